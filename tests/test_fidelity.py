"""The methods as their authors ran them: each rule of README's Fidelity table against a
small reference written from the rule (float64, identical weights, 1e-10).

Sources of the rules: fairseq's MoE branch (top2gating), the SMoE authors' fork
(fe1ixxu/Stratified_Mixture_of_Experts) and the MoEC authors' code
(xy980523/MoEc_model), as summarised in ../shared/docs/methods.md.
"""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import moe_namespace
from moe_fairseq.layer.dispatcher import SortDispatcher
from moe_fairseq.layer.expert_bank import ExpertBank
from moe_fairseq.layer.moe_layer import MoELayer
from moe_fairseq.options import (
    MoEConfigError,
    MoEOptions,
    moe_defaults,
    validate_moe_args,
)
from moe_fairseq.args_version import ARGS_VERSION, stamp_checkpoint_args
from moe_fairseq.routers.base import Router, Routing, capacity_for
from moe_fairseq.routers.cosine import CosineRouter
from moe_fairseq.routers.stratified import StratifiedRouter
from moe_fairseq.routers.top_k import TopKRouter

D, F_DIM = 6, 10
EXACT = dict(rtol=1e-10, atol=1e-10)


def ffn(bank, e, u):
    """Expert e of a one-sublayer ExpertBank on one token u ``[d]`` (relu)."""
    return F.relu(u @ bank.w1[e] + bank.b1[e]) @ bank.w2[e] + bank.b2[e]


def sublayer_expert(bank, e, u):
    """Expert e of an N-sublayer bank: N times u <- LN(u + FFN_n(u)) (MoEC's experts)."""
    for n in range(bank.w1.size(1)):
        h = F.relu(u @ bank.w1[e, n] + bank.b1[e, n]) @ bank.w2[e, n] + bank.b2[e, n]
        u = F.layer_norm(u + h, (u.size(-1),), bank.ln_weight[e, n], bank.ln_bias[e, n])
    return u


def assert_same_grads(out, ref, params):
    """Gradients of ``out.sum()`` and ``ref.sum()`` agree to 1e-10 for every param
    (a param the reference does not use must get no or a zero gradient)."""
    got = torch.autograd.grad(out.sum(), params, allow_unused=True)
    want = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    for a, b in zip(got, want):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, **EXACT)


def kept_slots(index, capacity, E):
    """Which (token, slot) assignments survive capacity: every first choice before
    any second choice, then token order; an expert keeps its first ``capacity``."""
    T, k = index.shape
    used = [0] * E
    kept = torch.zeros(T, k, dtype=torch.bool)
    for j in range(k):
        for t in range(T):
            e = int(index[t, j])
            if e >= 0 and (capacity is None or used[e] < capacity):
                used[e] += 1
                kept[t, j] = True
    return kept


def bank64(E, seed=0, sublayers=1):
    torch.manual_seed(seed)
    bank = ExpertBank(E, D, F_DIM, sublayers=sublayers)
    bank.impl = "loop"
    with torch.no_grad():  # non-zero second matrices, so every term shows
        for p in bank.parameters():
            if p.dim() >= 3 and float(p.abs().sum()) == 0:
                p.uniform_(-0.3, 0.3)
    return bank.double()


class FixedRouter(Router):
    """Hands the layer a fixed Routing (gates computed from a parameter)."""

    def __init__(self, index, logits, capacity, **flags):
        super().__init__()
        self.num_experts = int(index.max()) + 1 if index.numel() else 1
        self.index = index
        self.logits = torch.nn.Parameter(logits)
        self.capacity = capacity
        self.flags = flags

    def route(self, x, pass_index=0):
        gates = torch.softmax(self.logits, -1).gather(1, self.index.clamp_min(0))
        gates = torch.where(self.index >= 0, gates, torch.zeros_like(gates))
        return Routing(self.index.clone(), gates, self.capacity, {}, **self.flags)


# ---------------------------------------------------------------- top-2 gate normalisation


