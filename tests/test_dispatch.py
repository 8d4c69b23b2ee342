"""MoELayer = router + SortDispatcher + ExpertBank, against a naive per-token loop.

The reference below walks every (token t, slot j) assignment in the documented
priority order (every first choice before any second choice, then token order),
lets each expert keep its first ``capacity`` assignments, and computes

    y_t = sum over kept (t, j) of gate[t, j] * FFN_e(x_t),
    FFN_e(x) = relu(x @ w1[e] + b1[e]) @ w2[e] + b2[e].
"""

import math

import pytest
import torch
from torch import nn

from moe_fairseq.layer.dispatcher import SortDispatcher, gather_rows, scatter_rows
from moe_fairseq.layer.expert_bank import ExpertBank
from moe_fairseq.layer.moe_layer import MoELayer
from moe_fairseq.routers.base import Router, Routing
from moe_fairseq.routers.top_k import TopKRouter

D, F_DIM, E = 6, 10, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- helpers


class FixedRouter(Router):
    """Returns a hand-built expert_index/capacity; gates = sigmoid(wg(x)), so they
    are a differentiable function of the tokens and of ``wg.weight``."""

    def __init__(self, embed_dim, num_experts, expert_index, capacity, losses=None):
        super().__init__()
        self.num_experts = num_experts
        self.expert_index = torch.as_tensor(expert_index, dtype=torch.long)  # [T, k]
        self.capacity = capacity
        self.extra_losses = losses or {}
        self.wg = nn.Linear(embed_dim, self.expert_index.size(1), bias=False)
        self.seen = []

    def gates(self, x):
        return torch.sigmoid(self.wg(x))

    def route(self, x, pass_index=0):
        assert x.size(0) == self.expert_index.size(0), "router got an unexpected token count"
        self.seen.append(x.detach().clone())
        losses = {name: fn(x) for name, fn in self.extra_losses.items()}
        return Routing(self.expert_index.clone(), self.gates(x), self.capacity, losses)


def reference_kept(expert_index, capacity, num_experts):
    """Per expert, the (t, j) assignments it keeps, in priority order."""
    index = torch.as_tensor(expert_index).tolist()
    T = len(index)
    k = len(index[0]) if T else 0
    kept = [[] for _ in range(num_experts)]
    for j in range(k):
        for t in range(T):
            e = index[t][j]
            if e < 0:
                continue
            if capacity is None or len(kept[e]) < capacity:
                kept[e].append((t, j))
    return kept


def reference_moe(x, expert_index, gates, capacity, bank):
    """Naive per-token, per-slot MoE output [T, d]."""
    per_expert = reference_kept(expert_index, capacity, bank.num_experts)
    kept = {tj for assignments in per_expert for tj in assignments}
    T, k = expert_index.shape
    rows = []
    for t in range(T):
        y = x.new_zeros(x.size(1))
        for j in range(k):
            if (t, j) not in kept:
                continue
            e = int(expert_index[t, j])
            h = torch.relu(x[t] @ bank.w1[e] + bank.b1[e])
            y = y + gates[t, j] * (h @ bank.w2[e] + bank.b2[e])
        rows.append(y)
    return torch.stack(rows) if rows else x.new_zeros(0, x.size(1))


def make_layer(router, seed=0, dtype=torch.float64, impl="loop"):
    torch.manual_seed(seed)
    bank = ExpertBank(router.num_experts, D, F_DIM)
    bank.impl = impl
    return MoELayer(router, bank).to(dtype)


def grads_of(out, cotangent, inputs):
    grads = torch.autograd.grad((out * cotangent).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]


def layer_inputs(layer, x):
    b = layer.experts
    return [x, b.w1, b.b1, b.w2, b.b2, layer.router.wg.weight]


