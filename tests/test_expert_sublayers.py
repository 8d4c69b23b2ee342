"""ExpertBank(sublayers=N): experts made of N post-LN residual FFN sublayers.

The reference below applies, to each row of expert e, the documented rule for
n = 0 .. N-1, one token at a time:

    x <- LayerNorm_{e,n}(x + W2_{e,n} act(W1_{e,n} x + b1_{e,n}) + b2_{e,n})

(LayerNorm over d, eps 1e-5, per-expert, per-sublayer affine weight and bias).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from fairseq import utils

from moe_fairseq.layer.expert_bank import ExpertBank, grouped_mm_supported
from moe_fairseq.parallel.dispatcher import build_local_expert_bank

D, F_DIM, E, N = 6, 10, 3, 3
TIGHT = dict(rtol=1e-10, atol=1e-10)
SUBLAYER_PARAMS = ["w1", "b1", "w2", "b2", "ln_weight", "ln_bias"]
# fairseq's own activations (its gelu runs in float32 even on float64 input)
ACTS = {name: utils.get_activation_fn(name) for name in ("relu", "gelu")}


# --------------------------------------------------------------------------- helpers


def reference_expert(x, e, params, act="relu"):
    """One token ``x [d]`` through the N sublayers of expert e (params: name -> tensor)."""
    for n in range(params["w1"].size(1)):
        h = ACTS[act](x @ params["w1"][e, n] + params["b1"][e, n])
        y = h @ params["w2"][e, n] + params["b2"][e, n]
        x = F.layer_norm(x + y, (x.size(0),), params["ln_weight"][e, n],
                         params["ln_bias"][e, n], 1e-5)
    return x


def reference_bank(rows, group_sizes, params, act="relu"):
    """Per-token loop over rows ``[N_rows, d]`` grouped by expert -> ``[N_rows, d]``."""
    experts = torch.arange(len(group_sizes)).repeat_interleave(group_sizes).tolist()
    out = [reference_expert(rows[i], e, params, act) for i, e in enumerate(experts)]
    return torch.stack(out) if out else rows.new_zeros(0, rows.size(1))


def randomize(bank, seed=0):
    """Non-trivial values for every parameter (init has w2 = 0 and an identity LN)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bank.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1.0 + 0.3 * noise if name == "ln_weight" else 0.5 * noise)


def run_bank(bank, rows, group_sizes, cot):
    """Output of the bank and gradients of (rows, every parameter) for cotangent cot."""
    bank.zero_grad(set_to_none=True)
    rows = rows.clone().requires_grad_(True)
    out = bank(rows, group_sizes)
    (out * cot.to(out.dtype)).sum().backward()
    return out.detach(), rows.grad, {n: p.grad for n, p in bank.named_parameters()}


def run_reference(bank, rows, group_sizes, cot, act="relu"):
    params = {n: p.detach().clone().requires_grad_(True) for n, p in bank.named_parameters()}
    rows = rows.clone().requires_grad_(True)
    out = reference_bank(rows, group_sizes, params, act)
    (out * cot).sum().backward()
    return out.detach(), rows.grad, {n: p.grad for n, p in params.items()}


def assert_matches_reference(bank, rows, group_sizes, act="relu", **tol):
    tol = tol or TIGHT
    cot = torch.randn(rows.shape, dtype=rows.dtype)
    out, g_rows, g_params = run_bank(bank, rows, group_sizes, cot)
    ref, r_rows, r_params = run_reference(bank, rows, group_sizes, cot, act)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(g_rows, r_rows, **tol)
    assert set(g_params) == set(SUBLAYER_PARAMS)
    for name in SUBLAYER_PARAMS:
        torch.testing.assert_close(g_params[name], r_params[name], **tol, msg=name)


# --------------------------------------------------------------------------- layout, init


def test_sublayer_parameter_layout():
    bank = ExpertBank(E, D, F_DIM, sublayers=N)
    shapes = {n: tuple(p.shape) for n, p in bank.named_parameters()}
    assert shapes == {
        "w1": (E, N, D, F_DIM), "b1": (E, N, F_DIM), "w2": (E, N, F_DIM, D),
        "b2": (E, N, D), "ln_weight": (E, N, D), "ln_bias": (E, N, D),
    }
    assert all(p.expert is True for p in bank.parameters())
    assert "sublayers=3" in repr(bank)
    with pytest.raises(ValueError):
        ExpertBank(E, D, F_DIM, sublayers=0)


