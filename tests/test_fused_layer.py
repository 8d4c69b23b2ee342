"""The MoE layer's fused path (``--moe-kernels triton``: gather + expert FFN + combine,
and for the linear router in the static layout its routing, losses and plan, as the
Triton custom ops of ``moe_fairseq/kernels``) against its PyTorch path.

On CPU the kernels run in Triton's interpreter, which ``TRITON_INTERPRET=1`` must switch
on before they are first imported, so the layer cases run in one worker subprocess (this
file run as a script, as in ``test_kernels.py``). Each case builds a tiny fp32 layer,
runs one training (or eval) forward + backward on its PyTorch path and on a copy forced
onto the fused path (whose bank forward, dispatch and combine are made to raise), and
compares outputs, the input gradient, every parameter gradient, the routing losses and
the statistics. The worker also checks the custom ops with ``torch.library.opcheck``
(schema, fake implementation, autograd registration, AOT tracing as torch.compile
does) and that ``auto`` keeps CPU on the PyTorch path even with the interpreter on.

In this process (no interpreter): ``auto`` on CPU is bit-identical to ``torch``, which
layers qualify, the flag's parsing, and in subprocesses the one-line error of ``triton``
without CUDA or interpreter, and a tiny ``fairseq-train`` under ``torch`` and ``auto``.
With a GPU (``-m gpu``): the same cases with compiled kernels on CUDA, and ``auto``
taking the fused path in bf16.

Run one case by hand: ``TRITON_INTERPRET=1 python tests/test_fused_layer.py CASE``
(on a GPU: ``python tests/test_fused_layer.py --device cuda CASE``).
"""

import argparse
import copy
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
if str(REPO_ROOT) not in sys.path:  # the worker runs this file as a script
    sys.path.insert(0, str(REPO_ROOT))

from moe_fairseq.layer.dispatcher import SortDispatcher  # noqa: E402
from moe_fairseq.layer.expert_bank import ExpertBank  # noqa: E402
from moe_fairseq.layer.moe_layer import MoELayer  # noqa: E402
from moe_fairseq.options import MoEConfigError  # noqa: E402
from moe_fairseq.routers.cosine import CosineRouter  # noqa: E402
from moe_fairseq.routers.stratified import StratifiedRouter  # noqa: E402
from moe_fairseq.routers.top_k import TopKRouter  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")

D, F_DIM, E = 16, 32, 4
# Relative error allowed (max |fused - torch| / max |torch|): fp32, other summation order.
TOLERANCE = 2e-5

# ------------------------------------------------------------------- the cases

CASES = {
    # top-1, compact layout (CPU's own), capacity drops.
    "top1_compact_drops": dict(top_k=1, cf=0.75, layout="compact"),
    # top-2, static layout (CUDA's), capacity drops, gates renormalised after dropping.
    "top2_static_drops": dict(top_k=2, cf=0.5, layout="static", normalize_gates=True),
    # top-2 compact with drops: fewer rows than k * T, zero-filled slot stacks.
    "top2_compact_drops": dict(top_k=2, cf=0.5, layout="compact"),
    # dropless (--moe-capacity-factor 0), both layouts.
    "top2_dropless_static": dict(top_k=2, cf=0.0, layout="static"),
    "top2_dropless_compact": dict(top_k=2, cf=0.0, layout="compact"),
    # No token ever picks expert 3: an empty group; exact gelu.
    "empty_expert_gelu": dict(top_k=2, cf=1.0, layout="static", act="gelu", empty_expert=True),
    # The layer's padding mask: padding removed before routing (CPU's way) ...
    "padding_removed_compact": dict(top_k=2, cf=1.0, layout="compact", padding="remove"),
    # ... and masked inside the router on the static layout (CUDA's way): padding slots
    # ride in the last expert's group with row_mask False.
    "padding_masked_static": dict(top_k=2, cf=0.75, layout="static", padding="mask"),
    # No activation; activation dropout only in training, so eval qualifies.
    "linear_eval_static": dict(top_k=2, cf=1.0, layout="static", act="linear",
                               act_dropout=0.3, eval=True),
    # MoEC: cosine router, top-1, output mixing (plan.input_weight), padding removed.
    "moec_output_mixing": dict(router="cosine", top_k=1, cf=1.0, layout="compact",
                               padding="remove"),
    # 640 tokens: several 64-row tiles per expert (the kernels' default tiles), ragged.
    "top2_static_many_tiles": dict(top_k=2, cf=1.25, layout="static", shape=(16, 40)),
    # SMoE: two routing passes, the block output from the router's stream.
    "smoe_two_passes": dict(router="stratified", top_k=2, cf=1.0, layout="static"),
}


