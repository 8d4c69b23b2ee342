"""Fused Triton kernels for the experts' FFN on the GPU (issue 25).

Both ops work on the dispatch plan of :class:`~moe_fairseq.layer.dispatcher.SortDispatcher`:
N rows grouped by expert, expert e owning rows ``[offsets[e-1], offsets[e])``
(``offsets = torch.cumsum(plan.rows_per_expert, 0).int()``, ``offsets[-1] == N``), each
row r carrying its slot ``slot[r] = j * T + t`` (``plan.assignment_index``: token
``t = slot % T``, its j-th choice). Slots are distinct; in the static layout they are a
permutation of all ``k * T`` slots. Weights as in
:class:`~moe_fairseq.layer.expert_bank.ExpertBank`: ``w1 [E, d, f]``, ``b1 [E, f]``,
``w2 [E, f, d]``, ``b2 [E, d]``.

- :func:`gather_ffn1` -- ``H[r] = act(X[slot[r] % T] @ W1[e] + b1[e])``, ``[N, f]``:
  the gather into rows fused into the GEMM's loads, bias and activation (relu, exact
  gelu or linear) into its epilogue.
- :func:`ffn2_combine` -- ``Y[t] = sum_r m[r] g[r] (H[r] @ W2[e] + b2[e])``, ``[T, d]``:
  bias, gate, row mask (exact zeros, non-finite rows included) and the combine into
  token order fused into the epilogue and stores.

Both are differentiable in every float input (x, w1, b1, h, w2, b2, gates). Every
launch is a ``torch.library`` custom op (``moe_fairseq::gather_ffn1``,
``moe_fairseq::ffn2_combine`` and their backward ops, see :mod:`.ops`) with a meta
implementation, so dispatch modes (``layer/op_budget.py``) count each as one op and
``torch.compile`` can trace them. The kernels underneath (``rows.grouped_rows``:
row-tile grouped GEMM with gather / scatter / fused activation gradient;
``xty.grouped_xty``: per-expert ``X^T D`` with the bias gradient fused) are usable alone.

The layer takes this path under ``--moe-kernels`` (:meth:`ExpertBank.fused_ffn
<moe_fairseq.layer.expert_bank.ExpertBank.fused_ffn>`)::

    offsets = torch.cumsum(plan.rows_per_expert, 0).to(torch.int32)
    h = gather_ffn1(x, w1, b1, offsets, plan.assignment_index, plan.num_slots,
                    activation, row_mask=plan.row_mask)
    y = ffn2_combine(h, w2, b2, plan.row_gates, offsets, plan.assignment_index,
                     plan.num_tokens, plan.num_slots, row_mask=plan.row_mask)

(the same calls serve the compact layout, whose ``plan.row_mask`` is None). Not
covered: activation dropout, tanh-GELU, experts of several sublayers, and rows that
arrive already gathered (expert parallelism) except as ``slot = arange(N)``,
``num_slots = 1``. Nothing is read back to the host: grids come from shapes, row tiles
from ``offsets`` in-kernel; no atomics, so results are deterministic.

The linear router and the static plan have kernels too (:mod:`.route`, :mod:`.plan`,
ops in :mod:`.routing_ops`): :func:`top_k_routing` (fp32 logits -> probabilities,
top-k experts and gates, balance and z losses, entropy statistic, per-block expert
counts) and :func:`static_plan` (those counts -> the static layout by a counting sort,
row gates, keep mask, sizes, GEMM offsets), each differentiable with one backward
kernel. :meth:`TopKRouter.fused_route <moe_fairseq.routers.top_k.TopKRouter.fused_route>`
and :meth:`SortDispatcher.plan <moe_fairseq.layer.dispatcher.SortDispatcher.plan>` use
them on the layer's fused path.

Whether the kernels can run here: :func:`available` (:func:`unavailable_reason` says
why not). Importing this package does not import Triton; ``available()`` and the ops
do, on first use (not on ``meta`` tensors). ``TRITON_INTERPRET=1`` set before that
first use makes Triton run them on CPU tensors (slow; for tests).
"""

import os
from typing import Optional

import torch

__all__ = ["available", "unavailable_reason", "gather_ffn1", "ffn2_combine", "BlockConfig",
           "interpreted", "top_k_routing", "static_plan"]

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_common = None  # the imported .common module, or False when Triton cannot be imported


