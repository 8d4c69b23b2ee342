"""scripts/evaluate.py on fairseq data-bins without manifest.json, and the check of a
checkpoint's vocabulary against the data's, run as a user runs them (subprocesses)."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sacrebleu

from conftest import N_TEST, REPO_ROOT, _sentences, reverse, run_cli, subprocess_env, word_map

EVALUATE = REPO_ROOT / "scripts" / "evaluate.py"
PREFIX = "evaluate.py: error: "


def evaluate(*args, check=True):
    proc = subprocess.run([sys.executable, str(EVALUATE), *map(str, args)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def one_error_line(proc) -> str:
    """The whole of stderr must be one ``evaluate.py: error:`` line (no traceback, no
    fairseq dump)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0][len(PREFIX):]


def in_process_error(argv, capsys) -> str:
    """As :func:`one_error_line`, through ``evaluate.main`` in this process (no
    interpreter start: for the variations of a case a subprocess test covers)."""
    from moe_fairseq.bible import evaluate as E

    assert E.main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), lines
    return lines[0][len(PREFIX):]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def text(sents):
    return [" ".join(s) for s in sents]


# The fixture's test sets (conftest.multilingual_data_bin): a-b reverses, a-c maps words.
TEST_AB = _sentences(N_TEST, 3)
TEST_AC = _sentences(N_TEST, 13)
REFS = {"a-b": text(reverse(s) for s in TEST_AB), "a-c": text(word_map(s) for s in TEST_AC),
        "b-a": text(TEST_AB)}


@pytest.fixture(scope="module")
def multi_ckpt(multilingual_data_bin, tmp_path_factory) -> Path:
    """moe_transformer_tiny after one update of translation_multi_simple_epoch on a-b, a-c,
    without --langs/--lang-dict (fairseq then sorts the languages of --lang-pairs)."""
    save = tmp_path_factory.mktemp("multi_ckpt")
    run_cli("train", [
        multilingual_data_bin, "--user-dir", REPO_ROOT / "moe_fairseq",
        "--task", "translation_multi_simple_epoch", "--lang-pairs", "a-b,a-c",
        "--encoder-langtok", "tgt", "--decoder-langtok", "--arch", "moe_transformer_tiny",
        "--criterion", "moe_label_smoothed_cross_entropy", "--optimizer", "adam", "--lr", "1e-3",
        "--max-tokens", "1000", "--max-update", "1", "--cpu", "--save-dir", save,
        "--no-epoch-checkpoints", "--disable-validation", "--no-progress-bar", "--seed", "1",
        "--num-workers", "0",
    ])
    return save / "checkpoint_last.pt"


@pytest.fixture
def plain_bin(multilingual_data_bin, tmp_path) -> Path:
    """A copy of the fixture data-bin: dict.{a,b,c}.txt and test/train/valid of a-b, a-c,
    no manifest.json, no langs.txt, no SentencePiece model."""
    dest = tmp_path / "databin"
    shutil.copytree(multilingual_data_bin, dest)
    return dest


DECODE = ["--beam", "1", "--batch-size", "16", "--cpu", "--quiet",
          "--generate-args", "--max-len-b 8"]