def test_sublayer_init_is_moec_and_forward_is_ln_of_x_plus_b2():
    torch.manual_seed(3)
    bank = ExpertBank(E, D, F_DIM, sublayers=N)
    after = torch.rand(2)
    # init: fc1 weight/bias and fc2 bias drawn like nn.Linear, in this order; fc2
    # weight zero (draws nothing); LN weight 1, bias 0.
    torch.manual_seed(3)
    b_in, b_hid = 1 / math.sqrt(D), 1 / math.sqrt(F_DIM)
    w1 = torch.empty(E, N, D, F_DIM).uniform_(-b_in, b_in)
    b1 = torch.empty(E, N, F_DIM).uniform_(-b_in, b_in)
    b2 = torch.empty(E, N, D).uniform_(-b_hid, b_hid)
    assert torch.equal(torch.rand(2), after)
    assert torch.equal(bank.w1, w1) and torch.equal(bank.b1, b1) and torch.equal(bank.b2, b2)
    assert torch.equal(bank.w2, torch.zeros(E, N, F_DIM, D))
    assert torch.equal(bank.ln_weight, torch.ones(E, N, D))
    assert torch.equal(bank.ln_bias, torch.zeros(E, N, D))

    bank.double()
    group_sizes = torch.tensor([2, 0, 3])
    rows = torch.randn(5, D, dtype=torch.float64)
    assert_matches_reference(bank, rows, group_sizes)
    # With w2 = 0 each sublayer is x <- LN(x + b2), whatever w1/b1.
    with torch.no_grad():
        out = bank(rows, group_sizes)
    experts = [0, 0, 2, 2, 2]
    for i, e in enumerate(experts):
        x = rows[i]
        for n in range(N):
            x = F.layer_norm(x + bank.b2[e, n].detach(), (D,), eps=1e-5)
        torch.testing.assert_close(out[i], x, **TIGHT)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_sublayer_forward_and_grads_match_per_token_reference(act):
    torch.manual_seed(0)
    bank = ExpertBank(E, D, F_DIM, activation_fn=act, sublayers=N).double()
    bank.impl = "loop"
    randomize(bank)
    group_sizes = torch.tensor([4, 0, 3])  # uneven, one empty expert
    rows = torch.randn(7, D, dtype=torch.float64)
    assert_matches_reference(bank, rows, group_sizes, act)
    # the empty expert's parameters get exactly zero gradient
    for name, p in bank.named_parameters():
        assert torch.equal(p.grad[1], torch.zeros_like(p.grad[1])), name
    # auto on CPU is the loop path: same numbers
    bank.impl = "auto"
    assert_matches_reference(bank, rows, group_sizes, act)


def test_sublayer_activation_dropout_is_off_in_eval_and_on_in_train():
    torch.manual_seed(0)
    bank = ExpertBank(E, D, F_DIM, activation_dropout=0.5, sublayers=N).double()
    randomize(bank)
    group_sizes = torch.tensor([2, 3, 1])
    rows = torch.randn(6, D, dtype=torch.float64)
    bank.eval()
    assert_matches_reference(bank, rows, group_sizes)
    bank.train()
    with torch.no_grad():
        assert not torch.allclose(bank(rows, group_sizes), bank.eval()(rows, group_sizes))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)],
                         ids=str)
def test_sublayer_grouped_mm_path_matches_loop(dtype, tol, monkeypatch):
    # The grouped_mm path only runs on GPUs in training; force it on CPU where
    # torch._grouped_mm supports the dtype, so its per-row LN affine is covered.
    d, f = 16, 32
    if not grouped_mm_supported(torch.device("cpu"), dtype, d, f):
        pytest.skip(f"torch._grouped_mm does not run {dtype} on CPU here")
    torch.manual_seed(0)
    bank = ExpertBank(4, d, f, sublayers=2)
    randomize(bank)
    group_sizes = torch.tensor([3, 0, 5, 2])
    rows = torch.randn(10, d).to(dtype)
    cot = torch.randn(10, d)
    bank.impl = "loop"
    out_loop, g_rows_loop, g_loop = run_bank(bank, rows, group_sizes, cot)
    monkeypatch.setattr(bank, "use_grouped_mm", lambda rows: True)
    out_gmm, g_rows_gmm, g_gmm = run_bank(bank, rows, group_sizes, cot)
    assert out_gmm.dtype == dtype

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))

    assert rel(out_gmm, out_loop) < tol
    assert rel(g_rows_gmm, g_rows_loop) < tol
    for name in SUBLAYER_PARAMS:
        assert rel(g_gmm[name], g_loop[name]) < tol, name
        assert torch.equal(g_gmm[name][1], torch.zeros_like(g_gmm[name][1])), name


# --------------------------------------------------------------------------- sublayers=1