@pytest.mark.parametrize("when", ["after", "before", "off"])
def test_top2_gates_renormalised_after_dropping_by_default(when):
    """fairseq's top2gating: gates renormalised over the slots that survive capacity
    (a token whose second choice is dropped keeps its first with weight 1); with
    --moe-normalize-gate-prob-before-dropping over both choices; off: raw probs."""
    T, E, cap = 12, 3, 6
    g = torch.Generator().manual_seed(0)
    index = torch.stack([torch.randint(0, E, (T,), generator=g)], 1)
    second = (index[:, 0] + 1 + torch.randint(0, E - 1, (T,), generator=g)) % E
    index = torch.cat([index, second[:, None]], 1)
    index[2, 1] = -1  # a skipped second choice (random policy)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    x = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    bank = bank64(E)
    router = FixedRouter(index, logits.clone(), cap, normalize_after_drop=(when == "after"))
    if when == "before":
        base = router.route

        def normalized(x, pass_index=0):
            r = base(x, pass_index)
            r.gates = r.gates / r.gates.sum(1, keepdim=True)
            return r
        router.route = normalized
    layer = MoELayer(router, bank)
    out = layer(x)

    probs = torch.softmax(router.logits, -1)
    kept = kept_slots(index, cap, E)
    assert 0 < int((~kept & (index >= 0)).sum()) < T // 2  # capacity really drops some
    rows = []
    for t in range(T):
        gates = [probs[t, int(index[t, j])] if index[t, j] >= 0 else probs.new_zeros(())
                 for j in range(2)]
        if when == "before":
            total = gates[0] + gates[1]
        elif when == "after":
            total = sum(gates[j] for j in range(2) if kept[t, j]) if kept[t].any() else 1.0
        else:
            total = 1.0
        y = torch.zeros(D, dtype=torch.float64)
        for j in range(2):
            if kept[t, j]:
                y = y + gates[j] / total * ffn(bank, int(index[t, j]), x[t])
        rows.append(y)
    ref = torch.stack(rows)
    torch.testing.assert_close(out, ref, **EXACT)
    assert_same_grads(out, ref, [x, router.logits, *bank.parameters()])
    if when == "after":  # a token with one kept slot has weight exactly 1 on it
        one = [t for t in range(T) if int(kept[t].sum()) == 1]
        assert one


def test_linear_router_asks_for_after_drop_normalisation():
    x = torch.randn(20, D)
    torch.manual_seed(0)
    r = TopKRouter(D, 4, top_k=2, normalize_gates=True)
    assert r(x).normalize_after_drop
    torch.manual_seed(0)
    r = TopKRouter(D, 4, top_k=2, normalize_gates=True, normalize_before_dropping=True)
    routing = r(x)
    assert not routing.normalize_after_drop
    torch.testing.assert_close(routing.gates.sum(1), torch.ones(20))


# ---------------------------------------------------------------- capacity rules


@pytest.mark.parametrize("T", [1, 7, 16, 33, 100, 1001])
@pytest.mark.parametrize("E", [1, 3, 8, 12])
def test_capacity_rules(T, E):
    # SMoE's code and fairseq's top2gating: 2 * ceil(T / E)
    assert capacity_for(T, E, 2, True, 1.0, 1.0, "per-slot") == 2 * math.ceil(T / E)
    assert capacity_for(T, E, 2, True, 1.25, 1.0, "per-slot") == 2 * math.ceil(1.25 * T / E)
    # MoEC's code: int(capacity_factor * local tokens)
    assert capacity_for(T, E, 1, True, 2.0, 1.0, "tokens") == int(2.0 * T)
    assert capacity_for(T, E, 1, True, 0.3, 1.0, "tokens") == max(1, int(0.3 * T))
    assert capacity_for(T, E, 2, True, 1.0, 1.0, "joint") == math.ceil(2 * T / E)
    # inference is the same for every rule
    for rule in ("joint", "per-slot", "tokens"):
        assert capacity_for(T, E, 2, False, 1.0, 0.5, rule) == math.ceil(0.5 * T)


