"""A CPU-checkable budget of what one MoE layer step launches and moves on CUDA.

The layer's CUDA path (static dispatch layout, ``torch._grouped_mm`` experts, masked
routing of padded batches) cannot be timed without a GPU, but what it *asks for* can
be counted anywhere: the layer is run forward + backward on ``meta`` tensors (shapes
and dtypes, no data, no memory, so 16k x 1024 tokens cost nothing) under a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` that records every aten op
reaching a backend kernel, with its input/output shapes and dtypes and the Python
code that asked for it.

What is counted (see :func:`classify`):

- **GEMMs**: ``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``_grouped_mm`` and friends. Their
  operand traffic is reported separately (``gemm_bytes``), and GEMMs whose arithmetic
  intensity is below ``MEMORY_BOUND_FLOPS_PER_BYTE`` (the one-hot bias ``addmm``, the
  router's ``[T, d] x [d, E]``) are flagged: they cost what element-wise passes cost.
- **launches outside the GEMMs**: every other op that would run a CUDA kernel. Views,
  metadata ops and bare allocations are excluded (``NO_LAUNCH``, ``OpOverload.is_view``):
  they only build a tensor header (and a caching-allocator lookup) on the host.
  Ops whose tensors all live on the host (wrapped scalars) launch nothing either.
- **element-wise traffic** (``elementwise_bytes``): bytes read + written by each such
  launch under a shape model (:func:`op_bytes`): the distinct elements of each tensor
  input plus each output (a broadcast, stride-0 input is read once), with index ops
  reading only the rows they gather or write. It is a lower bound on DRAM traffic
  (no cache misses, no multi-pass algorithms: a radix sort makes several passes).

Ops whose kernel is a composition of other ops on every backend (a
``CompositeExplicitAutograd`` kernel and no device kernel, e.g. ``logsumexp``,
``zeros_like``, ``_to_copy``, ``index_put``) are run through that composition with the
mode still active, so the count is what CUDA launches (``logsumexp`` is 9 kernels),
not the number of top-level aten calls (``aten_ops`` counts those, views included).
Not modelled: a single aten op that CUDA implements with several kernels (``sort``:
a radix sort of 8-bit digits, ``cumsum``: a multi-block scan, large reductions: two
passes), fused epilogues of cuBLAS, and the host-side cost of each launch.

Only what goes through the dispatcher is seen: a kernel launched straight from Python
(a Triton kernel called inside an ``autograd.Function``) is invisible, and cannot run
on meta tensors anyway. The fused path's kernels (``moe_fairseq/kernels/ops.py``) are
``torch.library`` custom ops with meta implementations, one op per Triton launch,
listed in ``FUSED_GEMM_OPS`` by qualified name (``"moe_fairseq::gather_ffn1"``): each
counts as one GEMM (flops of its grouped product over the dispatched rows), and its
meta implementation runs with the mode active, so the torch ops around its kernel (a
slot stack's zero fill, the sum over a token's slots) are launches like any other (on
meta tensors only: elsewhere the op's real implementation runs unseen inside; it is
the same code as the meta one, less the launch).

Entry points: :func:`layer_budget` (the linear top-k MoE layer, forced onto its CUDA
path; ``kernels="triton"``: its fused path), :func:`dense_ffn_budget` (the dense FFN
of equal active FLOPs) and :func:`measure` (any forward + backward callable).
"""

import linecache
import os
import re
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch._C import DispatchKey
from torch.utils._python_dispatch import TorchDispatchMode

GiB = float(1 << 30)

# The package whose frames name an op's call site.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The fused path's custom ops (moe_fairseq/kernels/ops.py: OP_NAMES), one Triton launch
# each, every one a grouped GEMM over the dispatched rows with its gather, scatter,
# bias, activation, gate and mask fused in.
FUSED_GEMM_OPS = frozenset({
    "moe_fairseq::gather_ffn1", "moe_fairseq::ffn2_combine", "moe_fairseq::ffn1_dx",
    "moe_fairseq::ffn1_dw", "moe_fairseq::ffn2_dh", "moe_fairseq::ffn2_dw",
})

