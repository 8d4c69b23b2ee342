"""scripts/gpu_compare.py end to end on CPU: a tiny prebuilt benchmark (the fixture
database of test_bible_prep), tiny dense and MoE models trained for a few seconds each,
every direction decoded and scored."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "gpu_compare.py"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from conftest import subprocess_env  # noqa: E402
from moe_fairseq.bible import significance  # noqa: E402

BUDGET = 3  # seconds of training per method


def run_script(*argv, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], cwd=str(REPO_ROOT),
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def small_benchmark(tmp_path_factory):
    """de <-> en from the fixture database, 50 test lines per direction."""
    from test_bible_prep import make_db, prep_args
    from moe_fairseq.bible import prepare as P

    root = tmp_path_factory.mktemp("gpu_compare_data")
    argv = prep_args(make_db(root / "bible.db"), root / "data", "--max-test-verses", "50")
    argv[argv.index("--langs") + 1] = "de"
    manifest = P.run(argv, progress=False)
    return root / "data", manifest


def test_compare_end_to_end_on_cpu(small_benchmark, tmp_path):
    data, manifest = small_benchmark
    carried = tmp_path / "carried"
    out = tmp_path / "out"
    # --export: the folder a GPU machine gets must be enough on its own
    proc = run_script("--prepare-only", "--data", data, "--export", carried)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (carried / "spm").exists() and not (carried / "raw" / "train.en-de.en").exists()
    assert (carried / "spm.model").is_file() and (carried / "bin" / "test.en-de.de.bin").is_file()

    proc = run_script("--data", carried, "--out", out, "--methods", "dense moe",
                      "--budget-seconds", BUDGET)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data: reused" in proc.stdout and "| dense |" in proc.stdout
    assert "time budget:" in proc.stdout and "train moe" in proc.stdout

    summary = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert summary["size"] == "tiny" and summary["methods"] == ["dense", "moe"]
    assert summary["directions"] == manifest["directions"] == ["en-de", "de-en"]
    for method in ("dense", "moe"):
        r = summary["runs"][method]
        assert math.isfinite(r["bleu"]) and math.isfinite(r["chrf"])
        assert set(r["per_direction"]) == {"en-de", "de-en"}
        for scores in r["per_direction"].values():
            assert math.isfinite(scores["bleu"]) and math.isfinite(scores["chrf"])
        assert r["updates"] > 0 and r["target_tokens"] > 0 and r["tokens_per_second"] > 0
        # stopped by the clock, not by --max-update, shortly after the budget
        assert r["stopped_by_time"] and BUDGET <= r["train_seconds"] < BUDGET + 5
        assert Path(r["checkpoint"]).is_file()
        assert (out / "eval" / method / "de-en.hyp").read_text(encoding="utf-8").count("\n") == 50
    md = (out / "compare.md").read_text(encoding="utf-8")
    boot = summary["bootstrap"]
    assert boot["baseline"] == "dense" and boot["samples"] == 1000
    for method in ("dense", "moe"):
        r = summary["runs"][method]
        gaps = " | ".join(
            [significance.format_delta(boot["all"][method][m]) for m in ("bleu", "chrf")])
        assert (f"| {method} | {r['bleu']:.2f} | {r['chrf']:.2f} | {gaps} | {r['updates']} |"
                in md)
        # the learning curve: validation at the stop at least, in the log's order
        assert r["curve"] and r["curve"][-1]["updates"] == r["updates"]
        dec = summary["eval"]["decoding"][method]
        assert dec["tokens"] > 0 and dec["tokens_per_second"] > 0
    assert "baseline | baseline" in md
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and summary["curves_figure"] == str(out / "curves.png")
    assert "![validation loss](curves.png)" in md and "## Learning curves" in md
    assert set(summary["samples"]) == {"en-de", "de-en"} and "## Sample translations" in md
    assert (out / "eval" / "samples.md").is_file()
    assert summary["plan"]["total"] > 0 and f"(plan: {summary['plan']['total']:.0f} s)" in md
    per_direction = Path(summary["eval"]["table"])
    assert per_direction == out / "eval" / "results.md" and "| de-en |" in per_direction.read_text()

    # --reuse (after a failed evaluation, say): neither trains nor decodes again
    proc = run_script("--data", carried, "--out", out, "--methods", "dense moe",
                      "--budget-seconds", BUDGET, "--reuse")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((out / "compare.json").read_text(encoding="utf-8"))
    assert again["eval"]["decoded"] == [] and "dense: reusing the run" in proc.stdout
    for method in ("dense", "moe"):
        assert again["runs"][method]["reused"]
        assert again["runs"][method]["per_direction"] == summary["runs"][method]["per_direction"]


@pytest.mark.parametrize("argv,message", [
    (["--methods", "dense moee"], "--methods: unknown method(s) moee"),
    (["--methods", "moe,moe"], "--methods: a method is listed twice"),
    (["--budget-seconds", "0"], "--budget-seconds: must be positive"),
    (["--validate-updates", "-1"], "--validate-updates must be >= 0, got -1"),
    (["--prepare-args", "'--vocab"], "--prepare-args is not a valid shell-quoted string"),
    (["--budget-seconds", "nan"], "--budget-seconds: must be positive"),
    pytest.param(["--size", "base"], "--size base trains in fp16 on CUDA",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_bad_flags_are_named(argv, message, tmp_path):
    proc = run_script(*argv, "--out", tmp_path / "out", timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_data_without_build_files_is_refused(small_benchmark, tmp_path):
    data, _ = small_benchmark
    partial = tmp_path / "partial"
    (partial / "bin").mkdir(parents=True)
    (partial / "manifest.json").write_text((data / "manifest.json").read_text())
    proc = run_script("--prepare-only", "--data", partial, timeout=60)
    assert proc.returncode == 2 and f"--data {partial} holds a manifest but lacks" in proc.stderr


def test_test_cap_must_match_a_reused_build(small_benchmark):
    data, _ = small_benchmark
    proc = run_script("--prepare-only", "--data", data, "--max-test-verses", "7", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--max-test-verses 7" in proc.stderr and f"--data {data}" in proc.stderr


def test_directions_are_checked_against_the_build(small_benchmark, tmp_path):
    """--directions names directions of --data (one line otherwise, before any work);
    the plan then decodes only them."""
    data, _ = small_benchmark
    proc = run_script("--prepare-only", "--data", data, "--directions", "de-en,de-fr", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"gpu_compare.py: error: --directions de-en,de-fr: not a direction of --data {data}: "
        "de-fr; it has en-de,de-en")
    proc = run_script("--plan", "--data", data, "--directions", "de-en", "--out", tmp_path / "o",
                      timeout=60)
    assert proc.returncode == 0 and "50 lines over 1 direction at" in proc.stdout