def test_plain_data_bin_is_decoded_and_scored(plain_bin, multi_ckpt, tmp_path):
    """Directions from the test.X-Y.X.idx files, references from the binarized targets
    (word-level dictionary: scored as they are), languages from the dict files; then
    --directions with a direction that fairseq reads from the reversed pair's files."""
    before = sha256(multi_ckpt)
    out = tmp_path / "out"
    evaluate("--data", plain_bin, "--checkpoints", multi_ckpt, "--names", "tiny",
             "--output-dir", out, *DECODE)
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = {r["direction"]: r for r in res["directions"]}
    assert list(rows) == ["a-b", "a-c"]
    assert res["languages"] == {"langs": ["a", "b", "c"], "from": "dict.<lang>.txt files"}
    refs = res["references"]
    assert refs["detokenizer"] == {"post_process": "none"}
    assert refs["files"] == {d: str(plain_bin / f"test.{d}.{d[-1]}") for d in rows}
    assert refs["unknown_tokens"] == {"a-b": 0, "a-c": 0}
    for d, row in rows.items():
        hyps = (out / "tiny" / f"{d}.hyp").read_text(encoding="utf-8").splitlines()
        assert row["n"] == len(hyps) == N_TEST
        assert row["scores"]["tiny"]["bleu"] == sacrebleu.corpus_bleu(hyps, [REFS[d]]).score
        assert row["scores"]["tiny"]["chrf"] == sacrebleu.corpus_chrf(hyps, [REFS[d]]).score
        assert row["scores"]["tiny"]["bleu_multi"] is None
        command = (out / "tiny" / f"{d}.generate.txt").read_text(encoding="utf-8").splitlines()[0]
        assert f" {plain_bin} " in command and "--langs a,b,c" in command
        assert "--lang-dict" not in command
    # a is in every direction: it is the pivot of the averages
    assert [a["group"] for a in res["averages"]] == ["a→xx", "all"]
    md = (out / "results.md").read_text(encoding="utf-8")
    assert md.startswith(f"# Evaluation: {plain_bin}\n")
    assert "| Direction | Lines | BLEU | chrF |" in md
    assert refs["description"] in md and "scored as fairseq writes them" in md

    out2 = tmp_path / "out2"
    evaluate("--data", plain_bin, "--checkpoints", multi_ckpt, "--names", "tiny",
             "--directions", "b-a", "--output-dir", out2, *DECODE)
    res = json.loads((out2 / "results.json").read_text(encoding="utf-8"))
    assert [r["direction"] for r in res["directions"]] == ["b-a"]
    assert res["references"]["files"] == {"b-a": str(plain_bin / "test.a-b.a")}
    hyps = (out2 / "tiny" / "b-a.hyp").read_text(encoding="utf-8").splitlines()
    assert res["directions"][0]["scores"]["tiny"]["bleu"] == sacrebleu.corpus_bleu(
        hyps, [REFS["b-a"]]).score
    assert sha256(multi_ckpt) == before


def test_checkpoint_vocabulary_against_the_data(plain_bin, multi_ckpt, data_bin, tmp_path,
                                                capsys):
    """The data's dictionary size is 4 special symbols + the dict file's lines + one
    token per language; a checkpoint of other data stops before any decoding, in one
    line naming both sizes; the checkpoint file is left as it was."""
    from moe_fairseq.bible import evaluate as E

    # <s> <pad> </s> <unk> + 30 words and 6 madeupwords (fairseq-preprocess pads to a
    # multiple of 8) + __a__ __b__ __c__: the sizes fairseq trained with
    assert len((plain_bin / "dict.a.txt").read_text().splitlines()) == 36
    assert E.checkpoint_vocabulary(str(multi_ckpt)) == {
        "encoder.embed_tokens.weight": 43, "decoder.embed_tokens.weight": 43}
    before = sha256(multi_ckpt)
    out = tmp_path / "out"
    # data_bin: the same 30 words, but two languages (src, tgt)
    msg = one_error_line(evaluate("--data", data_bin, "--checkpoints", multi_ckpt,
                                  "--output-dir", out, *DECODE, check=False))
    assert msg == (
        f"checkpoint {multi_ckpt} was trained with a vocabulary of 43 entries "
        f"(encoder.embed_tokens.weight), --data {data_bin} gives 42 ({data_bin / 'dict.src.txt'}: "
        "36 entries + 4 special + 2 language tokens): score it on the data it was trained on")
    assert not list(out.rglob("*.generate.txt"))  # nothing was decoded

    # one language more than in training: given with --langs, or listed in langs.txt
    msg = in_process_error(["--data", plain_bin, "--checkpoints", multi_ckpt,
                            "--langs", "a,b,c,d", "--output-dir", out, *DECODE], capsys)
    assert "gives 44 (" in msg and "+ 4 language tokens" in msg
    (plain_bin / "langs.txt").write_text("a\nb\nc\nd\n", encoding="utf-8")
    msg = in_process_error(["--data", plain_bin, "--checkpoints", multi_ckpt,
                            "--directions", "a-c", "--output-dir", out, *DECODE], capsys)
    assert msg.startswith(f"checkpoint {multi_ckpt} was trained with a vocabulary of 43 ")
    assert "gives 44 (" in msg
    assert sha256(multi_ckpt) == before


