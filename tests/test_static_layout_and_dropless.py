"""The GPU hot path, checked on CPU: the static dispatch layout and routing of the whole
padded batch (no host sync) give what the compact layout and padding removal give,
and dropless routing (``--moe-capacity-factor 0``) never drops a token."""

import json

import pytest
import torch

from moe_fairseq.layer.expert_bank import ExpertBank
from moe_fairseq.layer.moe_layer import MoELayer
from moe_fairseq.routers.base import Routing, capacity_for
from moe_fairseq.routers.cosine import CosineRouter
from moe_fairseq.routers.top_k import TopKRouter

from conftest import run_cli, train_args
from test_dispatch import D, E, F_DIM, random_index, reference_moe

LOOSE = dict(rtol=1e-9, atol=1e-11)


def build(router_kind: str, seed: int = 0, **kw) -> MoELayer:
    torch.manual_seed(seed)
    if router_kind == "cosine":
        router = CosineRouter(D, E, routing_dim=4, clusters=2, var_coef=0.5, **kw)
    else:
        router = TopKRouter(D, E, **kw)
    bank = ExpertBank(E, D, F_DIM)
    return MoELayer(router, bank).double()


def run(layer, x, mask, layout, masked_routing=True):
    """Output, input grad, parameter grads and the stats of one training forward."""
    layer.dispatcher.layout = layout
    layer.padding = "mask" if masked_routing else "remove"
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(123)  # same sampling noise in both runs
    out = layer(x, padding_mask=mask)
    s = layer.stats
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    loss = loss + sum(v for v in s.losses.values())
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [x, *params])]
    stats = {k: getattr(s, k) for k in ("tokens", "assignments", "dropped", "expert_load",
                                        "entropy_sum", "entropy_count")}
    losses = {k: v.detach() for k, v in s.losses.items()}
    return out.detach(), grads, stats, losses


def assert_same(a, b):
    out_a, grads_a, stats_a, losses_a = a
    out_b, grads_b, stats_b, losses_b = b
    torch.testing.assert_close(out_a, out_b, **LOOSE)
    for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        torch.testing.assert_close(ga, gb, **LOOSE, msg=lambda m, i=i: f"grad {i}: {m}")
    for k in stats_a:
        # entropy is summed in fp32 (the router's dtype), in another order
        tol = dict(rtol=1e-6, atol=1e-6) if k == "entropy_sum" else LOOSE
        torch.testing.assert_close(stats_a[k].double(), stats_b[k].double(), **tol,
                                   msg=lambda m, k=k: f"stat {k}: {m}")
    assert losses_a.keys() == losses_b.keys()
    for k in losses_a:
        torch.testing.assert_close(losses_a[k], losses_b[k], **LOOSE,
                                   msg=lambda m, k=k: f"loss {k}: {m}")


def padded_batch(seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 3, D, dtype=torch.float64, generator=g)
    mask = torch.zeros(7, 3, dtype=torch.bool)
    mask[5:, 0] = True
    mask[2:, 2] = True
    # Padding aimed at one expert: routed, it would change capacity and losses.
    x[mask] = 40.0
    return x, mask


CASES = {
    "top1-capacity": ("linear", dict(top_k=1, capacity_factor=0.5)),
    "top2-capacity-normalized": ("linear", dict(top_k=2, capacity_factor=0.5,
                                                normalize_gates=True, second_expert_policy="all")),
    "top2-dropless": ("linear", dict(top_k=2, capacity_factor=0.0, second_expert_policy="all")),
    "cosine-mixing-dropout": ("cosine", dict(top_k=1, capacity_factor=0.5, output_mixing=True,
                                             expert_dropout=0.5)),
    "cosine-top2-tokens-rule": ("cosine", dict(top_k=2, capacity_factor=0.3,
                                               capacity_rule="tokens", second_expert_policy="all")),
}
# Policies that draw noise per row: padding removal changes how many rows draw, so
# only the two layouts of the masked batch are compared.
NOISY_CASES = {
    "top2-sampling": ("linear", dict(top_k=2, capacity_factor=0.5, normalize_gates=True,
                                     second_expert_policy="sampling")),
    "top2-random": ("linear", dict(top_k=2, capacity_factor=1.0, second_expert_policy="random")),
}


