"""The fused FFN kernels as ``torch.library`` custom ops, namespace ``moe_fairseq``.

One op per Triton launch, so that whatever walks the dispatcher (a
``TorchDispatchMode`` such as :mod:`moe_fairseq.layer.op_budget`, ``torch.compile``)
sees each kernel as one opaque op with known output shapes:

=================  ===========================================================  ===========
op                 inputs -> outputs                                             kernel
=================  ===========================================================  ===========
``gather_ffn1``    x [T, d], w1 [E, d, f], b1 [E, f] -> h [N, f], pre [N, f]     row tiles
                   (pre: gelu's input, kept for backward; [0] for relu/linear)
``ffn2_combine``   h [N, f], w2 [E, f, d], b2 [E, d], gates [N] -> y [T, d]       row tiles
``ffn1_dx``        dh [N, f], w1, z [N, f] -> dx [T, d]                           row tiles
``ffn1_dw``        x [T, d], dh [N, f], z [N, f] -> dw1 [E, d, f], db1 [E, f]     X^T D
``ffn2_dh``        dy [T, d], w2, b2, h, gates -> dh [N, f], dgates [N] (or [0])  row tiles
``ffn2_dw``        h [N, f], dy [T, d], gates -> dw2 [E, f, d], db2 [E, d]        X^T D
=================  ===========================================================  ===========

(every op also takes the plan's ``offsets [E]`` int32, ``slot [N]`` int64 and optional
``row_mask [N]`` bool, and ``config`` = the :class:`~.host.BlockConfig` fields as a list
of ints; ``z`` is what the activation's gradient reads: ``pre`` for gelu, else h.)
``gather_ffn1`` and ``ffn2_combine`` are differentiable (``register_autograd``); their
backward calls the four others. The validated entry points are
:func:`moe_fairseq.kernels.ffn1.gather_ffn1` and :func:`moe_fairseq.kernels.ffn2.ffn2_combine`.

Each op's implementation is written once and serves both as its real kernel and as
its fake (meta) implementation, which only leaves out the launch: the tensors an op
allocates and the torch ops around its kernel (a slot stack's zero fill, the sum over
a token's slots) run the same way on ``meta`` / fake tensors, so a count on meta
tensors sees them. Importing this module registers the ops and imports no Triton;
the real implementations import it on first use.
"""

import dataclasses
import inspect
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .host import BlockConfig, activation_code, slot_buffer, sum_slots

NAMESPACE = "moe_fairseq"
# Qualified names of every op defined here (op_budget lists them as GEMMs).
OP_NAMES = tuple(f"{NAMESPACE}::{name}" for name in (
    "gather_ffn1", "ffn2_combine", "ffn1_dx", "ffn1_dw", "ffn2_dh", "ffn2_dw"))


def config_list(config: BlockConfig) -> List[int]:
    """A :class:`BlockConfig` as the ops take it (custom-op schemas hold no dataclass)."""
    return list(dataclasses.astuple(config))


def _launchers():
    # Triton only when a kernel really runs.
    from .rows import grouped_rows
    from .xty import grouped_xty
    return grouped_rows, grouped_xty


def _gather_ffn1(x: Tensor, w1: Tensor, b1: Tensor, offsets: Tensor, slot: Tensor,
                 num_slots: int, activation: str, row_mask: Optional[Tensor],
                 config: List[int], launch: bool) -> Tuple[Tensor, Tensor]:
    act = activation_code(activation)
    num_rows, f = slot.numel(), w1.size(2)
    h = x.new_empty(num_rows, f)
    # gelu's backward needs its input; relu's sign test can use the output.
    pre = x.new_empty(num_rows, f) if act == 2 else x.new_empty(0)
    if launch and x.size(0) > 0:
        grouped_rows, _ = _launchers()
        grouped_rows(x, w1, offsets, slot, h, num_tokens=x.size(0),
                     config=BlockConfig(*config), a_gather=True, bias=b1, act=act,
                     pre=pre if act == 2 else None)
    return h, pre