def assert_layer_matches_reference(layer, x, ref_fn, rtol=1e-10, atol=1e-12):
    """Compare outputs and gradients (x, w1, b1, w2, b2, router weight)."""
    cot = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(99))
    inputs = layer_inputs(layer, x)
    out = layer(x)
    ref = ref_fn(x)
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    names = ["x", "w1", "b1", "w2", "b2", "router.wg.weight"]
    for name, g, r in zip(names, grads_of(out, cot, inputs), grads_of(ref, cot, inputs)):
        torch.testing.assert_close(
            g, r, rtol=rtol, atol=atol, msg=lambda m, n=name: f"grad {n}: {m}"
        )
    return out


def random_index(T, k, num_experts, seed, minus_one_rate=0.0, distinct=True):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, num_experts, (T, k), generator=g)
    if k == 2 and distinct:  # distinct experts per token, like a real top-2 router
        clash = index[:, 1] == index[:, 0]
        index[clash, 1] = (index[clash, 0] + 1) % num_experts
    if minus_one_rate > 0:
        index[torch.rand(T, k, generator=g) < minus_one_rate] = -1
    return index


def token_batch(T, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g, dtype=dtype).requires_grad_(True)


# ---------------------------------------------------------------- fixed routing


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("capacity", [None, 2, 1])
@pytest.mark.parametrize("minus_one_rate", [0.0, 0.25])
def test_fixed_routing_matches_reference(k, capacity, minus_one_rate):
    T = 11
    seed = 10 * k + (capacity or 0)
    index = random_index(T, k, E, seed=seed, minus_one_rate=minus_one_rate)
    torch.manual_seed(5)
    router = FixedRouter(D, E, index, capacity)
    layer = make_layer(router)
    x = token_batch(T)
    assert_layer_matches_reference(
        layer,
        x,
        lambda x: reference_moe(x, index, router.gates(x), capacity, layer.experts),
        **TIGHT,
    )
    plan = layer.dispatcher.plan(router(x))
    n_real = int((index >= 0).sum())
    kept = reference_kept(index, capacity, E)
    assert plan.num_assignments == n_real
    assert plan.num_dropped == n_real - sum(len(v) for v in kept)
    if capacity == 1:
        assert plan.num_dropped > 0  # the case really exercises drops


def test_fixed_routing_same_expert_in_both_slots():
    # A hand-built routing may send both slots of a token to one expert: the two
    # assignments are separate rows, each weighed by its own gate.
    T = 8
    index = random_index(T, 2, E, seed=4, distinct=False)
    index[:3, 1] = index[:3, 0]
    for capacity in (None, 3):
        torch.manual_seed(5)
        router = FixedRouter(D, E, index, capacity)
        layer = make_layer(router)
        x = token_batch(T)
        assert_layer_matches_reference(
            layer,
            x,
            lambda x: reference_moe(x, index, router.gates(x), capacity, layer.experts),
            **TIGHT,
        )


def test_gather_and_scatter_rows_with_slot_copies():
    # index addresses a virtual [k*T, d] stack: row j*T + t is token t's slot j.
    T, k = 5, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.tensor([7, 0, 2, 5, 9, 1])  # tokens 2, 0, 2, 0, 4, 1
    rows = gather_rows(x, index, k)
    assert torch.equal(rows, x.detach()[[2, 0, 2, 0, 4, 1]])
    cot = torch.randn(6, D, dtype=torch.float64, generator=g)
    (gx,) = torch.autograd.grad((rows * cot).sum(), [x])
    expected = torch.zeros(T, D, dtype=torch.float64)
    for i, t in enumerate([2, 0, 2, 0, 4, 1]):
        expected[t] += cot[i]
    torch.testing.assert_close(gx, expected, rtol=0, atol=0)  # token 3 gets no gradient
    src = torch.randn(6, D, dtype=torch.float64, generator=g, requires_grad=True)
    out = scatter_rows(src, index, T, k)
    expected = torch.zeros(T, D, dtype=torch.float64)
    for i, t in enumerate([2, 0, 2, 0, 4, 1]):
        expected[t] += src.detach()[i]
    torch.testing.assert_close(out, expected, **TIGHT)
    (gs,) = torch.autograd.grad((out * cot[:T]).sum(), [src])
    torch.testing.assert_close(gs, cot[:T][[2, 0, 2, 0, 4, 1]], rtol=0, atol=0)


