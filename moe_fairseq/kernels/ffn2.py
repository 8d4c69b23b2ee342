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
"""

from typing import Optional

import torch
from torch import Tensor

from .common import DEFAULT_CONFIG, SUPPORTED_DTYPES, BlockConfig, check_routing_args, \
    check_same_device, slot_buffer, sum_slots
from .rows import grouped_rows
from .xty import grouped_xty


class FFN2Combine(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h: Tensor, w2: Tensor, b2: Tensor, gates: Tensor, offsets: Tensor,
                slot: Tensor, num_tokens: int, num_slots: int, row_mask: Optional[Tensor],
                config: BlockConfig) -> Tensor:
        N, d = slot.numel(), w2.size(2)
        if N == 0 or num_tokens == 0:
            y = h.new_zeros(num_tokens, d)
        else:
            stack = slot_buffer(h, num_slots, num_tokens, N, d)
            grouped_rows(h, w2, offsets, slot, stack, num_tokens=num_tokens, config=config,
                         bias=b2, gate=gates, row_mask=row_mask, out_scatter=True)
            y = sum_slots(stack, num_slots, num_tokens)
        ctx.save_for_backward(h, w2, b2, gates, offsets, slot, row_mask)
        ctx.num_tokens, ctx.config = num_tokens, config
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        h, w2, b2, gates, offsets, slot, row_mask = ctx.saved_tensors
        T, config = ctx.num_tokens, ctx.config
        N = slot.numel()
        empty = N == 0 or T == 0
        need_h, need_w2, need_b2, need_gates = ctx.needs_input_grad[:4]
        dh = dw2 = db2 = dgates = None
        if need_h or need_gates:
            dh = torch.empty_like(h) if not empty else torch.zeros_like(h)
            dgate32 = None
            if need_gates:
                dgate32 = torch.zeros(N, dtype=torch.float32, device=h.device)
            if not empty:
                # dY[t] @ W2[e]^T through a transposed view of W2, no copy.
                grouped_rows(dy, w2.transpose(1, 2), offsets, slot, dh, num_tokens=T,
                             config=config, a_gather=True, gate=gates, row_mask=row_mask,
                             row_dot=(h, b2, dgate32) if need_gates else None)
            if need_gates:
                dgates = dgate32.to(gates.dtype)
            if not need_h:
                dh = None
        if need_w2 or need_b2:
            dw2 = torch.empty_like(w2)
            db2 = torch.empty_like(b2)
            if empty:
                dw2.zero_()
                db2.zero_()
            else:
                grouped_xty(h, dy, offsets, slot, dw2, num_tokens=T, config=config, bias=db2,
                            x_mask=True, d_gather=True, gate=gates, d_mask=True,
                            row_mask=row_mask)
        return dh, dw2, db2, dgates, None, None, None, None, None, None


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
    return FFN2Combine.apply(h, w2, b2, gates, offsets, slot, num_tokens, num_slots,
                             row_mask, config)
