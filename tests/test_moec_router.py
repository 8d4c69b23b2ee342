"""MoEC's cosine router (``moe_fairseq/routers/cosine.py``), its flags and presets."""

import math

import pytest
import torch

from conftest import USER_DIR, moe_namespace, run_cli, train_args
from moe_fairseq.options import MoEConfigError, validate_moe_args
from moe_fairseq.routers import ROUTERS
from moe_fairseq.routers.cosine import CosineRouter, kept_per_cluster, moec_variance

D, E = 8, 8


def make_router(init_seed=0, **kwargs):
    torch.manual_seed(init_seed)
    kwargs.setdefault("routing_dim", 4)
    return CosineRouter(D, kwargs.pop("num_experts", E), **kwargs)


def tokens(T, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g, dtype=torch.float64).to(dtype)


# A fixed example: T = 2 tokens, E = 4 experts, G = 2 clusters {0, 1}, {2, 3}.
PROBS = [
    [0.1, 0.2, 0.3, 0.4],
    [0.3, 0.4, 0.1, 0.2],
]
# me = column SUMS (as the authors compute it) = [0.4, 0.6, 0.4, 0.6]


def _unbiased_var(values):
    mean = sum(values) / len(values)
    return sum((v - mean) ** 2 for v in values) / (len(values) - 1)


def test_cluster_variance_by_hand():
    # cluster 0: me = [0.4, 0.6], mean 0.5, var = (0.1^2 + 0.1^2) / 1 = 0.02
    # cluster 1: same, 0.02; (1/G) * sum = 0.02
    expected = (_unbiased_var([0.4, 0.6]) + _unbiased_var([0.4, 0.6])) / 2
    assert expected == pytest.approx(0.02)
    got = moec_variance(torch.tensor(PROBS, dtype=torch.float64), 2, "cluster")
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_global_variance_by_hand():
    # me = [0.4, 0.6, 0.4, 0.6], mean 0.5, sum of squares 4 * 0.01, unbiased: 0.04 / 3
    expected = _unbiased_var([0.4, 0.6, 0.4, 0.6])
    assert expected == pytest.approx(0.04 / 3)
    got = moec_variance(torch.tensor(PROBS, dtype=torch.float64), 2, "global")
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_gap_variance_by_hand():
    # The authors' coef_type 2: sort the mean probabilities, cut into G chunks.
    # probs = [[0.5, 0.2, 0.2, 0.1], [0.4, 0.3, 0.1, 0.2]]
    # me (sums) = [0.9, 0.5, 0.3, 0.3]; cluster var: c0 (0.2^2 * 2) = 0.08, c1 0 -> 0.04
    # means = [0.45, 0.25, 0.15, 0.15] sorted -> chunks [0.45, 0.25], [0.15, 0.15]
    # dif = 0.35 - 0.15 = 0.2 -> 0.04 / exp(0.2)
    probs = [[0.5, 0.2, 0.2, 0.1], [0.4, 0.3, 0.1, 0.2]]
    me = [a + b for a, b in zip(*probs)]
    var = (_unbiased_var(me[:2]) + _unbiased_var(me[2:])) / 2
    means = sorted((m / 2 for m in me), reverse=True)
    dif = sum(means[:2]) / 2 - sum(means[2:]) / 2
    expected = var / math.exp(dif)
    assert expected == pytest.approx(0.04 / math.exp(0.2))
    got = moec_variance(torch.tensor(probs, dtype=torch.float64), 2, "gap")
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_moec_var_loss_is_scaled_and_omitted_when_off():
    router = make_router(top_k=1, clusters=2, var_coef=0.5)
    router.eval()
    x = tokens(16)
    routing = router(x)
    # fixed temperature 0.07, variance of sums, times n * coef / T
    probs = torch.softmax(router.cosine(x) / 0.07, dim=-1)
    expected = E * 0.5 * moec_variance(probs, 2, "cluster") / 16
    torch.testing.assert_close(routing.losses["moec_var"], expected)
    assert set(routing.losses) == {"balance", "z", "moec_var"}
    off = make_router(top_k=1, clusters=2, var_coef=0.0)
    assert set(off(x).losses) == {"balance", "z"}


