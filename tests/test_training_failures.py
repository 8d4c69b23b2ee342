"""What users really do to a training run, as real ``fairseq-train`` subprocesses:
diverge it, ask for an EMA copy, pick a criterion that ignores the routing losses,
ask for fp16 on a CPU. Each ends in a working run or in one line naming the cause."""

import re

import pytest
import torch

from conftest import log_records, run_cli, train_args


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


@pytest.mark.parametrize("criterion,use", [
    (["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"],
     "moe_label_smoothed_cross_entropy"),
    (["--criterion", "cross_entropy"], "moe_cross_entropy"),
])
def test_criterion_without_routing_losses_is_refused(data_bin, tmp_path, criterion, use):
    """The commonest copy-paste of a fairseq recipe: an MoE architecture trained
    with a criterion that never adds the balance loss."""
    args = train_args(data_bin, tmp_path / "ck")
    i = args.index("--criterion")
    args[i:i + 4] = criterion  # replaces "--criterion moe_... --label-smoothing 0.1"
    proc = run_cli("train", args, check=False)
    assert proc.returncode != 0
    errors = [line for line in _stderr_lines(proc) if line.startswith("moe_fairseq: error:")]
    assert len(errors) == 1 and f"--criterion {criterion[1]} ignores the MoE routing losses" \
        in errors[0] and f"use --criterion {use}" in errors[0], proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr


def test_moe_cross_entropy_is_the_moe_criterion_without_smoothing(data_bin, tmp_path):
    def losses(*criterion):
        args = train_args(data_bin, tmp_path / criterion[1], log_interval=1)
        i = args.index("--criterion")
        args[i:i + 4] = criterion
        proc = run_cli("train", args)
        return [(r["loss"], r["moe_gate_loss"])
                for r in log_records(proc.stdout + proc.stderr, "train_inner")]

    ce = losses("--criterion", "moe_cross_entropy")
    ls0 = losses("--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0")
    assert len(ce) >= 3 and ce == ls0


def test_routing_collapse_is_a_warning(data_bin, tmp_path):
    """No balance loss and a high learning rate: the routers become sure of one
    expert for nearly every token. The run goes on, with one warning."""
    proc = run_cli("train", train_args(data_bin, tmp_path / "ck", "--moe-gate-loss-wt", "0",
                                       "--lr", "5e-2", "--lr-scheduler", "fixed",
                                       "--warmup-updates", "0", "--no-save", max_update=40,
                                       log_interval=5))
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "routing collapse:" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]
    collapsed = [r["moe_collapsed"]
                 for r in log_records(proc.stdout + proc.stderr, "train_inner")]
    assert collapsed[-1] >= 0.5
    # the default run of the same model is not flagged
    quiet = run_cli("train", train_args(data_bin, tmp_path / "ok", "--no-save", max_update=20,
                                        log_interval=5))
    assert "routing collapse" not in quiet.stdout + quiet.stderr


def test_collapsed_needs_a_sure_router_and_one_dominant_expert():
    from moe_fairseq.layer.moe_layer import MoEStats

    def stats(first_choices, entropy):
        load = torch.tensor(first_choices)
        n = int(load.sum())
        return MoEStats(first_choice_load=load, entropy_sum=torch.tensor(entropy * n),
                        entropy_count=torch.tensor(n))

    assert bool(stats([95, 5, 0, 0], 0.05).collapsed)
    assert not bool(stats([95, 5, 0, 0], 1.3).collapsed)  # undecided router (log 4 = 1.39)
    assert not bool(stats([60, 20, 10, 10], 0.05).collapsed)
    assert not bool(stats([0, 0, 0, 0], 0.0).collapsed)