def test_bad_data_folders_are_one_line(plain_bin, tmp_path, capsys):
    """Subprocesses for a folder that is no data and a direction without test files;
    the other cases in this process."""
    out = tmp_path / "out"
    hyp = tmp_path / "hyp"
    hyp.mkdir()
    flags = ["--hypotheses", f"A={hyp}", "--output-dir", out, "--quiet"]

    def error(*args):
        return in_process_error([*args, *flags], capsys)

    missing = tmp_path / "nowhere"
    assert error("--data", missing) == f"--data {missing} does not exist"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert one_error_line(evaluate("--data", empty, *flags, check=False)) == (
        f"--data {empty} has no manifest.json (the --out folder of prepare_bible.py) and no "
        "dict.<lang>.txt files (a fairseq-preprocess data-bin)")
    # a prepare_bible.py folder that never got its manifest
    unfinished = tmp_path / "unfinished"
    shutil.copytree(plain_bin, unfinished / "bin")
    assert error("--data", unfinished) == (
        f"--data {unfinished} has no manifest.json (did prepare_bible.py finish?): rerun "
        f"prepare_bible.py, or pass --data {unfinished / 'bin'} to score its binarized test data")
    assert one_error_line(evaluate("--data", plain_bin, "--directions", "b-c", *flags,
                                   check=False)) == (
        f"--directions b-c: {plain_bin} has no test files for it (test.b-c.b.idx or "
        "test.c-b.b.idx, both sides); the data has: a-b, a-c")
    assert error("--data", plain_bin, "--directions", "a-b", "--langs", "a,c") == (
        "--directions a-b: b not in the language list of --langs (a,c)")
    for f in plain_bin.glob("test.*"):
        f.unlink()
    assert error("--data", plain_bin) == (
        f"--data {plain_bin} has no binarized test data (test.<src>-<tgt>.<src>.idx and .bin, "
        "both sides), which evaluate.py decodes and scores")