def build_layer(c: dict, seed: int = 0) -> MoELayer:
    """The case's fp32 layer on its PyTorch path (``kernels="torch"``)."""
    torch.manual_seed(seed)
    kw = dict(top_k=c["top_k"], capacity_factor=c["cf"], second_expert_policy="all",
              normalize_gates=c.get("normalize_gates", False))
    kind = c.get("router", "top_k")
    if kind == "cosine":
        router = CosineRouter(D, E, routing_dim=4, output_mixing=True, **kw)
    elif kind == "stratified":
        router = StratifiedRouter(D, (2, 2), **kw)
    else:
        router = TopKRouter(D, E, **kw)
    bank = ExpertBank(E, D, F_DIM, activation_fn=c.get("act", "relu"),
                      activation_dropout=c.get("act_dropout", 0.0))
    layer = MoELayer(router, bank, SortDispatcher(E, layout=c["layout"]), kernels="torch")
    layer.padding = c.get("padding", "auto")
    if c.get("empty_expert"):
        with torch.no_grad():
            # Inputs carry a constant 4 in feature 0 (see inputs): expert 3's logit ~ -100.
            router.wg.weight[:, 0] = 0.0
            router.wg.weight[3, 0] = -25.0
    return layer.eval() if c.get("eval") else layer.train()


