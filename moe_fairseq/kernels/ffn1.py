"""``gather_ffn1``: the experts' first layer, with the gather of tokens into rows fused
into the GEMM's loads and bias + activation into its epilogue::

    H[r] = act(X[slot[r] % T] @ W1[e(r)] + b1[e(r)])

Backward (no atomics):

- dA = dH * act'(.) is formed on the fly in the loads of both backward kernels;
- dX: per-row ``dA[r] @ W1[e]^T`` stored at slot ``slot[r]`` of a ``[k * T, d]`` stack,
  then summed over the k slots of each token;
- dW1[e] = X_e^T dA_e and db1[e] = sum of dA_e, in one per-expert pass (``xty``).

With a row mask, masked rows are zeroed by ``where`` in every backward load.
"""

from typing import Optional

import torch
from torch import Tensor

from .common import DEFAULT_CONFIG, SUPPORTED_DTYPES, BlockConfig, activation_code, \
    check_routing_args, check_same_device, slot_buffer, sum_slots
from .rows import grouped_rows
from .xty import grouped_xty


class GatherFFN1(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, offsets: Tensor, slot: Tensor,
                num_slots: int, activation: str, row_mask: Optional[Tensor],
                config: BlockConfig) -> Tensor:
        act = activation_code(activation)
        num_tokens = x.size(0)
        num_rows = slot.numel()
        h = x.new_empty(num_rows, w1.size(2))
        # gelu's backward needs its input; relu's sign test can use the output.
        pre = x.new_empty(num_rows, w1.size(2)) if act == 2 else None
        if num_tokens > 0:
            grouped_rows(x, w1, offsets, slot, h, num_tokens=num_tokens, config=config,
                         a_gather=True, bias=b1, act=act, pre=pre)
        ctx.save_for_backward(x, w1, offsets, slot, row_mask, pre if act == 2 else h)
        ctx.act, ctx.num_slots, ctx.config = act, num_slots, config
        return h

    @staticmethod
    def backward(ctx, dh: Tensor):
        x, w1, offsets, slot, row_mask, z = ctx.saved_tensors
        act, k, config = ctx.act, ctx.num_slots, ctx.config
        T, d = x.shape
        N = slot.numel()
        dx = dw1 = db1 = None
        if ctx.needs_input_grad[0]:
            if N == 0 or T == 0:
                dx = torch.zeros_like(x)
            else:
                stack = slot_buffer(x, k, T, N, d)
                # dA @ W1[e]^T: W1 read through a transposed view, no copy.
                grouped_rows(dh, w1.transpose(1, 2), offsets, slot, stack, num_tokens=T,
                             config=config, a_act_grad=act, z=z, a_mask=True,
                             row_mask=row_mask, out_scatter=True)
                dx = sum_slots(stack, k, T)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw1 = torch.empty_like(w1)
            db1 = w1.new_empty(w1.size(0), w1.size(2))
            if N == 0 or T == 0:
                dw1.zero_()
                db1.zero_()
            else:
                grouped_xty(x, dh, offsets, slot, dw1, num_tokens=T, config=config, bias=db1,
                            x_gather=True, x_mask=True, d_act_grad=act, z=z, d_mask=True,
                            row_mask=row_mask)
        return dx, dw1, db1, None, None, None, None, None, None


def gather_ffn1(x: Tensor, w1: Tensor, b1: Tensor, offsets: Tensor, slot: Tensor,
                num_slots: int, activation: str = "relu", row_mask: Optional[Tensor] = None,
                config: Optional[BlockConfig] = None) -> Tensor:
    """``H [N, f]``: row r is ``act(x[slot[r] % T] @ w1[e] + b1[e])``, e its expert.

    Args:
        x: ``[T, d]`` tokens.
        w1: ``[E, d, f]``; b1: ``[E, f]``; same dtype as x (fp32, fp16 or bf16).
        offsets: ``[E]`` int32, cumulative row counts: expert e owns rows
            ``[offsets[e-1], offsets[e])`` (``torch.cumsum(sizes, 0).int()``, as
            ``torch._grouped_mm``'s ``offs``); ``offsets[-1]`` must equal N.
        slot: ``[N]`` int64, each row's slot ``j * T + t`` (the dispatch plan's
            ``assignment_index``): the row reads token ``t = slot % T``, and in
            backward its dX lands in slot ``slot[r]`` of a ``[k * T, d]`` stack. Slots
            must be distinct and ``< num_slots * T``.
        num_slots: k, slots per token.
        activation: ``"relu"``, ``"gelu"`` (exact erf) or ``"linear"``.
        row_mask: optional ``[N]`` bool; rows with False take no part in backward
            (their dA and their x rows in dW1 are forced to 0 even if not finite).
            Their forward output is still computed.
        config: tile sizes (:class:`BlockConfig`).
    """
    config = config or DEFAULT_CONFIG
    E, d, f = w1.shape
    if x.dim() != 2 or x.size(1) != d or b1.shape != (E, f):
        raise ValueError(f"gather_ffn1: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, "
                         f"b1 {tuple(b1.shape)} do not fit x [T, d], w1 [E, d, f], b1 [E, f]")
    if x.dtype not in SUPPORTED_DTYPES or w1.dtype != x.dtype or b1.dtype != x.dtype:
        raise ValueError(f"gather_ffn1: dtypes x {x.dtype}, w1 {w1.dtype}, b1 {b1.dtype}: "
                         f"all must be one of {SUPPORTED_DTYPES}")
    check_same_device(x.device, w1=w1, b1=b1)
    check_routing_args(offsets, slot, slot.numel(), E, x.device, row_mask)
    return GatherFFN1.apply(x, w1, b1, offsets, slot, num_slots, activation, row_mask, config)