def _ffn1_dx(dh: Tensor, w1: Tensor, z: Tensor, offsets: Tensor, slot: Tensor,
             row_mask: Optional[Tensor], num_tokens: int, num_slots: int, activation: str,
             config: List[int], launch: bool) -> Tensor:
    T, k, N, d = num_tokens, num_slots, slot.numel(), w1.size(1)
    if N == 0 or T == 0:
        return w1.new_zeros(T, d)
    # Each row's dX lands in its slot of a [k * T, d] stack, summed per token after.
    stack = slot_buffer(w1, k, T, N, d)
    if launch:
        grouped_rows, _ = _launchers()
        # dA @ W1[e]^T: W1 read through a transposed view, no copy.
        grouped_rows(dh, w1.transpose(1, 2), offsets, slot, stack, num_tokens=T,
                     config=BlockConfig(*config), a_act_grad=activation_code(activation), z=z,
                     a_mask=True, row_mask=row_mask, out_scatter=True)
    return sum_slots(stack, k, T)


def _ffn1_dw(x: Tensor, dh: Tensor, z: Tensor, offsets: Tensor, slot: Tensor,
             row_mask: Optional[Tensor], activation: str, config: List[int],
             launch: bool) -> Tuple[Tensor, Tensor]:
    E, (T, d), f = offsets.numel(), x.shape, dh.size(1)
    if slot.numel() == 0 or T == 0:
        return x.new_zeros(E, d, f), x.new_zeros(E, f)
    # The kernel writes every element, empty experts' included.
    dw1, db1 = x.new_empty(E, d, f), x.new_empty(E, f)
    if launch:
        _, grouped_xty = _launchers()
        grouped_xty(x, dh, offsets, slot, dw1, num_tokens=T, config=BlockConfig(*config),
                    bias=db1, x_gather=True, x_mask=True, d_act_grad=activation_code(activation),
                    z=z, d_mask=True, row_mask=row_mask)
    return dw1, db1


def _ffn2_combine(h: Tensor, w2: Tensor, b2: Tensor, gates: Tensor, offsets: Tensor,
                  slot: Tensor, num_tokens: int, num_slots: int, row_mask: Optional[Tensor],
                  config: List[int], launch: bool) -> Tensor:
    N, d = slot.numel(), w2.size(2)
    if N == 0 or num_tokens == 0:
        return h.new_zeros(num_tokens, d)
    stack = slot_buffer(h, num_slots, num_tokens, N, d)
    if launch:
        grouped_rows, _ = _launchers()
        grouped_rows(h, w2, offsets, slot, stack, num_tokens=num_tokens,
                     config=BlockConfig(*config), bias=b2, gate=gates, row_mask=row_mask,
                     out_scatter=True)
    return sum_slots(stack, num_slots, num_tokens)


def _ffn2_dh(dy: Tensor, w2: Tensor, b2: Tensor, h: Tensor, gates: Tensor, offsets: Tensor,
             slot: Tensor, row_mask: Optional[Tensor], need_gates: bool, config: List[int],
             launch: bool) -> Tuple[Tensor, Tensor]:
    N, T = slot.numel(), dy.size(0)
    empty = N == 0 or T == 0
    dh = h.new_zeros(h.shape) if empty else h.new_empty(h.shape)
    # The kernel stores every row's gate gradient (summed in fp32 in registers, one
    # program per row tile), in the gates' dtype: no zero fill, no cast.
    dgates = gates.new_empty(N if need_gates else 0)
    if launch and not empty:
        grouped_rows, _ = _launchers()
        # dY[t] @ W2[e]^T through a transposed view of W2, no copy.
        grouped_rows(dy, w2.transpose(1, 2), offsets, slot, dh, num_tokens=T,
                     config=BlockConfig(*config), a_gather=True, gate=gates, row_mask=row_mask,
                     row_dot=(h, b2, dgates) if need_gates else None)
    return dh, dgates


