"""Expert parallelism at the layer level: MoELayer + AllToAllDispatcher over real
gloo processes on CPU, against single-process references.

Each launch spawns W processes (gloo, ``file://`` rendezvous in a tmp dir: no
ports) that run every case of :data:`CASES` in turn and check it *inside* the
worker against a single-process reference built from the same seeds (every rank
can rebuild every rank's batch). The parent only collects "ok" or a traceback per
case and rank; one launch per W is shared by all cases (module-scoped fixture),
because starting a process that imports fairseq costs seconds.

References (fp64 layers; the router computes in fp32 either way):

- *per-rank* (valid with drops): the single-process layer with all E experts run
  on each rank's batch separately; rank r's output, input gradient and router
  gradient are those of its own batch, its local experts' gradients are the
  slices of the expert gradients summed over all ranks' batches (capacity is per
  rank, computed from the rank's token count, in both);
- *full batch* (no drops only): the single-process layer on the concatenation of
  all batches; the router gradient summed over ranks equals the full-batch one
  (to fp32 precision: the router's fp32 matmul rounds differently on more rows).

A hang must fail, not block CI: collectives time out after
``COLLECTIVE_TIMEOUT_S`` and the parent kills workers still running after
``LAUNCH_TIMEOUT_S``.
"""

import json
import os
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from moe_fairseq.parallel.all_to_all import all_to_all_rows, exchange_counts
from moe_fairseq.layer.expert_bank import ExpertBank
from moe_fairseq.parallel.dispatcher import (
    AllToAllDispatcher,
    build_local_expert_bank,
    source_to_expert_order,
)
from moe_fairseq.layer.moe_layer import MoELayer
from moe_fairseq.options import MoEConfigError
from moe_fairseq.routers.base import Router, Routing
from moe_fairseq.routers.cosine import CosineRouter
from moe_fairseq.routers.stratified import StratifiedRouter
from moe_fairseq.routers.top_k import TopKRouter

D, F_DIM, E_PER_RANK = 6, 10, 2
TIGHT = dict(rtol=1e-10, atol=1e-12)
COLLECTIVE_TIMEOUT_S = 30
LAUNCH_TIMEOUT_S = 120
WORLDS = (2, 4)


# ------------------------------------------------------------------ shared helpers


def num_experts(world):
    return E_PER_RANK * world


def tokens_of(rank):
    return 5 + 3 * rank  # uneven batches: 5, 8, 11, 14


def batch(rank, T=None, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + rank)
    return torch.randn(tokens_of(rank) if T is None else T, D, generator=g, dtype=torch.float64)


def cotangent(rank, T, seed=0):
    g = torch.Generator().manual_seed(5000 + 1000 * seed + rank)
    return torch.randn(T, D, generator=g, dtype=torch.float64)


class FixedRouter(Router):
    """Routes to ``self.index`` (set per batch; ``[T, k]``, -1 = none) with capacity
    ``self.capacity``; gates ``sigmoid(wg x)`` depend on the tokens and on wg."""

    def __init__(self, num_experts, k, capacity):
        super().__init__()
        self.num_experts = num_experts
        self.capacity = capacity
        self.index = None
        self.wg = nn.Linear(D, k, bias=False)

    def route(self, x, pass_index=0):
        assert self.index.size(0) == x.size(0)
        return Routing(self.index.clone(), torch.sigmoid(self.wg(x)), self.capacity)


def build_layers(rank, world, make_router, seed=0):
    """(expert-parallel layer of this rank, single-process layer with all experts),
    both built from the same seed, in float64."""
    torch.manual_seed(seed)
    router = make_router()
    rng = torch.get_rng_state()
    full = ExpertBank(num_experts(world), D, F_DIM)
    after_full = torch.get_rng_state()
    torch.set_rng_state(rng)
    local = build_local_expert_bank(num_experts(world), D, F_DIM, rank, world)
    assert torch.equal(torch.get_rng_state(), after_full)  # same random draws
    full.impl = local.impl = "loop"
    ref_router = make_router()
    ref_router.load_state_dict(router.state_dict())
    ep = MoELayer(router, local, AllToAllDispatcher(num_experts(world))).double()
    ref = MoELayer(ref_router, full).double()
    return ep, ref