def inputs(c: dict, seed: int = 1):
    """x ``[B, S, D]`` (default ``[4, 8, D]``) and the layer's padding mask ``[4, 8]``
    (True = padding) or None."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*c.get("shape", (4, 8)), D, generator=gen)
    if c.get("empty_expert"):
        x[..., 0] = 4.0
    mask = None
    if c.get("padding"):
        mask = torch.zeros(4, 8, dtype=torch.bool)
        for b, n in enumerate((0, 3, 5, 8)):  # the last sentence is all padding
            mask[b, 8 - n:] = True
    return x, mask


def run(layer: MoELayer, x, mask):
    """Output, grads (x, then every parameter), stats and losses of one forward + backward."""
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(123)  # the same noise, if any, on both paths
    out = layer(x, padding_mask=mask)
    s = layer.stats
    weights = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
    loss = (out.float() * weights).sum()
    loss = loss + sum(v for v in s.losses.values())
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [x, *params])]
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    stats = {k: getattr(s, k).detach().clone() for k in
             ("tokens", "assignments", "dropped", "expert_load", "first_choice_load",
              "entropy_sum", "entropy_count")}
    losses = {k: v.detach() for k, v in s.losses.items()}
    return out.detach(), dict(zip(names, grads)), stats, losses


def _rel_error(got, ref) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape:
        return float("inf")
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(got)):
        return float("inf")
    got, ref = got[finite], ref[finite]
    if ref.numel() == 0:
        return 0.0
    scale = ref.abs().max().item()
    diff = (got - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def _must_not_run(*args, **kwargs):
    raise AssertionError("the fused path ran a part of the PyTorch path")


def _on(device, x, mask):
    return x.to(device), (None if mask is None else mask.to(device))


def run_case(name: str, device: str = "cpu") -> dict:
    """The case on both paths; raises AssertionError on a mismatch. Returns the errors."""
    c = CASES[name]
    layer = build_layer(c).to(device)
    fused = copy.deepcopy(layer)
    fused.kernels = "triton"
    fused.experts.forward = _must_not_run
    fused.dispatcher.dispatch = _must_not_run
    fused.dispatcher.combine = _must_not_run
    if c["layout"] == "static" and c.get("router", "top_k") == "top_k":
        # The linear router's static layout: routing, losses and plan by their kernels.
        fused.router.route = _must_not_run
        fused.dispatcher._sort_plan = _must_not_run
    x, mask = _on(device, *inputs(c))
    assert fused.uses_fused_kernels(x) and not layer.uses_fused_kernels(x)

    out_t, grads_t, stats_t, losses_t = run(layer, x, mask)
    out_f, grads_f, stats_f, losses_f = run(fused, x, mask)
    errors = {"out": _rel_error(out_f, out_t)}
    errors.update({"d" + n: _rel_error(grads_f[n], grads_t[n]) for n in grads_t})
    errors.update({"loss " + n: _rel_error(losses_f[n], losses_t[n]) for n in losses_t})
    assert set(losses_f) == set(losses_t), (sorted(losses_f), sorted(losses_t))
    bad = {n: e for n, e in errors.items() if not e <= TOLERANCE}
    assert not bad, f"{name}: relative errors above {TOLERANCE}: {bad} (all: {errors})"
    for k in stats_t:
        if k == "entropy_sum":  # fp32 sums of the router's probabilities
            assert _rel_error(stats_f[k], stats_t[k]) <= TOLERANCE, k
        else:
            assert torch.equal(stats_f[k], stats_t[k]), (k, stats_f[k], stats_t[k])
    if c.get("padding"):
        assert bool((out_f[mask] == 0).all()), "padding must output exactly 0"
    if c.get("empty_expert"):
        assert int(stats_t["expert_load"][3]) == 0, "expert 3 should get no token"
    if c["cf"] > 0 and c.get("router", "top_k") == "top_k" and not c.get("eval"):
        if c["cf"] < 1:
            assert int(stats_t["dropped"]) > 0, "the case should drop assignments"
    return errors


def check_auto_keeps_cpu_on_torch(device: str = "cpu") -> dict:
    """With the interpreter on (the kernels run on CPU), ``auto`` still takes the
    PyTorch path on CPU: bit-identical to ``torch``."""
    from moe_fairseq import kernels

    assert kernels.available("cpu", torch.float32)
    c = CASES["top2_static_drops"]
    layer = build_layer(c)
    auto = copy.deepcopy(layer)
    auto.kernels = "auto"
    x, mask = inputs(c)
    assert not auto.uses_fused_kernels(x)
    assert not auto.uses_fused_kernels(x.to(torch.bfloat16))  # CPU: not even 16-bit
    out_t, grads_t, _, losses_t = run(layer, x, mask)
    out_a, grads_a, _, losses_a = run(auto, x, mask)
    assert torch.equal(out_t, out_a)
    assert all(torch.equal(grads_t[n], grads_a[n]) for n in grads_t)
    assert all(torch.equal(losses_t[n], losses_a[n]) for n in losses_t)
    return {}


def check_auto_takes_fused_on_cuda(device: str = "cuda") -> dict:
    """On CUDA, ``auto`` takes the fused path in bf16 (close to ``torch``), not in fp32."""
    c = CASES["top2_static_drops"]
    layer = build_layer(c).to(device)
    x, mask = _on(device, *inputs(c))
    auto = copy.deepcopy(layer)
    auto.kernels = "auto"
    assert not auto.uses_fused_kernels(x)  # fp32
    layer, auto = layer.to(torch.bfloat16), auto.to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    assert auto.uses_fused_kernels(x)
    auto.experts.forward = _must_not_run
    out_t, grads_t, _, _ = run(layer, x, mask)
    out_a, grads_a, _, _ = run(auto, x, mask)
    errors = {"out": _rel_error(out_a, out_t)}
    errors.update({"d" + n: _rel_error(grads_a[n], grads_t[n]) for n in grads_t})
    bad = {n: e for n, e in errors.items() if not e <= 5e-2}  # bf16 roundings differ
    assert not bad, f"bf16 auto vs torch: {bad}"
    return errors


def check_ops_with_opcheck(device: str = "cpu") -> dict:
    """``torch.library.opcheck`` on each custom op: schema, fake implementation vs the
    real one, autograd registration and AOT dispatch (what torch.compile traces)."""
    from moe_fairseq.kernels import ops

    gen = torch.Generator().manual_seed(5)
    T, k, d, f, n_exp = 12, 2, 16, 32, 3
    N = k * T
    slot = torch.randperm(N, generator=gen).to(device)
    offsets = torch.tensor([7, 7, N], dtype=torch.int32, device=device)  # expert 1 empty
    mask = (torch.rand(N, generator=gen) > 0.25).to(device)
    cfg = ops.config_list(ops.BlockConfig(block_m=16, block_n=16, block_k=16))

    def t(*shape, grad=False):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_(grad)

    x, w1, b1 = t(T, d, grad=True), t(n_exp, d, f, grad=True), t(n_exp, f, grad=True)
    h, w2, b2 = t(N, f, grad=True), t(n_exp, f, d, grad=True), t(n_exp, d, grad=True)
    gates, dy, z = t(N, grad=True), t(T, d), t(N, f)
    calls = {
        ops.gather_ffn1_op: [(x, w1, b1, offsets, slot, k, "gelu", mask, cfg),
                             (x, w1, b1, offsets, slot, k, "relu", None, cfg)],
        ops.ffn2_combine_op: [(h, w2, b2, gates, offsets, slot, T, k, mask, cfg),
                              (h, w2, b2, gates, offsets, slot[:20], T, k, None, cfg)],
        ops.ffn1_dx_op: [(h.detach(), w1.detach(), z, offsets, slot, mask, T, k, "relu", cfg)],
        ops.ffn1_dw_op: [(x.detach(), h.detach(), z, offsets, slot, mask, "gelu", cfg)],
        ops.ffn2_dh_op: [(dy, w2.detach(), b2.detach(), h.detach(), gates.detach(), offsets,
                          slot, mask, True, cfg)],
        ops.ffn2_dw_op: [(h.detach(), dy, gates.detach(), offsets, slot, mask, cfg)],
    }
    # ffn2_combine's second call: 20 of 24 slots (compact layout), offsets to match.
    calls[ops.ffn2_combine_op][1] = (h[:20], w2, b2, gates[:20],
                                     torch.tensor([7, 7, 20], dtype=torch.int32, device=device),
                                     slot[:20], T, k, None, cfg)
    from conftest import opcheck_every

    return opcheck_every(calls)


CHECKS = {"auto_keeps_cpu_on_torch": check_auto_keeps_cpu_on_torch,
          "opcheck": check_ops_with_opcheck}
CUDA_CHECKS = {"auto_takes_fused_on_cuda": check_auto_takes_fused_on_cuda,
               "opcheck": check_ops_with_opcheck}

# ---------------------------------------------------------------- the worker


def _runner(name, device):
    checks = CUDA_CHECKS if device == "cuda" else CHECKS
    if name in checks:
        return lambda: checks[name](device)
    return lambda: run_case(name, device)


def _worker(names, device, out):
    """Run cases and checks in this process; write {name: {ok, errors, seconds, traceback}}."""
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            results[name] = {"ok": True, "errors": _runner(name, device)()}
        except Exception:
            results[name] = {"ok": False, "traceback": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
    Path(out).write_text(json.dumps(results, indent=1))


def _run_worker(out, device):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if device == "cpu":
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, "--device", device, "--out", str(out)],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), (
        f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp("fused") / "fused_layer.json", "cpu")


def _assert_ok(results, name):
    r = results[name]
    assert r["ok"], f"{name} ({r['seconds']} s):\n{r['traceback']}"


@needs_triton
@pytest.mark.parametrize("case", list(CASES))
def test_fused_layer_equals_torch_path(interpreted_results, case):
    _assert_ok(interpreted_results, case)


@needs_triton
@pytest.mark.parametrize("check", list(CHECKS))
def test_interpreted_checks(interpreted_results, check):
    _assert_ok(interpreted_results, check)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs CUDA")
def test_fused_layer_compiled_on_gpu(tmp_path):
    """The same cases with compiled kernels on CUDA tensors (fp32 on both paths; TF32
    off), and ``auto`` taking the fused path in bf16."""
    results = _run_worker(tmp_path / "fused_layer_cuda.json", "cuda")
    failed = [n for n, r in results.items() if not r["ok"]]
    assert not failed, "\n".join(f"{n}:\n{results[n]['traceback']}" for n in failed)
    assert set(results) == {*CASES, *CUDA_CHECKS}


# ----------------------------------------------------- in this process, no kernels


@pytest.mark.parametrize("case", ["top2_static_drops", "padding_removed_compact",
                                  "smoe_two_passes"])
def test_auto_on_cpu_is_bit_identical_to_torch(case):
    c = CASES[case]
    layer = build_layer(c)
    auto = copy.deepcopy(layer)
    auto.kernels = "auto"
    x, mask = inputs(c)
    assert not auto.uses_fused_kernels(x)
    out_t, grads_t, stats_t, losses_t = run(layer, x, mask)
    out_a, grads_a, stats_a, losses_a = run(auto, x, mask)
    assert torch.equal(out_t, out_a)
    for n in grads_t:
        assert torch.equal(grads_t[n], grads_a[n]), n
    for n in losses_t:
        assert torch.equal(losses_t[n], losses_a[n]), n


def test_which_layers_qualify():
    layer = build_layer(CASES["top2_static_drops"])
    meta_bf16 = torch.empty(8, D, device="meta", dtype=torch.bfloat16)
    # meta tensors: the ops' shape functions run (op_budget counts the fused path there)
    assert layer.fused_path_blocker(meta_bf16) is None
    assert "take float32, float16 and bfloat16" in layer.fused_path_blocker(
        torch.empty(8, D, device="meta", dtype=torch.float64))

    bank = layer.experts
    assert bank.fused_unsupported() is None
    bank.activation_dropout = 0.1
    assert "activation dropout" in bank.fused_unsupported()  # training
    assert bank.eval().fused_unsupported() is None
    assert "sublayers" in ExpertBank(E, D, F_DIM, sublayers=2).fused_unsupported()
    assert "'gelu_accurate'" in ExpertBank(E, D, F_DIM, "gelu_accurate").fused_unsupported()

    class OtherBank(torch.nn.Module):  # e.g. the cluster study's classifiers
        num_experts = E

    other = MoELayer(TopKRouter(D, E), OtherBank())
    assert "OtherBank" in other.fused_path_blocker(meta_bf16)


def test_expert_parallelism_keeps_the_torch_path():
    """The all-to-all dispatcher moves rows between ranks: it never qualifies, so
    ``auto`` keeps today's path under expert parallelism and ``triton`` is refused."""
    import torch.distributed as dist

    from moe_fairseq.parallel.dispatcher import AllToAllDispatcher

    own_group = not dist.is_initialized()
    if own_group:  # one gloo rank stands for the group
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        layer = MoELayer(TopKRouter(D, E), ExpertBank(E, D, F_DIM), AllToAllDispatcher(E))
        x = torch.empty(8, D, device="meta", dtype=torch.bfloat16)
        assert "AllToAllDispatcher" in layer.fused_path_blocker(x)
        assert not layer.uses_fused_kernels(x)  # auto
        layer.kernels = "triton"
        with pytest.raises(MoEConfigError, match="--moe-kernels triton.*AllToAllDispatcher"):
            layer.uses_fused_kernels(x)
    finally:
        if own_group:
            dist.destroy_process_group()


