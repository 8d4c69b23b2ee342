"""Paired bootstrap resampling of BLEU and chrF: which gaps between models are real.

Koehn (2004), as sacrebleu's ``--paired-bs`` runs it: draw ``n_samples`` resamples of
the test lines (with replacement, the same draws for every system), recompute each
system's corpus score on each resample from its per-line sufficient statistics, and
read intervals off the sorted resampled scores. For every system and metric this
gives:

- ``score``: the corpus score on the real test set;
- ``mean``, ``low``, ``high``: the mean of the resampled scores and the 95% interval
  (sacrebleu's bounds: the ``n // 40``-th smallest and largest resampled score;
  sacrebleu prints ``mean (± (high - low) / 2)``);
- against the baseline: ``delta`` (score minus the baseline's), ``delta_low``,
  ``delta_high`` (the same bounds over the per-resample differences: a gap whose
  interval excludes 0 is real at the 95% level) and ``p_value`` (sacrebleu's: the
  share of resamples whose centred absolute difference exceeds the real one).

The resample indices are drawn exactly as sacrebleu draws them
(``numpy.random.default_rng(seed).choice``, seed 12345 by default, its
``SACREBLEU_SEED``), so ``mean``, ``low``/``high`` and ``p_value`` equal what
``sacrebleu --paired-bs`` reports for the same seed; the difference interval is ours.

:func:`pool` turns several test sets' resampled scores (e.g. the directions of a
benchmark, each resampled on its own) into the bootstrap distribution of their
unweighted mean, for the averages of a table.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

DEFAULT_SEED = 12345
DEFAULT_SAMPLES = 1000
METRICS = ("bleu", "chrf")


def _metric(name: str, tokenize: str):
    from sacrebleu.metrics import BLEU, CHRF

    if name == "bleu":
        return BLEU(tokenize=tokenize)
    if name == "chrf":
        return CHRF()
    raise ValueError(f"unknown metric {name!r}; choose from {list(METRICS)}")


def resample_indices(num_lines: int, n_samples: int = DEFAULT_SAMPLES,
                     seed: Optional[int] = DEFAULT_SEED) -> np.ndarray:
    """``[n_samples, num_lines]`` line indices drawn with replacement, as sacrebleu's
    paired bootstrap draws them for the same seed (None: fresh entropy)."""
    return np.random.default_rng(seed).choice(num_lines, size=(n_samples, num_lines),
                                              replace=True)


def resampled_scores(hyps: Sequence[str], refs: Sequence[str], metric: str,
                     indices: np.ndarray, tokenize: str = "13a") -> Dict[str, object]:
    """One system's corpus ``score`` and its score on every resample (``samples``,
    ``[n_samples]``) of the lines ``indices`` selects."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    m = _metric(metric, tokenize)
    stats = m._extract_corpus_statistics(list(hyps), [list(refs)])
    score = m._compute_score_from_stats(np.array(stats, dtype="float64").sum(0).tolist()).score
    # float32 as sacrebleu: the statistics are counts, exact in float32 below 2**24
    per_line = np.array(stats, dtype="float32")
    samples = np.array([m._compute_score_from_stats(per_line[idx].sum(0)).score
                        for idx in indices])
    return {"score": float(score), "samples": samples}


def interval(samples: np.ndarray):
    """(low, high): sacrebleu's 95% bounds of a bootstrap sample."""
    s = np.sort(np.asarray(samples))
    n = len(s)
    cut = n // 40
    return float(s[cut]), float(s[n - cut - 1])


def summarize(system: Dict[str, object], baseline: Optional[Dict[str, object]]) -> dict:
    """The reported numbers of one system and metric (see the module docstring) from
    :func:`resampled_scores` of it and of the baseline (None: the system is the
    baseline, no comparison)."""
    samples = system["samples"]
    low, high = interval(samples)
    out = {"score": system["score"], "mean": float(np.mean(samples)), "low": low, "high": high}
    if baseline is not None:
        diffs = samples - baseline["samples"]
        d_low, d_high = interval(diffs)
        real = abs(system["score"] - baseline["score"])
        centred = np.abs(diffs) - np.abs(diffs).mean()
        out.update(delta=system["score"] - baseline["score"], delta_low=d_low,
                   delta_high=d_high,
                   p_value=float((np.sum(centred > real) + 1) / (len(diffs) + 1)))
    return out