def test_moec_var_has_gradient_but_not_to_tau():
    router = make_router(top_k=1, clusters=2, var_coef=1.0)
    router.train()
    losses = router(tokens(16)).losses
    (losses["moec_var"] + losses["balance"]).backward()
    assert router.wg.weight.grad is not None and router.wg.weight.grad.abs().sum() > 0
    assert router.w_reduce.weight.grad.abs().sum() > 0
    # the routing losses use the fixed temperature 0.07 (the authors' rule)
    assert router.tau.grad is None or float(router.tau.grad.abs()) == 0.0


def test_no_tokens_gives_zero_losses():
    router = make_router(top_k=2, clusters=2, var_coef=1.0, var_type="gap")
    routing = router(torch.zeros(0, D))
    for name, value in routing.losses.items():
        assert float(value.detach()) == 0.0, name


def test_cosine_logits_match_float64_reference():
    router = make_router(top_k=2, routing_dim=5)
    router.eval()
    with torch.no_grad():
        router.tau.fill_(0.05)
    x = tokens(32, dtype=torch.bfloat16)
    logits = router.logits(x)
    assert logits.dtype == torch.float32
    h = x.double() @ router.w_reduce.weight.detach().double().t()
    w = router.wg.weight.detach().double()
    ref = (h @ w.t()) / (h.norm(dim=-1, keepdim=True) * w.norm(dim=-1)[None, :]) / 0.05
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=1e-5)
    routing = router(x)
    ref_probs = torch.softmax(ref, dim=-1)
    top = ref_probs.topk(2, dim=-1)
    assert torch.equal(routing.expert_index, top.indices)
    torch.testing.assert_close(routing.gates.double(), top.values, rtol=1e-5, atol=1e-6)


def test_gate_matrix_init_is_orthogonal_with_gain():
    router = make_router(routing_dim=16)  # [E=8, 16]: orthonormal rows scaled by 0.1
    w = router.wg.weight.detach().double()
    torch.testing.assert_close(w @ w.t(), 0.01 * torch.eye(E, dtype=torch.float64),
                               rtol=0, atol=1e-6)
    assert float(router.tau.detach()) == pytest.approx(0.07)


def test_tau_is_clamped():
    router = make_router()
    router.eval()
    with torch.no_grad():
        router.tau.fill_(-3.0)
    assert float(router.temperature().detach()) == pytest.approx(1e-4)
    logits = router.logits(tokens(8))
    assert torch.isfinite(logits).all()
    assert float(logits.abs().max()) <= 1.0 / 1e-4 * (1 + 1e-5)
    assert float(logits.abs().max()) > 1.0 / 0.07  # really divided by 1e-4


# --------------------------------------------------------------------- expert dropout


def test_kept_per_cluster():
    assert kept_per_cluster(4, 0.5) == 2
    assert kept_per_cluster(2, 0.9) == 1  # never empties a cluster
    assert kept_per_cluster(8, 0.0) == 8
    assert kept_per_cluster(1, 0.5) == 1


def test_dropout_never_empties_a_cluster():
    router = make_router(top_k=1, clusters=4, expert_dropout=0.9, dropout_interval=1)
    router.train()
    x = tokens(16)
    seen = set()
    for _ in range(200):
        routing = router(x)
        kept = router.kept_experts.view(4, 2)
        assert kept.sum(dim=1).tolist() == [1, 1, 1, 1]
        assert bool(router.kept_experts[routing.expert_index[:, 0]].all())
        assert float(routing.probs[:, ~router.kept_experts].sum()) == 0.0
        seen.add(tuple(router.kept_experts.tolist()))
    assert len(seen) > 1


@pytest.mark.parametrize("policy", ["all", "sampling", "random"])
def test_top2_never_picks_a_dropped_expert(policy):
    router = make_router(top_k=2, clusters=2, expert_dropout=0.5,
                         second_expert_policy=policy)
    router.train()
    x = tokens(64)
    for _ in range(50):
        routing = router(x)
        idx = routing.expert_index
        valid = idx >= 0
        assert bool(valid[:, 0].all())
        assert bool(router.kept_experts[idx[valid]].all())
        assert bool((idx[:, 0] != idx[:, 1]).all())


