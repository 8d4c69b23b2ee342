"""The MoE layer on a CUDA device (marker ``gpu``; ``make gpu-check`` runs them).

Without a GPU every test here skips with one reason. ``MOE_GPU_TESTS_ON_CPU=1`` runs
the same checks with the "device" being the CPU, to test the tests themselves
(the sync and NCCL checks still need CUDA and skip).

Tolerances (relative Frobenius error ``|a - b| / |b|`` of the output, the input
gradient and every parameter gradient, against an fp64 CPU reference built from the
same, already rounded, parameters and inputs): fp32 2e-5, fp16 5e-3, bf16 3e-2; grouped
vs loop expert path: twice those (both sides are rounded). The
routers compute in fp32 in every case; their weights are scaled up so that no token
sits on a routing tie that rounding could flip.
"""

import copy
import json
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_fairseq.layer.dispatcher import SortDispatcher
from moe_fairseq.layer.expert_bank import ExpertBank, grouped_mm_supported
from moe_fairseq.parallel.dispatcher import AllToAllDispatcher, build_local_expert_bank
from moe_fairseq.layer.moe_layer import MoELayer
from moe_fairseq.routers.attentive import AttentiveRouter
from moe_fairseq.routers.cosine import CosineRouter
from moe_fairseq.routers.stratified import StratifiedRouter
from moe_fairseq.routers.top_k import TopKRouter

CUDA = torch.cuda.is_available()
ON_CPU = os.environ.get("MOE_GPU_TESTS_ON_CPU") == "1"
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (CUDA or ON_CPU),
                       reason="no CUDA device (make gpu-check runs these on a GPU)"),
]
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA (sync debug mode, NCCL)")

D, F_DIM, E = 64, 128, 8
SEQ, BATCH = 24, 12
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 2e-5, "fp16": 5e-3, "bf16": 3e-2}
# grouped vs loop: two rounded computations, each within TOL of the exact one
PATH_TOL = {k: 2 * v for k, v in TOL.items()}


def make_router(kind: str) -> torch.nn.Module:
    if kind == "top1":
        router = TopKRouter(D, E, top_k=1, capacity_factor=1.0, second_expert_policy="all")
    elif kind == "top2":
        router = TopKRouter(D, E, top_k=2, capacity_factor=1.0, second_expert_policy="all",
                            normalize_gates=True)
    elif kind == "attentive":
        router = AttentiveRouter(D, E, attention_dim=16, top_k=2, capacity_factor=1.0,
                                 second_expert_policy="all", normalize_gates=True)
    elif kind == "cosine":  # MoEC as its presets run it
        router = CosineRouter(D, E, top_k=1, capacity_factor=2.0, capacity_rule="tokens",
                              second_expert_policy="all", routing_dim=16, clusters=2,
                              var_coef=1.0, expert_dropout=0.5, output_mixing=True)
    elif kind == "stratified":  # SMoE, post-LN strata
        router = StratifiedRouter(D, [4, 4], stratum_norm="post-ln", top_k=2,
                                  capacity_factor=1.0, capacity_rule="per-slot",
                                  second_expert_policy="all", normalize_gates=True)
    else:
        raise ValueError(kind)
    with torch.no_grad():
        for name, p in router.named_parameters():
            if (name.endswith("wg.weight") and kind != "cosine") or name == "query.weight":
                p.mul_(4.0)
    return router


