"""``--bf16`` trains with the plugin loaded instead of going down fairseq's TPU path;
``--fp16`` trains on CPU."""

import json
import math
from types import SimpleNamespace

from conftest import USER_DIR, run_cli, train_args

from moe_fairseq.fairseq_fixes.precision import untangle_bf16_from_tpu


def test_bf16_no_longer_implies_tpu_without_torch_xla():
    cfg = SimpleNamespace(common=SimpleNamespace(bf16=True, tpu=True, cpu=False))
    assert untangle_bf16_from_tpu(cfg)
    assert cfg.common.tpu is False
    # An explicit TPU run without bf16 is left alone.
    cfg = SimpleNamespace(common=SimpleNamespace(bf16=False, tpu=True, cpu=False))
    assert not untangle_bf16_from_tpu(cfg)
    assert cfg.common.tpu is True


def test_bf16_training_runs_and_learns(data_bin, tmp_path):
    proc = run_cli("train", train_args(data_bin, tmp_path / "ckpt", "--bf16", max_update=8))
    losses = [json.loads(line[line.index("{"):])["loss"]
              for line in proc.stdout.splitlines() + proc.stderr.splitlines()
              if "train_inner" in line and "{" in line]
    assert "training in bf16 on CPU, not on a TPU" in proc.stdout + proc.stderr
    assert losses, proc.stderr[-2000:]
    assert all(math.isfinite(float(v)) for v in losses)
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").exists()


def test_fp16_on_cpu_trains_and_decodes(data_bin, tmp_path):
    """fairseq's flattened fp16 optimizer asked for a CUDA device and crashed."""
    proc = run_cli("train", train_args(data_bin, tmp_path / "ckpt", "--fp16", max_update=6))
    assert "--fp16 on CPU" in proc.stdout + proc.stderr
    losses = [json.loads(line[line.index("{"):])["loss"]
              for line in proc.stdout.splitlines() + proc.stderr.splitlines()
              if "train_inner" in line and "{" in line]
    assert losses and all(math.isfinite(float(v)) for v in losses)
    out = run_cli("generate", [data_bin, "--user-dir", USER_DIR, "--path",
                               tmp_path / "ckpt" / "checkpoint_last.pt", "--cpu", "--fp16",
                               "--max-tokens", "2000", "--beam", "2"])
    assert "Generate test with beam=2" in out.stdout + out.stderr
