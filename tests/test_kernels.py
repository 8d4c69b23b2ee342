"""The Triton MoE kernels (moe_fairseq/kernels) against an fp64 PyTorch loop.

On CPU the kernels run in Triton's interpreter, which ``TRITON_INTERPRET=1`` must
switch on before the kernels are first imported. So the cases run in one worker
subprocess (this file run as a script) with that variable set: the pytest process
itself never builds interpreted kernels that a later test could pick up. With a GPU,
the same cases also run compiled (``--device cuda``, no interpreter).

Each case checks the output and every gradient (x, w1, b1, w2, b2, gates) against
an fp64 loop over experts that only sees the kept rows. Tiny shapes with 16-wide tiles:
several row tiles per expert, ragged K and column tails.

Run one case by hand: ``TRITON_INTERPRET=1 python tests/test_kernels.py CASE``.
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
HAVE_TRITON = importlib.util.find_spec("triton") is not None

pytestmark = pytest.mark.skipif(
    not HAVE_TRITON, reason="triton is not installed (pip install -r requirements.txt)")

# Relative error allowed (max |kernel - ref| / max |ref|) per dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


# ------------------------------------------------------------------- the cases

def _routing(T, k, E, pattern, gen):
    """expert_index ``[T, k]`` (-1 = no expert) and gates ``[T, k]`` for a pattern."""
    if T == 0:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
    if pattern == "one_expert":
        expert_index = torch.full((T, k), 2, dtype=torch.long)
    else:
        # Distinct experts per token, never expert 3 when E > 4 ("skip3"): an empty group.
        pool = [e for e in range(E) if not (pattern == "skip3" and e == 3)]
        choice = torch.stack([torch.randperm(len(pool), generator=gen)[:k] for _ in range(T)])
        expert_index = torch.tensor(pool)[choice]
    gates = torch.rand(T, k, generator=gen) + 0.1
    return expert_index, gates


def _pad(expert_index, padding, second_missing):
    """Padding tokens (-1 in every slot) and tokens without a second expert."""
    expert_index = expert_index.clone()
    expert_index[:padding] = -1
    if second_missing and expert_index.size(1) > 1:
        expert_index[padding:padding + second_missing, 1] = -1
    return expert_index


CASES = {
    # top-2, static layout: capacity drops, padding tokens, a token without a second
    # expert, an empty expert (3); also checked against the layer's PyTorch path.
    "top2_static_drops_padding_empty": dict(
        T=40, d=24, f=48, E=5, k=2, layout="static", capacity=9, act="relu",
        pattern="skip3", padding=4, second_missing=3, torch_path=True),
    # top-1, compact layout, dropless (no row mask), exact gelu.
    "top1_compact_dropless_gelu": dict(
        T=32, d=24, f=40, E=4, k=1, layout="compact", capacity=None, act="gelu",
        pattern="any"),
    # Every token to expert 2 (three empty experts), static and dropless (mask all
    # True); loss y.sum(): the output gradient is a broadcast (stride-0) tensor.
    "top1_one_expert_static": dict(
        T=24, d=16, f=32, E=4, k=1, layout="static", capacity=None, act="relu",
        pattern="one_expert", sum_loss=True),
    # top-2, compact with drops and padding: N < k T, the slot stacks are zero-filled.
    "top2_compact_drops_padding": dict(
        T=36, d=16, f=32, E=4, k=2, layout="compact", capacity=10, act="relu",
        pattern="any", padding=3),
    # Non-finite dropped rows: inf padding tokens (their H rows NaN), NaN poured into
    # the H rows of dropped assignments, nonzero gates on every dropped row: the row
    # mask alone must keep them out of y and out of every gradient.
    "nonfinite_dropped_rows": dict(
        T=32, d=16, f=32, E=4, k=2, layout="static", capacity=8, act="gelu",
        pattern="any", padding=3, poison=True),
    # All tokens padding: every row masked, y and all gradients exactly 0.
    "all_padding_static": dict(
        T=8, d=16, f=32, E=3, k=2, layout="static", capacity=None, act="relu",
        pattern="any", padding=8),
    # 16-bit: fp16, and bf16 (whose interpreter dot goes through fp32).
    "top2_static_fp16": dict(
        T=32, d=24, f=32, E=4, k=2, layout="static", capacity=12, act="relu",
        pattern="any", padding=2, dtype="float16"),
    "top2_static_bf16": dict(
        T=32, d=24, f=32, E=4, k=2, layout="static", capacity=12, act="gelu",
        pattern="any", padding=2, dtype="bfloat16"),
    # The default (GPU) tile sizes, 64-row tiles with ragged tails; no activation.
    "top2_static_default_blocks": dict(
        T=80, d=40, f=72, E=3, k=2, layout="static", capacity=60, act="linear",
        pattern="any", padding=5, config="default"),
    # No tokens: nothing to launch, gradients zero.
    "no_tokens": dict(
        T=0, d=16, f=32, E=4, k=2, layout="static", capacity=None, act="relu",
        pattern="any"),
}


def _reference(x, w1, b1, w2, b2, row_gates, slot, row_expert, keep, T, act):
    """fp64 loop over experts, over the kept rows only: ``[T, d]``."""
    y = x.new_zeros(T, w2.size(2))
    for e in range(w1.size(0)):
        rows = ((row_expert == e) & keep).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        tokens = slot[rows] % T
        h = act(x[tokens] @ w1[e] + b1[e])
        y = y.index_add(0, tokens, row_gates[rows, None] * (h @ w2[e] + b2[e]))
    return y


def _rel_error(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (got - ref).abs().max().item() if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff


def run_case(name, device="cpu"):
    """Run one case on ``device``; raises AssertionError on a mismatch. Returns errors."""
    from moe_fairseq import kernels
    from moe_fairseq.kernels.common import BlockConfig
    from moe_fairseq.layer.dispatcher import SortDispatcher
    from moe_fairseq.routers.base import Routing

    c = CASES[name]
    T, d, f, E, k = c["T"], c["d"], c["f"], c["E"], c["k"]
    dtype = getattr(torch, c.get("dtype", "float32"))
    assert kernels.available(device, dtype), f"kernels unavailable for {device} {dtype}"
    config = (BlockConfig() if c.get("config") == "default"
              else BlockConfig(block_m=16, block_n=32, block_k=16))
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    act64 = {"relu": torch.relu, "gelu": torch.nn.functional.gelu,
             "linear": lambda z: z}[c["act"]]

    expert_index, gates = _routing(T, k, E, c["pattern"], gen)
    expert_index = _pad(expert_index, c.get("padding", 0), c.get("second_missing", 0))
    x = torch.randn(T, d, generator=gen)
    w1 = torch.randn(E, d, f, generator=gen) / d ** 0.5
    b1 = torch.randn(E, f, generator=gen) * 0.1
    w2 = torch.randn(E, f, d, generator=gen) / f ** 0.5
    b2 = torch.randn(E, d, generator=gen) * 0.1
    if c.get("poison"):
        x[:c["padding"]] = float("inf")
    grad_out = torch.randn(T, d, generator=gen)
    host = dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, gates=gates)

    # The kernels' inputs: the dispatcher's plan, as the layer builds it.
    dev = {n: t.to(device=device, dtype=dtype if n != "gates" else torch.float32, copy=True)
           .requires_grad_() for n, t in host.items()}
    plan = SortDispatcher(E, layout=c["layout"]).plan(
        Routing(expert_index.to(device), dev["gates"], c["capacity"]))
    slot = plan.assignment_index
    sizes = plan.rows_per_expert
    offsets = torch.cumsum(sizes, 0).to(torch.int32)
    row_mask = plan.row_mask
    row_gates = plan.row_gates
    if c.get("poison"):
        # Gates no longer zero on dropped rows: only the mask may remove them.
        row_gates = row_gates + (~row_mask).float() * 0.7
    h = kernels.gather_ffn1(dev["x"], dev["w1"], dev["b1"], offsets, slot, k, c["act"],
                            row_mask=row_mask, config=config)
    if c.get("poison"):
        nan_rows = (~row_mask) & (slot % T >= c["padding"])  # dropped, not padding
        assert bool(nan_rows.any()), "the case should drop assignments"
        h = h + torch.where(nan_rows[:, None], float("nan"), 0.0).to(h)
    if c.get("poison"):
        h.retain_grad()
        row_gates.retain_grad()
    y = kernels.ffn2_combine(h, dev["w2"], dev["b2"], row_gates, offsets, slot, T, k,
                             row_mask=row_mask, config=config)
    loss = y.float().sum() if c.get("sum_loss") else (y.float() * grad_out.to(device)).sum()
    loss.backward()

    # The fp64 reference on the same plan, over kept rows only.
    # From the values the kernels saw (16-bit inputs rounded; gates stay fp32).
    ref = {n: (t if n == "gates" else t.to(dtype)).double().requires_grad_()
           for n, t in host.items()}
    keep = (row_mask.cpu() if row_mask is not None
            else torch.ones(slot.numel(), dtype=torch.bool))
    row_expert = torch.repeat_interleave(torch.arange(E), sizes.cpu())
    slot_cpu = slot.cpu()
    ref_row_gates = ref["gates"].t().reshape(-1)[slot_cpu]
    if c.get("poison"):
        ref_row_gates = ref_row_gates + (~keep).double() * 0.7
    y_ref = _reference(ref["x"], ref["w1"], ref["b1"], ref["w2"], ref["b2"], ref_row_gates,
                       slot_cpu, row_expert, keep, T, act64)
    ref_loss = y_ref.sum() if c.get("sum_loss") else (y_ref * grad_out.double()).sum()
    if ref_loss.requires_grad:  # not when no row is kept
        ref_loss.backward()

    errors = {"y": _rel_error(y, y_ref)}
    for n in host:
        got = dev[n].grad if dev[n].grad is not None else torch.zeros_like(dev[n])
        want = ref[n].grad if ref[n].grad is not None else torch.zeros_like(ref[n])
        errors["d" + n] = _rel_error(got, want)
    tol = TOLERANCE[dtype]
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"{name}: relative errors above {tol}: {bad} (all: {errors})"

    if c.get("poison"):
        # Straight from the kernel (the plan's where would hide a NaN in dgates).
        assert bool((row_gates.grad[~row_mask] == 0).all()), "dropped rows: dgate must be 0"
        assert bool((h.grad[~row_mask] == 0).all()), "dropped rows: dH must be 0"
    if c.get("padding", 0) >= T:
        assert bool((y == 0).all()), "all-padding batch: y must be exactly 0"
        for n in host:
            assert bool((dev[n].grad == 0).all()), f"all-padding batch: d{n} must be exactly 0"
    if c.get("torch_path"):
        errors["y_vs_layer_path"] = _check_layer_path(host, expert_index, c, y)
    return errors


def _check_layer_path(host, expert_index, c, y):
    """The kernels' y equals the layer's own PyTorch path (dispatch, expert bank,
    combine) on the same plan, in fp64."""
    from moe_fairseq.layer.dispatcher import SortDispatcher
    from moe_fairseq.layer.expert_bank import ExpertBank
    from moe_fairseq.routers.base import Routing

    E, d, f = c["E"], c["d"], c["f"]
    bank = ExpertBank(E, d, f, activation_fn=c["act"]).double()
    with torch.no_grad():
        for n in ("w1", "b1", "w2", "b2"):
            getattr(bank, n).copy_(host[n])
    dispatcher = SortDispatcher(E, layout=c["layout"])
    plan = dispatcher.plan(Routing(expert_index, host["gates"].double(), c["capacity"]))
    rows, sizes = dispatcher.dispatch(host["x"].double(), plan)
    y_torch = dispatcher.combine(bank(rows, sizes), plan)
    err = _rel_error(y, y_torch)
    assert err <= 1e-5, f"kernels and the layer's PyTorch path differ: {err}"
    return err


# ---------------------------------------------------------------- the worker

def _worker(names, device, out):
    """Run cases in this process; write {case: {ok, errors, seconds, traceback}}."""
    results = {}
    from moe_fairseq import kernels
    results["_meta"] = {"available_cpu_fp32": kernels.available("cpu", torch.float32),
                        "available_cpu_int64": kernels.available("cpu", torch.int64),
                        "interpreted": kernels.interpreted()}
    for name in names:
        start = time.perf_counter()
        try:
            errors = run_case(name, device)
            results[name] = {"ok": True, "errors": errors}
        except Exception:
            results[name] = {"ok": False, "traceback": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
    Path(out).write_text(json.dumps(results, indent=1))


def _run_worker(tmp_path, device, interpret):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    out = tmp_path / f"kernels_{device}.json"
    proc = subprocess.run([sys.executable, __file__, "--device", device, "--out", str(out)],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), (
        f"kernel worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp("kernels"), "cpu", interpret=True)


def _assert_case(results, case):
    r = results[case]
    assert r["ok"], f"{case} ({r['seconds']} s):\n{r['traceback']}"


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_interpreted(interpreted_results, case):
    _assert_case(interpreted_results, case)


def test_available_in_interpreter(interpreted_results):
    meta = interpreted_results["_meta"]
    assert meta["interpreted"] is True
    assert meta["available_cpu_fp32"] is True
    assert meta["available_cpu_int64"] is False


_NO_INTERPRETER_SCRIPT = r"""
import sys, torch
import moe_fairseq.kernels as kernels
assert "triton" not in sys.modules, "importing moe_fairseq.kernels must not import triton"
assert kernels.available("cpu", torch.float32) is False
assert kernels.interpreted() is False  # compiled kernels: CUDA tensors only
x = torch.zeros(4, 8)
try:
    kernels.gather_ffn1(x, torch.zeros(2, 8, 16), torch.zeros(2, 16),
                        torch.tensor([2, 4], dtype=torch.int32), torch.arange(4), 1)