def test_triton_refused_for_a_layer_that_does_not_qualify():
    torch.manual_seed(0)
    layer = MoELayer(TopKRouter(D, E), ExpertBank(E, D, F_DIM, sublayers=2), kernels="triton")
    with pytest.raises(MoEConfigError) as err:
        layer(torch.randn(6, D))
    msg = str(err.value)
    assert msg.startswith("--moe-kernels triton cannot run this MoE layer") and "\n" not in msg
    assert "2 sublayers" in msg
    layer.kernels = "fast"
    with pytest.raises(MoEConfigError, match="--moe-kernels must be one of"):
        layer(torch.randn(6, D))


def test_the_flag_reaches_every_layer():
    from test_fidelity import build_block, preset_args

    assert build_block("moe_transformer_tiny").moe.kernels == "auto"
    for mode in ("torch", "triton"):
        assert build_block("moe_transformer_tiny", "--moe-kernels", mode).moe.kernels == mode
    from moe_fairseq.options import validate_moe_args

    args = preset_args("moe_transformer_tiny", "--moe-kernels", "cuda")
    with pytest.raises(MoEConfigError, match="--moe-kernels must be one of"):
        validate_moe_args(args)


_NO_INTERPRETER_SCRIPT = r"""
import sys, torch
from moe_fairseq.layer.expert_bank import ExpertBank
from moe_fairseq.layer.moe_layer import MoELayer
from moe_fairseq.options import MoEConfigError
from moe_fairseq.routers.top_k import TopKRouter

torch.manual_seed(0)
layer = MoELayer(TopKRouter(16, 4), ExpertBank(4, 16, 32))
x = torch.randn(6, 16)
layer(x).sum().backward()  # auto on CPU: the PyTorch path, Triton never imported
assert "triton" not in sys.modules, "auto on CPU imported triton"
layer.kernels = "triton"
try:
    layer(x)
except MoEConfigError as e:
    print("ERROR:" + str(e))
else:
    raise AssertionError("--moe-kernels triton ran on CPU without the interpreter")
"""


