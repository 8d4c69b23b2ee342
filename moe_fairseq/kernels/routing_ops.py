"""The routing and plan kernels as ``torch.library`` custom ops, and their autograd.

One op per launch, as for the FFN ops (:mod:`.ops`), so a dispatch-mode count
(``layer/op_budget.py``) sees each kernel as one launch, and its meta implementation
(the same code, less the launch) gives the shapes:

========================  ===========================================================
op                        inputs -> outputs
========================  ===========================================================
``route_top_k``           logits [T, E] fp32, token_mask [T]?, noise [T, E]? ->
                          probs [T, E], index [T, k] int64, gates [T, k], lse [T],
                          counts [B, k, E+1] int32, partials [B, E+2] fp32
``router_losses``         partials, running counts [B, k, E+1] int64 ->
                          balance [], z [], entropy sum []
``route_top_k_backward``  probs, lse, index, token_mask?, d gates?, d probs?,
                          d balance?, d z?, running counts -> d logits [T, E]
``static_plan``           index [T, k], gates [T, k], running counts, capacity? ->
                          order [kT] int64, slot_row [kT] int64, row_gates [kT],
                          row_mask [kT] bool, sizes [3E+3] int64, offsets [E] int32
``static_plan_backward``  d row_gates [kT], gates, slot_row, row_mask -> d gates [T, k]
========================  ===========================================================

(B = token blocks of ``ROUTE_BLOCK_T``.) Between the first two, one ``torch.cumsum``
turns the per-block counts into running counts. :func:`top_k_routing` and
:func:`static_plan` are the differentiable entry points.
"""

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from .host import route_blocks
from .ops import NAMESPACE, _define

OP_NAMES = tuple(f"{NAMESPACE}::{name}" for name in (
    "route_top_k", "router_losses", "route_top_k_backward", "static_plan",
    "static_plan_backward"))

# Capacity modes of the plan kernel (kernels/plan.py: CAP_NONE, CAP_VALUE, CAP_TENSOR).
_CAP_NONE, _CAP_VALUE, _CAP_TENSOR = 0, 1, 2