@pytest.mark.parametrize("case", sorted(NOISY_CASES))
def test_static_layout_equals_compact_with_noisy_policies(case):
    kind, kw = NOISY_CASES[case]
    x, mask = padded_batch()
    reference = run(build(kind, **kw).train(), x, mask, "compact")
    assert_same(run(build(kind, **kw).train(), x, mask, "static"), reference)


@pytest.mark.parametrize("case", sorted(CASES))
def test_static_layout_and_masked_routing_equal_compact_and_removal(case):
    kind, kw = CASES[case]
    x, mask = padded_batch()
    ref_layer = build(kind, **kw).train()
    reference = run(ref_layer, x, mask, "compact", masked_routing=False)
    for layout in ("compact", "static"):
        layer = build(kind, **kw).train()
        assert_same(run(layer, x, mask, layout, masked_routing=True), reference)
    layer = build(kind, **kw).train()
    assert_same(run(layer, x, mask, "static", masked_routing=False), reference)
    if "capacity" in case and "dropless" not in case:
        assert int(reference[2]["dropped"]) > 0  # the case really drops


def test_static_plan_keeps_all_slots_in_expert_groups():
    layer = build("linear", top_k=2, capacity_factor=0.5)
    layer.dispatcher.layout = "static"
    idx = random_index(10, 2, E, seed=3, minus_one_rate=0.2)
    routing = Routing(idx, torch.rand(10, 2, dtype=torch.float64), 2)
    plan = layer.dispatcher.plan(routing)
    assert plan.assignment_index.numel() == 20
    assert int(plan.bank_sizes.sum()) == 20
    assert int(plan.row_mask.sum()) == int(plan.group_sizes.sum())
    # every row sits in the group of its own expert (unassigned: the last group)
    flat = idx.t().reshape(-1)[plan.assignment_index]
    owner = torch.repeat_interleave(torch.arange(E), plan.bank_sizes)
    assert torch.equal(torch.where(flat >= 0, flat, torch.full_like(flat, E - 1)), owner)
    assert torch.equal(plan.row_gates[~plan.row_mask], torch.zeros(int((~plan.row_mask).sum()),
                                                                    dtype=torch.float64))


@pytest.mark.parametrize("T", [0, 1, 7, 40, 129])
@pytest.mark.parametrize("rule", ["joint", "per-slot", "tokens"])
@pytest.mark.parametrize("training,cf,frac", [(True, 1.25, 1.0), (True, 0.3, 1.0),
                                              (False, 1.0, 0.25), (True, 0.0, 1.0)])
def test_capacity_from_device_count_equals_host_formula(T, rule, training, cf, frac):
    host = capacity_for(T, E, 2, training, cf, frac, rule)
    dev = capacity_for(torch.tensor(T), E, 2, training, cf, frac, rule)
    if host is None:
        assert dev is None
    else:
        assert int(dev) == host


def test_dropless_training_never_drops_and_matches_reference():
    torch.manual_seed(2)
    router = TopKRouter(D, E, top_k=2, capacity_factor=0.0, second_expert_policy="all")
    with torch.no_grad():
        router.wg.weight.mul_(0.5)
        router.wg.weight[0] += 5.0  # x >= 0 below: nearly every token picks expert 0 first
    layer = MoELayer(router, ExpertBank(E, D, F_DIM)).double().train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, D, dtype=torch.float64, generator=g).abs().requires_grad_(True)
    routing = router(x)
    assert routing.capacity is None
    out = layer(x)
    assert int(layer.stats.dropped) == 0
    assert int(layer.stats.expert_load[0]) >= 60  # far past any capacity-1.0 limit
    probs = torch.softmax(x.detach().float() @ router.wg.weight.float().t(), -1).double()
    top = probs.topk(2, dim=-1)
    ref = reference_moe(x.detach(), top.indices, top.values, None, layer.experts)
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    # and with a finite factor the same routing does drop
    router.capacity_factor = 1.0
    layer(x)
    assert int(layer.stats.dropped) > 0


def test_dropless_flag_trains_without_overflow(data_bin, tmp_path):
    proc = run_cli("train", train_args(data_bin, tmp_path / "ckpt", "--moe-capacity-factor", "0",
                                       max_update=4))
    lines = [json.loads(line[line.index("{"):]) for line in (proc.stdout + proc.stderr).splitlines()
             if "train_inner" in line and "{" in line]
    overflow = [float(line["moe_overflow"]) for line in lines]
    assert overflow and all(v == 0 for v in overflow), lines