# The routing and plan kernels (moe_fairseq/kernels/routing_ops.py: OP_NAMES), one
# Triton launch each: element-wise work, counted as launches with their bytes.
FUSED_LAUNCH_OPS = frozenset({
    "moe_fairseq::route_top_k", "moe_fairseq::router_losses",
    "moe_fairseq::route_top_k_backward", "moe_fairseq::static_plan",
    "moe_fairseq::static_plan_backward",
})

GEMM_OPS = frozenset({
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "_grouped_mm", "_scaled_mm",
    "_scaled_grouped_mm", "addmv", "mv", "dot", "linear", "_addmm_activation",
}) | FUSED_GEMM_OPS

# Not launches. Views are caught by OpOverload.is_view (t, transpose, expand, slice,
# select, unsqueeze, view, as_strided, alias, ...): they only write a tensor header on
# the host. These are the rest: _unsafe_view/_reshape_alias are views whose schema
# does not say so; detach makes a new header over the same memory; empty* and
# new_empty* take memory from the caching allocator without a kernel; sym_* and
# friends read metadata. Allocations that *fill* (zeros, ones, full, *_like) are not
# here: they expand to empty + fill_ (or zero_), and the fill is a launch.
NO_LAUNCH = frozenset({
    "_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
    "empty_permuted", "lift_fresh", "detach", "alias", "resize_",
    "set_", "_reshape_alias", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "_has_compatible_shallow_copy_type", "is_same_size", "size", "stride", "dim",
})

# Ops that make the host wait for the device (a read-back); the static path has none.
HOST_SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique",
                           "_unique2", "unique_dim", "item", "equal", "is_nonzero"})

# GEMMs below this many flops per byte of operands are memory-bound on any current
# GPU (an H100's bf16 ridge point is ~300 flop/B): they cost what a pass over their
# operands costs, not what their flops cost.
MEMORY_BOUND_FLOPS_PER_BYTE = 64.0


@dataclass
class TensorInfo:
    shape: Tuple[int, ...]
    dtype: torch.dtype
    nbytes: int  # distinct elements (stride-0 dims once) * element size

    def __str__(self) -> str:
        return f"{str(self.dtype).replace('torch.', '')}{list(self.shape)}"


@dataclass
class OpRecord:
    """One aten op as the dispatcher saw it."""

    op: str  # e.g. "aten.index_select.default"
    name: str  # overload packet name, e.g. "index_select"
    kind: str  # gemm | launch | view | composite | host (all tensors on the host)
    direction: str  # fwd | bwd
    # router | router losses | plan | dispatch | experts | combine | statistics | layer,
    # other (project code outside those), autograd (engine), outside (caller's code)
    phase: str
    site: str  # innermost project frame, "layer/dispatcher.py:plan"
    line: int
    depth: int  # > 0: issued by the composite kernel of an op above
    inputs: Tuple[TensorInfo, ...]
    outputs: Tuple[TensorInfo, ...]
    bytes: int = 0  # shape-model traffic (launches and GEMMs; 0 otherwise)
    flops: int = 0  # GEMMs only
    node: Optional[str] = None  # autograd node running it (backward)

    @property
    def where(self) -> str:
        """Site with its line (backward ops: the forward line that built their node)."""
        return f"{self.site}:{self.line}"

    @property
    def memory_bound(self) -> bool:
        return self.kind == "gemm" and self.flops < MEMORY_BOUND_FLOPS_PER_BYTE * max(self.bytes, 1)

    def describe(self) -> str:
        ins = ", ".join(str(t) for t in self.inputs)
        outs = ", ".join(str(t) for t in self.outputs)
        return f"{self.op}({ins}) -> {outs}"


@dataclass
class Row:
    """Aggregate of records sharing a key."""

    key: Tuple[str, ...]
    launches: int = 0  # outside the GEMMs
    bytes: int = 0  # element-wise traffic of those launches
    gemm_launches: int = 0
    gemm_bytes: int = 0
    example: str = ""


