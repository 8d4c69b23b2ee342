"""Sparse upcycling (scripts/upcycle.py): a trained dense transformer becomes an MoE
model whose decoder outputs equal the dense model's (eval mode, fp32, before any
training) for the linear, cosine and stratified routers; it then trains with
--finetune-from-model, on one process and on 2 expert-parallel ranks; where equal
outputs are impossible (MoEC's output mixing, SMoE's post-ln strata) the script says so
and the outputs indeed differ; bad input is one line naming the flag."""

import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, USER_DIR, first_test_batch, log_records, run_cli, subprocess_env

TINY_DIMS = [
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
    "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
    "--share-all-embeddings",
]


def _train_args(data, save_dir, *extra, max_update=30):
    return [
        data, "--user-dir", USER_DIR, "--task", "translation",
        "--criterion", "moe_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "3e-3", "--max-tokens", "1000",
        "--max-update", max_update, "--save-dir", save_dir, "--no-epoch-checkpoints",
        "--cpu", "--num-workers", "0", "--seed", "1", "--disable-validation",
        "--log-format", "json", "--log-interval", "2", "--no-progress-bar", *extra,
    ]


@pytest.fixture(scope="module")
def dense(data_bin, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("dense")
    run_cli("train", _train_args(data_bin, save_dir, "--arch", "transformer", *TINY_DIMS))
    return data_bin, save_dir / "checkpoint_last.pt"


def upcycle(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "upcycle.py"),
                           *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=300)


def _decoder_outputs(path, data):
    model, out, real = first_test_batch(path, data)
    # the real target positions (an MoE layer gives padding 0, a dense FFN does not;
    # attention never reads them)
    return out[real], model


ROUTERS = {
    # name: (MoE flags, the rule the script prints)
    "linear_top2_normalised": (["--arch", "moe_transformer", "--moe-expert-count", "4",
                                "--moe-freq", "2"], "random init kept"),
    "linear_top2_raw": (["--arch", "moe_transformer", "--moe-expert-count", "4", "--moe-freq", "2",
                         "--no-moe-normalize-gates"], "scaled by 2"),
    "linear_top1": (["--arch", "moe_transformer", "--moe-expert-count", "4", "--moe-freq", "2",
                     "--moe-top-k", "1"], "scaled by 4"),
    "cosine": (["--arch", "moec_transformer_tiny", "--no-moec-output-mixing",
                "--moec-expert-sublayers", "1"], "scaled by 4"),
    # the smoe presets go pre-norm (the authors' rule): the method's flags on
    # moe_transformer keep the dense model's post-norm
    "stratified": (["--arch", "moe_transformer", "--moe-router", "stratified", "--smoe-strata",
                    "2,2", "--moe-expert-count", "4", "--moe-freq", "2",
                    "--smoe-stratum-norm", "gate-input"], "experts 2-3 with a zero output layer"),
}