# 5 tokens, 2 slots, 3 experts; -1 = no expert.
#   priority  j*T+t:   slot 0: t0..t4 -> 0..4    slot 1: t0..t4 -> 5..9
HAND_INDEX = [
    [1, 0],
    [1, 2],
    [0, 1],
    [1, -1],
    [2, 1],
]


def test_plan_drops_exactly_past_capacity_in_priority_order():
    # capacity 2:
    #   expert 0 requests (t2,j0)=2, (t0,j1)=5              -> keeps 2, 5
    #   expert 1 requests (t0,j0)=0, (t1,j0)=1, (t3,j0)=3,
    #                     (t2,j1)=7, (t4,j1)=9              -> keeps 0, 1; drops 3, 7, 9
    #   expert 2 requests (t4,j0)=4, (t1,j1)=6              -> keeps 4, 6
    #   (t3, j1) = -1 is no assignment at all.
    index = torch.tensor(HAND_INDEX)
    gates = torch.arange(10, dtype=torch.float64).reshape(2, 5).t() / 10  # gate[t, j] = (j*5+t)/10
    plan = SortDispatcher(3).plan(Routing(index, gates, 2))
    assert plan.assignment_index.tolist() == [2, 5, 0, 1, 4, 6]
    assert plan.token_index.tolist() == [2, 0, 0, 1, 4, 1]
    assert plan.group_sizes.tolist() == [2, 2, 2]
    assert plan.requested.tolist() == [2, 5, 2]
    assert plan.num_tokens == 5
    assert plan.num_assignments == 9
    assert plan.num_dropped == 3
    expected_gates = torch.tensor([2, 5, 0, 1, 4, 6], dtype=torch.float64) / 10
    torch.testing.assert_close(plan.row_gates, expected_gates, rtol=0, atol=0)
    # Same as the reference rule.
    expected = [j * 5 + t for per_e in reference_kept(index, 2, 3) for (t, j) in per_e]
    assert plan.assignment_index.tolist() == expected


def test_plan_first_choices_beat_earlier_tokens_second_choices():
    # capacity 1: expert 0 gets (t0, j1) = 5 and (t2, j0) = 2; the later token's
    # FIRST choice wins over the earlier token's second choice.
    index = torch.tensor(HAND_INDEX)
    plan = SortDispatcher(3).plan(Routing(index, torch.ones(5, 2), 1))
    assert plan.assignment_index.tolist() == [2, 0, 4]
    assert plan.group_sizes.tolist() == [1, 1, 1]
    assert plan.requested.tolist() == [2, 5, 2]
    assert plan.num_dropped == 6


def test_plan_without_capacity_keeps_everything_but_minus_one():
    index = torch.tensor(HAND_INDEX)
    plan = SortDispatcher(3).plan(Routing(index, torch.ones(5, 2), None))
    assert plan.assignment_index.tolist() == [2, 5, 0, 1, 3, 7, 9, 4, 6]
    assert plan.group_sizes.tolist() == [2, 5, 2]
    assert plan.num_dropped == 0
    assert 8 not in plan.assignment_index.tolist()  # the -1 slot (t3, j1)


