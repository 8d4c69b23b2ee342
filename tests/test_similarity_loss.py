"""The sample-similarity loss in translation models: a bounded token sample, the
same value with padding masked or removed, every router, the criterion's weight
and log key, and a tiny fairseq-train run."""

import math
import re

import pytest
import torch

from conftest import log_records, moe_namespace, run_cli, train_args
from moe_fairseq.criterions.moe_label_smoothed_cross_entropy import (
    MoELabelSmoothedCrossEntropyCriterion,
    similarity_loss_from_flags,
)
from moe_fairseq.layer.expert_bank import ExpertBank
from moe_fairseq.layer.moe_layer import MoELayer
from moe_fairseq.options import MoEConfigError, MoEOptions
from moe_fairseq.routers import build_router
from moe_fairseq.routers.losses import sample_similarity_loss
from moe_fairseq.layer.similarity_loss import SimilarityLoss

D = 8


def test_mask_leaves_rows_out_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, D, generator=g, dtype=torch.float64)
    probs = torch.softmax(torch.randn(9, 4, generator=g, dtype=torch.float64), -1)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    x_pad = x.clone()
    x_pad[~mask] = 1e3  # far away: would set max D if it were counted
    masked = sample_similarity_loss(probs, x_pad, 0.3, 0.7, mask)
    kept = sample_similarity_loss(probs[mask], x[mask], 0.3, 0.7)
    torch.testing.assert_close(masked, kept, rtol=1e-12, atol=1e-12)


def test_sample_is_bounded_and_spread_over_the_batch():
    spec = SimilarityLoss(1.0, 1.0, sample_tokens=256)
    assert spec.sample_rows(256, "cpu") is None
    rows = spec.sample_rows(1000, "cpu")
    assert rows.tolist() == list(range(0, 1000, 4)) and len(rows) <= 256
    rows = spec.sample_rows(257, "cpu")
    assert len(rows) <= 256 and rows[0] == 0 and rows[-1] >= 250


@pytest.mark.parametrize("n_tokens", [5, 40, 61])
def test_masked_sample_picks_the_rows_of_the_unpadded_batch(n_tokens):
    spec = SimilarityLoss(1.0, 1.0, sample_tokens=8)
    g = torch.Generator().manual_seed(n_tokens)
    mask = torch.zeros(80, dtype=torch.bool)
    mask[torch.randperm(80, generator=g)[:n_tokens]] = True
    token_rows = mask.nonzero().squeeze(1)
    rows, valid = spec.masked_sample_rows(mask)
    expected = spec.sample_rows(n_tokens, "cpu")
    expected = torch.arange(n_tokens) if expected is None else expected
    assert rows[valid].tolist() == token_rows[expected].tolist()


def _layer(router_name, **overrides):
    opts = MoEOptions.from_args(moe_namespace(2, router_name, moe_expert_count=4,
                                              moe_second_expert_policy="all", **overrides))
    torch.manual_seed(0)
    router = build_router(opts, D)
    return MoELayer(router, ExpertBank(4, D, 2 * D)).train()


ROUTERS = {
    "linear": {},
    "attentive": {"moe_attentive_dim": 4},
    "cosine": {"moec_routing_dim": 4},
    "stratified": {"smoe_strata": "2,2"},
}