def params_of(layer):
    """Router parameters (any number), then the expert bank's w1, b1, w2, b2."""
    b = layer.experts
    return [*layer.router.parameters(), b.w1, b.b1, b.w2, b.b2]


def num_router_params(layer):
    return len(list(layer.router.parameters()))


def grads(out, cot, inputs):
    gs = torch.autograd.grad((out * cot).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, gs)]


def run_ep(layer, x, cot):
    """Forward + ``backward`` (as fairseq does) -> (out, [x.grad, router, w1, b1, w2, b2])."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * cot).sum().backward()
    return out.detach(), [torch.zeros_like(p) if p.grad is None else p.grad
                          for p in [x] + params_of(layer)]


def per_rank_reference(ref, rank, world, batches, cots, before_each=None):
    """Single-process layer on each rank's batch: this rank's output and x/router
    grads, expert grads summed over all ranks' batches, total dropped."""
    expert_grads, mine, dropped = None, None, 0
    nr = num_router_params(ref)
    for s in range(world):
        if before_each is not None:
            before_each(s)
        x = batches[s].clone().requires_grad_(True)
        out = ref(x)
        dropped += int(ref.stats.dropped)
        g = grads(out, cots[s], [x] + params_of(ref))
        if expert_grads is None:
            expert_grads = g[1 + nr:]
        else:
            expert_grads = [a + b for a, b in zip(expert_grads, g[1 + nr:])]
        if s == rank:
            mine = (out.detach(), g[:1 + nr])
    out, own = mine
    return out, own + expert_grads, dropped


def local_slice(t, rank):
    return t[rank * E_PER_RANK:(rank + 1) * E_PER_RANK]


def assert_matches(out, got, ref_out, ref_grads, rank, **tol):
    tol = tol or TIGHT
    torch.testing.assert_close(out, ref_out, **tol)
    assert len(got) == len(ref_grads)
    nr = len(got) - 5  # x, router parameters, w1, b1, w2, b2
    names = ["x"] + [f"router param {i}" for i in range(nr)] + ["w1", "b1", "w2", "b2"]
    for i, (name, g, r) in enumerate(zip(names, got, ref_grads)):
        r = local_slice(r, rank) if i > nr else r
        torch.testing.assert_close(g, r, **tol, msg=lambda m, n=name: f"grad {n}: {m}")


# ------------------------------------------------------------------ cases (run in workers)


def case_top_k(rank, world, k, drops):
    def make_router():
        return TopKRouter(D, num_experts(world), top_k=k, capacity_factor=0.5,
                          eval_capacity_token_fraction=1.0, second_expert_policy="all")

    ep, ref = build_layers(rank, world, make_router, seed=k)
    # drops: training capacity ceil(0.5 * k * T / E) per rank; no drops: eval, no limit.
    ep.train(drops)
    ref.train(drops)
    batches = [batch(s, seed=k) for s in range(world)]
    cots = [cotangent(s, tokens_of(s), seed=k) for s in range(world)]
    out, got = run_ep(ep, batches[rank], cots[rank])
    ref_out, ref_grads, dropped = per_rank_reference(ref, rank, world, batches, cots)
    assert_matches(out, got, ref_out, ref_grads, rank)
    assert (dropped > 0) == drops, dropped  # the case really exercises drops (or none)
    if drops:
        return
    # No drops: the same as one process on the concatenated batch.
    lo = sum(tokens_of(s) for s in range(rank))
    x = torch.cat(batches).requires_grad_(True)
    full_out = ref(x)
    full = grads(full_out, torch.cat(cots), [x] + params_of(ref))
    rows = slice(lo, lo + tokens_of(rank))
    router_sum = got[1].clone()
    dist.all_reduce(router_sum)
    # The fp32 router's matmul over a different number of rows rounds differently
    # (~1e-7 relative), hence fp32-level tolerances here; the per-rank reference
    # above is the tight check.
    fp32 = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, full_out.detach()[rows], **fp32)
    torch.testing.assert_close(got[0], full[0][rows], **fp32)
    torch.testing.assert_close(router_sum, full[1], **fp32)
    for g, r in zip(got[2:], full[2:]):
        torch.testing.assert_close(g, local_slice(r, rank), **fp32)