@needs_triton
def test_triton_without_cuda_or_interpreter_is_one_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", MOE_FAIRSEQ_AUTOLOAD="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _NO_INTERPRETER_SCRIPT], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(lines) == 1, proc.stdout
    msg = lines[0][len("ERROR:"):]
    assert msg.startswith("--moe-kernels triton cannot run this MoE layer on cpu"), msg
    assert "TRITON_INTERPRET=1" in msg, msg


def test_fairseq_train_under_each_mode(data_bin, tmp_path):
    """On CPU, ``--moe-kernels auto`` (the default) trains exactly as ``torch``, and
    ``triton`` (interpreted) to the logged precision."""
    from conftest import log_records, run_cli, train_args

    modes = ("torch", "auto", "triton") if HAVE_TRITON else ("torch", "auto")
    losses = {}
    for mode in modes:
        env = {"TRITON_INTERPRET": "1"} if mode == "triton" else {}
        proc = run_cli("train", train_args(data_bin, tmp_path / mode, "--moe-kernels", mode,
                                           "--no-save", max_update=3, log_interval=1), env=env)
        records = log_records(proc.stdout + proc.stderr, "train_inner")
        losses[mode] = [(r["num_updates"], r["loss"], r["moe_gate_loss"]) for r in records]
    assert len(losses["torch"]) == 3 and losses["torch"] == losses["auto"], losses
    if "triton" in losses:
        assert torch.allclose(torch.tensor(losses["triton"]), torch.tensor(losses["torch"]),
                              rtol=0, atol=2e-3), losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="cases / checks to run (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write results as JSON here (else print them)")
    args = parser.parse_args()
    names = args.names or [*CASES, *(CUDA_CHECKS if args.device == "cuda" else CHECKS)]
    if args.out:
        _worker(names, args.device, args.out)
    else:
        for name in names:
            start = time.perf_counter()
            print(name, _runner(name, args.device)(), f"{time.perf_counter() - start:.2f} s")
