"""Paired bootstrap intervals (moe_fairseq/bible/significance.py) on constructed cases:
equal to sacrebleu's own paired test where it reports the same numbers, and to a
direct recomputation (corpus scores of every resampled test set) for the rest."""

import numpy as np
import pytest

from moe_fairseq.bible import significance as sig

WORDS = ("the lord said unto moses go and speak to the children of israel that they "
         "bring me an offering of every man whose heart is willing").split()


def constructed(n=40, seed=0):
    """References and two systems: ``good`` keeps most words, ``poor`` fewer."""
    rng = np.random.default_rng(seed)
    refs, good, poor = [], [], []
    for _ in range(n):
        ref = list(rng.choice(WORDS, size=rng.integers(6, 14)))
        refs.append(" ".join(ref))
        good.append(" ".join(w for w in ref if rng.random() > 0.15))
        poor.append(" ".join(w if rng.random() > 0.5 else str(rng.choice(WORDS)) for w in ref))
    return refs, {"dense": poor, "moe": good}


def test_equals_sacrebleu_paired_bootstrap(monkeypatch):
    """mean, 95% half-width and p-value as ``sacrebleu --paired-bs`` computes them."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    monkeypatch.setenv("SACREBLEU_SEED", "12345")
    refs, systems = constructed()
    ours = sig.paired_bootstrap(refs, systems, "dense", n_samples=300)
    test = PairedTest([("dense", systems["dense"]), ("moe", systems["moe"])],
                      {"BLEU": BLEU(), "chrF": CHRF()}, [refs], test_type="bs", n_samples=300)
    _, theirs = test()
    for metric, name in (("bleu", "BLEU"), ("chrf", "chrF2")):
        got = ours["moe"][metric]
        res = theirs[name][1]  # [baseline, moe]
        assert got["score"] == pytest.approx(res.score, abs=1e-9)
        assert got["mean"] == pytest.approx(res.mean, abs=1e-9)
        assert (got["high"] - got["low"]) / 2 == pytest.approx(res.ci, abs=1e-9)
        assert got["p_value"] == pytest.approx(res.p_value, abs=1e-12)
        assert "delta" not in ours["dense"][metric]


def test_difference_interval_equals_direct_recomputation():
    """Resample the lines with the same draws, score each resampled corpus with
    sacrebleu's corpus_score, difference, take the 8th smallest and largest of 300."""
    from sacrebleu.metrics import BLEU, CHRF

    refs, systems = constructed(n=30, seed=3)
    n = 300
    ours = sig.paired_bootstrap(refs, systems, "dense", n_samples=n, seed=7)
    idx = np.random.default_rng(7).choice(len(refs), size=(n, len(refs)), replace=True)
    for metric, scorer in (("bleu", BLEU()), ("chrf", CHRF())):
        diffs = []
        for row in idx:
            r = [refs[i] for i in row]
            score = {name: scorer.corpus_score([hyps[i] for i in row], [r]).score
                     for name, hyps in systems.items()}
            diffs.append(score["moe"] - score["dense"])
        diffs = np.sort(diffs)
        got = ours["moe"][metric]
        # sacrebleu scores resamples from float32 sums (as we do): ~1e-5 of float64
        assert got["delta_low"] == pytest.approx(diffs[n // 40], abs=1e-4)
        assert got["delta_high"] == pytest.approx(diffs[n - n // 40 - 1], abs=1e-4)
        real = (scorer.corpus_score(systems["moe"], [refs]).score
                - scorer.corpus_score(systems["dense"], [refs]).score)
        assert got["delta"] == pytest.approx(real, abs=1e-9)
        assert sig.is_real(got)  # the constructed gap is large
        assert got["delta_low"] > 0 and sig.format_delta(got).endswith("*")


def test_identical_systems_gap_is_not_real_and_pool_averages():
    refs, systems = constructed(n=25, seed=5)
    same = {"dense": systems["dense"], "copy": list(systems["dense"]), "moe": systems["moe"]}
    a = sig.paired_bootstrap(refs, same, "dense", n_samples=200, keep_samples=True)
    b = sig.paired_bootstrap(refs[:20], {k: v[:20] for k, v in same.items()}, "dense",
                             n_samples=200, seed=9, keep_samples=True)
    copy = a["copy"]["bleu"]
    assert copy["delta"] == copy["delta_low"] == copy["delta_high"] == 0.0
    assert not sig.is_real(copy) and sig.format_delta(copy) == "+0.00 [+0.00, +0.00]"
    pooled = sig.pool([a, b], "dense")
    for metric in sig.METRICS:
        want = (a["moe"][metric]["score"] + b["moe"][metric]["score"]) / 2
        assert pooled["moe"][metric]["score"] == pytest.approx(want)
        diffs = ((a["moe"][metric]["samples"] - a["dense"][metric]["samples"])
                 + (b["moe"][metric]["samples"] - b["dense"][metric]["samples"])) / 2
        assert pooled["moe"][metric]["delta_low"] == pytest.approx(np.sort(diffs)[5])
    clean = sig.without_samples(a)
    assert "samples" not in clean["moe"]["bleu"] and "samples" in a["moe"]["bleu"]


def test_bad_input_is_named():
    refs, systems = constructed(n=5)
    with pytest.raises(ValueError, match="baseline 'base'"):
        sig.paired_bootstrap(refs, systems, "base")
    with pytest.raises(ValueError, match="4 hypotheses for 5 references"):
        sig.paired_bootstrap(refs, {"dense": systems["dense"][:4]}, "dense")