def test_smoe_strata_use_the_per_slot_rule():
    router = StratifiedRouter(D, [2, 6], capacity_rule="per-slot", top_k=2)
    layer = MoELayer(router, bank64(8)).double().train()
    seen = []
    handle = router.register_forward_hook(lambda m, a, r: seen.append((a[0].size(0), a[1], r)))
    layer(torch.randn(61, D, dtype=torch.float64))
    handle.remove()
    visible = [8, 6]
    for T_i, p, routing in seen:
        assert routing.capacity == 2 * math.ceil(T_i / visible[p])
    assert len(seen) == 2


# ---------------------------------------------------------------- second expert at inference


def test_eval_second_expert_sampling_is_gumbel_over_the_others():
    """Ours: the second-best at inference. The authors' (sampling): the second
    expert is drawn from softmax over the experts other than the first."""
    torch.manual_seed(0)
    router = TopKRouter(D, 4, top_k=2, eval_second_expert_policy="sampling").double().eval()
    x = torch.randn(1, D, dtype=torch.float64).repeat(20000, 1)
    routing = router(x)
    p = torch.softmax(router.logits(x[:1]), -1)[0]
    first = int(p.argmax())
    assert bool((routing.expert_index[:, 0] == first).all())
    counts = torch.bincount(routing.expert_index[:, 1], minlength=4).double() / 20000
    want = p.clone()
    want[first] = 0
    want = want / want.sum()
    torch.testing.assert_close(counts, want, rtol=0, atol=0.015)
    best = TopKRouter(D, 4, top_k=2).double().eval()
    best.load_state_dict(router.state_dict())
    assert len(set(best(x).expert_index[:, 1].tolist())) == 1


# ---------------------------------------------------------------- MoEC


def moec_l_aux(cos, kept, clusters, var_coef, var_type):
    """The MoEC authors' l_aux from the rule (methods.md section 2), float64.

    cos ``[T, E]``, kept: list of scored experts. Returns l_aux (not divided by T)."""
    c = cos[:, kept]
    T, n = c.shape
    P = torch.softmax(c / 0.07, -1)
    me = P.sum(0)
    first = c.argmax(-1)
    ce = torch.bincount(first, minlength=n).double() / T + 1e-6
    if var_type == "global":
        var = torch.var(me)
    else:
        var = torch.var(me.view(clusters, -1), dim=1).mean()
        if var_type == "gap":
            srt = torch.sort(P.mean(0), descending=True).values.view(clusters, -1).mean(1)
            var = var / torch.exp(srt[0] - srt[1])
    return n * (torch.dot(me, ce) + var_coef * var)


