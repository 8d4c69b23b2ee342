"""The attentive router (arXiv 2302.14703, sparse): scores against a per-expert loop,
the router contract (fp32, shapes, capacity, padding never routed) and training."""

import math

import pytest
import torch

from conftest import run_cli, train_args
from moe_fairseq.layer.expert_bank import ExpertBank
from moe_fairseq.layer.moe_layer import MoELayer
from moe_fairseq.routers.attentive import AttentiveRouter

D, E, R = 12, 4, 5


def make(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("second_expert_policy", "all")
    return AttentiveRouter(D, E, attention_dim=R, **kw)


def test_scores_equal_the_per_expert_formula():
    router = make().double()
    x = torch.randn(7, D, dtype=torch.float64)
    q = router.query.weight @ x.t()  # [r, T]
    U = router.expert_repr.view(D, E, R)
    expected = torch.empty(7, E, dtype=torch.float64)
    for e in range(E):
        key = router.key.weight @ (U[:, e, :].t() @ x.t())  # W_k U_e x: [r, T]
        expected[:, e] = (q * key).sum(0) / math.sqrt(R)
    torch.testing.assert_close(router.logits(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_contract_fp32_shapes_and_capacity(dtype):
    router = make(top_k=2, capacity_factor=0.5).to(dtype).train()
    x = torch.randn(16, D).to(dtype)
    routing = router(x)
    assert routing.expert_index.shape == (16, 2) and routing.gates.dtype == torch.float32
    assert routing.probs.dtype == torch.float32
    assert routing.capacity == math.ceil(0.5 * 2 * 16 / E)
    assert set(routing.losses) == {"balance", "z"}
    assert not hasattr(router, "wg")  # no unused linear gate (DDP would refuse it)


def test_padding_is_never_routed_and_every_parameter_learns():
    router = make(top_k=2, capacity_factor=0.5)
    layer = MoELayer(router, ExpertBank(E, D, 2 * D)).double().train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, D, dtype=torch.float64, generator=g)
    mask = torch.zeros(5, 3, dtype=torch.bool)
    mask[2:, 1] = True
    x[mask] = 30.0  # would grab capacity if routed
    out = layer(x.clone().requires_grad_(True), padding_mask=mask)
    n_real = int((~mask).sum())
    assert int(layer.stats.tokens) == n_real and int(layer.stats.assignments) == 2 * n_real
    assert torch.equal(out[mask], torch.zeros_like(out[mask]))
    ref = layer(x[~mask].clone())
    torch.testing.assert_close(out[~mask], ref, rtol=1e-12, atol=1e-12)
    (out.pow(2).sum() + sum(layer.stats.losses.values())).backward()
    for name, p in router.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_attentive_router_trains_end_to_end(data_bin, tmp_path):
    proc = run_cli("train", train_args(data_bin, tmp_path / "ckpt", "--moe-router", "attentive",
                                       "--moe-attentive-dim", "8", max_update=4))
    assert "router attentive" in proc.stdout + proc.stderr
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").exists()
    bad = run_cli("train", train_args(data_bin, tmp_path / "bad", "--moe-router", "attentive",
                                      "--moe-attentive-dim", "0"), check=False)
    assert bad.returncode != 0 and "--moe-attentive-dim" in bad.stderr
