"""``ffn2_combine``: the experts' second layer, with bias, gate and the combine back into
token order fused into the GEMM's epilogue and stores::

    Y[t] = sum over the rows r of token t of  m[r] * gate[r] * (H[r] @ W2[e(r)] + b2[e(r)])

``m[r]`` is the row mask: a row with m False contributes exactly 0, even if its
output is not finite (a ``where``, not a product). Each row is stored at its slot
``slot[r] = j * T + t`` of a ``[k * T, d]`` stack, then the k slots are summed: no atomics.

Backward (no atomics):

- dH[r] = m g (dY[t] @ W2[e]^T), with dY gathered in the loads, and in the same
  program ``dgate[r] = m (<dY[t] @ W2[e]^T, H[r]> + <dY[t], b2[e]>)`` (the program
  walks all f columns of its rows);
- dW2[e] = sum_r H[r]^T (m g dY[t]) and db2[e] = sum_r m g dY[t], one per-expert pass
  (``xty``), H's dropped rows zeroed by ``where`` in the loads.

The launches are the custom ops ``moe_fairseq::ffn2_combine`` (forward, differentiable),
``ffn2_dh`` and ``ffn2_dw`` (see :mod:`.ops`); this module checks the arguments.
"""

from typing import Optional

from torch import Tensor

from .host import DEFAULT_CONFIG, SUPPORTED_DTYPES, BlockConfig, check_routing_args, \
    check_same_device
from .ops import config_list, ffn2_combine_op


def ffn2_combine(h: Tensor, w2: Tensor, b2: Tensor, gates: Tensor, offsets: Tensor,
                 slot: Tensor, num_tokens: int, num_slots: int,
                 row_mask: Optional[Tensor] = None,
                 config: Optional[BlockConfig] = None) -> Tensor:
    """``Y [T, d]``: token t's sum of ``gate[r] * (h[r] @ w2[e] + b2[e])`` over its rows.

    Args:
        h: ``[N, f]`` rows grouped by expert (e.g. :func:`gather_ffn1`'s output).
        w2: ``[E, f, d]``; b2: ``[E, d]``; same dtype as h (fp32, fp16 or bf16).
        gates: ``[N]`` gate of each row (any float dtype; read in fp32; its gradient
            comes back in its dtype).
        offsets: ``[E]`` int32 cumulative row counts, ``offsets[-1] == N`` (see
            :func:`gather_ffn1`).
        slot: ``[N]`` int64 distinct slots ``j * T + t`` (< ``num_slots * num_tokens``):
            row r is added to token ``t = slot % T``.
        num_tokens: T; num_slots: k.
        row_mask: optional ``[N]`` bool; rows with False add exactly 0 and get zero
            gradients (h, gate) and contribute nothing to dW2 / db2, even when their h is
            not finite.
        config: tile sizes (:class:`BlockConfig`).
    """
    config = config or DEFAULT_CONFIG
    E, f, d = w2.shape
    if h.dim() != 2 or h.shape != (slot.numel(), f) or b2.shape != (E, d):
        raise ValueError(f"ffn2_combine: h {tuple(h.shape)}, w2 {tuple(w2.shape)}, "
                         f"b2 {tuple(b2.shape)}, slot {tuple(slot.shape)} do not fit "
                         "h [N, f], w2 [E, f, d], b2 [E, d], slot [N]")
    if h.dtype not in SUPPORTED_DTYPES or w2.dtype != h.dtype or b2.dtype != h.dtype:
        raise ValueError(f"ffn2_combine: dtypes h {h.dtype}, w2 {w2.dtype}, b2 {b2.dtype}: "
                         f"all must be one of {SUPPORTED_DTYPES}")
    if not gates.is_floating_point():
        raise ValueError(f"ffn2_combine: gates must be floating point, got {gates.dtype}")
    check_same_device(h.device, w2=w2, b2=b2)
    check_routing_args(offsets, slot, slot.numel(), E, h.device, row_mask, gates)
    return ffn2_combine_op(h, w2, b2, gates, offsets, slot, num_tokens, num_slots, row_mask,
                           config_list(config))
