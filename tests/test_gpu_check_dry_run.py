"""The GPU step, dry-run on CPU: scripts/bench_moe_layer.py with the flags
scripts/gpu_check.py gives it (tiny shapes), read back by gpu_check's own parser, and
the summary table it prints. The device then only has to run what this proves runs."""

import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, subprocess_env

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import gpu_check  # noqa: E402


def bench(*flags, env=None):
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "bench_moe_layer.py"), "--device", "cpu",
           "--tokens", "256", "--embed-dim", "32", "--ffn-dim", "64", "--experts", "4",
           "--repeats", "2", "--warmup", "1", "--threads", "1", *map(str, flags)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**subprocess_env(), **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_with_the_reference_is_read_back_by_gpu_check():
    text = bench("--reference", "--no-phases")
    rows = gpu_check._contenders(text)
    assert set(rows) == {"MoE", "dense", "bare sort+grouped_mm"}
    assert all(r["ms"] > 0 for r in rows.values())
    ratio = gpu_check._number(r"(?m)^ratio_vs_dense=([0-9.]+)", text)
    # the table prints ms to 0.01: a few per cent on these tiny steps
    assert ratio == pytest.approx(rows["MoE"]["ms"] / rows["dense"]["ms"], rel=0.05)
    assert text.strip().splitlines()[-1].startswith("ratio_vs_dense=")


def test_gpu_check_flags_run_on_cpu_with_the_fused_path_interpreted():
    """Exactly gpu_check's BENCH_FLAGS (sync check and kernel counts are CUDA-only and
    skipped on CPU); the fused path runs under Triton's interpreter."""
    pytest.importorskip("triton")
    text = bench("--capacity-factor", "1.25", *gpu_check.BENCH_FLAGS,
                 env={"TRITON_INTERPRET": "1"})
    rows = gpu_check._contenders(text)
    assert set(rows) == {"MoE (torch)", "MoE (triton)", "dense", "bare sort+grouped_mm"}
    for key in ("ratio_torch_vs_dense", "speedup_triton_vs_torch", "ratio_bare_vs_dense"):
        assert gpu_check._number(rf"{key}=([0-9.]+)", text) is not None, key
    ratio = gpu_check._number(r"(?m)^ratio_vs_dense=([0-9.]+)", text)
    assert ratio == pytest.approx(rows["MoE (triton)"]["ms"] / rows["dense"]["ms"], rel=0.05)


def test_summary_table_of_a_constructed_report():
    text = """MoE (torch)                 8.00    min     7.84  max     8.28  host_syncs=none  kernels=163
MoE (triton)                4.00    min     3.84  max     4.28  host_syncs=none  kernels=40
dense                       2.00    min     1.87  max     2.04  kernels=10
bare sort+grouped_mm        5.70    min     5.63  max     5.78  kernels=30
"""
    rows = gpu_check._contenders(text)
    assert rows["MoE (triton)"] == {"ms": 4.0, "kernels": 40, "host_syncs": "none"}
    report = {"device": "H200", "torch": "2.11", "seconds": 1,
              "bench": [{"label": "E16 top2 cf1.25", "rc": 0, "seconds": 1, "target": 1.15,
                         "contenders": rows, "ratio_vs_dense": 2.0, "ratio_torch_vs_dense": 4.0,
                         "ratio_bare_vs_dense": 2.85, "speedup": 2.0, "overflow": 0.01,
                         "tail": ""}],
              "decode": {"rc": 0, "seconds": 3, "ratio": 0.9, "moe_tokens_s": "900",
                         "dense_tokens_s": "1,000", "tail": ""}}
    summary = gpu_check.summarize(report)
    assert "| E16 top2 cf1.25 | 8.0 | 4.0 | 2.0 | 5.7 | 2.0 (MISSED) | 1.15 | 4.0 | 2.0 " in summary
    assert "163 / 40 / 10 | none / none" in summary
    assert "ratio 0.9 (met) (target >= 0.8)" in summary


def test_make_bench_runs_as_the_makefile_and_readme_give_it():
    """``make bench``'s command line (read from the Makefile; the README quotes the same
    flags), with fewer repetitions: the MoE and dense rows, the instrumented phases (the
    part the gpu-check flags switch off) and ``ratio_vs_dense`` last."""
    import re
    import shlex

    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe = re.search(r"(?m)^bench:.*\n((?:\t.*\\\n)*\t.*)", makefile).group(1)
    words = shlex.split(recipe.replace("\\\n", " "))
    flags = words[words.index("scripts/bench_moe_layer.py") + 1:]
    readme = (REPO_ROOT / "README.md").read_text()
    quoted = re.search(r"make bench +# = \.venv/bin/python scripts/bench_moe_layer\.py (.*)\\\n"
                       r" +# +(.*)\n", readme)
    assert quoted and shlex.split(quoted.group(1) + " " + quoted.group(2)) == flags
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bench_moe_layer.py"),
                           *flags, "--repeats", "2", "--warmup", "1"],
                          capture_output=True, text=True, timeout=600,
                          env={**subprocess_env(), "OMP_WAIT_POLICY": "PASSIVE"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    rows = gpu_check._contenders(text)
    assert set(rows) == {"MoE", "dense"} and all(r["ms"] > 0 for r in rows.values())
    for phase in ("router", "plan", "gather", "experts", "combine", "backward"):
        assert re.search(rf"(?m)^  {phase} +[0-9.]+", text), phase
    assert "tokens=4096 embed_dim=256 ffn_dim=1024 experts=8 top_k=2" in text
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio_vs_dense=[0-9]+\.[0-9]{3}", last) and float(last.split("=")[1]) > 0