def case_nllb(rank, world, eom, prioritized):
    """--moe-eom / --moe-batch-prioritized-routing under expert parallelism, training
    with drops: each rank draws its own tokens' EOM masks before any row travels, so
    with the same seed per rank its output and gradients are the single process's on
    that rank's batch (the reference reseeds alike before each rank's batch)."""
    def make_router():
        return TopKRouter(D, num_experts(world), top_k=2, capacity_factor=0.5,
                          second_expert_policy="all", normalize_gates=True,
                          batch_prioritized=prioritized)

    ep, ref = build_layers(rank, world, make_router, seed=4)
    ep.eom = ref.eom = eom
    batches = [batch(s, seed=4) for s in range(world)]
    cots = [cotangent(s, tokens_of(s), seed=4) for s in range(world)]
    torch.manual_seed(100 + rank)
    out, got = run_ep(ep, batches[rank], cots[rank])
    ref_out, ref_grads, dropped = per_rank_reference(
        ref, rank, world, batches, cots, before_each=lambda s: torch.manual_seed(100 + s))
    assert_matches(out, got, ref_out, ref_grads, rank)
    assert dropped > 0
    if eom:  # the masks really masked something: not the unmasked layer's output
        ref.eom = 0.0
        plain, _, _ = per_rank_reference(ref, rank, world, batches, cots)
        assert not torch.allclose(out, plain)


def _fixed_index(rank, world, T, local_only, seed):
    """``[T, 2]`` random experts (distinct per token, some -1); with local_only,
    only this rank's own experts."""
    g = torch.Generator().manual_seed(77 + seed + 10 * rank)
    if local_only:
        index = rank * E_PER_RANK + torch.randint(0, E_PER_RANK, (T, 2), generator=g)
        index[:, 1] = rank * E_PER_RANK + (index[:, 0] - rank * E_PER_RANK + 1) % E_PER_RANK
    else:
        index = torch.randint(0, num_experts(world), (T, 2), generator=g)
        clash = index[:, 1] == index[:, 0]
        index[clash, 1] = (index[clash, 0] + 1) % num_experts(world)
    index[torch.rand(T, 2, generator=g) < 0.2] = -1
    return index


def case_fixed_routing(rank, world, local_ranks, capacity, sizes=None, seed=0):
    """Hand-built routing: ranks in ``local_ranks`` only use their own experts."""
    sizes = sizes or [tokens_of(s) for s in range(world)]
    index = [_fixed_index(s, world, sizes[s], s in local_ranks, seed) for s in range(world)]

    def make_router():
        return FixedRouter(num_experts(world), 2, capacity)

    ep, ref = build_layers(rank, world, make_router, seed=seed)
    batches = [batch(s, T=sizes[s], seed=seed) for s in range(world)]
    cots = [cotangent(s, sizes[s], seed=seed) for s in range(world)]
    ep.router.index = index[rank]
    out, got = run_ep(ep, batches[rank], cots[rank])

    def set_index(s):
        ref.router.index = index[s]

    ref_out, ref_grads, _ = per_rank_reference(ref, rank, world, batches, cots, set_index)
    assert_matches(out, got, ref_out, ref_grads, rank)
    return ep


def case_one_rank_local_only(rank, world):
    # Rank 0 sends nothing to its peers; the others route anywhere.
    case_fixed_routing(rank, world, local_ranks={0}, capacity=3)


def case_all_ranks_local_only(rank, world):
    # No row crosses ranks at all: every peer split is 0, in both directions.
    case_fixed_routing(rank, world, local_ranks=set(range(world)), capacity=None)


def case_one_rank_has_no_tokens(rank, world):
    # Rank 0 has an empty batch; it still takes part in every collective, forward
    # and backward, and receives rows from its peers for its experts.
    sizes = [0] + [tokens_of(s) for s in range(1, world)]
    case_fixed_routing(rank, world, local_ranks=set(), capacity=2, sizes=sizes, seed=1)

    def make_router():
        return TopKRouter(D, num_experts(world), top_k=2, capacity_factor=0.5,
                          second_expert_policy="all")

    ep, ref = build_layers(rank, world, make_router, seed=2)
    batches = [batch(s, T=sizes[s], seed=2) for s in range(world)]
    cots = [cotangent(s, sizes[s], seed=2) for s in range(world)]
    out, got = run_ep(ep, batches[rank], cots[rank])
    ref_out, ref_grads, _ = per_rank_reference(ref, rank, world, batches, cots)
    assert_matches(out, got, ref_out, ref_grads, rank)
    assert out.shape == (sizes[rank], D)