def _ffn2_dw(h: Tensor, dy: Tensor, gates: Tensor, offsets: Tensor, slot: Tensor,
             row_mask: Optional[Tensor], config: List[int],
             launch: bool) -> Tuple[Tensor, Tensor]:
    E, f, (T, d) = offsets.numel(), h.size(1), dy.shape
    if slot.numel() == 0 or T == 0:
        return h.new_zeros(E, f, d), h.new_zeros(E, d)
    dw2, db2 = h.new_empty(E, f, d), h.new_empty(E, d)
    if launch:
        _, grouped_xty = _launchers()
        grouped_xty(h, dy, offsets, slot, dw2, num_tokens=T, config=BlockConfig(*config),
                    bias=db2, x_mask=True, d_gather=True, gate=gates, d_mask=True,
                    row_mask=row_mask)
    return dw2, db2


def _define(impl):
    """Register ``impl`` (whose last parameter is ``launch``) as the custom op
    ``moe_fairseq::<its name>``: ``launch=True`` for real tensors, ``False`` as its fake
    implementation. The schema comes from ``impl``'s annotations, ``launch`` left out."""
    sig = inspect.signature(impl)

    def real(*args, **kwargs):
        return impl(*args, **kwargs, launch=True)

    def fake(*args, **kwargs):
        return impl(*args, **kwargs, launch=False)

    real.__signature__ = sig.replace(parameters=list(sig.parameters.values())[:-1])
    op = torch.library.custom_op(f"{NAMESPACE}::{impl.__name__.lstrip('_')}", real,
                                 mutates_args=())
    op.register_fake(fake)
    return op


gather_ffn1_op = _define(_gather_ffn1)
ffn2_combine_op = _define(_ffn2_combine)
ffn1_dx_op = _define(_ffn1_dx)
ffn1_dw_op = _define(_ffn1_dw)
ffn2_dh_op = _define(_ffn2_dh)
ffn2_dw_op = _define(_ffn2_dw)


def _gather_ffn1_setup(ctx, inputs, output):
    x, w1, _, offsets, slot, num_slots, activation, row_mask, config = inputs
    h, pre = output
    ctx.mark_non_differentiable(pre)
    # pre gets no gradient: no zero tensor made for it.
    ctx.set_materialize_grads(False)
    # act'(z): gelu needs its input, relu's sign test can read the output.
    z = pre if activation == "gelu" else h
    ctx.save_for_backward(x, w1, offsets, slot, row_mask, z)
    ctx.num_slots, ctx.activation, ctx.config = num_slots, activation, config


def _gather_ffn1_backward(ctx, dh, _dpre):
    x, w1, offsets, slot, row_mask, z = ctx.saved_tensors
    dx = dw1 = db1 = None
    if dh is None:  # h reached no loss (grads are not materialised)
        return dx, dw1, db1, None, None, None, None, None, None
    if ctx.needs_input_grad[0]:
        dx = ffn1_dx_op(dh, w1, z, offsets, slot, row_mask, x.size(0), ctx.num_slots,
                        ctx.activation, ctx.config)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        dw1, db1 = ffn1_dw_op(x, dh, z, offsets, slot, row_mask, ctx.activation, ctx.config)
    return dx, dw1, db1, None, None, None, None, None, None


def _ffn2_combine_setup(ctx, inputs, output):
    h, w2, b2, gates, offsets, slot, _, _, row_mask, config = inputs
    ctx.save_for_backward(h, w2, b2, gates, offsets, slot, row_mask)
    ctx.config = config


def _ffn2_combine_backward(ctx, dy):
    h, w2, b2, gates, offsets, slot, row_mask = ctx.saved_tensors
    need_h, need_w2, need_b2, need_gates = ctx.needs_input_grad[:4]
    dh = dw2 = db2 = dgates = None
    if need_h or need_gates:
        dh, dgates = ffn2_dh_op(dy, w2, b2, h, gates, offsets, slot, row_mask, need_gates,
                                ctx.config)
        dh, dgates = (dh if need_h else None), (dgates if need_gates else None)
    if need_w2 or need_b2:
        dw2, db2 = ffn2_dw_op(h, dy, gates, offsets, slot, row_mask, ctx.config)
    return dh, dw2, db2, dgates, None, None, None, None, None, None


gather_ffn1_op.register_autograd(_gather_ffn1_backward, setup_context=_gather_ffn1_setup)
ffn2_combine_op.register_autograd(_ffn2_combine_backward, setup_context=_ffn2_combine_setup)