def test_minus_one_slots_are_ignored():
    # Every token's second slot is -1 (with a non-zero gate): the output and all
    # gradients equal those of top-1 routing on slot 0, and -1 takes no capacity.
    T = 9
    first = random_index(T, 1, E, seed=3)
    index = torch.cat([first, torch.full((T, 1), -1)], dim=1)
    for capacity in (None, 2):
        torch.manual_seed(5)
        router2 = FixedRouter(D, E, index, capacity)
        layer2 = make_layer(router2)
        torch.manual_seed(5)
        router1 = FixedRouter(D, E, first, capacity)
        layer1 = make_layer(router1)
        with torch.no_grad():  # the top-1 router's single gate = first gate of the top-2 one
            router1.wg.weight.copy_(router2.wg.weight[:1])
        x2 = token_batch(T)
        x1 = token_batch(T)
        out2, out1 = layer2(x2), layer1(x1)
        torch.testing.assert_close(out2, out1, **TIGHT)
        cot = torch.randn(T, D, dtype=torch.float64)
        g2 = grads_of(out2, cot, layer_inputs(layer2, x2))
        g1 = grads_of(out1, cot, layer_inputs(layer1, x1))
        for a, b in zip(g2[:5], g1[:5]):
            torch.testing.assert_close(a, b, **TIGHT)
        # The -1 slot's gate gets no gradient; the first slot's matches.
        torch.testing.assert_close(g2[5][1], torch.zeros(D, dtype=torch.float64), rtol=0, atol=0)
        torch.testing.assert_close(g2[5][0], g1[5][0], **TIGHT)
        plan = layer2.dispatcher.plan(router2(x2))
        assert plan.requested.tolist() == torch.bincount(first[:, 0], minlength=E).tolist()
        assert plan.num_assignments == T


def test_all_minus_one_gives_zero_output():
    T = 4
    router = FixedRouter(D, E, torch.full((T, 2), -1), 1)
    layer = make_layer(router)
    x = token_batch(T)
    out = layer(x)
    assert torch.equal(out, torch.zeros(T, D, dtype=torch.float64))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert layer.stats.assignments.item() == 0 and layer.stats.dropped.item() == 0


# ---------------------------------------------------------------- real TopKRouter


def topk_reference(x, router, k, capacity, bank):
    """Routing from float64 softmax(x W^T) + the naive MoE loop."""
    probs = torch.softmax(x @ router.wg.weight.t(), dim=-1)
    top = probs.topk(k, dim=-1)
    return reference_moe(x, top.indices, top.values, capacity, bank), top.indices


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("mode", ["eval", "eval_fraction", "train_capacity"])
def test_topk_router_layer_matches_reference(k, mode):
    T = 12
    # Capacity:  eval, fraction 1.0 -> None;  eval, fraction 0.25 -> ceil(0.25*12) = 3;
    #            train, cf 0.5 -> ceil(0.5 * k * 12 / 4) = 2 (k=1) or 3 (k=2).
    expected_capacity = {
        "eval": None,
        "eval_fraction": 3,
        "train_capacity": {1: 2, 2: 3}[k],
    }[mode]
    torch.manual_seed(3)
    router = TopKRouter(
        D,
        E,
        top_k=k,
        capacity_factor=0.5,
        eval_capacity_token_fraction=0.25 if mode == "eval_fraction" else 1.0,
        second_expert_policy="all",
        jitter_eps=0.0,
    )
    layer = make_layer(router, seed=4)
    layer.train(mode == "train_capacity")
    # Scale the router so that each token's choice is clear (no near-ties).
    with torch.no_grad():
        router.wg.weight.mul_(3.0)
    x = token_batch(T, seed=7)
    routing = router(x)
    assert routing.capacity == expected_capacity
    _, ref_index = topk_reference(x.detach(), router, k, expected_capacity, layer.experts)
    assert torch.equal(routing.expert_index, ref_index)
    # The router computes in fp32, the rest of the layer in float64.
    assert_layer_matches_reference(
        layer,
        x,
        lambda x: topk_reference(x, router, k, expected_capacity, layer.experts)[0],
        rtol=1e-5,
        atol=1e-6,
    )
    plan = layer.dispatcher.plan(routing)
    if expected_capacity is not None:
        assert plan.num_dropped > 0  # the case really exercises drops
        kept = reference_kept(ref_index, expected_capacity, E)
        assert plan.assignment_index.tolist() == [j * T + t for per_e in kept for (t, j) in per_e]
    else:
        assert plan.num_dropped == 0


