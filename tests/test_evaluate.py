"""Multi-reference scoring and scripts/evaluate.py (moe_fairseq.bible.evaluate)."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from moe_fairseq.bible import BibleDataError  # noqa: E402
from moe_fairseq.bible import evaluate as E  # noqa: E402
from moe_fairseq.bible.scoring import corpus_scores, score_direction  # noqa: E402
from conftest import subprocess_env  # noqa: E402

HYPS = [
    "In the beginning God created the heavens and the earth.",
    "The earth was empty and dark.",
    "God said, let there be light, and there was light.",
    "Jesus cried.",
]
WEB = [
    "In the beginning God created the heavens and the earth.",
    "The earth was formless and empty. Darkness was on the surface of the deep.",
    'God said, "Let there be light," and there was light.',
    "Jesus wept.",
]
KJV = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "Jesus wept.",
]
BBE = [
    "At the first God made the heaven and the earth.",
    "And the earth was waste and without form; and it was dark on the face of the deep.",
    "And God said, Let there be light: and there was light.",
    "Jesus was weeping.",
]
ZH_REF = ["起初，神创造天地。", "大地还是空虚混沌，深渊上一片黑暗。", "神说：“要有光！”就有了光。", "耶稣哭了。"]
ZH_HYP = ["起初，神创造了天地。", "地是空虚混沌，渊面黑暗。", "神说：要有光，就有了光。", "耶稣哭了。"]


# --------------------------------------------------------------------------- scoring


def test_single_reference_equals_sacrebleu():
    s = score_direction(HYPS, WEB, tgt_lang="en")
    assert s["bleu"] == sacrebleu.corpus_bleu(HYPS, [WEB]).score
    assert s["chrf"] == sacrebleu.corpus_chrf(HYPS, [WEB]).score
    assert "multi" not in s
    assert "nrefs:1" in s["bleu_signature"] and "tok:13a" in s["bleu_signature"]
    assert "nrefs:1" in s["chrf_signature"] and "nc:6" in s["chrf_signature"]


def test_multi_reference_equals_sacrebleu():
    s = score_direction(HYPS, WEB, {"k": KJV, "3": BBE}, tgt_lang="en")
    assert s["bleu"] == sacrebleu.corpus_bleu(HYPS, [WEB]).score
    multi = s["multi"]
    assert multi["bleu"] == sacrebleu.corpus_bleu(HYPS, [WEB, KJV, BBE]).score
    assert multi["chrf"] == sacrebleu.corpus_chrf(HYPS, [WEB, KJV, BBE]).score
    assert multi["bleu"] > s["bleu"]  # more references, more matches
    assert "nrefs:3" in multi["bleu_signature"] and multi["refs"] == ["primary", "k", "3"]


def test_target_language_tokenizers():
    zh = score_direction(ZH_HYP, ZH_REF, tgt_lang="zh")
    assert zh["bleu"] == sacrebleu.corpus_bleu(ZH_HYP, [ZH_REF], tokenize="zh").score
    assert "tok:zh" in zh["bleu_signature"]
    ja = score_direction(ZH_HYP, ZH_REF, tgt_lang="ja")
    assert ja["bleu"] == sacrebleu.corpus_bleu(ZH_HYP, [ZH_REF], tokenize="char").score
    forced = score_direction(HYPS, WEB, tgt_lang="en", tokenize="intl")
    assert forced["bleu"] == sacrebleu.corpus_bleu(HYPS, [WEB], tokenize="intl").score


def test_reference_length_mismatch_is_refused():
    with pytest.raises(ValueError, match="reference stream 1 has 3 lines"):
        corpus_scores(HYPS, [WEB, KJV[:3]])


# --------------------------------------------------------------------------- evaluate.py


def make_data(root: Path) -> Path:
    """A data folder as prepare_bible.py lays it out, references only."""
    data = root / "data"
    (data / "raw").mkdir(parents=True)
    manifest = {
        "complete": True,
        "directions": ["en-de", "de-en", "en-zh", "zh-en"],
        "lang_pairs": "en-de,de-en,en-zh,zh-en",
        "levels": {"de": "high", "zh": "very_low"},
        "pivot": {"lang": "en", "version": "4"},
        "extra_refs": {"versions": {"k": "King James 1611", "3": "Bible in Basic English 1949"}},
    }
    (data / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    de = ["Im Anfang schuf Gott die Himmel und die Erde.", "Die Erde war wüst und leer.",
          "Gott sprach: Es werde Licht!", "Jesus weinte."]
    files = {"test.en-de.en": WEB, "test.en-de.de": de, "test.de-en.ref-k": KJV,
             "test.de-en.ref-3": BBE, "test.en-zh.en": WEB, "test.en-zh.zh": ZH_REF,
             "test.zh-en.ref-k": KJV, "test.zh-en.ref-3": BBE}
    for name, lines in files.items():
        (data / "raw" / name).write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return data


def write_hyps(folder: Path, hyps: dict) -> Path:
    folder.mkdir(parents=True)
    for direction, lines in hyps.items():
        (folder / f"{direction}.hyp").write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    return folder


def test_evaluate_scores_tables_and_averages(tmp_path):
    data = make_data(tmp_path)
    de_hyp = ["Am Anfang schuf Gott Himmel und Erde.", "Die Erde war leer.", "Gott sprach: Licht!",
              "Jesus weinte."]
    a = write_hyps(tmp_path / "A", {"en-de": de_hyp, "de-en": HYPS, "en-zh": ZH_HYP, "zh-en": HYPS})
    b = write_hyps(tmp_path / "B", {"en-de": de_hyp[::-1], "de-en": KJV, "en-zh": ZH_REF,
                                    "zh-en": HYPS[::-1]})
    out = tmp_path / "res"
    E.run(["--data", str(data), "--hypotheses", f"A={a}", "--hypotheses", f"B={b}",
           "--output-dir", str(out), "--quiet"])
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [m["name"] for m in res["models"]] == ["A", "B"]
    rows = {r["direction"]: r for r in res["directions"]}
    assert list(rows) == ["en-de", "de-en", "en-zh", "zh-en"]
    hyps = {"A": {"en-de": de_hyp, "de-en": HYPS, "en-zh": ZH_HYP, "zh-en": HYPS},
            "B": {"en-de": de_hyp[::-1], "de-en": KJV, "en-zh": ZH_REF, "zh-en": HYPS[::-1]}}
    refs = {"en-de": ["Im Anfang schuf Gott die Himmel und die Erde.", "Die Erde war wüst und leer.",
                      "Gott sprach: Es werde Licht!", "Jesus weinte."],
            "de-en": WEB, "en-zh": ZH_REF, "zh-en": WEB}
    for model in ("A", "B"):
        for d, row in rows.items():
            tok = "zh" if d == "en-zh" else "13a"
            h = hyps[model][d]
            got = row["scores"][model]
            assert got["bleu"] == sacrebleu.corpus_bleu(h, [refs[d]], tokenize=tok).score
            assert got["chrf"] == sacrebleu.corpus_chrf(h, [refs[d]]).score
            if d.endswith("-en"):
                assert got["bleu_multi"] == sacrebleu.corpus_bleu(h, [WEB, KJV, BBE]).score
                assert got["chrf_multi"] == sacrebleu.corpus_chrf(h, [WEB, KJV, BBE]).score
            else:
                assert got["bleu_multi"] is None and got["chrf_multi"] is None
    assert rows["en-zh"]["scores"]["B"]["bleu"] == pytest.approx(100.0)
    assert rows["de-en"]["level"] == "high" and rows["zh-en"]["level"] == "very_low"
    assert "tok:zh" in rows["en-zh"]["signatures"]["bleu"]
    assert "nrefs:3" in rows["zh-en"]["signatures"]["bleu_multi"]

    avgs = {a["group"]: a for a in res["averages"]}
    assert list(avgs) == ["en→xx", "xx→en", "high", "very_low", "all"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for model in ("A", "B"):
        sc = lambda d, m="bleu": rows[d]["scores"][model][m]  # noqa: E731
        assert avgs["en→xx"]["scores"][model]["bleu"] == pytest.approx(mean([sc("en-de"), sc("en-zh")]))
        assert avgs["xx→en"]["scores"][model]["chrf_multi"] == pytest.approx(
            mean([sc("de-en", "chrf_multi"), sc("zh-en", "chrf_multi")]))
        assert avgs["high"]["scores"][model]["chrf"] == pytest.approx(
            mean([sc("en-de", "chrf"), sc("de-en", "chrf")]))
        assert avgs["very_low"]["scores"][model]["bleu_multi"] == pytest.approx(sc("zh-en", "bleu_multi"))
        assert avgs["all"]["scores"][model]["bleu"] == pytest.approx(mean([sc(d) for d in rows]))
        assert avgs["en→xx"]["scores"][model]["bleu_multi"] is None

    md = (out / "results.md").read_text(encoding="utf-8")
    header = next(l for l in md.splitlines() if l.startswith("| Direction"))
    assert header.split(" | ")[3:5] == ["BLEU A", "BLEU B"]
    assert "chrF-multi B" in header
    for d in rows:
        assert re.search(rf"^\| {d} \|", md, re.M)
    for group in avgs:
        assert f"**avg {group}**" in md
    b_en_zh = next(l for l in md.splitlines() if l.startswith("| en-zh |"))
    assert "100.00" in b_en_zh and "–" in b_en_zh
    for sig in res["signatures"]:
        assert sig in md


def test_evaluate_selected_directions_single_model_columns(tmp_path):
    data = make_data(tmp_path)
    a = write_hyps(tmp_path / "A", {"de-en": HYPS})
    out = tmp_path / "res"
    res = E.run(["--data", str(data), "--hypotheses", f"A={a}", "--directions", "de-en",
                 "--output-dir", str(out), "--quiet"])
    assert [r["direction"] for r in res["directions"]] == ["de-en"]
    header = next(l for l in (out / "results.md").read_text().splitlines() if l.startswith("| Dir"))
    assert header == "| Direction | Level | Lines | BLEU | chrF | BLEU-multi | chrF-multi |"


def test_empty_hypotheses_are_scored_with_a_warning(tmp_path):
    """A hypothesis file with empty lines (a decoding that lost sentences) is still
    scored, as empty translations, but no longer silently: a warning names the file
    and results.json counts them."""
    data = make_data(tmp_path)
    hyps = ["", HYPS[1], "  ", HYPS[3]]
    a = write_hyps(tmp_path / "A", {"de-en": hyps})
    out = tmp_path / "res"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), "--data", str(data),
         "--hypotheses", f"A={a}", "--directions", "de-en", "--output-dir", str(out), "--quiet"],
        capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert warnings == [f"evaluate.py: warning: {a / 'de-en.hyp'}: 2 of 4 hypotheses are empty "
                        "(lines 1, 3); they are scored as empty translations"], proc.stderr
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    row = res["directions"][0]
    assert row["empty_hypotheses"] == {"A": 2}
    assert row["scores"]["A"]["bleu"] == sacrebleu.corpus_bleu(hyps, [WEB]).score


def test_line_counts_must_match_the_references(tmp_path, capsys):
    """A hypothesis file with a line too few or too many is refused, naming it and the
    reference (scoring it would pair every later line with the wrong verse); so is an
    extra reference of another length, and a missing reference."""
    data = make_data(tmp_path)
    out = str(tmp_path / "o")
    ref = data / "raw" / "test.en-de.en"
    for n, name in [(3, "short"), (5, "long")]:
        a = write_hyps(tmp_path / name, {"de-en": (HYPS + ["Amen."])[:n]})
        assert _error(["--data", str(data), "--hypotheses", f"A={a}", "--directions", "de-en",
                       "--output-dir", out], capsys) == (
            f"evaluate.py: error: {a / 'de-en.hyp'} has {n} lines but the reference {ref} has "
            "4: one hypothesis per reference line, in order")
    a = tmp_path / "long"
    kjv = data / "raw" / "test.de-en.ref-k"
    kjv.write_text("".join(line + "\n" for line in KJV[:3]), encoding="utf-8")
    assert _error(["--data", str(data), "--hypotheses", f"A={a}", "--directions", "de-en",
                   "--output-dir", out], capsys) == (
        f"evaluate.py: error: {kjv} has 3 lines but the reference {ref} has 4: the references "
        "must hold the same verses (rerun prepare_bible.py)")
    ref.unlink()
    assert _error(["--data", str(data), "--hypotheses", f"A={a}", "--directions", "de-en",
                   "--output-dir", out], capsys) == (
        f"evaluate.py: error: reference for de-en not found: {ref} (rerun prepare_bible.py)")


def test_generate_command(tmp_path):
    manifest = {"lang_pairs": "en-de,de-en", "lang_dict": "bin/langs.txt"}
    args = E.build_parser().parse_args([
        "--data", "D", "--checkpoints", "c.pt", "--output-dir", "o", "--beam", "4",
        "--max-tokens", "2000", "--moe-eval-capacity-token-fraction", "0.25", "--cpu",
        "--generate-args", "--max-len-b 50 --nbest 1"])
    cmd = E.generate_command(args, "D", manifest, "c.pt", "de-en")
    joined = " ".join(cmd)
    for flag in ("--task translation_multi_simple_epoch", "--lang-pairs en-de,de-en",
                 f"--lang-dict {os.path.join('D', 'bin/langs.txt')}", "--source-lang de",
                 "--target-lang en", "--encoder-langtok tgt", "--decoder-langtok",
                 "--gen-subset test", "--beam 4", "--max-tokens 2000", "--cpu",
                 "--required-batch-size-multiple 1", "--max-len-b 50 --nbest 1",
                 f"--user-dir {REPO_ROOT / 'moe_fairseq'}"):
        assert flag in joined, flag
    assert cmd[cmd.index("--path") + 1] == "c.pt" and cmd[3] == os.path.join("D", "bin")
    assert "--batch-size" not in cmd and "--post-process" not in cmd
    overrides = ast.literal_eval(cmd[cmd.index("--model-overrides") + 1])
    assert overrides == {"moe_eval_capacity_token_fraction": 0.25}

    plain = E.build_parser().parse_args(["--data", "D", "--output-dir", "o",
                                         "--no-decoder-langtok", "--encoder-langtok", "none"])
    cmd = E.generate_command(plain, "D", manifest, "c.pt", "en-de")
    assert "--model-overrides" not in cmd and "--decoder-langtok" not in cmd
    assert "--encoder-langtok" not in cmd and cmd[cmd.index("--batch-size") + 1] == "64"


def test_generate_output_parsing_and_detokenizing(tmp_path):
    import sentencepiece as spm

    text = "\n".join([
        "2026-01-01 | INFO | fairseq_cli.generate | loaded",
        "S-1\t__en__ ▁b",
        "H-1\t-0.5\t▁world ▁again",
        "D-1\t-0.5\tworld again",
        "H-0\t-0.2\t▁hello ▁wor ld",
        "H-2\t-0.9\t",
        "P-2\t-0.1",
    ])
    pieces = E.parse_generate_output(text, 3)
    assert pieces == ["▁hello ▁wor ld", "▁world ▁again", ""]
    with pytest.raises(BibleDataError, match="2 hypotheses for 3 test lines"):
        E.parse_generate_output("H-0\t-1\t▁a\nH-2\t-1\t▁b", 3)

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\nworld again\nhello again world\n" * 20, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"),
                                   vocab_size=20, hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    encoded = [" ".join(sp.encode(l, out_type=str)) for l in ("hello world", "world again")]
    assert E.detokenize(encoded, sp) == ["hello world", "world again"]
    with_unk = encoded[0].split()
    with_unk.insert(1, "<unk>")  # a piece fairseq printed for its unknown symbol
    decoded = E.detokenize([" ".join(with_unk), ""], sp)
    assert "⁇" in decoded[0] and decoded[0].endswith("world") and decoded[1] == ""


def _error(argv, capsys):
    assert E.main(argv) == 2
    lines = [l for l in re.split(r"[\r\n]", capsys.readouterr().err) if "error" in l]
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error: ")
    return lines[0]


def test_errors_are_one_clear_line(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert "no manifest.json" in _error(["--data", str(tmp_path), "--hypotheses", "A=x",
                                         "--output-dir", out], capsys)
    data = make_data(tmp_path)
    a = write_hyps(tmp_path / "A", {"de-en": HYPS})
    assert "unknown direction(s) xx-en" in _error(
        ["--data", str(data), "--hypotheses", f"A={a}", "--directions", "xx-en",
         "--output-dir", out], capsys)
    assert "nothing to evaluate" in _error(["--data", str(data), "--output-dir", out], capsys)
    assert "checkpoint not found" in _error(
        ["--data", str(data), "--checkpoints", str(tmp_path / "none.pt"), "--output-dir", out], capsys)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "checkpoint_best.pt").write_bytes(b"")
    assert "--names gives 2 name(s) for 1 checkpoint(s)" in _error(
        ["--data", str(data), "--checkpoints", str(tmp_path / "ck"), "--names", "a", "b",
         "--output-dir", out], capsys)
    assert "hypotheses for en-de not found" in _error(
        ["--data", str(data), "--hypotheses", f"A={a}", "--output-dir", out], capsys)


def test_checkpoint_discovery_and_names(tmp_path):
    for run in ("dense", "moe8"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        for name in ("checkpoint_best.pt", "checkpoint_last.pt", "checkpoint3.pt"):
            (tmp_path / "runs" / run / name).write_bytes(b"")
    found = E.find_checkpoints([str(tmp_path / "runs")], "checkpoint_best.pt")
    assert [E.default_name(p) for p in found] == ["dense", "moe8"]
    found = E.find_checkpoints([str(tmp_path / "runs" / "moe8")], "checkpoint*.pt")
    assert [E.default_name(p) for p in found] == ["moe8/checkpoint3", "moe8", "moe8/last"]
    assert E._unique(["a", "a", "b"]) == ["a", "a#2", "b"]


# --------------------------------------------------------------------------- real decoding


def test_decode_with_a_real_moe_checkpoint(tmp_path):
    """prepare (fixture DB) -> 1 update of moe_transformer_tiny -> evaluate.py."""
    from test_bible_prep import make_db, prep_args
    from moe_fairseq.bible import prepare as P

    db = make_db(tmp_path / "bible.db")
    data = tmp_path / "data"
    argv = prep_args(db, data, "--max-test-verses", "50")
    argv[argv.index("--langs") + 1] = "de"
    manifest = P.run(argv, progress=False)
    ckpt = tmp_path / "ckpt"
    train = [
        sys.executable, "-m", "fairseq_cli.train", str(data / "bin"),
        "--user-dir", str(REPO_ROOT / "moe_fairseq"), "--task", "translation_multi_simple_epoch",
        "--lang-pairs", manifest["lang_pairs"], "--lang-dict", str(data / "bin" / "langs.txt"),
        "--encoder-langtok", "tgt", "--decoder-langtok", "--arch", "moe_transformer_tiny",
        "--criterion", "moe_label_smoothed_cross_entropy", "--optimizer", "adam", "--lr", "0.001",
        "--max-tokens", "1000", "--max-update", "1", "--cpu", "--save-dir", str(ckpt),
        "--no-epoch-checkpoints", "--disable-validation", "--no-progress-bar", "--seed", "1",
    ]
    proc = subprocess.run(train, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = tmp_path / "eval"
    res = E.run(["--data", str(data), "--checkpoints", str(ckpt / "checkpoint_last.pt"),
                 "--names", "tiny", "--directions", "de-en", "--beam", "1", "--batch-size", "7",
                 "--cpu",
                 "--moe-eval-capacity-token-fraction", "0.5", "--output-dir", str(out),
                 "--generate-args", "--max-len-b 4", "--quiet"])
    for direction in ("de-en",):  # one direction: each fairseq-generate run costs seconds
        hyps = (out / "tiny" / f"{direction}.hyp").read_text(encoding="utf-8").splitlines()
        assert len(hyps) == 50  # every test line, though 50 is no multiple of the batch size
        assert not any("__de__" in h or "__en__" in h or "▁" in h for h in hyps)
        log = (out / "tiny" / f"{direction}.generate.txt").read_text(encoding="utf-8")
        assert "moe_eval_capacity_token_fraction" in log.splitlines()[0]
    row = {r["direction"]: r for r in res["directions"]}["de-en"]
    assert row["n"] == 50 and row["scores"]["tiny"]["bleu_multi"] is not None
    assert (out / "results.md").is_file()


DE_HYP = ["Am Anfang schuf Gott Himmel und Erde.", "Die Erde war leer.", "Gott sprach: Licht!",
          "Jesus weinte."]


def two_models(tmp_path):
    """Data and hypotheses of two models A and B on en-de and de-en."""
    data = make_data(tmp_path)
    a = write_hyps(tmp_path / "A", {"en-de": DE_HYP, "de-en": HYPS})
    b = write_hyps(tmp_path / "B", {"en-de": DE_HYP[::-1], "de-en": KJV})
    return data, a, b, DE_HYP


def test_evaluate_paired_bootstrap_table(tmp_path, capsys):
    """Two models: results.json holds each direction's and each average's paired
    bootstrap against the baseline (B by --baseline), equal to significance.py run on
    the same lines; results.md prints the gaps with their intervals. A bad --baseline
    or --bootstrap is refused before anything is read."""
    from moe_fairseq.bible import significance

    data, a, b, de_hyp = two_models(tmp_path)
    out = tmp_path / "res"
    res = E.run(["--data", str(data), "--hypotheses", f"A={a}", "--hypotheses", f"B={b}",
                 "--directions", "en-de,de-en", "--baseline", "B", "--bootstrap", "200",
                 "--output-dir", str(out), "--quiet"])
    assert res["bootstrap"] == {"baseline": "B", "samples": 200, "seed": 12345,
                                "references": "single (the primary)"}
    rows = {r["direction"]: r for r in res["directions"]}
    want = significance.paired_bootstrap(WEB, {"A": HYPS, "B": KJV}, "B", n_samples=200)
    assert rows["de-en"]["bootstrap"] == want
    assert "delta" not in rows["de-en"]["bootstrap"]["B"]["bleu"]
    assert rows["de-en"]["bootstrap"]["A"]["bleu"]["delta"] == pytest.approx(
        rows["de-en"]["scores"]["A"]["bleu"] - rows["de-en"]["scores"]["B"]["bleu"])
    avg = next(x for x in res["averages"] if x["group"] == "all")
    assert avg["bootstrap"]["A"]["chrf"]["delta"] == pytest.approx(
        avg["scores"]["A"]["chrf"] - avg["scores"]["B"]["chrf"])
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "Paired bootstrap against **B** (200 resamples" in md
    assert "| Direction | ΔBLEU A − B | ΔchrF A − B |" in md
    line = next(l for l in md.splitlines() if l.startswith("| de-en | ") and "[" in l)
    assert significance.format_delta(want["A"]["bleu"]) in line
    assert "| **avg all** | " in md.split("Paired bootstrap")[1]

    for flags, msg in ((["--baseline", "C"], "--baseline C is not one of the models: A, B"),
                       (["--bootstrap", "-1"], "--bootstrap must be >= 0, got -1")):
        assert _error(["--data", str(data), "--hypotheses", f"A={a}", "--hypotheses", f"B={b}",
                       "--directions", "de-en", "--output-dir", str(tmp_path / "x"),
                       *flags], capsys) == f"evaluate.py: error: {msg}"


def test_evaluate_writes_sample_translations(tmp_path):
    """--samples 2: the same two test lines of each direction for every model, with
    source, reference and outputs, in results.json and samples.md."""
    data, a, b, de_hyp = two_models(tmp_path)
    out = tmp_path / "res"
    res = E.run(["--data", str(data), "--hypotheses", f"A={a}", "--hypotheses", f"B={b}",
                 "--directions", "en-de,de-en", "--samples", "2", "--bootstrap", "0",
                 "--output-dir", str(out), "--quiet"])
    assert res["bootstrap"] is None
    refs = {"de-en": WEB, "en-de": (data / "raw" / "test.en-de.de").read_text().splitlines()}
    sources = {"de-en": (data / "raw" / "test.en-de.de").read_text().splitlines(),
               "en-de": WEB}
    outputs = {"A": {"en-de": de_hyp, "de-en": HYPS}, "B": {"en-de": de_hyp[::-1], "de-en": KJV}}
    assert set(res["samples"]) == {"en-de", "de-en"}
    for d, items in res["samples"].items():
        assert len(items) == 2 and items[0]["line"] < items[1]["line"]
        for item in items:
            i = item["line"]
            assert item["source"] == sources[d][i] and item["reference"] == refs[d][i]
            assert item["outputs"] == {m: outputs[m][d][i] for m in ("A", "B")}
    md = (out / "samples.md").read_text(encoding="utf-8")
    assert "## de-en" in md and "## en-de" in md
    first = res["samples"]["de-en"][0]
    assert f"reference  {first['reference']}" in md and f"B          {first['outputs']['B']}" in md
    assert E.sample_lines(["one two"] * 3 + ["w " * 10] * 7, 3) == [4, 6, 8]
    assert E.sample_lines(["x"] * 5, 0) == [] and E.sample_lines(["x"] * 2, 3) == [0, 1]