def make_layer(kind: str, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    router = make_router(kind)
    sublayers = 3 if kind == "cosine" else 1
    return MoELayer(router, ExpertBank(E, D, F_DIM, sublayers=sublayers))


def padded_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SEQ, BATCH, D, generator=g)
    lengths = torch.randint(SEQ // 3, SEQ + 1, (BATCH,), generator=g)
    lengths[0] = SEQ
    mask = torch.arange(SEQ).unsqueeze(1) >= lengths.unsqueeze(0)  # [seq, batch], True = pad
    cot = torch.randn(SEQ, BATCH, D, generator=g)
    return x, mask, cot


def run_layer(layer, x, mask, cot, residual_needed):
    x = x.detach().clone().requires_grad_(True)
    out = layer(x, padding_mask=mask, residual=x if residual_needed else None)
    losses = layer.stats.losses
    loss = (out.float() * cot.float()).sum() + sum(v.float() for v in losses.values())
    loss.backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters() if p.grad is not None})
    return out.detach(), grads, {k: v.detach() for k, v in losses.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("kind", ["top1", "top2", "attentive", "cosine", "stratified"])
def test_layer_matches_fp64_cpu_reference(kind, dtype):
    dt, tol = DTYPES[dtype], TOL[dtype]
    layer = make_layer(kind).to(DEVICE, dt).train()
    ref = copy.deepcopy(layer).to("cpu", torch.float64).train()
    ref.dispatcher = SortDispatcher(E, layout="compact")
    x, mask, cot = padded_batch()
    x, cot = x.to(dt), cot.to(dt)  # both sides start from the same rounded values
    stream = layer.router.num_passes > 1 or layer.returns_block_output
    out, grads, losses = run_layer(layer, x.to(DEVICE), mask.to(DEVICE), cot.to(DEVICE), stream)
    r_out, r_grads, r_losses = run_layer(ref, x.double(), mask, cot.double(), stream)
    assert torch.isfinite(out.float()).all()
    errors = {"out": rel_err(out, r_out)}
    errors.update({f"grad {n}": rel_err(g, r_grads[n]) for n, g in grads.items()
                   if r_grads[n].norm() > 0})
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{kind} {dtype}: relative errors above {tol}: {bad}"
    assert grads.keys() == r_grads.keys()
    for name, value in losses.items():
        assert abs(float(value) - float(r_losses[name])) <= 1e-3 * max(1.0, abs(float(r_losses[name]))), name
    assert int(layer.stats.dropped) == int(ref.stats.dropped)
    assert torch.equal(layer.stats.expert_load.cpu(), ref.stats.expert_load)


@pytest.mark.parametrize("sublayers", [1, 3])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_grouped_path_equals_loop_path(dtype, sublayers):
    dt, tol = DTYPES[dtype], PATH_TOL[dtype]
    if DEVICE.type != "cuda" or not grouped_mm_supported(DEVICE, dt, D, F_DIM):
        pytest.skip(f"torch._grouped_mm does not run {dtype} on {DEVICE.type} here: "
                    "the bank uses its loop path")
    torch.manual_seed(0)
    bank = ExpertBank(E, D, F_DIM, sublayers=sublayers).to(DEVICE, dt)
    loop = copy.deepcopy(bank)
    loop.impl = "loop"
    sizes = torch.tensor([0, 37, 0, 5, 100, 0, 1, 13], device=DEVICE)  # empty experts included
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(int(sizes.sum()), D, generator=g).to(DEVICE, dt)
    cot = torch.randn(rows.shape, generator=g).to(DEVICE, dt)
    results = []
    for b in (bank, loop):
        r = rows.clone().requires_grad_(True)
        y = b(r, sizes)
        (y.float() * cot.float()).sum().backward()
        results.append((y, r.grad, {n: p.grad for n, p in b.named_parameters()}))
    assert bank.use_grouped_mm(rows) and not loop.use_grouped_mm(rows)
    (y, gx, gp), (ly, lgx, lgp) = results
    assert rel_err(y, ly) <= tol and rel_err(gx, lgx) <= tol
    for n in gp:
        assert rel_err(gp[n], lgp[n]) <= tol, n


@pytest.mark.parametrize("kind", ["top1", "top2", "cosine", "stratified"])
def test_zero_token_passes_and_empty_batches(kind):
    layer = make_layer(kind).to(DEVICE).train()
    stream = layer.router.num_passes > 1 or layer.returns_block_output
    x, mask, cot = padded_batch()
    all_pad = torch.ones_like(mask)
    out, grads, losses = run_layer(layer, x.to(DEVICE), all_pad.to(DEVICE), cot.to(DEVICE), stream)
    if not stream:
        assert torch.equal(out, torch.zeros_like(out))
    assert int(layer.stats.tokens) == 0 and int(layer.stats.assignments) == 0
    assert all(torch.isfinite(g).all() for g in grads.values())
    empty = torch.zeros(0, 3, D, device=DEVICE, requires_grad=True)
    y = layer(empty, residual=empty if stream else None)
    y.sum().backward()
    assert y.shape == empty.shape


def _grouped_mm_syncs(dt) -> bool:
    """Whether torch's own ``_grouped_mm`` syncs with the host in this dtype (torch
    2.11 on an H100: fp16 runs a per-group fallback that reads the offsets)."""
    x = torch.randn(16, D, device=DEVICE, dtype=dt)
    w = torch.randn(2, D, F_DIM, device=DEVICE, dtype=dt)
    offs = torch.tensor([8, 16], device=DEVICE, dtype=torch.int32)
    torch._grouped_mm(x, w, offs=offs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch._grouped_mm(x, w, offs=offs)
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["top1", "top2-sampling", "attentive", "cosine"])
def test_single_pass_forward_has_no_host_sync(kind, dtype, monkeypatch):
    """Training forward of single-pass routers on a padded batch: no ``.item()``,
    ``nonzero`` or device-to-host copy anywhere in the layer's own code.

    Where torch's grouped GEMM itself syncs in this dtype (fp16 on torch 2.11), it is
    replaced for this test by the same product computed through the bf16 kernel, so
    the rest of the layer is still checked; bf16 runs torch's kernel as is."""
    dt = DTYPES[dtype]
    if grouped_mm_supported(DEVICE, dt, D, F_DIM) and _grouped_mm_syncs(dt):
        grouped_mm = torch._grouped_mm
        monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: grouped_mm(
            a.bfloat16(), b.bfloat16(), offs=offs).to(a.dtype))
    router_kind = "top2" if kind.startswith("top2") else kind
    layer = make_layer(router_kind).to(DEVICE, DTYPES[dtype]).train()
    if kind == "top2-sampling":
        layer.router.second_expert_policy = "sampling"
    x, mask, _ = padded_batch()
    x, mask = x.to(DEVICE, DTYPES[dtype]).requires_grad_(True), mask.to(DEVICE)
    for _ in range(2):  # warm-up: grouped_mm probe, MoEC's host copy of its call counter
        layer(x, padding_mask=mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x, padding_mask=mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.float()).all()


