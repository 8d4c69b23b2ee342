"""The routing and plan kernels (``moe_fairseq/kernels/route.py``, ``plan.py``) against
the float64 torch router and dispatcher they replace on the fused path.

Each case draws fp64 logits, routes them with :class:`TopKRouter` (its ``logits`` made to
return them) and plans with :class:`SortDispatcher` in the static layout, all in fp64;
the kernels get the same logits in fp32. Experts, drops, the layout and every size must
be equal; probabilities, gates, losses, row gates, the entropy statistic and the
gradient of an objective touching all of them (row gates, probabilities, both losses)
with respect to the logits must agree to fp32 precision. Cases: top-1 and top-2,
capacity drops, dropless, eval capacity, gates normalised before or after dropping,
padding, empty experts, expert counts that are not powers of two, several ragged token
blocks, no token, and Gumbel sampling (against the fp32 router, which draws the same
noise). Also ``torch.library.opcheck`` on each op.

The kernels run in Triton's interpreter, which must be switched on before their first
import: the cases run in one worker subprocess (this file run as a script).
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from moe_fairseq.layer.dispatcher import SortDispatcher  # noqa: E402
from moe_fairseq.routers.top_k import TopKRouter  # noqa: E402

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed")
TOLERANCE = 2e-6  # relative, fp32 kernels against fp64

CASES = {
    "top1_drops": dict(T=150, E=5, k=1, cf=0.8),
    "top2_drops_normalize_after": dict(T=150, E=6, k=2, cf=0.5, normalize=True),
    "top2_normalize_before_dropless": dict(T=130, E=4, k=2, cf=0.0, normalize=True,
                                           before=True),
    "top2_padding_masked": dict(T=200, E=8, k=2, cf=1.0, padding=True),
    "top2_padding_normalize_after": dict(T=90, E=3, k=2, cf=0.75, padding=True,
                                         normalize=True),
    "top2_empty_experts": dict(T=70, E=16, k=2, cf=1.25, empty=(3, 7, 11)),
    "top2_eval_capacity": dict(T=100, E=5, k=2, cf=1.0, eval=True, eval_fraction=0.1),
    "top2_many_blocks": dict(T=333, E=7, k=2, cf=1.25),
    "top2_no_token": dict(T=0, E=4, k=2, cf=1.0),
    "top2_sampling_fp32": dict(T=120, E=6, k=2, cf=1.0, sampling=True),
}


def _rel(got, ref) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if ref.numel() == 0:
        return 0.0
    scale = ref.abs().max().item()
    diff = (got - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def run_case(name: str) -> dict:
    from moe_fairseq import kernels

    c = CASES[name]
    T, E, k = c["T"], c["E"], c["k"]
    ref_dtype = torch.float32 if c.get("sampling") else torch.float64
    gen = torch.Generator().manual_seed(7)
    logits = (2 * torch.randn(T, E, generator=gen, dtype=torch.float64))
    for e in c.get("empty", ()):
        logits[:, e] -= 50.0
    mask = (torch.rand(T, generator=gen) > 0.3) if c.get("padding") else None
    router = TopKRouter(4, E, top_k=k, capacity_factor=c["cf"],
                        eval_capacity_token_fraction=c.get("eval_fraction", 1.0),
                        second_expert_policy="sampling" if c.get("sampling") else "all",
                        eval_second_expert_policy="all",
                        normalize_gates=c.get("normalize", False),
                        normalize_before_dropping=c.get("before", False))
    router.train(not c.get("eval"))
    ref_logits = logits.to(ref_dtype).requires_grad_(True)
    router.logits = lambda x: ref_logits
    x = torch.zeros(T, 4, dtype=ref_dtype)
    torch.manual_seed(11)
    ref = router.route(x, 0, token_mask=mask)
    ref_plan = SortDispatcher(E, layout="static").plan(ref)

    got_logits = logits.float().requires_grad_(True)
    torch.manual_seed(11)
    noise = torch.rand_like(got_logits) if c.get("sampling") else None
    normalize = c.get("normalize", False) and k > 1
    out = kernels.top_k_routing(got_logits, mask, noise, k,
                                normalize_before=normalize and c.get("before", False))
    plan = kernels.static_plan(out.expert_index, out.gates, out.block_counts, ref.capacity,
                               normalize_after=ref.normalize_after_drop)

    assert torch.equal(out.expert_index, ref.expert_index), "experts differ"
    assert torch.equal(plan.order, ref_plan.assignment_index), "row layout differs"
    assert torch.equal(plan.row_mask, ref_plan.row_mask), "kept rows differ"
    sizes = plan.sizes
    assert torch.equal(sizes[:E], ref_plan.requested)
    assert torch.equal(sizes[E:2 * E], ref_plan.group_sizes)
    assert torch.equal(sizes[2 * E:3 * E], ref_plan.bank_sizes)
    assert int(sizes[3 * E]) == int(ref_plan.requested.sum())
    assert int(sizes[3 * E + 1]) == int(ref_plan.requested.sum() - ref_plan.group_sizes.sum())
    assert int(sizes[3 * E + 2]) == int(ref.token_count)
    assert torch.equal(plan.offsets.long(), torch.cumsum(ref_plan.bank_sizes, 0))
    first = ref.expert_index[:, 0]
    first_load = torch.zeros(E, dtype=torch.long).scatter_add_(
        0, first.clamp_min(0), (first >= 0).long())
    if T:
        assert torch.equal(out.block_counts[-1, 0, :E], first_load)
    if c.get("cf", 0) and c["cf"] < 1 and not c.get("eval"):
        assert int(sizes[3 * E + 1]) > 0, "the case should drop assignments"
    for e in c.get("empty", ()):
        assert int(sizes[e]) == 0, f"expert {e} should get no token"

    from moe_fairseq.routers.base import entropy_of
    ref_entropy = entropy_of(ref.probs.detach(), mask) * ref.token_count
    errors = {
        "probs": _rel(out.probs, ref.probs), "gates": _rel(out.gates, ref.gates),
        "balance": _rel(out.balance, ref.losses["balance"]), "z": _rel(out.z, ref.losses["z"]),
        "row_gates": _rel(plan.row_gates, ref_plan.row_gates),
        "entropy": _rel(out.entropy_sum, ref_entropy),
    }
    if T:
        w_rows = torch.linspace(-1, 2, k * T, dtype=torch.float64)
        w_probs = torch.cos(torch.arange(T * E, dtype=torch.float64)).view(T, E)
        if mask is not None:  # the objective reads no padding row's probabilities
            w_probs = w_probs * mask.unsqueeze(1)

        def objective(row_gates, probs, balance, z):
            return ((row_gates.double() * w_rows).sum() + (probs.double() * w_probs).sum()
                    + 0.3 * balance.double() + 0.05 * z.double())

        ref_grad, = torch.autograd.grad(objective(ref_plan.row_gates, ref.probs,
                                                  ref.losses["balance"], ref.losses["z"]),
                                        ref_logits)
        got_grad, = torch.autograd.grad(objective(plan.row_gates, out.probs, out.balance,
                                                  out.z), got_logits)
        errors["dlogits"] = _rel(got_grad, ref_grad)
        if mask is not None:
            assert bool((got_grad[~mask] == 0).all()), "padding must get no gradient"
    tolerance = 2e-5 if ref_dtype == torch.float32 else TOLERANCE
    bad = {n: e for n, e in errors.items() if not e <= tolerance}
    assert not bad, f"{name}: relative errors above {tolerance}: {bad} (all: {errors})"
    return errors


def check_opcheck() -> dict:
    """Schema, fake implementation vs real, and AOT dispatch of every op."""
    from moe_fairseq.kernels import routing_ops as ro

    gen = torch.Generator().manual_seed(3)
    T, E, k = 70, 5, 2
    logits = torch.randn(T, E, generator=gen)
    mask = torch.rand(T, generator=gen) > 0.2
    noise = torch.rand(T, E, generator=gen)
    probs, index, gates, lse, counts, parts = ro.route_top_k_op(logits, mask, noise, k, False)
    cum = torch.cumsum(counts, 0)
    order, slot_row, row_gates, row_mask, sizes, offs = ro.static_plan_op(
        index, gates, cum, torch.tensor(40), 0, 2, True)
    one = torch.ones(())
    calls = {
        ro.route_top_k_op: [(logits, mask, noise, k, False), (logits, None, None, 1, False)],
        ro.router_losses_op: [(parts, cum)],
        ro.route_top_k_backward_op: [(probs, lse, index, mask, torch.randn(T, k), None, one,
                                      one, cum, True)],
        ro.static_plan_op: [(index, gates, cum, None, 0, 0, False),
                            (index, gates, cum, None, 30, 1, True)],
        ro.static_plan_backward_op: [(torch.randn(k * T), gates, slot_row, row_mask, True)],
    }
    from conftest import opcheck_every

    return opcheck_every(calls)


CHECKS = {"opcheck": check_opcheck}


def _worker(names, out):
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            fn = CHECKS.get(name) or (lambda: run_case(name))
            results[name] = {"ok": True, "errors": fn()}
        except Exception:
            results[name] = {"ok": False, "traceback": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
    Path(out).write_text(json.dumps(results, indent=1))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("routing") / "routing_kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, "--out", str(out)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), (
        f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


@needs_triton
@pytest.mark.parametrize("name", [*CASES, *CHECKS])
def test_routing_kernels_interpreted(results, name):
    r = results[name]
    assert r["ok"], f"{name} ({r['seconds']} s):\n{r['traceback']}"


def test_random_policy_has_no_kernel():
    """GShard's ``random`` second expert is routed by the torch router even on the fused
    path (``fused_route`` declines: None), and so is the cosine router."""
    from moe_fairseq.routers.cosine import CosineRouter

    router = TopKRouter(8, 4, top_k=2, second_expert_policy="random").train()
    assert router.fused_route(torch.randn(5, 8)) is None
    assert CosineRouter(8, 4, routing_dim=4).fused_route(torch.randn(5, 8)) is None


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("names", nargs="*")
    a = parser.parse_args()
    _worker(a.names or [*CASES, *CHECKS], a.out)