# ---------------------------------------------------------------- padding


def test_padding_mask_fixed_router():
    # [B=2, S=4] with 3 padded positions -> 5 routed tokens, in row-major order.
    mask = torch.tensor([[False, True, False, False], [True, False, True, False]])
    index = torch.tensor(HAND_INDEX)
    E3 = 3
    torch.manual_seed(5)
    router = FixedRouter(D, E3, index, 2)
    layer = make_layer(router)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, D, dtype=torch.float64, generator=g).requires_grad_(True)
    out = layer(x, padding_mask=mask)
    assert out.shape == x.shape
    # The router saw exactly the non-padded tokens, in order: padded tokens are
    # not routed and so cannot take capacity.
    assert len(router.seen) == 1
    assert torch.equal(router.seen[0], x.detach()[~mask])
    assert torch.equal(out[mask], torch.zeros(int(mask.sum()), D, dtype=torch.float64))
    real = x[~mask]
    ref = reference_moe(real, index, router.gates(real), 2, layer.experts)
    torch.testing.assert_close(out[~mask], ref, **TIGHT)
    cot = torch.randn(x.shape, dtype=torch.float64, generator=g)
    (gx,) = torch.autograd.grad((out * cot).sum(), [x])
    (gr,) = torch.autograd.grad((ref * cot[~mask]).sum(), [x])
    torch.testing.assert_close(gx, gr, **TIGHT)
    assert torch.equal(gx[mask], torch.zeros(int(mask.sum()), D, dtype=torch.float64))
    stats = layer.stats
    assert stats.tokens.item() == 5
    assert stats.expert_load.tolist() == [2, 5, 2]  # HAND_INDEX requests only
    assert stats.assignments.item() == 9
    assert stats.dropped.item() == 3


def test_padding_mask_topk_router_takes_no_capacity():
    # Padded positions hold huge vectors aimed at expert 0; if they were routed
    # they would fill expert 0's capacity and change the real tokens' outputs.
    torch.manual_seed(3)
    router = TopKRouter(
        D, E, top_k=2, capacity_factor=0.5, second_expert_policy="all", jitter_eps=0.0
    )
    layer = make_layer(router, seed=4)
    layer.train()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 5, D, dtype=torch.float64, generator=g)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True
    mask[2, 1:] = True
    with torch.no_grad():
        x[mask] = 50.0 * router.wg.weight[0].double()
    x.requires_grad_(True)
    out = layer(x, padding_mask=mask)
    stats = layer.stats
    n_real = int((~mask).sum())
    assert stats.tokens.item() == n_real
    assert stats.expert_load.sum().item() == 2 * n_real
    assert torch.equal(out[mask], torch.zeros(int(mask.sum()), D, dtype=torch.float64))
    (gx,) = torch.autograd.grad(out.pow(2).sum(), [x])
    assert torch.equal(gx[mask], torch.zeros(int(mask.sum()), D, dtype=torch.float64))
    assert bool((gx[~mask] != 0).any())
    # Same as running the layer on the real tokens alone (same capacity, same drops).
    real = x.detach()[~mask].clone().requires_grad_(True)
    ref = layer(real)
    torch.testing.assert_close(out[~mask], ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(layer.stats.expert_load, stats.expert_load)
    # With the padding routed instead, expert 0's load would be larger.
    layer(x.detach())
    assert layer.stats.expert_load[0] > stats.expert_load[0]


def test_all_padding():
    torch.manual_seed(3)
    layer = make_layer(TopKRouter(D, E, top_k=2, second_expert_policy="all"), seed=4)
    layer.train()
    x = torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True)
    out = layer(x, padding_mask=torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))
    (out.sum() + sum(layer.stats.losses.values())).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert layer.stats.tokens.item() == 0
    assert layer.stats.expert_load.tolist() == [0] * E


