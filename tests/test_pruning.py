"""Expert pruning (scripts/prune_experts.py): keeping every expert changes no output bit;
keeping K < E per layer makes the checkpoint smaller by exactly the pruned experts'
parameters, and it decodes every sentence with plain fairseq-generate; --keep-mass keeps
the fewest experts that carry the share; bad input is one line naming the flag."""

import subprocess
import sys

import pytest
import torch

from conftest import N_TEST, REPO_ROOT, USER_DIR, first_test_batch, run_cli, subprocess_env

MULTI_TASK_ARGS = [
    "--task", "translation_multi_simple_epoch",
    "--lang-pairs", "a-b,a-c",
    "--encoder-langtok", "tgt", "--decoder-langtok",
]
E, D, F = 4, 64, 128  # moe_transformer_tiny with 4 experts


def _train(data, save_dir, arch):
    run_cli("train", [
        data, "--user-dir", USER_DIR, *MULTI_TASK_ARGS, "--arch", arch,
        "--moe-expert-count", str(E), "--moe-freq", "2",
        "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "3e-3", "--max-tokens", "1000",
        "--max-update", "10", "--save-dir", save_dir, "--no-epoch-checkpoints",
        "--cpu", "--num-workers", "0", "--seed", "1", "--disable-validation",
        "--log-format", "json", "--log-interval", "5", "--no-progress-bar",
    ])
    return save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def moe(multilingual_data_bin, tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    return multilingual_data_bin, _train(multilingual_data_bin, root / "moe", "moe_transformer_tiny")


def prune(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "prune_experts.py"),
                           *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)


def _model_and_outputs(path, data, direction="a-c"):
    src, tgt = direction.split("-")
    model, out, _ = first_test_batch(path, data, source_lang=src, target_lang=tgt)
    return model, out


def test_choose_experts():
    from moe_fairseq.conversion.pruning import choose_experts

    load = torch.tensor([5, 40, 0, 30, 25])
    assert choose_experts(load, 2, keep=2) == [1, 3]
    assert choose_experts(load, 2, keep_mass=0.7) == [1, 3]  # 70 of 100
    assert choose_experts(load, 2, keep_mass=0.71) == [1, 3, 4]
    assert choose_experts(load, 2, keep_mass=0.3) == [1, 3]  # never below top-k
    assert choose_experts(load, 1, keep_mass=1.0) == [0, 1, 3, 4]  # expert 2 took nothing
    assert choose_experts(torch.tensor([3, 3, 3]), 1, keep=2) == [0, 1]  # ties: lower index


def test_keeping_every_expert_changes_nothing(moe, tmp_path):
    data, path = moe
    out = tmp_path / "all.pt"
    proc = prune(path, "--data", data, "--keep", E, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, want = _model_and_outputs(path, data)
    _, got = _model_and_outputs(out, data)
    assert torch.equal(got, want)


def test_pruned_checkpoint_is_smaller_by_the_pruned_experts_and_decodes(moe, tmp_path):
    data, path = moe
    out = tmp_path / "ac2.pt"
    proc = prune(path, "--data", data, "--lang-pairs", "a-c", "--split", "valid", "--keep", 2,
                 "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pruned" in proc.stdout and "for a-c ('valid' routing)" in proc.stdout
    full, _ = _model_and_outputs(path, data)
    small, _ = _model_and_outputs(out, data)
    per_expert = D * F + F + F * D + D + D  # w1, b1, w2, b2 and its router row
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(full) - n(small) == 2 * (E - 2) * per_expert  # 2 MoE layers
    state = torch.load(out, map_location="cpu")
    assert "last_optimizer_state" not in state
    kept = state["extra_state"]["pruned_from"]["kept_experts"]
    assert sorted(kept) == ["decoder.layers.1", "encoder.layers.1"]
    assert all(len(v) == 2 and v == sorted(v) for v in kept.values())
    # the kept experts' weights are the original ones, in order
    for name, experts in kept.items():
        w_full = dict(full.named_parameters())[f"{name}.moe.experts.w1"]
        w_small = dict(small.named_parameters())[f"{name}.moe.experts.w1"]
        assert torch.equal(w_small, w_full[experts])
    gen = run_cli("generate", [
        data, "--user-dir", USER_DIR, *MULTI_TASK_ARGS, "--source-lang", "a",
        "--target-lang", "c", "--path", out, "--beam", "4", "--gen-subset", "test",
        "--max-tokens", "2000", "--cpu", "--num-workers", "0"])
    hyps = [l for l in gen.stdout.splitlines() if l.startswith("H-")]
    assert sorted(int(l.split("\t")[0][2:]) for l in hyps) == list(range(N_TEST))
    assert "(1-based), 2,2 experts" in gen.stdout + gen.stderr


def test_keep_mass_keeps_the_fewest_experts_that_carry_the_share(moe, tmp_path):
    import re

    data, path = moe
    out = tmp_path / "mass.pt"
    proc = prune(path, "--data", data, "--lang-pairs", "a-b", "--keep-mass", "0.6", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shares = [float(s) for s in re.findall(r"\(([\d.]+)% of the assignments\)", proc.stdout)]
    assert len(shares) == 2 and all(s >= 60.0 for s in shares)
    state = torch.load(out, map_location="cpu")
    counts = state["cfg"]["model"]["moe_layer_expert_counts"]  # a plain dict on disk
    kept = state["extra_state"]["pruned_from"]["kept_experts"]
    assert counts == ",".join(str(len(kept[n])) for n in ("encoder.layers.1", "decoder.layers.1"))
    assert state["extra_state"]["pruned_from"]["directions"] == ["a-b"]
    _, out_small = _model_and_outputs(out, data, "a-b")
    assert torch.isfinite(out_small).all()


def test_bad_input_is_one_line(moe, multilingual_data_bin, tmp_path):
    data, path = moe
    smoe = _train(multilingual_data_bin, tmp_path / "smoe", "smoe_transformer_tiny")
    for args, says in [
        ([path, "--keep", "0"], "--keep must be >= 1, got 0"),
        ([path, "--keep", "9"], "--keep must be between --moe-top-k 2 and the experts per layer (4)"),
        ([path, "--keep-mass", "1.5"], "--keep-mass must be in (0, 1], got 1.5"),
        ([path, "--keep", "2", "--lang-pairs", "a-x"], "--lang-pairs a-x: not a direction"),
        ([smoe, "--keep", "2"], "expert pruning supports the linear and cosine routers"),
    ]:
        proc = prune(*args, "--data", data, "--out", tmp_path / "x.pt")
        last = [l for l in proc.stderr.splitlines() if l.strip()][-1]
        assert proc.returncode != 0 and says in last, proc.stderr[-2000:]
        assert not (tmp_path / "x.pt").exists()