except RuntimeError as e:
    assert "TRITON_INTERPRET" in str(e), e
else:
    raise AssertionError("gather_ffn1 ran on CPU without the interpreter")
# Without Triton at all: unavailable, no exception.
kernels._common = None
sys.modules["triton"] = None
for m in [m for m in sys.modules if m.startswith("moe_fairseq.kernels.")]:
    del sys.modules[m]
    vars(kernels).pop(m.rsplit(".", 1)[1], None)  # else "from . import" finds it
assert kernels.available("cuda", torch.float16) is False
assert kernels.interpreted() is None
print("ok")
"""


def test_unavailable_on_cpu_without_interpreter():
    """A CPU-only process without TRITON_INTERPRET imports Triton fine, reports the
    kernels unavailable and refuses to run them with a clear error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", _NO_INTERPRETER_SCRIPT], env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_compiled_on_gpu(tmp_path):
    results = _run_worker(tmp_path, "cuda", interpret=False)
    failed = [c for c in CASES if not results[c]["ok"]]
    assert not failed, "\n".join(f"{c}:\n{results[c]['traceback']}" for c in failed)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", help="cases to run (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="write results as JSON here (else print them)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    names = args.cases or list(CASES)
    if args.out:
        _worker(names, args.device, args.out)
    else:
        for name in names:
            start = time.perf_counter()
            print(name, run_case(name, args.device), f"{time.perf_counter() - start:.2f} s")