@dataclass
class Budget:
    """What one forward + backward launches and moves (see the module docstring)."""

    records: List[OpRecord] = field(default_factory=list)
    label: str = ""

    def _sum(self, kind: str, attr: Optional[str]) -> int:
        rs = [r for r in self.records if r.kind == kind]
        return len(rs) if attr is None else sum(getattr(r, attr) for r in rs)

    @property
    def launches_outside_gemms(self) -> int:
        return self._sum("launch", None)

    @property
    def gemm_launches(self) -> int:
        return self._sum("gemm", None)

    @property
    def elementwise_bytes(self) -> int:
        return self._sum("launch", "bytes")

    @property
    def gemm_bytes(self) -> int:
        return self._sum("gemm", "bytes")

    @property
    def gemm_flops(self) -> int:
        return self._sum("gemm", "flops")

    @property
    def memory_bound_gemms(self) -> List[OpRecord]:
        return [r for r in self.records if r.memory_bound]

    @property
    def memory_bound_gemm_bytes(self) -> int:
        return sum(r.bytes for r in self.memory_bound_gemms)

    @property
    def elementwise_like_bytes(self) -> int:
        """Element-wise traffic plus the memory-bound GEMMs' operands: every pass that
        costs bandwidth rather than flops (the one-hot bias addmm is a bias add)."""
        return self.elementwise_bytes + self.memory_bound_gemm_bytes

    @property
    def aten_ops(self) -> int:
        """Top-level aten calls, views included (the unit of a profiler's op list)."""
        return sum(1 for r in self.records if r.depth == 0)

    @property
    def host_syncs(self) -> int:
        return sum(1 for r in self.records if r.name in HOST_SYNC_OPS)

    def aggregate(self, keys: Sequence[str] = ("op",), gemms: str = "all") -> List[Row]:
        """Launch and GEMM records grouped by record attributes (``op``, ``name``,
        ``site``, ``where``, ``phase``, ``direction``), most bytes first. ``gemms``:
        ``all``, ``memory_bound`` (leave the compute-bound GEMMs out) or ``none``."""
        rows: Dict[Tuple[str, ...], Row] = OrderedDict()
        for r in self.records:
            if r.kind == "gemm" and (gemms == "none" or (gemms == "memory_bound"
                                                        and not r.memory_bound)):
                continue
            if r.kind not in ("launch", "gemm"):
                continue
            key = tuple(str(getattr(r, k)) for k in keys)
            row = rows.setdefault(key, Row(key, example=r.describe()))
            if r.kind == "gemm":
                row.gemm_launches += 1
                row.gemm_bytes += r.bytes
            else:
                row.launches += 1
                row.bytes += r.bytes
        return sorted(rows.values(), key=lambda w: (-(w.bytes + w.gemm_bytes), -w.launches))

    def table(self, keys: Sequence[str] = ("phase", "site", "name"), top: Optional[int] = None,
              sort: str = "bytes", gemms: str = "all") -> str:
        """:meth:`aggregate` as text, sorted by ``bytes`` or ``launches``."""
        rows = self.aggregate(keys, gemms)
        if sort == "launches":
            rows.sort(key=lambda w: (-w.launches, -w.bytes))
        rows = rows[:top] if top else rows
        head = " | ".join(keys)
        lines = [f"{'launches':>8} {'elem GiB':>9} {'gemms':>5} {'gemm GiB':>9}  {head}"]
        for w in rows:
            lines.append(f"{w.launches:>8} {w.bytes / GiB:>9.4f} {w.gemm_launches:>5} "
                         f"{w.gemm_bytes / GiB:>9.4f}  {' | '.join(w.key)}")
        return "\n".join(lines)

    def summary(self) -> str:
        return (f"{self.label}: launches outside GEMMs {self.launches_outside_gemms}, "
                f"GEMM launches {self.gemm_launches}, element-wise {self.elementwise_bytes / GiB:.3f} GiB, "
                f"GEMM operands {self.gemm_bytes / GiB:.3f} GiB (memory-bound GEMMs: "
                f"{len(self.memory_bound_gemms)}, {self.memory_bound_gemm_bytes / GiB:.3f} GiB; with the "
                f"element-wise: {self.elementwise_like_bytes / GiB:.3f} GiB), "
                f"aten ops {self.aten_ops}, host syncs {self.host_syncs}")


# ---------------------------------------------------------------------------
# Shape model