def _route_top_k(logits: Tensor, token_mask: Optional[Tensor], noise: Optional[Tensor],
                 top_k: int, normalize_before: bool, launch: bool
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, E = logits.shape
    blocks = route_blocks(T)
    probs = logits.new_empty(T, E)
    index = logits.new_empty(T, top_k, dtype=torch.long)
    gates = logits.new_empty(T, top_k)
    lse = logits.new_empty(T)
    counts = logits.new_empty(blocks, top_k, E + 1, dtype=torch.int32)
    partials = logits.new_empty(blocks, E + 2)
    if launch and T > 0:
        from .route import route_top_k
        route_top_k(logits, token_mask, noise, top_k, normalize_before, probs, index, gates,
                    lse, counts, partials)
    return probs, index, gates, lse, counts, partials


def _router_losses(partials: Tensor, cum: Tensor, launch: bool) -> Tuple[Tensor, Tensor, Tensor]:
    if cum.size(0) == 0:  # no token
        return tuple(partials.new_zeros(()) for _ in range(3))
    balance, z, entropy = (partials.new_empty(()) for _ in range(3))
    if launch:
        from .route import router_losses
        router_losses(partials, cum, balance, z, entropy)
    return balance, z, entropy


def _route_top_k_backward(probs: Tensor, lse: Tensor, index: Tensor,
                          token_mask: Optional[Tensor], gates_grad: Optional[Tensor],
                          probs_grad: Optional[Tensor], balance_grad: Optional[Tensor],
                          z_grad: Optional[Tensor], cum: Tensor, normalize_before: bool,
                          launch: bool) -> Tensor:
    out = probs.new_empty(probs.shape)
    if launch and probs.size(0) > 0:
        from .route import route_top_k_backward
        route_top_k_backward(probs, lse, index, token_mask, gates_grad, probs_grad,
                             balance_grad, z_grad, cum, normalize_before, out)
    return out


def _static_plan(index: Tensor, gates: Tensor, cum: Tensor, capacity: Optional[Tensor],
                 cap_value: int, cap_mode: int, normalize_after: bool, launch: bool
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    T, k = index.shape
    E = cum.size(2) - 1
    order = index.new_empty(k * T)
    slot_row = index.new_empty(k * T)
    row_gates = gates.new_empty(k * T)
    row_mask = index.new_empty(k * T, dtype=torch.bool)
    if T == 0:
        sizes = index.new_zeros(3 * E + 3)
        offsets = index.new_zeros(E, dtype=torch.int32)
        return order, slot_row, row_gates, row_mask, sizes, offsets
    sizes = index.new_empty(3 * E + 3)
    offsets = index.new_empty(E, dtype=torch.int32)
    if launch:
        from .plan import static_plan
        static_plan(index, gates, cum, capacity, cap_value, cap_mode, normalize_after, order,
                    slot_row, row_gates, row_mask, sizes, offsets)
    return order, slot_row, row_gates, row_mask, sizes, offsets


def _static_plan_backward(grad: Tensor, gates: Tensor, slot_row: Tensor, row_mask: Tensor,
                          normalize_after: bool, launch: bool) -> Tensor:
    out = gates.new_empty(gates.shape)
    if launch and gates.size(0) > 0:
        from .plan import static_plan_backward
        static_plan_backward(grad, gates, slot_row, row_mask, normalize_after, out)
    return out


route_top_k_op = _define(_route_top_k)
router_losses_op = _define(_router_losses)
route_top_k_backward_op = _define(_route_top_k_backward)
static_plan_op = _define(_static_plan)
static_plan_backward_op = _define(_static_plan_backward)


class TopKRouting(NamedTuple):
    """What :func:`top_k_routing` returns (T tokens, k slots, E experts, B blocks)."""

    probs: Tensor  # [T, E] fp32, differentiable
    expert_index: Tensor  # [T, k] int64, -1 for padding
    gates: Tensor  # [T, k] fp32, differentiable
    balance: Tensor  # [] fp32 balance loss, differentiable
    z: Tensor  # [] fp32 z-loss, differentiable
    entropy_sum: Tensor  # [] fp32, sum over tokens of the routing entropy (nats)
    block_counts: Tensor  # [B, k, E+1] int64 running counts of each slot's experts


class _TopKRoutingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, token_mask, noise, top_k, normalize_before):
        probs, index, gates, lse, counts, partials = route_top_k_op(
            logits, token_mask, noise, top_k, normalize_before)
        cum = torch.cumsum(counts, 0)  # int64
        balance, z, entropy = router_losses_op(partials, cum)
        ctx.mark_non_differentiable(index, entropy, cum)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(probs, lse, index, token_mask, cum)
        ctx.normalize_before = normalize_before
        return probs, index, gates, balance, z, entropy, cum

    @staticmethod
    def backward(ctx, d_probs, _d_index, d_gates, d_balance, d_z, _d_entropy, _d_cum):
        if d_probs is None and d_gates is None and d_balance is None and d_z is None:
            return None, None, None, None, None
        probs, lse, index, token_mask, cum = ctx.saved_tensors
        # The kernel reads rows in place: a consumer may hand back strided gradients
        # (the torch plan's gates.t() does); contiguous ones pass as they are.
        d_probs, d_gates = (None if g is None else g.contiguous() for g in (d_probs, d_gates))
        d_logits = route_top_k_backward_op(probs, lse, index, token_mask, d_gates, d_probs,
                                           d_balance, d_z, cum, ctx.normalize_before)
        return d_logits, None, None, None, None


def top_k_routing(logits: Tensor, token_mask: Optional[Tensor] = None,
                  noise: Optional[Tensor] = None, top_k: int = 2,
                  normalize_before: bool = False) -> TopKRouting:
    """The linear top-k router's decisions and losses from its fp32 logits ``[T, E]``.

    Equal to :class:`~moe_fairseq.routers.top_k.TopKRouter` with the ``all`` second-expert
    policy, or ``sampling`` when ``noise`` (uniform ``[T, E]``, what its ``rand_like``
    draws) is given; ``normalize_before``: top-2 gates renormalised to sum to 1 before
    capacity dropping. ``token_mask [T]`` bool: False rows are padding.
    """
    if logits.dtype != torch.float32:
        raise TypeError(f"top_k_routing takes fp32 logits, got {logits.dtype}")
    if top_k not in (1, 2) or (top_k == 2 and logits.size(1) < 2):
        raise ValueError(f"top_k_routing: top_k must be 1 or 2 (<= E), got {top_k}")
    if noise is not None:
        noise = noise.contiguous()
    return TopKRouting(*_TopKRoutingFn.apply(logits.contiguous(), token_mask, noise, top_k,
                                             normalize_before))


class StaticPlan(NamedTuple):
    """What :func:`static_plan` returns (rows in the static layout: k * T)."""

    order: Tensor  # [kT] int64, slot j * T + t of each row (rows grouped by expert)
    row_gates: Tensor  # [kT] fp32, differentiable; 0 for dropped or unassigned rows
    row_mask: Tensor  # [kT] bool, rows whose output counts
    # [3E + 3] int64: requested [E], kept [E], laid out [E] rows per expert, then the
    # assignments, the dropped ones and the tokens (first slots with an expert).
    sizes: Tensor
    offsets: Tensor  # [E] int32, cumulative laid-out rows (the grouped GEMMs' offs)


class _StaticPlanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, index, gates, cum, capacity, cap_value, cap_mode, normalize_after):
        order, slot_row, row_gates, row_mask, sizes, offsets = static_plan_op(
            index, gates, cum, capacity, cap_value, cap_mode, normalize_after)
        ctx.mark_non_differentiable(order, row_mask, sizes, offsets)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(gates, slot_row, row_mask)
        ctx.normalize_after = normalize_after
        return order, row_gates, row_mask, sizes, offsets

    @staticmethod
    def backward(ctx, _d_order, d_row_gates, _d_mask, _d_sizes, _d_offsets):
        if d_row_gates is None:
            return (None,) * 7
        gates, slot_row, row_mask = ctx.saved_tensors
        d_gates = static_plan_backward_op(d_row_gates.contiguous(), gates, slot_row, row_mask,
                                          ctx.normalize_after)
        return None, d_gates, None, None, None, None, None


def static_plan(expert_index: Tensor, gates: Tensor, block_counts: Tensor,
                capacity: Union[None, int, Tensor], normalize_after: bool = False) -> StaticPlan:
    """The static dispatch layout of :class:`~moe_fairseq.layer.dispatcher.SortDispatcher`
    from a routing of :func:`top_k_routing` (its ``expert_index [T, k]``, ``gates``,
    ``block_counts``). ``capacity``: None (no limit), an int or a 0-dim int64 tensor;
    ``normalize_after``: each token's kept gates renormalised to sum to 1."""
    if capacity is None:
        cap, value, mode = None, 0, _CAP_NONE
    elif isinstance(capacity, Tensor):
        cap, value, mode = capacity.to(torch.long).reshape(()), 0, _CAP_TENSOR
    else:
        cap, value, mode = None, int(min(capacity, 2 ** 31 - 1)), _CAP_VALUE
    return StaticPlan(*_StaticPlanFn.apply(expert_index, gates.contiguous(), block_counts, cap,
                                           value, mode, normalize_after))