def test_one_sublayer_keeps_old_layout_init_and_forward():
    torch.manual_seed(5)
    bank = ExpertBank(E, D, F_DIM)
    after = torch.rand(2)
    assert bank.sublayers == 1
    assert [(n, tuple(p.shape)) for n, p in bank.named_parameters()] == [
        ("w1", (E, D, F_DIM)), ("b1", (E, F_DIM)), ("w2", (E, F_DIM, D)), ("b2", (E, D)),
    ]
    assert ExpertBank(E, D, F_DIM, sublayers=1).state_dict().keys() == bank.state_dict().keys()
    # the pre-sublayers init, drawn by hand: fc1 then fc2, weight then bias
    torch.manual_seed(5)
    b_in, b_hid = 1 / math.sqrt(D), 1 / math.sqrt(F_DIM)
    old = {
        "w1": torch.empty(E, D, F_DIM).uniform_(-b_in, b_in),
        "b1": torch.empty(E, F_DIM).uniform_(-b_in, b_in),
        "w2": torch.empty(E, F_DIM, D).uniform_(-b_hid, b_hid),
        "b2": torch.empty(E, D).uniform_(-b_hid, b_hid),
    }
    assert torch.equal(torch.rand(2), after)
    for name, value in old.items():
        assert torch.equal(getattr(bank, name), value), name
    # two-layer FFN, no residual, no LN
    bank.double()
    group_sizes = torch.tensor([2, 0, 3])
    rows = torch.randn(5, D, dtype=torch.float64)
    with torch.no_grad():
        out = bank(rows, group_sizes)
    for i, e in enumerate([0, 0, 2, 2, 2]):
        ref = torch.relu(rows[i] @ old["w1"][e].double() + old["b1"][e].double())
        ref = ref @ old["w2"][e].double() + old["b2"][e].double()
        torch.testing.assert_close(out[i], ref, **TIGHT)


# --------------------------------------------------------------------------- sharding


def test_sublayer_shard_is_the_full_banks_block_and_draws_the_same_numbers():
    E4, world = 4, 2
    torch.manual_seed(11)
    full = ExpertBank(E4, D, F_DIM, sublayers=N)
    after = torch.rand(3)
    for rank in range(world):
        torch.manual_seed(11)
        local = build_local_expert_bank(E4, D, F_DIM, rank, world, sublayers=N)
        assert torch.equal(torch.rand(3), after)
        assert local.num_experts == E4 // world and local.sublayers == N
        assert [n for n, _ in local.named_parameters()] == SUBLAYER_PARAMS
        lo = rank * (E4 // world)
        for name in SUBLAYER_PARAMS:
            p = getattr(local, name)
            assert torch.equal(p, getattr(full, name)[lo:lo + E4 // world]), name
            assert p.expert is True and p.expert_shard == (rank, world) and p.requires_grad


def test_sublayer_shard_forward_and_full_state_dict_load():
    E4, world = 4, 2
    torch.manual_seed(0)
    full = ExpertBank(E4, D, F_DIM, sublayers=N).double()
    randomize(full, seed=1)
    group_sizes = torch.tensor([2, 3, 0, 4])
    rows = torch.randn(int(group_sizes.sum()), D, dtype=torch.float64)
    with torch.no_grad():
        full_out = full(rows, group_sizes)
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), group_sizes.cumsum(0)]).tolist()
    state = full.state_dict()
    for rank in range(world):
        lo_e, hi_e = rank * 2, rank * 2 + 2
        rows_of_rank = slice(bounds[lo_e], bounds[hi_e])
        # keep_shard of the same bank
        shard = copy.deepcopy(full).keep_shard(rank, world)
        with torch.no_grad():
            out = shard(rows[rows_of_rank], group_sizes[lo_e:hi_e])
        torch.testing.assert_close(out, full_out[rows_of_rank], **TIGHT)
        # a bank sharded from other initial values takes its block of a full checkpoint
        torch.manual_seed(100 + rank)
        other = build_local_expert_bank(E4, D, F_DIM, rank, world, sublayers=N).double()
        other.load_state_dict({k: v.clone() for k, v in state.items()})
        for name in SUBLAYER_PARAMS:
            assert torch.equal(getattr(other, name), state[name][lo_e:hi_e]), name
        with torch.no_grad():
            out = other(rows[rows_of_rank], group_sizes[lo_e:hi_e])
        torch.testing.assert_close(out, full_out[rows_of_rank], **TIGHT)


# --------------------------------------------------------------------------- no rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["loop", "auto"])
def test_sublayer_no_rows_forward_backward(dtype, impl):
    torch.manual_seed(0)
    bank = ExpertBank(4, 16, 32, sublayers=N)
    bank.impl = impl
    rows = torch.zeros(0, 16, dtype=dtype, requires_grad=True)
    out = bank(rows, torch.zeros(4, dtype=torch.long))
    assert out.shape == (0, 16) and out.dtype == dtype
    out.float().sum().backward()
    assert [n for n, _ in bank.named_parameters()] == SUBLAYER_PARAMS
    for name, p in bank.named_parameters():
        assert p.grad is not None, name
        assert torch.equal(p.grad, torch.zeros_like(p)), name
