"""scripts/bench_decode.py as a user runs it (tiny models on CPU): both models decode
the same forced number of steps and the last line is the ratio."""

import re
import subprocess
import sys

from conftest import REPO_ROOT, subprocess_env

TINY = ("--encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 32 --decoder-embed-dim 32 "
        "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2 "
        "--decoder-attention-heads 2")


def test_bench_decode_prints_both_rates_and_the_ratio():
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "bench_decode.py"), "--device", "cpu",
         "--model-flags", TINY, "--vocab", "200", "--batch", "4", "--beam", "2",
         "--src-len", "6", "--length", "5", "--warmup", "0", "--repeats", "1", "--threads", "1"],
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    rates = {m.group(1): float(m.group(2).replace(",", "")) for l in lines
             if (m := re.match(r"(moe|dense)\s+median [\d.]+ s per batch, ([\d,]+) target", l))}
    assert set(rates) == {"moe", "dense"} and all(r > 0 for r in rates.values())
    m = re.fullmatch(r"decode_ratio_vs_dense=(\d+\.\d{3})", lines[-1])
    assert m and abs(float(m.group(1)) - rates["moe"] / rates["dense"]) < 0.01
    assert "--moe-expert-count 8" in proc.stdout  # the MoE model is the one named