def paired_bootstrap(refs: Sequence[str], systems: Mapping[str, Sequence[str]],
                     baseline: str, tokenize: str = "13a", metrics: Sequence[str] = METRICS,
                     n_samples: int = DEFAULT_SAMPLES, seed: Optional[int] = DEFAULT_SEED,
                     keep_samples: bool = False) -> Dict[str, Dict[str, dict]]:
    """``{system: {metric: summary}}`` for every system (the baseline included, without
    a comparison) on one test set with a single reference stream ``refs``.
    ``keep_samples``: each summary also holds its resampled scores (``samples``, a numpy
    array; not JSON), for :func:`pool`."""
    if baseline not in systems:
        raise ValueError(f"baseline {baseline!r} is not among the systems {list(systems)}")
    if not refs:
        raise ValueError("paired bootstrap needs at least one test line")
    indices = resample_indices(len(refs), n_samples, seed)
    out: Dict[str, Dict[str, dict]] = {name: {} for name in systems}
    for metric in metrics:
        scored = {name: resampled_scores(hyps, refs, metric, indices, tokenize)
                  for name, hyps in systems.items()}
        for name in systems:
            base = None if name == baseline else scored[baseline]
            out[name][metric] = summarize(scored[name], base)
            if keep_samples:
                out[name][metric]["samples"] = scored[name]["samples"]
    return out


def pool(per_set: Sequence[Dict[str, Dict[str, dict]]], baseline: str,
         metrics: Sequence[str] = METRICS) -> Dict[str, Dict[str, dict]]:
    """The unweighted mean over test sets, with intervals: each set's resample b is an
    independent draw, so the mean of the sets' b-th resampled scores is the b-th
    bootstrap draw of the mean. ``per_set``: :func:`paired_bootstrap` results with
    ``keep_samples`` and equal ``n_samples``."""
    if not per_set:
        raise ValueError("nothing to pool")
    systems = list(per_set[0])
    out: Dict[str, Dict[str, dict]] = {name: {} for name in systems}
    for metric in metrics:
        pooled = {name: {"score": float(np.mean([s[name][metric]["score"] for s in per_set])),
                         "samples": np.mean([s[name][metric]["samples"] for s in per_set],
                                            axis=0)}
                  for name in systems}
        for name in systems:
            base = None if name == baseline else pooled[baseline]
            out[name][metric] = summarize(pooled[name], base)
    return out


def without_samples(result: Dict[str, Dict[str, dict]]) -> Dict[str, Dict[str, dict]]:
    """``result`` less the numpy ``samples`` (for JSON)."""
    return {name: {metric: {k: v for k, v in summary.items() if k != "samples"}
                   for metric, summary in by_metric.items()}
            for name, by_metric in result.items()}


def is_real(summary: dict) -> Optional[bool]:
    """Whether a compared system's 95% difference interval excludes 0 (None for the
    baseline)."""
    if "delta_low" not in summary:
        return None
    return summary["delta_low"] > 0 or summary["delta_high"] < 0


def format_delta(summary: dict, digits: int = 2) -> str:
    """``+1.23 [+0.40, +2.10]*`` (``*``: the interval excludes 0), or ``baseline``."""
    if "delta" not in summary:
        return "baseline"
    f = f"{{:+.{digits}f}}"
    mark = "*" if is_real(summary) else ""
    return (f"{f.format(summary['delta'])} [{f.format(summary['delta_low'])}, "
            f"{f.format(summary['delta_high'])}]{mark}")


def default_baseline(names: List[str]) -> str:
    """``dense`` when one of the models is called so, else the first."""
    return "dense" if "dense" in names else names[0]