def test_sentencepiece_data_bin_references(tmp_path, capsys):
    """A data-bin of SentencePiece pieces (prepare_bible.py's bin/ without its manifest):
    the references are decoded with the spm.model found next to it and match the raw
    text; without the model, fairseq's sentencepiece post-processing gives the same text
    here; a model of other data is not used. Hypotheses given as text score 100."""
    from test_bible_prep import make_db, prep_args
    from moe_fairseq.bible import prepare as P

    db = make_db(tmp_path / "bible.db")
    prepared = tmp_path / "prepared"
    argv = prep_args(db, prepared, "--max-test-verses", "50")
    argv[argv.index("--langs") + 1] = "de"
    P.run(argv, progress=False)
    raw = {"en-de": prepared / "raw" / "test.en-de.de", "de-en": prepared / "raw" / "test.en-de.en"}
    hyp = tmp_path / "hyp"
    hyp.mkdir()
    for d, path in raw.items():
        shutil.copyfile(path, hyp / f"{d}.hyp")

    # In place: the note points at the manifest, the spm.model comes from the parent.
    out = tmp_path / "o1"
    proc = evaluate("--data", prepared / "bin", "--hypotheses", f"raw={hyp}", "--directions",
                    "en-de,de-en", "--output-dir", out, "--quiet")
    assert proc.stderr.strip() == (
        f"evaluate.py: note: {prepared} is a prepare_bible.py folder: --data {prepared} scores "
        "against its raw references (multi-reference for xx->en)")
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["references"]["detokenizer"] == {"spm_model": str(prepared / "spm.model")}
    assert res["languages"]["from"] == str(prepared / "bin" / "langs.txt")
    for row in res["directions"]:
        assert row["n"] == 50 and row["scores"]["raw"]["bleu"] == pytest.approx(100.0)

    # A bare copy of bin/ (no model anywhere near): the pieces say sentencepiece.
    bare = tmp_path / "bare" / "bin"
    shutil.copytree(prepared / "bin", bare)
    out = tmp_path / "o2"
    proc = evaluate("--data", bare, "--hypotheses", f"raw={hyp}", "--output-dir", out, "--quiet")
    assert proc.stderr == ""
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["references"]["detokenizer"] == {"post_process": "sentencepiece"}
    assert [r["direction"] for r in res["directions"]] == ["en-de"]  # from the files
    assert res["directions"][0]["scores"]["raw"]["bleu"] == pytest.approx(100.0)
    assert "post-processed as fairseq's --post-process sentencepiece does" in (
        out / "results.md").read_text(encoding="utf-8")

    # Named as the README's data-bin command names it (--spm-model): decoded with it.
    out = tmp_path / "o2b"
    proc = evaluate("--data", bare, "--hypotheses", f"raw={hyp}", "--spm-model",
                    prepared / "spm.model", "--output-dir", out, "--quiet")
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert res["references"]["detokenizer"] == {"spm_model": str(prepared / "spm.model")}
    assert res["directions"][0]["scores"]["raw"]["bleu"] == pytest.approx(100.0)

    # A SentencePiece model of other pieces next to the data is noticed, not used ...
    import sentencepiece as spm

    corpus = tmp_path / "other.txt"
    corpus.write_text("lorem ipsum dolor sit amet\n" * 50, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(bare.parent / "other"),
                                   vocab_size=20, hard_vocab_limit=False, minloglevel=2)
    from moe_fairseq.bible import evaluate as E

    out = tmp_path / "o3"
    res = E.run(["--data", str(bare), "--hypotheses", f"raw={hyp}", "--output-dir", str(out),
                 "--quiet"])
    other = bare.parent / "other.model"
    assert capsys.readouterr().err.startswith(f"evaluate.py: note: not decoding with {other}: ")
    assert res["references"]["detokenizer"] == {"post_process": "sentencepiece"}
    # ... and refused when named with --spm-model; a manifest folder takes none of the flags.
    msg = in_process_error(["--data", bare, "--hypotheses", f"raw={hyp}", "--output-dir", out,
                            "--spm-model", other], capsys)
    assert msg.startswith(f"--spm-model {other} does not fit the data: ")
    msg = in_process_error(["--data", prepared, "--hypotheses", f"raw={hyp}", "--output-dir", out,
                            "--post-process", "none"], capsys)
    assert msg.startswith("--post-process applies to data-bins without manifest.json; ")


def test_one_process_decoding_equals_one_process_per_direction(plain_bin, multi_ckpt, tmp_path):
    """--one-process (the model loaded once, every direction decoded by fairseq's loop in
    evaluate.py's process) gives exactly fairseq-generate's hypotheses, direction by
    direction, and the same scores."""
    per = tmp_path / "per"
    one = tmp_path / "one"
    flags = ["--data", plain_bin, "--checkpoints", multi_ckpt, "--names", "tiny",
             "--directions", "a-b,a-c,b-a", "--beam", "2", "--batch-size", "7", "--cpu", "--quiet",
             "--generate-args", "--max-len-b 8"]
    evaluate(*flags, "--output-dir", per)
    evaluate(*flags, "--output-dir", one, "--one-process")
    a = json.loads((per / "results.json").read_text(encoding="utf-8"))
    b = json.loads((one / "results.json").read_text(encoding="utf-8"))
    assert b["decoding"]["one_process"] and not a["decoding"]["one_process"]
    for d in ("a-b", "a-c", "b-a"):
        assert (one / "tiny" / f"{d}.hyp").read_text() == (per / "tiny" / f"{d}.hyp").read_text()
        h_per = [l.split("\t")[2] for l in (per / "tiny" / f"{d}.generate.txt").read_text(
            encoding="utf-8").splitlines() if l.startswith("H-")]
        h_one = [l.split("\t", 1)[1] for l in (one / "tiny" / f"{d}.generate.txt").read_text(
            encoding="utf-8").splitlines() if l.startswith("H-")]
        assert len(h_one) == N_TEST and sorted(h_per) == sorted(h_one)
    assert [r["scores"] for r in a["directions"]] == [r["scores"] for r in b["directions"]]
    timing = b["models"][0]["decoding"]
    assert set(timing) == {"a-b", "a-c", "b-a"} and all(t["tokens"] > 0 for t in timing.values())