def test_dropout_inactive_in_eval():
    router = make_router(top_k=1, clusters=2, expert_dropout=0.5)
    router.train()
    router(tokens(8))
    assert int(router.kept_experts.sum()) == 4
    router.eval()
    calls = int(router.dropout_calls)
    x = tokens(256, seed=3)
    routing = router(x)
    assert int(router.dropout_calls) == calls  # eval forward does not count
    # every expert can win: logits finite everywhere and the choices match no mask
    logits = router.logits(x)
    assert torch.isfinite(logits).all()
    assert torch.equal(routing.expert_index[:, 0], logits.argmax(-1))
    assert (routing.probs > 0).all()


def test_same_seed_same_kept_set_on_every_rank():
    # Two routers with different weights (as different layers/ranks might be
    # initialised) but the same --seed draw the same kept sets.
    torch.manual_seed(0)
    a = CosineRouter(D, E, top_k=1, routing_dim=4, clusters=2, expert_dropout=0.5, seed=7)
    torch.manual_seed(99)  # the global RNG must not matter
    b = CosineRouter(D, E, top_k=1, routing_dim=4, clusters=2, expert_dropout=0.5, seed=7)
    c = CosineRouter(D, E, top_k=1, routing_dim=4, clusters=2, expert_dropout=0.5, seed=8)
    for r in (a, b, c):
        r.train()
    x = tokens(8)
    sets_a, sets_b, sets_c = [], [], []
    for _ in range(20):
        torch.manual_seed(len(sets_a))  # differ per call, to be sure
        a(x)
        torch.manual_seed(1000 + len(sets_a))
        b(x)
        c(x)
        sets_a.append(a.kept_experts.clone())
        sets_b.append(b.kept_experts.clone())
        sets_c.append(c.kept_experts.clone())
    assert all(torch.equal(p, q) for p, q in zip(sets_a, sets_b))
    assert not all(torch.equal(p, q) for p, q in zip(sets_a, sets_c))