# ---------------------------------------------------------------- stats


def test_stats_on_hand_built_case():
    index = torch.tensor(HAND_INDEX)
    torch.manual_seed(5)
    balance = lambda x: x.pow(2).mean()  # noqa: E731  (any differentiable scalar)
    router = FixedRouter(D, 3, index, 2, losses={"balance": balance})
    layer = make_layer(router)
    x = token_batch(5)
    layer(x)
    s = layer.stats
    assert s.tokens.item() == 5
    assert s.assignments.item() == 9  # 10 slots, one -1
    assert s.dropped.item() == 3  # expert 1 keeps 2 of its 5
    assert s.expert_load.tolist() == [2, 5, 2]
    assert s.expert_passes.item() == 5
    # load (2, 5, 2): mean 3, population variance (1 + 4 + 1) / 3 = 2 -> cv = sqrt(2) / 3
    assert s.load_cv.item() == pytest.approx(math.sqrt(2.0) / 3.0, rel=1e-6)
    assert s.entropy_count.item() == 0  # this router reports no probabilities
    assert set(s.losses) == {"balance"}
    torch.testing.assert_close(s.losses["balance"], balance(x))
    assert s.losses["balance"].requires_grad
    # The running per-expert total accumulates over forwards until reset.
    assert layer.expert_load_total.tolist() == [2, 5, 2]
    layer(x)
    assert layer.expert_load_total.tolist() == [4, 10, 4]
    layer.reset_expert_load()
    assert layer.expert_load_total.tolist() == [0, 0, 0]


def test_stats_balanced_load_and_topk_entropy():
    # Perfectly balanced requests -> cv 0.
    index = torch.tensor([[0, 1], [1, 2], [2, 0]])
    layer = make_layer(FixedRouter(D, 3, index, None))
    layer(token_batch(3))
    assert layer.stats.expert_load.tolist() == [2, 2, 2]
    assert layer.stats.load_cv.item() == 0.0
    assert layer.stats.dropped.item() == 0
    # The real router reports probabilities: entropy_sum = T * mean entropy.
    torch.manual_seed(3)
    router = TopKRouter(D, E, top_k=2, second_expert_policy="all")
    layer = make_layer(router, seed=4).eval()
    x = token_batch(7)
    layer(x)
    p = torch.softmax(x.detach() @ router.wg.weight.detach().t(), -1)
    entropy = -(p * p.log()).sum()
    assert layer.stats.entropy_count.item() == 7
    assert layer.stats.entropy_sum.item() == pytest.approx(entropy.item(), rel=1e-5)
    assert set(layer.stats.losses) == {"balance", "z"}


def test_stats_load_cv_zero_load():
    layer = make_layer(FixedRouter(D, E, torch.full((3, 1), -1), None))
    layer(token_batch(3))
    assert layer.stats.expert_load.tolist() == [0] * E
    assert layer.stats.load_cv.item() == 0.0


# ---------------------------------------------------------------- empty input


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str
)
@pytest.mark.parametrize("training", [True, False])
def test_empty_input_forward_backward(dtype, training):
    torch.manual_seed(3)
    router = TopKRouter(D, E, top_k=2, second_expert_policy="all")
    layer = make_layer(router, seed=4, dtype=dtype, impl="auto")
    layer.train(training)
    x = torch.zeros(0, D, dtype=dtype, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, D) and out.dtype == dtype
    loss = out.float().sum() + sum(layer.stats.losses.values())
    loss.backward()
    assert x.grad is not None and x.grad.shape == (0, D)
    # Every parameter stays in the graph (same backward on every step / rank).
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert torch.equal(p.grad, torch.zeros_like(p)), name
    assert layer.stats.tokens.item() == 0
    assert layer.stats.assignments.item() == 0
    assert layer.stats.expert_load.tolist() == [0] * E


# ---------------------------------------------------------------- expert bank


