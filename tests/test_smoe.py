"""SMoE stratified router and the MoE layer's multi-pass loop (single process).

The rules under test (routers/stratified.py): a token at stratum i picks its
top-k among the experts of strata i..L-1; its next stratum is (stratum of its
top-1 expert) + 1; it leaves after the last stratum; capacity at stratum i is
``ceil(C * k * T_i / E_i)``; the balance loss is averaged over the strata that had
tokens; with ``--smoe-stratum-norm gate-input`` strata i >= 1 see
``LN_i(residual stream)`` (the authors' ``post-ln`` stream is tested against its own
reference in test_fidelity.py).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from moe_fairseq.layer.expert_bank import ExpertBank
from moe_fairseq.layer.moe_layer import MoELayer
from moe_fairseq.routers.stratified import StratifiedRouter, parse_strata
from moe_fairseq.routers.top_k import TopKRouter

D, F_DIM = 6, 10
TIGHT = dict(rtol=1e-10, atol=1e-12)
# The router computes in fp32 (as in training); a one-token matmul rounds its
# logits differently from the layer's batched one (~1e-7 relative in the gates).
FP32_GATES = dict(rtol=1e-5, atol=1e-6)


def capture_routes(router):
    """Forward hook recording (pass index, input rows, Routing) of every router call."""
    calls = []
    handle = router.register_forward_hook(
        lambda _m, args, routing: calls.append((args[1] if len(args) > 1 else 0,
                                               args[0].detach().clone(), routing))
    )
    return calls, handle


# ------------------------------------------------------------------ parsing


def test_parse_strata():
    assert parse_strata("4,12") == [4, 12]
    assert parse_strata(" 2, 2,2 ,2") == [2, 2, 2, 2]
    assert parse_strata([3, 1]) == [3, 1]
    for bad in ("", "4,,12", "4;12", "0,4", "-1,5", "a,b"):
        with pytest.raises(ValueError):
            parse_strata(bad)


def test_top_k_larger_than_last_stratum_is_refused():
    with pytest.raises(ValueError, match="larger than the last stratum"):
        StratifiedRouter(D, [3, 1], top_k=2)


# ------------------------------------------------------------------ token progression


def expected_progression(scores, strata):
    """Reference of the rules for one token whose gate logit for expert e is
    ``scores[e]`` at every stratum: [(stratum, top1, top2), ...] in order."""
    offsets = [sum(strata[:i]) for i in range(len(strata))]
    stratum_of = [s for s, n in enumerate(strata) for _ in range(n)]
    visits, s = [], 0
    while s < len(strata):
        visible = sorted(range(offsets[s], sum(strata)), key=lambda e: -scores[e])
        visits.append((s, visible[0], visible[1]))
        s = stratum_of[visible[0]] + 1
    return visits


def test_tokens_move_and_exit_by_the_rules():
    """Hand-built router: gate i scores expert e by x[e] (identity rows), experts
    output zero (so the stream does not change) and there is no stratum LayerNorm:
    each token's preference order over experts is fixed, and its whole path
    follows from the rules. 120 tokens cover every order of 5 experts."""
    strata = [1, 2, 2]
    E = sum(strata)
    router = StratifiedRouter(E, strata, stratum_norm="none", top_k=2,
                              second_expert_policy="all", eval_capacity_token_fraction=1.0)
    with torch.no_grad():
        for i, gate in enumerate(router.gates):
            gate.wg.weight.copy_(torch.eye(E)[router.offsets[i]:])
    experts = ExpertBank(E, E, 4)
    with torch.no_grad():
        experts.w2.zero_()
        experts.b2.zero_()
    layer = MoELayer(router, experts).eval()
    import itertools
    orders = list(itertools.permutations(range(E)))
    x = torch.tensor([[float(E - o.index(e)) for e in range(E)] for o in orders])
    calls, handle = capture_routes(router)
    with torch.no_grad():
        layer(x)
    handle.remove()

    expected = [expected_progression(row.tolist(), strata) for row in x]
    # Every path shape occurs: exit after stratum 0, skip stratum 1, visit all three.
    lengths = {len(v) for v in expected}
    assert lengths == {1, 2, 3}
    assert any([s for s, _, _ in v] == [0, 2] for v in expected)
    assert [p for p, _, _ in calls] == [0, 1, 2]
    for pass_index, rows, routing in calls:
        # Exactly the tokens due at this stratum were routed here, in token order.
        due = [t for t, v in enumerate(expected) if any(s == pass_index for s, _, _ in v)]
        torch.testing.assert_close(rows, x[due])
        want = [next((a, b) for s, a, b in expected[t] if s == pass_index) for t in due]
        assert routing.expert_index.tolist() == [list(w) for w in want]
        stratum_of = [0, 1, 1, 2, 2]
        assert routing.next_pass.tolist() == [stratum_of[a] + 1 for a, _ in want]
    stats = layer.stats
    assert stats.token_passes.tolist() == [len(v) for v in expected]
    assert stats.pass_tokens.tolist() == [
        sum(any(s == i for s, _, _ in v) for v in expected) for i in range(3)
    ]
    assert int(stats.expert_passes) == sum(len(v) for v in expected)


# ------------------------------------------------------------------ numerical reference


def build(strata, layernorm=True, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"top_k": 2, "second_expert_policy": "all", **kw}
    router = StratifiedRouter(D, strata, stratum_norm="gate-input" if layernorm else "none", **kw)
    if layernorm:  # not the identity, so a missing norm shows
        with torch.no_grad():
            for norm in router.norms:
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.3, 0.3)
    experts = ExpertBank(sum(strata), D, F_DIM)
    experts.impl = "loop"
    return MoELayer(router, experts).double()


def reference_forward(layer, x, residual):
    """Token-by-token SMoE from the rules, in plain differentiable ops (no capacity).
    x, residual ``[T, d]`` fp64 -> (output ``[T, d]``, passes per token)."""
    router, bank = layer.router, layer.experts
    outs, passes = [], []
    for t in range(x.size(0)):
        u, h, s, out, n = x[t], residual[t], 0, 0.0, 0
        while s < len(router.strata):
            off = router.offsets[s]
            logits = router.gates[s].wg.weight.float() @ u.float()
            probs = torch.softmax(logits, -1)
            top = torch.topk(probs.detach(), 2).indices.tolist()
            y = 0.0
            for j in top:
                e = off + j
                hid = F.relu(u @ bank.w1[e] + bank.b1[e])
                y = y + probs[j].double() * (hid @ bank.w2[e] + bank.b2[e])
            out, h, n = out + y, h + y, n + 1
            s = int(router.stratum_of_expert[off + top[0]]) + 1
            if s < len(router.strata):
                u = router.norms[s - 1](h) if router.norms is not None else h
        outs.append(out)
        passes.append(n)
    return torch.stack(outs), passes


@pytest.mark.parametrize("layernorm", [True, False])
@pytest.mark.parametrize("strata", [[2, 2, 4], [1, 3], [3, 1, 1, 3]])
def test_layer_equals_token_by_token_reference(strata, layernorm):
    """Outputs and gradients (input, residual stream, gates, norms, experts) of the
    layer equal a token-by-token implementation of the rules (fp64 experts and
    norms, fp32 gates), and every token takes the same path."""
    layer = build(strata, layernorm).eval()  # eval: capacity fraction 1.0 = no drops
    g = torch.Generator().manual_seed(1)
    T = 40
    x = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(T, D, generator=g, dtype=torch.float64)
    out = layer(x, residual=residual)
    ref, passes = reference_forward(layer, x, residual)
    torch.testing.assert_close(out, ref, **FP32_GATES)
    assert layer.stats.token_passes.tolist() == passes
    assert len(set(passes)) > 1  # tokens really asked for different capacity
    params = [x, residual, *layer.parameters()]
    got = torch.autograd.grad((out * cot).sum(), params, allow_unused=True)
    want = torch.autograd.grad((ref * cot).sum(), params, allow_unused=True)
    for p, a, b in zip(params, got, want):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, **FP32_GATES)


def test_padding_is_not_routed_and_gets_zero_passes():
    layer = build([2, 2]).eval()
    x = torch.randn(4, 3, D, dtype=torch.float64)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[2:, 1] = True
    out = layer(x, mask)
    assert torch.equal(out[mask], torch.zeros_like(out[mask]))
    passes = layer.stats.token_passes
    assert passes.shape == (4, 3)
    assert torch.equal(passes[mask], torch.zeros_like(passes[mask]))
    assert bool((passes[~mask] >= 1).all())
    # The unpadded tokens route exactly as without the padding.
    flat = layer(x[~mask])
    torch.testing.assert_close(out[~mask], flat, **TIGHT)


# ------------------------------------------------------------------ one stratum = top-2 MoE


@pytest.mark.parametrize("policy", ["all", "sampling", "random"])
def test_one_stratum_equals_plain_top2_layer(policy):
    """Same weights, same RNG: identical outputs, losses and gradients in training
    (capacity drops on) and in inference."""
    E = 4
    smoe = build([E], layernorm=True, seed=3, capacity_factor=0.5,
                 second_expert_policy=policy)
    assert smoe.router.norms is not None and len(smoe.router.norms) == 0
    plain_router = TopKRouter(D, E, top_k=2, capacity_factor=0.5, second_expert_policy=policy)
    plain_router.wg.weight.data.copy_(smoe.router.gates[0].wg.weight.data)
    plain = MoELayer(plain_router, copy.deepcopy(smoe.experts)).double()
    x = torch.randn(5, 7, D, dtype=torch.float64)
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[3:, 0] = True
    for training in (True, False):
        outs, grads = [], []
        for layer in (smoe, plain):
            layer.train(training)
            layer.zero_grad()
            torch.manual_seed(11)
            out = layer(x, mask)
            (out ** 2).sum().backward()
            outs.append((out.detach(), {k: v.detach() for k, v in layer.stats.losses.items()},
                         int(layer.stats.dropped)))
            grads.append([layer.router.parameters().__next__().grad.clone(),
                          *(p.grad.clone() for p in layer.experts.parameters())])
        (o1, l1, d1), (o2, l2, d2) = outs
        torch.testing.assert_close(o1, o2, **TIGHT)
        assert l1.keys() == l2.keys() == {"balance", "z"}
        for k in l1:
            torch.testing.assert_close(l1[k], l2[k], **TIGHT)
        assert d1 == d2 and (d1 > 0) == training
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, **TIGHT)


# ------------------------------------------------------------------ capacity and losses


def test_capacity_per_stratum_training_and_eval():
    strata = [2, 6]
    layer = build(strata, capacity_factor=1.0, eval_capacity_token_fraction=0.5)
    calls, handle = capture_routes(layer.router)
    x = torch.randn(64, D, dtype=torch.float64)
    layer.train()
    layer(x)
    layer.eval()
    layer(x)
    layer.router.gates[0].eval_capacity_token_fraction = 1.0
    layer.router.gates[1].eval_capacity_token_fraction = 1.0
    layer(x)
    handle.remove()
    visible = [8, 6]
    train_calls, eval_calls, unlimited = calls[:2], calls[2:4], calls[4:]
    assert [p for p, _, _ in calls] == [0, 1] * 3
    for p, rows, routing in train_calls:  # 2 * T_i / E_i
        assert routing.capacity == math.ceil(2 * rows.size(0) / visible[p])
    for p, rows, routing in eval_calls:  # --moe-eval-capacity-token-fraction 0.5
        assert routing.capacity == math.ceil(0.5 * rows.size(0))
    assert all(r.capacity is None for _, _, r in unlimited)
    assert 0 < train_calls[1][1].size(0) < 64  # stratum 1 really got a subset


def test_balance_loss_is_the_mean_over_strata_with_tokens():
    strata = [2, 2, 4]
    layer = build(strata).train()
    calls, handle = capture_routes(layer.router)
    layer(torch.randn(50, D, dtype=torch.float64))
    handle.remove()
    per_stratum = []
    for p, _rows, routing in calls:
        E_i = sum(strata[p:])
        probs = routing.probs
        first = routing.expert_index[:, 0] - layer.router.offsets[p]
        f = torch.bincount(first, minlength=E_i).double() / probs.size(0)
        per_stratum.append(E_i * float((f * probs.double().mean(0)).sum()))
    assert len(per_stratum) >= 2
    assert float(layer.stats.losses["balance"].detach()) == pytest.approx(
        sum(per_stratum) / len(per_stratum), rel=1e-6)


def test_empty_strata_are_skipped_without_communication_and_not_averaged():
    """Strata no token reaches are not run by a local dispatcher, and the losses
    average over the strata that ran (so they do not depend on batch makeup)."""
    strata = [2, 2, 4]
    layer = build(strata).eval()
    with torch.no_grad():  # every token's top-1 at stratum 0 is in the last stratum
        w = layer.router.gates[0].wg.weight
        w.zero_()
        w[4:, 0] = 50.0
    calls, handle = capture_routes(layer.router)
    x = torch.randn(20, D, dtype=torch.float64)
    x[:, 0] = x[:, 0].abs() + 1.0
    layer(x)
    handle.remove()
    assert [p for p, _, _ in calls] == [0]
    assert layer.stats.token_passes.tolist() == [1] * 20
    torch.testing.assert_close(layer.stats.losses["balance"],
                               calls[0][2].losses["balance"], **TIGHT)


def test_stratum_norm_modes():
    with_norm = StratifiedRouter(D, [4, 12], stratum_norm="gate-input")
    without = StratifiedRouter(D, [4, 12], stratum_norm="none")
    post = StratifiedRouter(D, [4, 12], stratum_norm="post-ln")
    assert len(with_norm.norms) == 1 and without.norms is None and len(post.norms) == 2
    assert post.stream_output and not with_norm.stream_output and not without.stream_output
    h = torch.randn(3, D)
    assert torch.equal(without.pass_input(h, 1), h)
    assert torch.equal(without.pass_stream(h, 1), h)
    torch.testing.assert_close(with_norm.pass_input(h, 1), F.layer_norm(h, (D,)))
    assert torch.equal(with_norm.pass_stream(h, 1), h)  # the stream stays raw
    assert torch.equal(with_norm.pass_input(h, 0), h)  # stratum 0: the layer's own norm
    # post-ln: the stream itself is normalized, the experts see it as it is
    torch.testing.assert_close(post.pass_stream(h, 1), F.layer_norm(h, (D,)))
    assert torch.equal(post.pass_input(h, 1), h)
    torch.testing.assert_close(post.finish_stream(h), F.layer_norm(h, (D,)))
    with pytest.raises(ValueError, match="--smoe-stratum-norm"):
        StratifiedRouter(D, [4, 12], stratum_norm="bogus")
    # Gates: stratum i scores its visible experts only.
    assert [g.wg.weight.shape[0] for g in with_norm.gates] == [16, 12]


def test_a_router_sending_tokens_back_is_an_error():
    from moe_fairseq.routers.base import Router, Routing

    class Backwards(Router):
        num_experts, num_passes = 2, 2

        def route(self, x, pass_index=0):
            T = x.size(0)
            return Routing(torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1), None,
                           next_pass=torch.full((T,), pass_index, dtype=torch.long))

    layer = MoELayer(Backwards(), ExpertBank(2, D, F_DIM))
    with pytest.raises(RuntimeError, match="sent a token from pass 0 back"):
        layer(torch.randn(3, D))