def test_resamples_every_interval():
    router = make_router(top_k=1, clusters=2, expert_dropout=0.5, dropout_interval=3, seed=5)
    router.train()
    x = tokens(8)
    masks = []
    for _ in range(12):
        router(x)
        masks.append(router.kept_experts.clone())
    assert int(router.dropout_calls) == 12
    # calls 0-2 use resample 0, 3-5 resample 1, ...
    for i, m in enumerate(masks):
        assert torch.equal(m, router.sample_kept(i // 3))
    for block in range(4):
        assert torch.equal(masks[3 * block], masks[3 * block + 1])
        assert torch.equal(masks[3 * block], masks[3 * block + 2])
    blocks = [tuple(masks[3 * b].tolist()) for b in range(4)]
    assert len(set(blocks)) > 1  # 6 possible sets per cluster pair: some change


def test_state_dict_round_trip_continues_dropout():
    kwargs = dict(top_k=1, clusters=2, expert_dropout=0.5, dropout_interval=4, seed=3)
    router = make_router(**kwargs)
    router.train()
    x = tokens(8)
    for _ in range(6):
        router(x)
    state = router.state_dict()
    assert "dropout_calls" in state and "kept_experts" in state
    fresh = make_router(init_seed=1, **kwargs)
    fresh.load_state_dict(state)
    fresh.train()
    assert int(fresh.dropout_calls) == 6
    assert torch.equal(fresh.kept_experts, router.kept_experts)
    for _ in range(10):
        a, b = router(x), fresh(x)
        assert torch.equal(router.kept_experts, fresh.kept_experts)
        assert torch.equal(a.expert_index, b.expert_index)
    assert int(fresh.dropout_calls) == 16


def test_too_few_experts_alive_for_top2_raises():
    # one cluster of 2 experts, p = 0.5 keeps 1: top-2 impossible
    with pytest.raises(ValueError, match="--moec-expert-dropout"):
        CosineRouter(D, 2, top_k=2, clusters=1, expert_dropout=0.5)
    # 2 clusters of 1 expert keep 1 each -> 2 alive: fine; and top-1 is always fine
    CosineRouter(D, 2, top_k=2, clusters=2, expert_dropout=0.5)
    CosineRouter(D, 2, top_k=1, clusters=1, expert_dropout=0.5)


# --------------------------------------------------------------------- flags


def _args(**overrides):
    return moe_namespace(2, "cosine", **overrides)


def test_default_flags_validate():
    validate_moe_args(_args())
    validate_moe_args(_args(moe_router="linear"))


@pytest.mark.parametrize(
    "overrides, flag",
    [
        (dict(moec_clusters=3), "--moec-clusters"),
        (dict(moec_clusters=0), "--moec-clusters"),
        (dict(moec_expert_dropout=1.0), "--moec-expert-dropout"),
        (dict(moec_expert_dropout=-0.1), "--moec-expert-dropout"),
        (dict(moec_dropout_interval=0), "--moec-dropout-interval"),
        (dict(moec_routing_dim=0), "--moec-routing-dim"),
        (dict(moec_var_type="bogus"), "--moec-var-type"),
        (dict(moec_var_coef=-1.0), "--moec-var-coef"),
        (dict(moec_var_type="gap", moec_var_coef=1.0, moec_clusters=1), "--moec-var-type"),
        (dict(moec_var_coef=1.0, moec_clusters=8), "--moec-clusters"),
        (dict(moe_expert_count=4, moec_clusters=4, moec_expert_dropout=0.5, moe_top_k=2),
         None),  # 4 clusters of 1 keep 4: fine
        (dict(moe_expert_count=2, moec_clusters=1, moec_expert_dropout=0.5, moe_top_k=2),
         "--moec-expert-dropout"),
    ],
)
def test_bad_flags_raise_naming_the_flag(overrides, flag):
    args = _args(**overrides)
    if flag is None:
        validate_moe_args(args)
        return
    with pytest.raises(MoEConfigError, match=flag):
        validate_moe_args(args)


def test_registered_builder_reads_flags():
    from moe_fairseq.options import MoEOptions

    args = _args(moec_clusters=2, moec_var_coef=1.0, moec_routing_dim=6,
                 moec_expert_dropout=0.5, moec_dropout_interval=10, seed=42)
    options = MoEOptions.from_args(args)
    router = ROUTERS["cosine"](options, 16)
    assert isinstance(router, CosineRouter)
    assert router.w_reduce.weight.shape == (6, 16)
    assert router.wg.weight.shape == (8, 6)
    assert (router.clusters, router.var_coef, router.expert_dropout,
            router.dropout_interval, router.seed) == (2, 1.0, 0.5, 10, 42)


# --------------------------------------------------------------------- end to end


def test_moec_tiny_trains_and_generates(data_bin, tmp_path):
    save_dir = tmp_path / "ckpt"
    args = train_args(data_bin, save_dir, "--moec-expert-dropout", "0.5",
                      "--moec-dropout-interval", "3", "--moe-log-per-layer", max_update=10)
    args[args.index("moe_transformer_tiny")] = "moec_transformer_tiny"
    proc = run_cli("train", args)
    out = proc.stdout + proc.stderr
    assert "router cosine" in out
    assert "moec_var_loss" in out and "moe_moec_var_loss" not in out
    # per-layer load statistics (two MoE layers: encoder 2, decoder 2)
    for key in ("moe_l0_load_cv", "moe_l1_load_cv", "moe_l0_starved", "moe_l1_starved"):
        assert f'"{key}"' in out, key
    assert '"moe_starved_experts"' in out
    proc = run_cli(
        "generate",
        [data_bin, "--user-dir", USER_DIR, "--path", save_dir / "checkpoint_last.pt",
         "--beam", "2", "--gen-subset", "test", "--max-tokens", "2000",
         "--cpu", "--num-workers", "0"],
    )
    assert "Translated 60 sentences" in proc.stdout + proc.stderr

    # weights-only load: importing moe_fairseq allowlisted the checkpoint's types
    state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu")
    calls = [v for k, v in state["model"].items() if k.endswith("router.dropout_calls")]
    assert calls and all(int(c) > 0 for c in calls)
