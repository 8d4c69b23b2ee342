"""What users really do to a training run, as real ``fairseq-train`` subprocesses:
diverge it, ask for an EMA copy, pick a criterion that ignores the routing losses,
ask for fp16 on a CPU. Each ends in a working run or in one line naming the cause."""

import re

import torch

from conftest import run_cli, train_args


def _stderr_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_divergence_ends_on_its_real_cause(data_bin, tmp_path):
    """A huge --lr makes gradients NaN; fairseq reruns the step in its NaN detector,
    which used to crash inside the router (Routing is not subscriptable) and the
    encoder (a dict of lists) and bury the cause."""
    proc = run_cli("train", train_args(data_bin, tmp_path / "ck", "--lr", "1e6",
                                       max_update=30), check=False)
    assert proc.returncode != 0
    lines = _stderr_lines(proc)
    assert lines[-1].startswith("moe_fairseq: error: training diverged"), lines[-3:]
    assert "gradients are Nan/Inf" in lines[-1] and "crash.pt" in lines[-1]
    assert "FloatingPointError: gradients are Nan/Inf" in lines[-2]
    assert "not subscriptable" not in proc.stderr and "StopIteration" not in proc.stderr
    # the detector still names where the first NaN/Inf appears (forward or backward)
    assert re.search(r"(NaN|Inf) detected in (output|the gradient) of \S+",
                     proc.stdout + proc.stderr)
    assert (tmp_path / "ck" / "crash.pt").exists()


def test_store_ema_keeps_an_ema_of_every_parameter(data_bin, tmp_path):
    """--store-ema deep-copies the model at its first update; the MoE layer's last
    statistics (graph-attached losses) made that copy fail."""
    run_cli("train", train_args(data_bin, tmp_path / "ck", "--store-ema", "--ema-decay", "0.5",
                                max_update=6))
    state = torch.load(tmp_path / "ck" / "checkpoint_last.pt", weights_only=True)
    model, ema = state["model"], state["extra_state"]["ema"]
    assert ema.keys() == model.keys()
    experts = [k for k in model if k.endswith("moe.experts.w1")]
    assert experts
    # decay 0.5 over 6 updates: the EMA trails the weights, experts included
    assert all(float((ema[k] - model[k]).abs().max()) > 1e-5 for k in experts)
    # and resuming restores it
    proc = run_cli("train", train_args(data_bin, tmp_path / "ck", "--store-ema",
                                       "--ema-decay", "0.5", max_update=8))
    assert "EMA not found" not in proc.stdout + proc.stderr