def case_experts_receive_nothing(rank, world):
    # Only the last rank has tokens and it keeps them on its own experts: every
    # other rank has no tokens, sends nothing and receives nothing, yet runs the
    # backward (its expert gradients are zero).
    sizes = [0] * (world - 1) + [tokens_of(world - 1)]
    ep = case_fixed_routing(rank, world, local_ranks={world - 1}, capacity=None, sizes=sizes)
    if rank != world - 1:
        for p in ep.experts.parameters():
            assert torch.equal(p.grad, torch.zeros_like(p))


def case_nobody_has_tokens(rank, world):
    # A zero-row total: every all-to-all moves nothing, and nobody hangs.
    case_fixed_routing(rank, world, local_ranks=set(), capacity=None, sizes=[0] * world)


def case_input_without_grad_on_one_rank(rank, world):
    # x requires grad on every rank but rank 0: the dispatch backward must still
    # run everywhere (rank 0 receives rows whose gradient its peers are waiting for).
    def make_router():
        return TopKRouter(D, num_experts(world), top_k=2, second_expert_policy="all")

    ep, ref = build_layers(rank, world, make_router, seed=3)
    ep.eval()
    x = batch(rank, seed=3).requires_grad_(rank != 0)
    out = ep(x)
    (out * cotangent(rank, x.size(0), seed=3)).sum().backward()
    assert (x.grad is not None) == (rank != 0)


def _kept_per_rank(expert_index, capacity, world):
    """Kept assignments per destination rank, counted naively."""
    per_expert = torch.bincount(expert_index[expert_index >= 0], minlength=num_experts(world))
    if capacity is not None:
        per_expert = per_expert.clamp(max=capacity)
    return per_expert.view(world, E_PER_RANK).sum(1).tolist()