def _triton_common():
    global _common
    if _common is None:
        try:
            from . import common
            _common = common
        except Exception:  # not installed, or an install that fails at import
            _common = False
    return _common or None


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def interpreted() -> Optional[bool]:
    """True when the kernels were built for Triton's interpreter, False when compiled,
    None without Triton."""
    common = _triton_common()
    if common is None:
        return None
    return type(common.expert_tile).__name__ == "InterpretedFunction"


def unavailable_reason(device, dtype: torch.dtype) -> Optional[str]:
    """Why the ops cannot run on tensors of this device and dtype here (None: they can),
    as a phrase for an error message that names the device and dtype. See
    :func:`available`."""
    if dtype not in _SUPPORTED:
        return "the kernels take float32, float16 and bfloat16 tensors"
    device = torch.device(device)
    if device.type == "meta":
        return None  # shapes only: the ops' meta implementations, no Triton
    mode = interpreted()
    if mode is None:
        return "Triton cannot be imported (pip install triton)"
    if mode:
        if not _interpret_env():
            return ("the kernels were built for Triton's interpreter, and TRITON_INTERPRET "
                    "is no longer set")
        return None
    if device.type != "cuda":
        return ("compiled kernels take CUDA tensors (CPU tensors need TRITON_INTERPRET=1 set "
                "before the kernels' first use)")
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def available(device, dtype: torch.dtype) -> bool:
    """Whether the ops run on tensors of this device and dtype here.

    Needs fp32 / fp16 / bf16; then either CUDA tensors with compiled kernels (Triton
    installed), or any tensor with kernels built for the interpreter while
    ``TRITON_INTERPRET`` is still set (a process that set it only to import them, as
    a test might, does not hand interpreted kernels to the layer afterwards). On
    ``meta`` tensors the ops always run (their shape functions; no Triton needed).
    """
    return unavailable_reason(device, dtype) is None


def _check_runnable(t: torch.Tensor) -> None:
    reason = unavailable_reason(t.device, t.dtype)
    if reason is not None:
        raise RuntimeError(
            f"moe_fairseq.kernels cannot run on {t.device} {t.dtype} tensors here ({reason}): "
            "they need Triton and a CUDA tensor, or TRITON_INTERPRET=1 (set before their "
            "first use) for CPU tensors; check kernels.available() and fall back")


def gather_ffn1(x, w1, b1, offsets, slot, num_slots, activation="relu", row_mask=None,
                config=None):
    """See :func:`moe_fairseq.kernels.ffn1.gather_ffn1` (x ``[T, d]`` -> ``[N, f]``)."""
    _check_runnable(x)
    from .ffn1 import gather_ffn1 as op
    return op(x, w1, b1, offsets, slot, num_slots, activation, row_mask, config)


def ffn2_combine(h, w2, b2, gates, offsets, slot, num_tokens, num_slots, row_mask=None,
                 config=None):
    """See :func:`moe_fairseq.kernels.ffn2.ffn2_combine` (h ``[N, f]`` -> ``[T, d]``)."""
    _check_runnable(h)
    from .ffn2 import ffn2_combine as op
    return op(h, w2, b2, gates, offsets, slot, num_tokens, num_slots, row_mask, config)


def top_k_routing(logits, token_mask=None, noise=None, top_k=2, normalize_before=False):
    """See :func:`moe_fairseq.kernels.routing_ops.top_k_routing` (fp32 logits ``[T, E]``
    -> probabilities, experts, gates, losses and the block counts of the plan)."""
    _check_runnable(logits)
    from .routing_ops import top_k_routing as op
    return op(logits, token_mask, noise, top_k, normalize_before)


def static_plan(expert_index, gates, block_counts, capacity, normalize_after=False):
    """See :func:`moe_fairseq.kernels.routing_ops.static_plan` (a routing of
    :func:`top_k_routing` -> the static dispatch layout)."""
    _check_runnable(gates)
    from .routing_ops import static_plan as op
    return op(expert_index, gates, block_counts, capacity, normalize_after)


def __getattr__(name):
    # Loaded on first use, so that importing the package stays light.
    if name == "BlockConfig":
        from .host import BlockConfig
        return BlockConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