@pytest.mark.parametrize("var_type", ["cluster", "global", "gap"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_moec_losses_are_the_authors_l_aux_over_T(var_type, dropout):
    torch.manual_seed(0)
    router = CosineRouter(D, 8, top_k=1, routing_dim=4, clusters=2, var_coef=1.0,
                          var_type=var_type, expert_dropout=dropout).double().train()
    with torch.no_grad():
        router.tau.fill_(0.2)  # the learnable tau must not enter the losses
    x = torch.randn(40, D, dtype=torch.float64)
    routing = router(x)
    kept = list(range(8)) if dropout == 0 else router.kept_experts.nonzero().squeeze(1).tolist()
    assert len(kept) == (8 if dropout == 0 else 4)
    ref = moec_l_aux(router.cosine(x), kept, 2, 1.0, var_type) / 40
    ours = routing.losses["balance"] + routing.losses["moec_var"]
    torch.testing.assert_close(ours, ref, **EXACT)
    # the variance term has the authors' strength: comparable to the balance term
    assert float(routing.losses["moec_var"]) > 1e-3 * float(routing.losses["balance"])
    # tokens only go to kept experts; capacity counts the survivors
    assert set(routing.expert_index[:, 0].tolist()) <= set(kept)


def test_moec_capacity_counts_survivors():
    torch.manual_seed(0)
    router = CosineRouter(D, 8, top_k=1, routing_dim=4, clusters=2, expert_dropout=0.5,
                          capacity_factor=1.0).train()
    assert router(torch.randn(30, D)).capacity == math.ceil(30 / 4)
    router.eval()
    router.eval_capacity_token_fraction = 0.5
    assert router(torch.randn(30, D)).capacity == 15


@pytest.mark.parametrize("sublayers", [1, 3])
def test_moec_output_mixing_layer_equals_reference(sublayers):
    """y = a FFN_e(x) + (1 - a) x with a = sigmoid(cos_e / tau); a token over
    capacity (int(C * T) per expert, the authors' rule) outputs x itself."""
    E, T = 4, 24
    torch.manual_seed(3)
    router = CosineRouter(D, E, top_k=1, routing_dim=4, clusters=2, output_mixing=True,
                          capacity_factor=0.25, capacity_rule="tokens").double().train()
    with torch.no_grad():
        router.tau.fill_(0.3)
    bank = bank64(E, seed=4, sublayers=sublayers)
    layer = MoELayer(router, bank).train()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    out = layer(x)

    cos = router.cosine(x)
    first = cos.argmax(-1)
    cap = int(0.25 * T)
    kept = kept_slots(first[:, None], cap, E)[:, 0]
    assert 0 < int((~kept).sum()) < T
    rows = []
    for t in range(T):
        e = int(first[t])
        if not kept[t]:
            rows.append(x[t])
            continue
        a = torch.sigmoid(cos[t, e] / router.tau)
        expert = sublayer_expert(bank, e, x[t]) if sublayers > 1 else ffn(bank, e, x[t])
        rows.append(a * expert + (1 - a) * x[t])
    ref = torch.stack(rows)
    torch.testing.assert_close(out, ref, **EXACT)
    params = [x, *router.parameters(), *bank.parameters()]
    assert_same_grads(out, ref, params)


# ---------------------------------------------------------------- SMoE post-LN strata


def smoe_reference(layer, x, residual):
    """The authors' stratum loop, token by token (no capacity: eval), float64:
    stratum 0 runs on x and the stream is z = r + MoE_0(x); a token entering stratum
    i >= 1 continues from LN_{i-1}(z): z = LN_{i-1}(z) + MoE_i(LN_{i-1}(z)); the block
    outputs LN_{L-1}(z). Top-2 gates renormalised (no drops at eval)."""
    router, bank = layer.router, layer.experts
    L = len(router.strata)
    outs = []
    for t in range(x.size(0)):
        u, z, s = x[t], residual[t], 0
        while True:
            off = router.offsets[s]
            probs = torch.softmax(router.gates[s].wg.weight @ u, -1)
            top = torch.topk(probs.detach(), 2).indices.tolist()
            g = probs[top]
            g = g / g.sum()
            y = sum(g[j] * ffn(bank, off + top[j], u) for j in range(2))
            z = z + y
            s = int(router.stratum_of_expert[off + top[0]]) + 1
            if s >= L:
                break
            z = router.norms[s - 1](z)
            u = z
        outs.append(router.norms[L - 1](z))
    return torch.stack(outs)


@pytest.mark.parametrize("strata", [[2, 2, 4], [1, 3], [3, 1, 1, 3], [4]])
def test_smoe_post_ln_stream_equals_reference(strata):
    torch.manual_seed(5)
    router = StratifiedRouter(D, strata, stratum_norm="post-ln", top_k=2, normalize_gates=True,
                              second_expert_policy="all")
    with torch.no_grad():
        for norm in router.norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
    layer = MoELayer(router, bank64(sum(strata), seed=6)).double().eval()
    assert layer.returns_block_output
    g = torch.Generator().manual_seed(2)
    T = 40
    x = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(T, D, generator=g, dtype=torch.float64, requires_grad=True)
    out = layer(x, residual=r)
    ref = smoe_reference(layer, x, r)
    torch.testing.assert_close(out, ref, **EXACT)
    if len(strata) > 1:
        assert len(set(layer.stats.token_passes.tolist())) > 1
    params = [x, r, *layer.parameters()]
    assert_same_grads(out, ref, params)


def test_smoe_post_ln_padding_and_dropout_per_stratum():
    torch.manual_seed(0)
    router = StratifiedRouter(D, [2, 2], stratum_norm="post-ln", top_k=2)
    layer = MoELayer(router, bank64(4)).double().eval()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 3:] = True
    out = layer(x, mask, residual=x, dropout=torch.nn.Dropout(0.0))
    assert torch.equal(out[mask], torch.zeros_like(out[mask]))
    torch.testing.assert_close(out[~mask], layer(x[~mask], residual=x[~mask]), **EXACT)
    # in training the block's dropout hits each stratum's output before the stream
    layer.train()
    calls = []
    drop = torch.nn.Dropout(0.5)
    drop.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    layer(x[~mask], residual=x[~mask], dropout=drop)
    assert calls[0] == int((~mask).sum()) and len(calls) == layer.router.num_passes


# ---------------------------------------------------------------- presets and flags


def preset_args(arch, *extra):
    from fairseq import options

    parser = options.get_training_parser()
    argv = ["data", "--user-dir", "moe_fairseq", "--arch", arch, "--task", "translation",
            "--criterion", "moe_label_smoothed_cross_entropy", *extra]
    return options.parse_args_and_arch(parser, argv)


def test_smoe_preset_is_the_authors_model():
    args = preset_args("smoe_transformer_base")
    assert args.encoder_normalize_before and args.decoder_normalize_before
    assert args.smoe_stratum_norm == "post-ln"
    assert args.moe_capacity_rule == "per-slot" and args.moe_capacity_factor == 1.0
    assert args.moe_normalize_gates and not args.moe_normalize_gate_prob_before_dropping
    assert args.moe_eval_second_expert_policy == "all"  # ours, documented
    assert args.moe_gate_loss_combine_method in (None, "average")


def test_moec_preset_is_the_authors_model():
    args = preset_args("moec_transformer_base")
    assert args.moe_router == "cosine" and args.moe_top_k == 1
    assert args.moe_capacity_rule == "tokens" and args.moe_capacity_factor == 2.0
    assert args.moec_output_mixing and args.moec_expert_sublayers == 3
    assert args.moe_freq == 4 and args.moe_encoder_layers is None  # layer 4 of 6
    assert args.moe_gate_loss_combine_method == "sum"
    options = MoEOptions.from_args(args)
    assert options.moe_layer_indices(6, options.encoder_layers) == [3]
    assert options.moe_layer_indices(6, options.decoder_layers) == [3]
    # flags still win over the preset
    args = preset_args("moec_transformer_base", "--moe-gate-loss-combine-method", "average",
                       "--no-moec-output-mixing", "--moe-encoder-layers", "2,6")
    assert args.moe_gate_loss_combine_method == "average" and not args.moec_output_mixing
    assert MoEOptions.from_args(args).moe_layer_indices(6, [2, 6]) == [1, 5]


def test_linear_top2_normalises_by_default_and_top1_does_not():
    args = preset_args("moe_transformer_tiny")
    assert args.moe_normalize_gates
    assert not preset_args("moe_transformer_tiny", "--moe-top-k", "1").moe_normalize_gates
    assert not preset_args("moe_transformer_tiny", "--no-moe-normalize-gates").moe_normalize_gates


def _ns(**overrides):
    return moe_namespace(6, "linear", **overrides)


@pytest.mark.parametrize("overrides, flag", [
    (dict(moe_router="cosine", moec_output_mixing=True, moe_top_k=2), "--moec-output-mixing"),
    (dict(moec_output_mixing=True, moe_top_k=1), "--moec-output-mixing"),
    (dict(moec_expert_sublayers=0), "--moec-expert-sublayers"),
    (dict(moe_capacity_rule="ceil"), "--moe-capacity-rule"),
    (dict(moe_eval_second_expert_policy="random"), "--moe-eval-second-expert-policy"),
    (dict(moe_encoder_layers="7"), "--moe-encoder-layers"),
    (dict(moe_decoder_layers="0"), "--moe-decoder-layers"),
    (dict(moe_decoder_layers="a,b"), "--moe-decoder-layers"),
    (dict(moe_router="stratified", smoe_strata="4,4", smoe_stratum_norm="pre"),
     "--smoe-stratum-norm"),
])
def test_bad_combinations_name_the_flag(overrides, flag):
    with pytest.raises(MoEConfigError, match=flag):
        validate_moe_args(_ns(**overrides))


def test_checkpoints_from_before_keep_their_behaviour():
    """A checkpoint namespace saved before the fidelity flags existed (no
    moe_capacity_rule, no version) is stamped version 1 when loaded and keeps the old
    rules: raw top-2 gates (or before-drop normalisation), joint capacity, SMoE's
    gate-input LayerNorm, no mixing, plain experts, seq-major capacity priority."""
    old = argparse.Namespace(moe_expert_count=4, moe_top_k=2, moe_normalize_gates=False,
                             smoe_strata="2,2", smoe_stratum_layernorm=True,
                             moe_router="stratified", encoder_layers=2, decoder_layers=2)
    stamp_checkpoint_args(old)
    assert old.moe_args_version == 1
    moe_defaults(old, 4)
    assert (old.moe_normalize_gates, old.moe_capacity_rule, old.smoe_stratum_norm,
            old.moec_output_mixing, old.moec_expert_sublayers, old.moe_token_order) == (
        False, "joint", "gate-input", False, 1, "seq-major")
    old2 = argparse.Namespace(moe_expert_count=4, moe_top_k=2, moe_normalize_gates=True)
    stamp_checkpoint_args(old2)
    moe_defaults(old2, 4)
    assert old2.moe_normalize_gate_prob_before_dropping
    # Version 2 (fidelity flags recorded): only the capacity priority is older.
    v2 = argparse.Namespace(moe_expert_count=4, moe_capacity_rule="per-slot")
    stamp_checkpoint_args(v2)
    moe_defaults(v2, 4)
    assert (v2.moe_args_version, v2.moe_capacity_rule, v2.moe_token_order) == (
        2, "per-slot", "seq-major")
    # A namespace that records no version and is not a checkpoint's is a fresh
    # command line: today's rules, whatever it names.
    fresh = argparse.Namespace(moe_expert_count=4)
    moe_defaults(fresh, 4)
    assert (fresh.moe_args_version, fresh.moe_normalize_gates, fresh.moe_capacity_rule,
            fresh.moe_token_order) == (ARGS_VERSION, True, "joint", "batch-major")


# ---------------------------------------------------------------- the transformer block


def build_block(arch, *extra, decoder=False):
    from fairseq.models.transformer import TransformerConfig

    from moe_fairseq.transformer_layers import (
        MoETransformerDecoderLayer,
        MoETransformerEncoderLayer,
    )

    args = preset_args(arch, *extra)
    options = MoEOptions.from_args(args)
    cfg = TransformerConfig.from_namespace(args)
    torch.manual_seed(0)
    if decoder:
        return MoETransformerDecoderLayer(cfg, options).double()
    return MoETransformerEncoderLayer(cfg, options).double()


def test_moec_block_adds_the_moe_output_without_dropout():
    """The MoEC authors' layer: x <- LN(x + MoE(x)) (post-norm), no dropout on the
    MoE output; our default (fairseq's FFN convention) drops it out."""
    x = torch.randn(5, 3, 64, dtype=torch.float64)
    block = build_block("moec_transformer_tiny", "--dropout", "0.5").train()
    assert not block.moe_output_dropout and not block.normalize_before
    want = block.final_layer_norm(x + block.moe(x))
    torch.testing.assert_close(block._moe_block(x, None), want, **EXACT)
    ours = build_block("moec_transformer_tiny", "--dropout", "0.5",
                       "--moe-output-dropout").train()
    torch.manual_seed(1)
    assert not torch.allclose(ours._moe_block(x, None), want)


@pytest.mark.parametrize("decoder", [False, True])
def test_smoe_block_output_is_the_strata_stream(decoder):
    """smoe preset (pre-norm): the block returns LN_{L-1} of the final stream, which
    started from the block's residual; stratum 0 sees final_layer_norm(x)."""
    block = build_block("smoe_transformer_tiny", "--dropout", "0", decoder=decoder).eval()
    assert block.normalize_before and block.moe.returns_block_output
    x = torch.randn(5, 3, 64, dtype=torch.float64)
    want = block.moe(block.final_layer_norm(x), residual=x)
    torch.testing.assert_close(block._moe_block(x, None), want, **EXACT)
    # a post-norm model with post-LN strata never uses final_layer_norm: gone
    post = build_block("moe_transformer_tiny", "--moe-router", "stratified",
                       "--smoe-strata", "2,2", decoder=decoder)
    assert post.final_layer_norm is None and post.moe.returns_block_output
    assert "final_layer_norm" not in dict(post.named_parameters())


# ---------------------------------------------------------------- capacity priority


ORDER_CASES = [
    ("moe_transformer_tiny", ()),
    ("moe_transformer_tiny", ("--moe-router", "attentive")),
    ("moe_transformer_tiny", ("--moe-top-k", "1")),
    ("moec_transformer_tiny", ()),
    ("smoe_transformer_tiny", ()),
]


@pytest.mark.parametrize("layout", ["compact", "static"])
@pytest.mark.parametrize("arch, extra", ORDER_CASES)
def test_capacity_goes_to_the_first_sentences_of_the_batch(arch, extra, layout):
    """fairseq's MoE branch and both authors' codes route ``x.transpose(0, 1)``: when
    capacity binds, the batch's first sentences keep their tokens. The block (training,
    binding capacity, padding) equals the layer fed its tokens sentence by sentence
    (batch-major reference; the layer's own priority, row order, is held to
    ``kept_slots`` above), and differs from fairseq's [T, B] order, which
    ``--moe-token-order seq-major`` (older checkpoints) keeps."""
    flags = ("--dropout", "0", "--moe-capacity-factor", "0.3", "--moe-second-expert-policy",
             "all", *extra)
    T, B = 7, 5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, B, 64, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, 5:] = mask[3, 2:] = True  # padding: never routed, takes no capacity
    outs = {}
    for order in ("batch-major", "seq-major"):
        block = build_block(arch, *flags, "--moe-token-order", order).train()
        block.moe.dispatcher.layout = layout
        assert block.moe_token_order == order
        outs[order] = block._moe_block(x, mask)
        moe = block.moe
        normed = block.final_layer_norm(x) if block.normalize_before else x
        # Reference: the non-padding tokens as one flat list, in the given order.
        major = order == "batch-major"
        keep = ~mask if major else ~mask.t()
        rows = (normed.transpose(0, 1) if major else normed)[keep]
        res = (x.transpose(0, 1) if major else x)[keep]
        y = moe(rows, residual=res)
        stats = moe.stats
        want = torch.zeros(B, T, 64, dtype=torch.float64) if major else torch.zeros_like(x)
        want[keep] = y
        if major:
            want = want.transpose(0, 1)
        if not moe.returns_block_output:
            want = block.residual_connection(want, x)
            if not block.normalize_before:
                want = block.final_layer_norm(want)
        got = outs[order].clone()
        got[mask.t()] = want[mask.t()] = 0  # padding rows: whatever the block adds to 0
        torch.testing.assert_close(got, want, **EXACT)
        assert int(stats.dropped) > 0  # capacity binds
    # The two orders drop different tokens.
    assert not torch.allclose(outs["batch-major"], outs["seq-major"])


def test_per_position_statistics_stay_seq_major():
    """Routing under batch-major order still reports per-position statistics in
    fairseq's [T, B] layout (analysis tools and the per-language logging read them)."""
    block = build_block("smoe_transformer_tiny", "--dropout", "0").eval()
    block.moe.record_first_expert = True
    T, B = 6, 3
    x = torch.randn(T, B, 64, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[2, 4:] = True
    block._moe_block(x, mask)
    stats = block.moe.stats
    assert stats.token_passes.shape == (T, B) and stats.first_expert.shape == (T, B)
    assert torch.equal(stats.token_passes == 0, mask.t())
    assert torch.equal(stats.first_expert == -1, mask.t())
    assert torch.equal(stats.sentence_tokens, (~mask).sum(1))