def bank_reference(rows, group_sizes, bank):
    """Per-row FFN of the expert owning the row, in float64."""
    owners = torch.repeat_interleave(torch.arange(bank.num_experts), group_sizes)
    w1, b1, w2, b2 = (p.double() for p in (bank.w1, bank.b1, bank.w2, bank.b2))
    out = []
    for r, e in zip(rows.double(), owners.tolist()):
        out.append(torch.relu(r @ w1[e] + b1[e]) @ w2[e] + b2[e])
    return torch.stack(out)


def run_bank(bank, rows, group_sizes, cot):
    rows = rows.detach().clone().requires_grad_(True)
    params = [bank.w1, bank.b1, bank.w2, bank.b2]
    out = bank(rows, group_sizes)
    grads = torch.autograd.grad((out.float() * cot).sum(), [rows] + params)
    return out, grads


@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float32, 1e-5), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)],
)
def test_expert_bank_loop_matches_auto(dtype, tol):
    # d, f multiples of 16 so that grouped_mm is usable where it exists (CPU
    # fp16/bf16 with torch 2.13; fp32 uses the loop either way); group sizes
    # include an empty expert. tol is a relative (norm) error: both paths round
    # in the low-precision dtype.
    torch.manual_seed(0)
    bank = ExpertBank(4, 16, 32)
    group_sizes = torch.tensor([3, 0, 5, 2])
    rows = torch.randn(10, 16).to(dtype)
    cot = torch.randn(10, 16)
    bank.impl = "loop"
    out_loop, g_loop = run_bank(bank, rows, group_sizes, cot)
    bank.impl = "auto"
    out_auto, g_auto = run_bank(bank, rows, group_sizes, cot)
    assert out_loop.dtype == out_auto.dtype == dtype
    ref = bank_reference(rows, group_sizes, bank)

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))

    assert rel(out_auto, out_loop) < tol
    assert rel(out_loop, ref) < tol
    assert rel(out_auto, ref) < tol
    for name, a, b in zip(["rows", "w1", "b1", "w2", "b2"], g_auto, g_loop):
        assert rel(a, b) < tol, name
    # Expert 1 has no rows: its parameters get exactly zero gradient either way.
    for a, b in zip(g_auto[1:], g_loop[1:]):
        assert torch.equal(a[1], torch.zeros_like(a[1]))
        assert torch.equal(b[1], torch.zeros_like(b[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["loop", "auto"])
def test_expert_bank_no_rows_forward_backward(dtype, impl):
    # A rank or a batch with nothing routed: N = 0 rows must still run backward
    # and give every expert parameter a (zero) gradient.
    torch.manual_seed(0)
    bank = ExpertBank(4, 16, 32)
    bank.impl = impl
    rows = torch.zeros(0, 16, dtype=dtype, requires_grad=True)
    out = bank(rows, torch.zeros(4, dtype=torch.long))
    assert out.shape == (0, 16) and out.dtype == dtype
    out.float().sum().backward()
    for name, p in bank.named_parameters():
        assert p.grad is not None, name
        assert torch.equal(p.grad, torch.zeros_like(p)), name


def test_starved_fraction_counts_experts_under_a_tenth_of_fair_share():
    from moe_fairseq.layer.moe_layer import MoEStats

    # load (100, 100, 5, 95): mean 75, a tenth of it 7.5 -> only the third expert
    stats = MoEStats(expert_load=torch.tensor([100, 100, 5, 95]))
    assert stats.starved_fraction.item() == pytest.approx(0.25)
    # (0, 0, 0, 40): mean 10 -> three experts below 1.0
    stats = MoEStats(expert_load=torch.tensor([0, 0, 0, 40]))
    assert stats.starved_fraction.item() == pytest.approx(0.75)
    # exactly at a tenth is not starved: (1, 19): mean 10, 1 < 1.0 is false
    stats = MoEStats(expert_load=torch.tensor([1, 19]))
    assert stats.starved_fraction.item() == 0.0
