"""TopKRouter (``moe_fairseq/routers/top_k.py``) and ``capacity_for``."""

import math

import pytest
import torch

from moe_fairseq.routers.base import capacity_for
from moe_fairseq.routers.top_k import SECOND_EXPERT_POLICIES, TopKRouter

D, E = 8, 4


def make_router(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TopKRouter(D, E, **kwargs)


def reference_probs(x, router):
    """softmax(x W^T) in float64, from the router's (possibly low-precision) weight."""
    logits = x.double() @ router.wg.weight.detach().double().t()
    return logits, torch.softmax(logits, dim=-1)


def tokens(T, seed=1, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(T, D, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("module_dtype", [torch.float32, "same"])
def test_computes_in_fp32_for_low_precision_input(dtype, module_dtype):
    router = make_router(top_k=2)
    if module_dtype == "same":
        router = router.to(dtype)
    router.eval()
    x = tokens(16, dtype=dtype, scale=2.0)
    logits = router.logits(x)
    assert logits.dtype == torch.float32
    ref_logits, ref_probs = reference_probs(x, router)
    # Inputs and weights are exact in float64; an fp32 product of 8 terms is
    # accurate to ~1e-6, a bf16/fp16 product would be off by ~1e-2.
    torch.testing.assert_close(logits.double(), ref_logits, rtol=1e-5, atol=1e-5)
    routing = router(x)
    assert routing.gates.dtype == torch.float32
    assert routing.probs.dtype == torch.float32
    torch.testing.assert_close(routing.probs.double(), ref_probs, rtol=1e-5, atol=1e-6)
    top = ref_probs.topk(2, dim=-1)
    torch.testing.assert_close(routing.gates.double(), top.values, rtol=1e-5, atol=1e-6)
    assert torch.equal(routing.expert_index, top.indices)
    for name in ("balance", "z"):
        assert routing.losses[name].dtype == torch.float32


@pytest.mark.parametrize("training", [False, True])
def test_top1_picks_argmax(training):
    router = make_router(top_k=1)
    router.train(training)
    x = tokens(32)
    routing = router(x)
    _, ref = reference_probs(x, router)
    assert routing.expert_index.shape == (32, 1)
    assert routing.gates.shape == (32, 1)
    assert torch.equal(routing.expert_index[:, 0], ref.argmax(-1))
    torch.testing.assert_close(
        routing.gates[:, 0].double(), ref.max(-1).values, rtol=1e-6, atol=1e-7
    )
    # Gate of the chosen expert is its softmax probability: > 1/E for the argmax.
    assert bool((routing.gates > 1.0 / E).all())


@pytest.mark.parametrize("policy", SECOND_EXPERT_POLICIES)
def test_top2_eval_picks_two_best_regardless_of_policy(policy):
    router = make_router(top_k=2, second_expert_policy=policy)
    router.eval()
    x = tokens(64)
    torch.manual_seed(123)  # any RNG use by the policy must not matter in eval
    a = router(x)
    torch.manual_seed(456)
    b = router(x)
    _, ref = reference_probs(x, router)
    top = ref.topk(2, dim=-1)
    assert torch.equal(a.expert_index, top.indices)
    assert torch.equal(b.expert_index, top.indices)
    assert bool((a.expert_index >= 0).all())
    torch.testing.assert_close(a.gates.double(), top.values, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.gates, b.gates, rtol=0, atol=0)


@pytest.mark.parametrize("top_k", [2])
def test_normalize_gates_before_dropping_sum_to_one(top_k):
    router = make_router(top_k=top_k, normalize_gates=True, normalize_before_dropping=True)
    router.eval()
    x = tokens(32)
    routing = router(x)
    torch.testing.assert_close(routing.gates.sum(-1), torch.ones(32), rtol=0, atol=1e-6)
    _, ref = reference_probs(x, router)
    top = ref.topk(top_k, dim=-1)
    torch.testing.assert_close(
        routing.gates.double(), top.values / top.values.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6
    )
    plain = make_router(top_k=top_k, normalize_gates=False).eval()
    g = plain(x).gates
    assert bool((g.sum(-1) < 1 - 1e-3).all())  # without normalisation they sum to < 1
    # After-dropping normalisation (the default) is the dispatcher's job: the
    # router hands raw probabilities and says so.
    after = make_router(top_k=top_k, normalize_gates=True).eval()(x)
    assert after.normalize_after_drop
    torch.testing.assert_close(after.gates, g, rtol=0, atol=0)


def test_normalize_gates_ignored_for_top1():
    x = tokens(32)
    a = make_router(top_k=1, normalize_gates=True).eval()(x)
    b = make_router(top_k=1).eval()(x)
    assert not a.normalize_after_drop
    torch.testing.assert_close(a.gates, b.gates, rtol=0, atol=0)


def test_normalize_gates_with_random_policy_dropped_second():
    router = make_router(top_k=2, second_expert_policy="random", normalize_gates=True,
                         normalize_before_dropping=True)
    router.train()
    torch.manual_seed(7)
    routing = router(tokens(256))
    dropped = routing.expert_index[:, 1] == -1
    assert 0 < int(dropped.sum()) < 256
    # A token whose second expert was skipped puts its whole weight on the first.
    torch.testing.assert_close(routing.gates[dropped, 0], torch.ones(int(dropped.sum())))
    assert torch.equal(routing.gates[dropped, 1], torch.zeros(int(dropped.sum())))
    torch.testing.assert_close(routing.gates.sum(-1), torch.ones(256), rtol=0, atol=1e-6)


def test_random_policy_keeps_second_with_prob_min_1_2g2():
    T = 10000
    router = make_router(top_k=2, second_expert_policy="random")
    router.train()
    x = tokens(T, seed=3, scale=1.5)
    torch.manual_seed(2024)
    routing = router(x)
    probs = routing.probs.double()
    top = probs.topk(2, dim=-1)
    g2 = top.values[:, 1]
    keep = routing.expert_index[:, 1] >= 0
    # Kept slots carry the deterministic second-best expert and its probability;
    # skipped slots are -1 with gate 0. The first slot is never skipped.
    assert bool((routing.expert_index[:, 0] == top.indices[:, 0]).all())
    assert torch.equal(routing.expert_index[keep, 1], top.indices[keep, 1])
    torch.testing.assert_close(routing.gates[keep, 1].double(), g2[keep], rtol=1e-6, atol=1e-7)
    assert bool((routing.expert_index[~keep, 1] == -1).all())
    assert bool((routing.gates[~keep, 1] == 0).all())
    # Frequency of keeping: Bernoulli(min(1, 2 g2)) per token. Check overall and
    # per bin of p = min(1, 2 g2) within 5 standard deviations.
    p = (2 * g2).clamp(max=1.0)
    assert float(p.min()) < 0.3 and float(p.max()) > 0.8  # a meaningful spread of p
    k = keep.double()
    std = math.sqrt(float((p * (1 - p)).sum()))
    assert abs(float(k.sum() - p.sum())) < 5 * std
    edges = [0.0, 0.3, 0.5, 0.7, 0.9, 1.01]
    checked = 0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (p >= lo) & (p < hi)
        n = int(sel.sum())
        if n < 200:
            continue
        checked += 1
        expected = float(p[sel].mean())
        observed = float(k[sel].mean())
        bin_std = math.sqrt(float((p[sel] * (1 - p[sel])).sum())) / n
        assert abs(observed - expected) < 5 * bin_std + 1e-3, (lo, hi, observed, expected)
    assert checked >= 3
    # Fixed seed -> reproducible decision.
    torch.manual_seed(2024)
    assert torch.equal(router(x).expert_index, routing.expert_index)


def test_sampling_policy_second_expert():
    T = 10000
    router = make_router(top_k=2, second_expert_policy="sampling")
    router.train()
    x = tokens(T, seed=5)
    torch.manual_seed(11)
    routing = router(x)
    probs = routing.probs.double()
    first = routing.expert_index[:, 0]
    second = routing.expert_index[:, 1]
    top = probs.topk(2, dim=-1)
    assert torch.equal(first, top.indices[:, 0])
    assert bool((second >= 0).all()) and bool((second < E).all())
    assert bool((second != first).all())
    differs = second != top.indices[:, 1]
    assert int(differs.sum()) > 0.05 * T  # not always the argmax second
    # The gate is the probability of whichever expert was sampled.
    sampled_prob = probs.gather(1, second[:, None]).squeeze(1)
    torch.testing.assert_close(routing.gates[:, 1].double(), sampled_prob, rtol=1e-6, atol=1e-7)
    # Gumbel-max over the experts other than the first samples e with
    # probability p_e / (1 - p_first); check the rate of the second-best expert.
    q = top.values[:, 1] / (1 - top.values[:, 0])
    hits = (~differs).double()
    std = math.sqrt(float((q * (1 - q)).sum()))
    assert abs(float(hits.sum() - q.sum())) < 5 * std
    # Different seed -> different samples.
    torch.manual_seed(12)
    assert not torch.equal(router(x).expert_index[:, 1], second)


def test_jitter_changes_routing_only_in_training():
    x = tokens(512, seed=9)
    router = make_router(top_k=2, second_expert_policy="all", jitter_eps=0.5)
    plain = make_router(top_k=2, second_expert_policy="all", jitter_eps=0.0)
    assert torch.equal(router.wg.weight, plain.wg.weight)
    ref_logits, _ = reference_probs(x, router)

    router.eval()
    torch.manual_seed(0)
    a = router(x)
    torch.manual_seed(1)
    b = router(x)
    torch.testing.assert_close(router.logits(x).double(), ref_logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(a.expert_index, b.expert_index)
    assert torch.equal(a.gates, b.gates)

    router.train()
    plain.train()
    torch.manual_seed(0)
    c = router(x)
    torch.manual_seed(1)
    d = router(x)
    deterministic = plain(x)
    assert torch.equal(deterministic.expert_index, a.expert_index)  # no jitter, policy "all"
    assert not torch.allclose(router.logits(x).double(), ref_logits, rtol=1e-3, atol=1e-3)
    assert bool((c.expert_index != a.expert_index).any())
    assert bool((c.expert_index != d.expert_index).any())
    # Jitter is multiplicative noise in [1 - eps, 1 + eps]: with eps = 0.5 most
    # tokens still keep their first choice.
    agree = (c.expert_index[:, 0] == a.expert_index[:, 0]).double().mean()
    assert 0.5 < float(agree) < 1.0


@pytest.mark.parametrize(
    "T, E_, k, cf, expected",
    [
        (10, 4, 2, 1.0, 5),  # ceil(1.0 * 2 * 10 / 4) = ceil(5.0) = 5
        (10, 4, 1, 1.25, 4),  # ceil(1.25 * 1 * 10 / 4) = ceil(3.125) = 4
        (7, 3, 2, 2.0, 10),  # ceil(2.0 * 2 * 7 / 3) = ceil(9.33) = 10
        (12, 4, 2, 0.5, 3),  # ceil(0.5 * 2 * 12 / 4) = ceil(3.0) = 3
        (1, 8, 1, 1.0, 1),  # ceil(0.125) = 1
    ],
)
def test_capacity_for_training(T, E_, k, cf, expected):
    assert capacity_for(T, E_, k, True, cf, 1.0) == expected
    # The eval fraction is ignored in training.
    assert capacity_for(T, E_, k, True, cf, 0.25) == expected


@pytest.mark.parametrize(
    "T, frac, expected",
    [
        (10, 1.0, None),
        (10, -1.0, None),
        (10, 0.0, None),
        (10, 1.5, None),
        (10, 0.25, 3),  # ceil(2.5) = 3
        (8, 0.25, 2),  # ceil(2.0) = 2
        (3, 0.1, 1),  # ceil(0.3) = 1
    ],
)
def test_capacity_for_eval(T, frac, expected):
    # Capacity factor and k are training-only knobs.
    assert capacity_for(T, 4, 2, False, 1.0, frac) == expected
    assert capacity_for(T, 4, 1, False, 3.0, frac) == expected


def test_router_reports_capacity_from_capacity_for():
    router = make_router(top_k=2, capacity_factor=1.5, eval_capacity_token_fraction=0.25)
    x = tokens(10)
    router.train()
    assert router(x).capacity == 8  # ceil(1.5 * 2 * 10 / 4) = ceil(7.5) = 8
    router.eval()
    assert router(x).capacity == 3  # ceil(0.25 * 10) = 3
    router.eval_capacity_token_fraction = -1.0
    assert router(x).capacity is None
    router.eval_capacity_token_fraction = 1.0
    assert router(x).capacity is None


def test_constructor_errors_name_the_flag():
    with pytest.raises(ValueError, match="--moe-top-k"):
        TopKRouter(D, E, top_k=3)
    with pytest.raises(ValueError, match="--moe-top-k"):
        TopKRouter(D, E, top_k=0)
    with pytest.raises(ValueError, match="--moe-second-expert-policy") as info:
        TopKRouter(D, E, second_expert_policy="best")
    assert "best" in str(info.value)