def case_only_kept_rows_on_the_wire(rank, world):
    """Record every all_to_all_single: the rows sent are exactly the kept assignments."""
    calls = []
    original = dist.all_to_all_single

    def recording(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        calls.append((input.dtype, tuple(input.shape), input_split_sizes, output_split_sizes))
        return original(output, input, output_split_sizes, input_split_sizes, **kw)

    for k, capacity_factor in ((1, 0.5), (2, 0.75), (2, 4.0)):
        def make_router():
            return TopKRouter(D, num_experts(world), top_k=k, capacity_factor=capacity_factor,
                              second_expert_policy="all")

        ep, _ = build_layers(rank, world, make_router, seed=4 + k)
        x = batch(rank, T=20 + rank, seed=4).requires_grad_(True)
        routing = ep.router(x)
        expected = _kept_per_rank(routing.expert_index, routing.capacity, world)
        plan = ep.dispatcher.plan(routing)
        assert plan.send_splits == expected
        assert plan.rows_sent == sum(expected) == plan.num_assignments - plan.num_dropped
        assert plan.rows_sent_to_peers == sum(expected) - expected[rank]
        received = torch.tensor(expected)
        dist.all_reduce(received)  # what all ranks send to each rank
        assert plan.rows_received == int(received[rank])

        calls.clear()
        dist.all_to_all_single = recording
        try:
            out = ep(x)
            out.sum().backward()
        finally:
            dist.all_to_all_single = original
        counts, dispatch, combine, combine_back, dispatch_back = calls
        # Forward: counts [W * E_l] int64, then exactly the kept rows, then their outputs.
        assert counts == (torch.int64, (num_experts(world),), None, None)
        rows_in = int(received[rank])
        assert dispatch == (torch.float64, (sum(expected), D), expected, dispatch[3])
        assert sum(dispatch[3]) == rows_in
        assert combine == (torch.float64, (rows_in, D), dispatch[3], expected)
        # Backward: the same traffic in reverse, gradient for gradient.
        assert combine_back == (torch.float64, (sum(expected), D), expected, dispatch[3])
        assert dispatch_back == (torch.float64, (rows_in, D), dispatch[3], expected)


def case_all_to_all_rows(rank, world):
    """The raw collective: uneven splits with zeros, content and gradient."""
    # rank s sends (s + r) % 3 rows to rank r; row values encode (source, dest, i).
    send = [(rank + r) % 3 for r in range(world)]
    recv = [(s + rank) % 3 for s in range(world)]
    rows = torch.cat([
        torch.tensor([[100.0 * rank + 10 * r + i] * 2 for i in range(n)], dtype=torch.float64)
        .reshape(n, 2) for r, n in enumerate(send)
    ]).requires_grad_(True)
    out = all_to_all_rows(rows, recv, send)
    expected = torch.cat([
        torch.tensor([[100.0 * s + 10 * rank + i] * 2 for i in range(n)], dtype=torch.float64)
        .reshape(n, 2) for s, n in enumerate(recv)
    ])
    assert torch.equal(out.detach(), expected)
    (out * (out.detach() + 0.5)).sum().backward()
    assert torch.equal(rows.grad, rows.detach() + 0.5)  # gradient came back to its row
    counts = torch.arange(world * 3, dtype=torch.int64) + 100 * rank
    got = exchange_counts(counts).view(world, 3)
    assert got.tolist() == [[100 * s + 3 * rank + e for e in range(3)] for s in range(world)]
    with pytest.raises(ValueError, match="sum to"):
        all_to_all_rows(rows, recv, [n + 1 for n in send])


def case_refuses_indivisible_expert_count(rank, world):
    with pytest.raises(MoEConfigError, match=(
        f"--moe-expert-count {world + 1} must be divisible by the number of "
        f"expert-parallel ranks {world}"
    )):
        AllToAllDispatcher(world + 1)
    with pytest.raises(MoEConfigError, match="must be divisible"):
        build_local_expert_bank(world + 1, D, F_DIM, rank, world)


def smoe_strata(world):
    """Three strata over E = 2W experts: [1, 1, 2] for W = 2, [2, 2, 4] for W = 4."""
    E = num_experts(world)
    return [E // 4, E // 4, E // 2]


def case_stratified(rank, world, drops, sizes=None, seed=0, rank0_exits_first=False):
    """SMoE: every rank runs all three stratum passes (its all-to-alls pair up with
    its peers'), and matches the single-process layer on each rank's batch."""
    strata = smoe_strata(world)

    def make_router():
        # The smoe presets' rules: post-LN strata, gates renormalised after
        # dropping, capacity 2 * ceil(C * T_i / E_i).
        router = StratifiedRouter(D, strata, top_k=2, capacity_factor=0.5 if drops else 1.0,
                                  second_expert_policy="all", normalize_gates=True,
                                  capacity_rule="per-slot", stratum_norm="post-ln")
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():  # norms that are not the identity
            for norm in router.norms:
                norm.weight.copy_(0.5 + torch.rand(D, generator=g))
                norm.bias.copy_(torch.rand(D, generator=g) - 0.5)
        return router

    ep, ref = build_layers(rank, world, make_router, seed=20 + seed)
    ep.train(drops)
    ref.train(drops)
    sizes = sizes or [tokens_of(s) for s in range(world)]
    batches = [batch(s, T=sizes[s], seed=20 + seed) for s in range(world)]
    if rank0_exits_first:
        # Rank 0 only gets tokens whose top-1 at stratum 0 is in the last stratum:
        # they all leave after one pass, while its peers' tokens go on.
        pool = batch(0, T=400, seed=30 + seed)
        with torch.no_grad():
            first = ref.router.gates[0].route(pool).expert_index[:, 0]
        leaves = (ref.router.stratum_of_expert[first] == len(strata) - 1).nonzero().squeeze(1)
        batches[0] = pool[leaves[: sizes[0]]]
        assert batches[0].size(0) == sizes[0]
    cots = [cotangent(s, sizes[s], seed=seed) for s in range(world)]
    passes = []
    hook = ep.router.register_forward_hook(lambda _m, args, _r: passes.append(args[1]))
    out, got = run_ep(ep, batches[rank], cots[rank])
    hook.remove()
    assert passes == [0, 1, 2]  # every rank, whatever its tokens
    ref_out, ref_grads, dropped = per_rank_reference(ref, rank, world, batches, cots)
    assert_matches(out, got, ref_out, ref_grads, rank)
    if drops:
        assert dropped > 0
    # The routing losses average over the strata this rank had tokens at: passes it
    # ran empty for its peers' sake do not count (the 1-process layer skips them).
    ref(batches[rank])
    assert ep.stats.losses.keys() == ref.stats.losses.keys() == {"balance", "z"}
    for name, value in ep.stats.losses.items():
        torch.testing.assert_close(value.detach(), ref.stats.losses[name].detach(),
                                   rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n} loss: {m}")
    pass_tokens = ep.stats.pass_tokens.tolist()
    if rank0_exits_first and rank == 0:
        assert pass_tokens == [sizes[0], 0, 0]
    everyone = torch.tensor(pass_tokens)
    dist.all_reduce(everyone)
    assert int(everyone[1]) > 0 and int(everyone[2]) > 0  # later strata did run somewhere


def case_moec_mixing(rank, world):
    """MoEC's presets: cosine top-1 with output mixing (a token over capacity
    outputs itself), the authors' capacity int(C * T), expert dropout (one kept set:
    the interval outlasts the case) and the fixed-temperature losses."""
    E = num_experts(world)

    def make_router():
        return CosineRouter(D, E, top_k=1, routing_dim=4, clusters=2, var_coef=1.0,
                            expert_dropout=0.5, dropout_interval=1000, seed=5,
                            output_mixing=True, capacity_factor=0.1, capacity_rule="tokens")

    ep, ref = build_layers(rank, world, make_router, seed=40)
    ep.train()
    ref.train()
    batches = [batch(s, seed=40) for s in range(world)]
    cots = [cotangent(s, tokens_of(s), seed=40) for s in range(world)]
    out, got = run_ep(ep, batches[rank], cots[rank])
    ref_out, ref_grads, dropped = per_rank_reference(ref, rank, world, batches, cots)
    assert_matches(out, got, ref_out, ref_grads, rank)
    assert dropped > 0
    assert torch.equal(ep.router.kept_experts, ref.router.kept_experts)
    ref(batches[rank])
    for name, value in ep.stats.losses.items():
        torch.testing.assert_close(value.detach(), ref.stats.losses[name].detach(),
                                   rtol=1e-6, atol=1e-7)


CASES = {
    "all_to_all_rows": case_all_to_all_rows,
    "top1_drops": lambda r, w: case_top_k(r, w, k=1, drops=True),
    "top1_no_drops": lambda r, w: case_top_k(r, w, k=1, drops=False),
    "top2_drops": lambda r, w: case_top_k(r, w, k=2, drops=True),
    "top2_no_drops": lambda r, w: case_top_k(r, w, k=2, drops=False),
    "one_rank_local_only": case_one_rank_local_only,
    "all_ranks_local_only": case_all_ranks_local_only,
    "one_rank_has_no_tokens": case_one_rank_has_no_tokens,
    "experts_receive_nothing": case_experts_receive_nothing,
    "nobody_has_tokens": case_nobody_has_tokens,
    "input_without_grad_on_one_rank": case_input_without_grad_on_one_rank,
    "only_kept_rows_on_the_wire": case_only_kept_rows_on_the_wire,
    "refuses_indivisible_expert_count": case_refuses_indivisible_expert_count,
    "smoe_no_drops": lambda r, w: case_stratified(r, w, drops=False),
    "smoe_drops": lambda r, w: case_stratified(r, w, drops=True, seed=1),
    "smoe_one_rank_done_after_first_stratum": lambda r, w: case_stratified(
        r, w, drops=False, seed=2, rank0_exits_first=True),
    "smoe_one_rank_has_no_tokens": lambda r, w: case_stratified(
        r, w, drops=True, seed=3, sizes=[0] + [4 * tokens_of(s) for s in range(1, w)]),
    "moec_mixing_dropout_drops": case_moec_mixing,
    "eom_drops": lambda r, w: case_nllb(r, w, eom=0.3, prioritized=False),
    "batch_prioritized_drops": lambda r, w: case_nllb(r, w, eom=0.0, prioritized=True),
    "eom_batch_prioritized_drops": lambda r, w: case_nllb(r, w, eom=0.3, prioritized=True),
}


# ------------------------------------------------------------------ launching


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    results = {}
    path = os.path.join(out_dir, f"rank{rank}.json")
    for index, (name, case) in enumerate(CASES.items()):
        try:
            case(rank, world)
            # Every rank must leave the case having made the same collective calls:
            # a rank that skipped one (e.g. a backward all-to-all) fails here, in
            # its own case, instead of derailing the next one.
            tag = torch.tensor([index + 1])
            dist.all_reduce(tag)
            assert int(tag) == (index + 1) * world, "ranks left the case out of step"
            results[name] = "ok"
        except BaseException:  # noqa: B902  (report everything, then stop)
            results[name] = traceback.format_exc()
        with open(path + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(path + ".tmp", path)
        if results[name] != "ok":
            # Peers may be stuck in a collective this rank left: do not tear down.
            os._exit(1)
    dist.destroy_process_group()


def launch(world, tmp_dir):
    """Run every case on ``world`` gloo processes -> per rank, {case: "ok" | error}."""
    init_file = os.path.join(tmp_dir, "rendezvous")
    ctx = mp.get_context("spawn")
    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # inherited at spawn
    try:
        procs = [
            ctx.Process(target=_worker, args=(r, world, init_file, tmp_dir), daemon=True)
            for r in range(world)
        ]
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    results = []
    for r, p in enumerate(procs):
        path = os.path.join(tmp_dir, f"rank{r}.json")
        got = {}
        if os.path.exists(path):
            with open(path) as f:
                got = json.load(f)
        why = "hung (killed after the launch timeout)" if r in hung else f"exit code {p.exitcode}"
        results.append({name: got.get(name, f"not run: rank {r} {why}") for name in CASES})
    return results


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    cache = {}

    def get(world):
        if world not in cache:
            cache[world] = launch(world, str(tmp_path_factory.mktemp(f"ep_world{world}")))
        return cache[world]

    return get


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("world", WORLDS)
def test_expert_parallel_case(launches, world, case):
    errors = [(r, res[case]) for r, res in enumerate(launches(world)) if res[case] != "ok"]
    if errors:
        pytest.fail(
            "\n".join(f"--- rank {r} of {world} ---\n{msg}" for r, msg in errors), pytrace=False
        )


# ------------------------------------------------------------------ single process


def test_local_bank_is_the_single_process_slice_and_draws_the_same_numbers():
    E, world = 8, 4
    torch.manual_seed(11)
    full = ExpertBank(E, D, F_DIM)
    after = torch.rand(3)
    for rank in range(world):
        torch.manual_seed(11)
        local = build_local_expert_bank(E, D, F_DIM, rank, world)
        assert torch.equal(torch.rand(3), after)  # RNG left where one process leaves it
        assert local.num_experts == E // world
        for name in ("w1", "b1", "w2", "b2"):
            p = getattr(local, name)
            lo = rank * (E // world)
            assert torch.equal(p, getattr(full, name)[lo:lo + E // world])
            assert p.expert is True and p.requires_grad
        assert [n for n, _ in local.named_parameters()] == ["w1", "b1", "w2", "b2"]


def test_source_to_expert_order():
    # W=2 ranks, E_l=3 local experts: received blocks ordered (source, expert).
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]])
    #  received rows: s0e0: 0 1 | s0e2: 2 | s1e0: 3 | s1e1: 4 5 6
    perm = source_to_expert_order(counts)
    assert perm.tolist() == [0, 1, 3, 4, 5, 6, 2]
    assert source_to_expert_order(torch.zeros(2, 3, dtype=torch.long)).tolist() == []
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 4, (4, 5), generator=g)
    perm = source_to_expert_order(counts)
    assert sorted(perm.tolist()) == list(range(int(counts.sum())))
    # expert of each received row, in the permuted order, is non-decreasing
    expert_of_row = torch.arange(5).repeat(4).repeat_interleave(counts.reshape(-1))
    assert torch.equal(expert_of_row[perm], expert_of_row[perm].sort().values)