def _tensors(obj) -> Iterable[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def distinct_bytes(t: Tensor) -> int:
    """Bytes a kernel must touch to read all of ``t``: stride-0 (broadcast) dims once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _info(t: Tensor) -> TensorInfo:
    return TensorInfo(tuple(t.shape), t.dtype, distinct_bytes(t))


def _unique(ts: Iterable[Tensor]) -> List[Tensor]:
    seen, out = set(), []
    for t in ts:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _arg(func, args, kwargs, name: str, default=None):
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            if name in kwargs:
                return kwargs[name]
            return args[i] if i < len(args) else default
    return default


def _split_inputs(func, args, kwargs) -> Tuple[List[Tensor], List[Tensor]]:
    """(tensors read, ``out=`` tensors, which are only written)."""
    read, outs = [], []
    for i, a in enumerate(func._schema.arguments):
        value = kwargs.get(a.name) if a.kwarg_only or a.name in kwargs else (
            args[i] if i < len(args) else None)
        (outs if a.is_out else read).extend(_tensors(value))
    return _unique(read), _unique(outs)


def op_bytes(func, args, kwargs, outputs: Sequence[Tensor], device: Optional[str] = None) -> int:
    """Bytes read + written by one launch (see the module docstring).

    Default: every distinct tensor input read once, every output written once (an
    in-place op's self is read and written, as an element-wise kernel does; an
    ``out=`` argument is only written). Exceptions, where a kernel touches less than
    whole tensors:
    - fill_/zero_: write only; copy_: read the source, write the destination;
    - gathers (index_select, index.Tensor, gather, embedding): read the index and
      only the gathered rows, write the output;
    - index_copy_/index_put_/scatter_(add_): read index and values, write only the
      rows they address (+ read them, when they accumulate); out-of-place variants
      also copy self into the output first.
    ``device``: only tensors there count (a host scalar is a kernel argument).
    """

    def nb(*ts) -> int:
        return sum(distinct_bytes(t) for t in _unique(_tensors(ts))
                   if device is None or t.device.type == device)

    name = func._opname
    read, _ = _split_inputs(func, args, kwargs)
    out_b = nb(outputs)
    if name in ("fill_", "zero_"):
        return out_b
    if name == "copy_":
        return nb(args[1]) + nb(args[0])
    if name in ("index_select", "index", "gather", "embedding", "take"):
        index = [t for t in read if not t.is_floating_point() and t is not args[0]]
        return nb(index) + 2 * out_b
    # Out-of-place variants first copy self into their output.
    copy = 0 if name.endswith("_") else nb(args[0]) + out_b
    if name in ("index_copy_", "index_copy", "index_add_", "index_add"):
        index, source = _arg(func, args, kwargs, "index"), _arg(func, args, kwargs, "source")
        rmw = 2 if name.startswith("index_add") else 1  # accumulation reads the rows too
        return nb(index) + nb(source) * (1 + rmw) + copy
    if name in ("index_put_", "index_put", "_index_put_impl_"):
        values = args[2]
        rmw = 2 if bool(_arg(func, args, kwargs, "accumulate", False)) else 1
        return nb(args[1]) + nb(values) * (1 + rmw) + copy
    if name in ("scatter_", "scatter", "scatter_add_", "scatter_add", "scatter_reduce_",
                "scatter_reduce"):
        index, src = _arg(func, args, kwargs, "index"), _arg(func, args, kwargs, "src")
        # One element of self per index element; a scalar src is a kernel argument.
        written = index.numel() * args[0].element_size()
        rmw = 1 if name in ("scatter_", "scatter") else 2
        return nb(index) + nb(src) + written * rmw + copy
    return nb(read) + out_b


def gemm_flops(func, args, outputs: Sequence[Tensor]) -> int:
    """Multiply-adds x 2 of a GEMM from its operand shapes."""
    name = func._opname
    if func.name() in FUSED_GEMM_OPS:
        # [N, a] x [a, b] per expert over the N dispatched rows; [E, a, b] is the expert
        # matrix or its gradient, the op's only 3-dim tensor.
        mat = next(t for t in _tensors((args, outputs)) if t.dim() == 3)
        return 2 * _arg(func, args, {}, "slot").numel() * mat.shape[1] * mat.shape[2]
    out = outputs[0]
    if name in ("addmm", "baddbmm", "addbmm", "addmv", "_addmm_activation"):
        a = args[1]
    else:
        a = next(t for t in _tensors(args) if t.dim() >= 1)
    if name in ("_grouped_mm", "_scaled_grouped_mm") and out.dim() == 3 and a.dim() == 2:
        # weight-gradient form: [K, rows] x [rows, N] in groups -> [E, K, N]
        return 2 * out.shape[1] * out.shape[2] * a.shape[1]
    return 2 * out.numel() * a.shape[-1]


# ---------------------------------------------------------------------------
# Call sites

_TB_RE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n(.*)', re.S)

# (file relative to the package, function or "*", phase), matched from the outermost
# project frame inward: the first hit names the phase of everything below it.
PHASE_RULES = (
    ("layer/moe_layer.py", "record_pass", "statistics"),
    ("routers/", "*", "router"),
    ("layer/dispatcher.py", "plan", "plan"),
    ("layer/dispatcher.py", "dispatch", "dispatch"),
    ("layer/dispatcher.py", "combine", "combine"),
    ("layer/expert_bank.py", "*", "experts"),
)

Frame = Tuple[str, str, int, str]  # (path relative to the package, function, line, source)


def _rel(path: str) -> Optional[str]:
    path = os.path.abspath(path)
    if not path.startswith(_PACKAGE_DIR + os.sep) or path == os.path.abspath(__file__):
        return None
    return os.path.relpath(path, _PACKAGE_DIR).replace(os.sep, "/")


def _python_frames() -> List[Frame]:
    """Project frames of the current Python stack, outermost first."""
    frames = []
    f = sys._getframe(1)
    while f is not None:
        rel = _rel(f.f_code.co_filename)
        if rel is not None:
            line = f.f_lineno or 0
            frames.append((rel, f.f_code.co_name, line,
                           linecache.getline(f.f_code.co_filename, line).strip()))
        f = f.f_back
    return frames[::-1]


def _traceback_frames(tb: Sequence[str]) -> List[Frame]:
    """Project frames of an anomaly-mode traceback (forward stack of an autograd node)."""
    frames = []
    for entry in tb:
        m = _TB_RE.search(entry)
        if m:
            rel = _rel(m.group(1))
            if rel is not None:
                frames.append((rel, m.group(3), int(m.group(2)), m.group(4).strip()))
    return frames


def phase_of(frames: Sequence[Frame]) -> str:
    """Which part of the layer a stack belongs to (see ``PHASE_RULES``)."""
    for i, (rel, func, _, _) in enumerate(frames):
        for prefix, name, phase in PHASE_RULES:
            if rel.startswith(prefix) and name in ("*", func):
                if phase == "router" and any(r.startswith("routers/losses.py")
                                             for r, *_ in frames[i:]):
                    return "router losses"
                return phase
    for rel, func, _, src in reversed(frames):
        if rel == "layer/moe_layer.py":
            # The layer's own lines: statistics bookkeeping, loss averaging, the rest.
            if func != "forward":
                if "stats" in src or "zero" in src:
                    return "statistics"
                if "losses" in src:
                    return "router losses"
            return "layer"
    return "other"


def _site(frames: Sequence[Frame]) -> Tuple[str, int]:
    if not frames:
        return "(outside the package)", 0
    rel, func, line, _ = frames[-1]
    return f"{rel}:{func}", line


# ---------------------------------------------------------------------------
# The counting mode


def _has(func, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key)


_COMPOSITE_KEYS = ("CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional")


def _composite_key(func) -> Optional[DispatchKey]:
    """The composite kernel every backend runs this op through (a composition of
    other ops, and no device kernel of its own), or None. A CPU kernel stands for the
    device kernels, which this CPU build does not register; GEMMs are never expanded
    (_grouped_mm has a CUDA kernel but only a composite one on CPU)."""
    if func._opname in GEMM_OPS or func._opname in NO_LAUNCH or func.is_view or _has(func, "CPU"):
        return None
    for key in _COMPOSITE_KEYS:
        if _has(func, key):
            return getattr(DispatchKey, key)
    return None


def classify(func) -> str:
    """``gemm``, ``view`` (no kernel: views, metadata, bare allocations), ``composite``
    (its launches are those of the ops it is made of) or ``launch``."""
    name = func._opname
    if name in GEMM_OPS or func.name() in GEMM_OPS:
        return "gemm"
    if func.name() in FUSED_LAUNCH_OPS:
        return "launch"
    if func.is_view or name in NO_LAUNCH:
        return "view"
    if _composite_key(func) is not None:
        return "composite"
    return "launch"


class OpCounter(TorchDispatchMode):
    """Records every aten op (see :class:`OpRecord`) into ``self.records``.

    ``device``: the device type whose tensors stand for the GPU's (``meta``); an op
    none of whose tensors is there runs on the host and launches nothing.
    """

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device = device
        self.records: List[OpRecord] = []
        self._depth = 0
        self._node_frames: Dict[int, Tuple[object, List[Frame]]] = {}

    def _frames(self) -> Tuple[List[Frame], str, Optional[str]]:
        node = torch._C._current_autograd_node()
        py = _python_frames()
        if node is None:
            return py, "fwd", None
        # Backward: the phase comes from the forward code that built the node
        # (anomaly-mode traceback); the site from a custom Function's backward code
        # when it is running, else from that forward code.
        key = id(node)
        if key not in self._node_frames:
            # The node is kept with its frames, so its id is not reused meanwhile.
            self._node_frames[key] = (node, _traceback_frames(node.metadata.get("traceback_", ())))
        fwd = self._node_frames[key][1]
        if py:
            return fwd + py, "bwd", node.name()
        return fwd, "bwd", node.name()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._opname
        kind = classify(func)
        frames, direction, node = self._frames()
        site, line = _site(frames)
        # No project frame: the autograd engine's own work (AccumulateGrad) or the
        # caller's code around the layer.
        phase = phase_of(frames) if frames else ("autograd" if node else "outside")
        record = OpRecord(str(func), name, kind, direction, phase, site, line, self._depth,
                          tuple(_info(t) for t in _unique(_tensors((args, kwargs)))), (),
                          node=node)
        self.records.append(record)
        out = None
        if kind == "composite":
            # Run the composition with this mode active, so its launches are counted.
            before = len(self.records)
            self._depth += 1
            try:
                with self:
                    out = func._op_dk(_composite_key(func), *args, **kwargs)
            except Exception:  # noqa: BLE001 - a composition meta cannot run: count the op itself
                del self.records[before:]
                out = None
            finally:
                self._depth -= 1
            nested = self.records[before:]
            if out is None or not any(r.kind in ("launch", "gemm") for r in nested):
                # Nothing below launches (e.g. copy_, whose meta composite does nothing):
                # the op itself is the kernel.
                del self.records[before:]
                record.kind = "launch"
                if out is None:
                    out = func(*args, **kwargs)
        elif func.name() in FUSED_GEMM_OPS | FUSED_LAUNCH_OPS and self.device == "meta":
            # The fused op's meta implementation with this mode active: the torch ops
            # around its kernel are launches of their own (the op stays one GEMM).
            self._depth += 1
            try:
                with self:
                    out = func._op_dk(DispatchKey.Meta, *args, **kwargs)
            finally:
                self._depth -= 1
        else:
            out = func(*args, **kwargs)
        outputs = _unique(_tensors(out))
        record.outputs = tuple(_info(t) for t in outputs)
        on_device = any(t.device.type == self.device
                        for t in _tensors((args, kwargs, out)))
        if record.kind == "launch" and not on_device:
            record.kind = "host"
        if record.kind in ("launch", "gemm"):
            record.bytes = op_bytes(func, args, kwargs, outputs, self.device)
        if record.kind == "gemm":
            record.flops = gemm_flops(func, args, outputs)
        return out


def measure(step: Callable[[], None], device: str = "meta", label: str = "") -> Budget:
    """Run ``step`` (a forward + backward) under an :class:`OpCounter`.

    Anomaly mode (without its NaN checks, which would read meta data) keeps each
    autograd node's forward stack, so backward ops are attributed to forward code.
    """
    counter = OpCounter(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Anomaly Detection has been enabled")
        with torch.autograd.set_detect_anomaly(True, check_nan=False), counter:
            step()
    return Budget(counter.records, label)


# ---------------------------------------------------------------------------
# The layer and the dense reference

BALANCE_WT, Z_WT = 0.01, 0.001  # as scripts/bench_moe_layer.py weighs the router losses


def build_cuda_path_layer(experts: int, dim: int, ffn: int, top_k: int = 2,
                          capacity_factor: float = 1.25, dtype: torch.dtype = torch.bfloat16,
                          second_expert_policy: str = "all", device: str = "meta",
                          kernels: str = "torch"):
    """The linear top-k MoE layer as it runs on CUDA, built on ``device``.

    Forced onto the CUDA code path: the dispatcher's ``static`` layout and the expert
    bank's grouped GEMMs (its ``use_grouped_mm`` probe would run a real GEMM).
    The whole layer in ``dtype`` (fairseq's ``--bf16``); the router computes in fp32.
    ``kernels``: the layer's ``--moe-kernels``; ``triton`` = the fused path (on meta
    tensors its ops' meta implementations run; elsewhere the kernels must be available).
    """
    from .dispatcher import SortDispatcher
    from .expert_bank import ExpertBank
    from .moe_layer import MoELayer
    from ..routers.top_k import TopKRouter

    with torch.device(device):
        router = TopKRouter(dim, experts, top_k=top_k, capacity_factor=capacity_factor,
                            second_expert_policy=second_expert_policy)
        bank = ExpertBank(experts, dim, ffn, activation_fn="relu")
        layer = MoELayer(router, bank, SortDispatcher(experts, layout="static"),
                         kernels=kernels)
    layer = layer.to(dtype).train()
    # As on CUDA for a supported dtype; empty batches keep the loop path (as the bank does).
    bank.use_grouped_mm = lambda rows: rows.size(0) > 0
    return layer


def layer_budget(experts: int = 16, tokens: int = 16384, dim: int = 1024, ffn: int = 4096,
                 top_k: int = 2, capacity_factor: float = 1.25,
                 dtype: torch.dtype = torch.bfloat16, padded: bool = False,
                 second_expert_policy: str = "all", device: str = "meta",
                 kernels: str = "torch") -> Budget:
    """Budget of one training forward + backward of the MoE layer's CUDA path.

    As ``scripts/bench_moe_layer.py`` times it: ``x [tokens, dim]`` requiring grad, the
    output's gradient given, the balance and z losses back-propagated with their
    weights. ``padded``: the transformer's call, with a ``padding_mask`` (all False,
    so shapes are those of ``tokens`` tokens), routed masked as on CUDA.
    ``capacity_factor`` 0 is dropless. ``kernels="triton"``: the fused path.
    """
    layer = build_cuda_path_layer(experts, dim, ffn, top_k, capacity_factor, dtype,
                                  second_expert_policy, device, kernels)
    x = torch.empty(tokens, dim, device=device, dtype=dtype).requires_grad_(True)
    grad = torch.empty(tokens, dim, device=device, dtype=dtype)
    mask = None
    if padded:
        mask = torch.zeros(tokens, dtype=torch.bool, device=device)
        layer.padding = "mask"  # what "auto" picks on CUDA
    # Loss weights as device scalars made outside the count (the criterion's business).
    weights = [torch.tensor(w, device=device) for w in (BALANCE_WT, Z_WT)]

    def step():
        out = layer(x, padding_mask=mask)
        losses = layer.stats.losses
        torch.autograd.backward([out, losses["balance"], losses["z"]], [grad, *weights])

    cf = "dropless" if capacity_factor == 0 else f"cf {capacity_factor:g}"
    label = (f"MoE E{experts} top-{top_k} {cf} T={tokens} d={dim} f={ffn} "
             f"{str(dtype).replace('torch.', '')}{' padded' if padded else ''}"
             f"{' fused' if kernels == 'triton' else ''}")
    return measure(step, device, label)


def dense_ffn_budget(tokens: int = 16384, dim: int = 1024, hidden: int = 8192,
                     dtype: torch.dtype = torch.bfloat16, device: str = "meta") -> Budget:
    """Budget of ``Linear(dim, hidden) -> relu -> Linear(hidden, dim)`` forward +
    backward (``hidden = top_k * ffn`` matches the MoE's active FLOPs)."""
    with torch.device(device):
        ffn = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
    ffn = ffn.to(dtype).train()
    x = torch.empty(tokens, dim, device=device, dtype=dtype).requires_grad_(True)
    grad = torch.empty(tokens, dim, device=device, dtype=dtype)

    def step():
        ffn(x).backward(grad)

    return measure(step, device, f"dense FFN T={tokens} d={dim} hidden={hidden} "
                                 f"{str(dtype).replace('torch.', '')}")