@pytest.mark.parametrize("router", list(ROUTERS))
def test_upcycled_outputs_equal_the_dense_model(dense, tmp_path, router):
    data, dense_path = dense
    flags, rule = ROUTERS[router]
    out = tmp_path / "up.pt"
    proc = upcycle(dense_path, *flags, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in eval mode the MoE model's outputs equal the dense model's" in proc.stdout
    assert rule in proc.stdout, proc.stdout
    want, _ = _decoder_outputs(dense_path, data)
    got, model = _decoder_outputs(out, data)
    from moe_fairseq.layer.moe_layer import MoELayer

    assert sum(isinstance(m, MoELayer) for m in model.modules()) == 2
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-5


def test_noise_breaks_the_symmetry(dense, tmp_path):
    data, dense_path = dense
    out = tmp_path / "noisy.pt"
    proc = upcycle(dense_path, "--arch", "moe_transformer", "--moe-expert-count", "4",
                   "--moe-freq", "2", "--noise", "0.01", "--out", out)
    assert proc.returncode == 0 and "--noise 0.01 perturbs the expert copies" in proc.stdout
    _, model = _decoder_outputs(out, data)
    w1 = [p for n, p in model.named_parameters() if n.endswith("moe.experts.w1")][0]
    assert not torch.equal(w1[0], w1[1])
    assert float((w1[0] - w1[1]).abs().max()) < 0.1 * float(w1[0].abs().max())


@pytest.mark.parametrize("flags,says", [
    (["--arch", "moec_transformer_tiny", "--moec-expert-sublayers", "1"],
     "--moec-output-mixing adds (1 - g) x"),
    (["--arch", "moe_transformer", "--moe-router", "stratified", "--smoe-strata", "2,2",
      "--moe-expert-count", "4"], "--smoe-stratum-norm post-ln normalises"),
    (["--arch", "smoe_transformer_tiny", "--smoe-stratum-norm", "gate-input"],
     "changes settings of the dense model (decoder_normalize_before False -> True; "
     "encoder_normalize_before False -> True)"),
])
def test_where_equal_outputs_are_impossible_the_script_says_so(dense, tmp_path, flags, says):
    data, dense_path = dense
    out = tmp_path / "up.pt"
    proc = upcycle(dense_path, *flags, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "outputs will differ from the dense model's" in proc.stdout and says in proc.stdout
    want, _ = _decoder_outputs(dense_path, data)
    got, _ = _decoder_outputs(out, data)
    assert float((got - want).abs().max()) > 1e-3  # and they do


def test_upcycled_model_trains_with_finetune_from_model(dense, tmp_path):
    data, dense_path = dense
    up = tmp_path / "up.pt"
    flags = ROUTERS["stratified"][0]
    assert upcycle(dense_path, *flags, "--out", up).returncode == 0
    save_dir = tmp_path / "ft"
    proc = run_cli("train", _train_args(data, save_dir, *flags, *TINY_DIMS,
                                        "--finetune-from-model", up, max_update=10))
    inner = log_records(proc.stdout, "train_inner")
    assert inner and all(r["loss"] == r["loss"] for r in inner)
    # fine-tuning starts from the dense model's quality, not from scratch
    scratch = run_cli("train", _train_args(data, tmp_path / "scratch", *flags, *TINY_DIMS,
                                           max_update=10))
    assert inner[0]["nll_loss"] < log_records(scratch.stdout, "train_inner")[0]["nll_loss"] - 0.5
    assert (save_dir / "checkpoint_last.pt").is_file()


def test_upcycled_checkpoint_trains_on_two_expert_parallel_ranks(dense, tmp_path):
    from test_expert_parallel_train import params, train

    data, dense_path = dense
    up = tmp_path / "up.pt"
    assert upcycle(dense_path, "--arch", "moe_transformer", "--moe-expert-count", "4",
                   "--moe-freq", "2", "--out", up).returncode == 0
    log = train(data, tmp_path / "ep", 2, tmp_path, *TINY_DIMS, "--arch", "moe_transformer",
                "--moe-expert-count", "4", "--moe-freq", "2", "--finetune-from-model", up,
                "--max-update", "4", tag="upcycled")
    assert "experts sharded over 2 ranks" in log
    model, state = params(tmp_path / "ep" / "checkpoint_last.pt")
    w1 = [v for k, v in model.items() if k.endswith("moe.experts.w1")]
    assert w1 and all(t.size(0) == 4 for t in w1)
    assert state["optimizer_history"][-1]["num_updates"] == 4


def test_bad_input_is_one_line(dense, tmp_path):
    _, dense_path = dense
    up = tmp_path / "up.pt"
    assert upcycle(dense_path, "--arch", "moe_transformer", "--moe-expert-count", "4",
                   "--moe-freq", "2", "--out", up).returncode == 0
    for args, says in [
        (["--arch", "transformer"], "--arch transformer: not an MoE architecture"),
        (["--arch", "moe_transformer", "--noise", "2"], "--noise must be in [0, 1), got 2.0"),
        (["--arch", "moe_transformer", "--moe-expert-ffn-dim", "64"],
         "leave --moe-expert-ffn-dim unset"),
        (["--arch", "moe_transformer", "--moe-router", "attentive"],
         "upcycling supports the linear, cosine and stratified routers"),
        (["--arch", "moec_transformer_tiny"],
         "--moec-expert-sublayers: upcycling needs one FFN per expert"),
    ]:
        proc = upcycle(dense_path, *args, "--out", tmp_path / "x.pt")
        last = [l for l in proc.stderr.splitlines() if l.strip()][-1]
        assert proc.returncode != 0 and says in last, proc.stderr[-2000:]
        assert not (tmp_path / "x.pt").exists()
    proc = upcycle(up, "--arch", "moe_transformer", "--out", tmp_path / "x.pt")
    assert "is already an MoE model" in proc.stderr.splitlines()[-1]