@pytest.mark.parametrize("router_name", list(ROUTERS))
def test_every_router_gets_the_loss_and_its_gradient(router_name):
    layer = _layer(router_name, **ROUTERS[router_name])
    spec = SimilarityLoss(1e-3, 1.0, sample_tokens=16)
    x = torch.randn(7, 6, D, generator=torch.Generator().manual_seed(1))
    layer(x)
    assert "similarity" not in layer.stats.losses  # off unless asked
    layer.similarity = spec
    layer(x)
    loss = layer.stats.losses["similarity"]
    # The same number from the router's first-pass probabilities on the same rows.
    flat = x.reshape(-1, D)
    h = flat if layer.router.num_passes == 1 else layer.router.pass_input(flat, 0)
    probs = layer.router(h, 0).probs
    rows = spec.sample_rows(flat.size(0), "cpu")
    expected = sample_similarity_loss(probs[rows].float(), h[rows], 1e-3, 1.0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    layer.zero_grad()
    loss.backward()
    grads = [p.grad for p in layer.router.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in layer.experts.parameters())


def test_padding_masked_or_removed_gives_the_same_loss():
    layer = _layer("linear").double()
    layer.similarity = SimilarityLoss(1e-2, 1.0, sample_tokens=8)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 4, D, generator=g, dtype=torch.float64)
    mask = torch.zeros(9, 4, dtype=torch.bool)
    mask[5:, 0] = mask[7:, 2] = True
    values = {}
    for how in ("remove", "mask"):
        layer.padding = how
        layer(x, padding_mask=mask)
        values[how] = layer.stats.losses["similarity"]
    torch.testing.assert_close(values["mask"], values["remove"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("flags,name", [
    ((-1.0, 1e-7, 1e-2, 256), "--moe-similarity-loss-wt"),
    ((1.0, float("nan"), 1e-2, 256), "--moe-similarity-beta-s"),
    ((1.0, 1e-7, -2.0, 256), "--moe-similarity-beta-d"),
    ((1.0, 1e-7, 1e-2, 1), "--moe-similarity-sample-tokens"),
])
def test_bad_flags_are_refused_by_name(flags, name):
    with pytest.raises(MoEConfigError, match=re.escape(name)):
        similarity_loss_from_flags(*flags)
    assert similarity_loss_from_flags(0.0, 1e-7, 1e-2, 256) == (0.0, None)


def test_criterion_weighs_and_logs_it_apart_from_the_gate_loss():
    from test_criterion_combine import FakeModel, FakeTask, make_sample, plain_ce

    layers = [{"balance": 1.0, "z": 2.0, "similarity": -0.5},
              {"balance": 3.0, "z": 1.0, "similarity": -1.5}]
    model, sample = FakeModel(layers), make_sample()
    crit = MoELabelSmoothedCrossEntropyCriterion(
        FakeTask(), False, 0.1, moe_gate_loss_wt=0.1, moe_router_z_loss_wt=0.01,
        moe_gate_loss_combine_method="average", moe_similarity_loss_wt=2.0,
        moe_similarity_sample_tokens=32)
    loss, n, log = crit(model, sample)
    assert all(isinstance(m.similarity, SimilarityLoss) and m.similarity.sample_tokens == 32
               for m in model.layers)
    gate, z, sim = (1.0 + 3.0) / 2, (2.0 + 1.0) / 2, (-0.5 - 1.5) / 2
    assert log["moe_gate_loss"] == pytest.approx(gate)
    assert log["moe_similarity_loss"] == pytest.approx(sim)
    expected = plain_ce(model, sample) + n * (0.1 * gate + 0.01 * z + 2.0 * sim)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    # weight 0: the layers are not asked for it
    off = MoELabelSmoothedCrossEntropyCriterion(FakeTask(), False, 0.1)
    off(model, sample)
    assert all(m.similarity is None for m in model.layers)


def test_fairseq_train_logs_the_similarity_loss(data_bin, tmp_path):
    proc = run_cli("train", train_args(
        data_bin, tmp_path / "ckpt", "--moe-similarity-loss-wt", "1.0",
        "--moe-similarity-beta-s", "1e-4", "--moe-similarity-beta-d", "1.0",
        "--moe-similarity-sample-tokens", "64", max_update=4))
    records = log_records(proc.stdout + proc.stderr, "train")
    assert records and "train_moe_similarity_loss" in records[-1]
    assert math.isfinite(records[-1]["train_moe_similarity_loss"])
    bad = run_cli("train", train_args(data_bin, tmp_path / "bad", "--moe-similarity-loss-wt", "1",
                                      "--moe-similarity-sample-tokens", "1"), check=False)
    assert bad.returncode != 0 and "--moe-similarity-sample-tokens" in bad.stderr