# ------------------------------------------------------------ all-to-all on the device


def _a2a_worker(rank, world, backend, rdv, result_dir, device="cuda"):
    """Expert-parallel layer vs the single-process layer on this rank's tokens."""
    result = {"rank": rank}
    try:
        if device == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"file://{rdv}", world_size=world,
                                rank=rank, timeout=timedelta(seconds=60))
        torch.manual_seed(0)
        router = make_router("top2")
        full = ExpertBank(E, D, F_DIM)
        reference = MoELayer(copy.deepcopy(router), copy.deepcopy(full)).to(device).train()
        local = build_local_expert_bank(E, D, F_DIM, rank, world)
        local.load_state_dict(full.state_dict())  # a sharded bank takes its block
        layer = MoELayer(router, local, AllToAllDispatcher(E)).to(device).train()
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(50 + 17 * rank, D, generator=g).to(device)
        out = layer(x)
        ref = reference(x)
        result["rel_err"] = rel_err(out, ref)
        xg = x.clone().requires_grad_(True)
        layer(xg).sum().backward()
        result["grad_finite"] = bool(torch.isfinite(xg.grad).all())
        dist.destroy_process_group()
    except Exception as exc:  # reported to the parent, which decides skip or fail
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-3000:]
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _launch(world, backend, tmp_path, device="cuda"):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_a2a_worker,
                         args=(r, world, backend, tmp_path / "rdv", tmp_path, device))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
        if p.is_alive():
            p.kill()
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@needs_cuda
def test_all_to_all_dispatcher_nccl_world_1(tmp_path):
    (res,) = _launch(1, "nccl", tmp_path)
    assert "error" not in res, res.get("traceback")
    assert res["rel_err"] <= 1e-5 and res["grad_finite"], res


@needs_cuda
def test_all_to_all_dispatcher_gloo_two_processes_cuda_tensors(tmp_path):
    results = _launch(2, "gloo", tmp_path)
    errors = [r["error"] for r in results if "error" in r]
    if errors and any("CUDA" in e or "cuda" in e or "not supported" in e for e in errors):
        pytest.skip(f"gloo has no all_to_all for CUDA tensors here: {errors[0][:200]}")
    assert not errors, [r.get("traceback") for r in results]
    for r in results:
        assert r["rel_err"] <= 1e-5 and r["grad_finite"], r
