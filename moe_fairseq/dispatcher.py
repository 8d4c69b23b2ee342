"""Sort-based token dispatch and gated combine.

Instead of a one-hot ``[tokens, experts, capacity]`` dispatch tensor (GShard-style
einsum), the token-to-expert assignments are sorted by expert, the rows of the
kept assignments are gathered into one contiguous ``[N, d]`` block grouped by
expert, and the expert outputs are scaled by their gates and summed back into
their tokens (a copy into a ``[k * T, d]`` stack of slots, then a sum over the k
slots: the same scatter-add, without ``index_add``'s slow CPU kernel).
Memory and time are linear in the number of routed assignments.

Drop order: assignment ``(slot j, token t)`` has priority ``j * T + t``, i.e. every
token's first choice beats any second choice, and among equal slots the earlier
token (row-major order of the layer's input) wins. An expert keeps its first
``capacity`` assignments in that order; the rest are dropped and contribute
nothing (the token's residual passes through the transformer layer).
"""

from dataclasses import dataclass
from typing import Optional, Tuple
import torch
from torch import Tensor

from .routers.base import Routing


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index % T)`` whose backward avoids a scatter-add.

    ``index`` holds distinct positions in a virtual ``[k * T, d]`` stack of k
    copies of x (slot j of token t at ``j * T + t``), so the gradient can be
    written with a plain copy into that stack and summed over the k copies;
    ``index_add`` (the default backward) is several times slower on CPU.
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, copies: int) -> Tensor:
        num_rows = x.size(0)
        ctx.save_for_backward(index)
        ctx.shape = (copies, num_rows, x.size(1))
        return x.index_select(0, index % max(num_rows, 1))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        copies, num_rows, dim = ctx.shape
        stack = grad.new_zeros(copies * num_rows, dim).index_copy_(0, index, grad)
        return stack.view(copies, num_rows, dim).sum(0), None, None


def gather_rows(x: Tensor, index: Tensor, copies: int = 1) -> Tensor:
    """Rows ``x[index % T]`` for distinct ``index`` in ``[0, copies * T)``; x ``[T, d]``."""
    return _GatherRows.apply(x, index, copies)


def scatter_rows(rows: Tensor, index: Tensor, num_rows: int, copies: int = 1) -> Tensor:
    """Inverse of :func:`gather_rows` with summation: ``out[t] = sum of rows
    placed at j * T + t``; rows ``[N, d]`` -> ``[num_rows, d]``. Absent rows are 0."""
    stack = rows.new_zeros(copies * num_rows, rows.size(1)).index_copy(0, index, rows)
    if copies == 1:
        return stack
    return stack.view(copies, num_rows, rows.size(1)).sum(0)


@dataclass
class DispatchPlan:
    """Where each dispatched row comes from and where it goes back.

    N = kept assignments, E = experts.
    """

    row_gates: Tensor  # [N] gate of each row (differentiable)
    group_sizes: Tensor  # [E] int64, rows per expert after capacity
    requested: Tensor  # [E] int64, assignments per expert before capacity
    assignment_index: Tensor  # [N] int64, flat priority index j * T + t of each row
    num_tokens: int
    num_slots: int  # k, slots per token
    # [T] fp32, weight of each token's own vector in its output (Routing.mix_input):
    # 1 - the sum of its kept gates; None when the router does not mix.
    input_weight: Optional[Tensor] = None

    @property
    def token_index(self) -> Tensor:
        """``[N]`` int64, source token of each row (rows grouped by expert)."""
        return self.assignment_index % max(self.num_tokens, 1)

    @property
    def num_assignments(self) -> int:
        """Assignments with an expert, before capacity."""
        return int(self.requested.sum())

    @property
    def num_dropped(self) -> int:
        return self.num_assignments - int(self.assignment_index.numel())


class SortDispatcher:
    """Plans, gathers and combines for experts that all live in this process."""

    # No communication: the layer may skip a routing pass that has no token.
    collective = False

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.num_local_experts = num_experts

    def plan(self, routing: Routing) -> DispatchPlan:
        expert_index, gates, capacity = routing.expert_index, routing.gates, routing.capacity
        num_tokens, k = expert_index.shape
        E = self.num_experts
        flat = expert_index.t().reshape(-1)  # priority order j * T + t
        # Slots without an expert (-1) sort after every real expert and are cut.
        key = torch.where(flat >= 0, flat, torch.full_like(flat, E))
        sorted_key, order = torch.sort(key, stable=True)
        counts = torch.bincount(key, minlength=E + 1)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(key.numel(), device=key.device) - starts[sorted_key]
        keep = sorted_key < E
        requested = counts[:E]
        if capacity is not None:
            keep &= position < capacity
            group_sizes = requested.clamp(max=capacity)
        else:
            group_sizes = requested
        kept = order[keep]
        row_gates = gates.t().reshape(-1)[kept]
        kept_sum = None
        if routing.normalize_after_drop or routing.mix_input:
            kept_sum = scatter_rows(row_gates.unsqueeze(1), kept, num_tokens, k).squeeze(1)  # [T]
        if routing.normalize_after_drop:
            denom = kept_sum.clamp_min(torch.finfo(kept_sum.dtype).eps)
            row_gates = row_gates / denom[kept % max(num_tokens, 1)]
            kept_sum = kept_sum / denom
        return DispatchPlan(
            row_gates=row_gates,
            group_sizes=group_sizes,
            requested=requested,
            assignment_index=kept,
            num_tokens=num_tokens,
            num_slots=k,
            input_weight=(1.0 - kept_sum) if routing.mix_input else None,
        )

    def dispatch(self, x: Tensor, plan: DispatchPlan) -> Tuple[Tensor, Tensor]:
        """x ``[T, d]`` -> (rows ``[N, d]`` grouped by expert, rows per local expert ``[E]``).

        The second value is what the expert bank needs: for this dispatcher all
        experts are local, so it is ``plan.group_sizes``; an expert-parallel
        dispatcher returns the rows it received for its own experts instead.
        """
        return gather_rows(x, plan.assignment_index, plan.num_slots), plan.group_sizes

    def combine(self, rows: Tensor, plan: DispatchPlan) -> Tensor:
        """Expert outputs ``[N, d]`` -> ``[T, d]``: sum of gate * output per token."""
        weighted = rows * plan.row_gates.to(rows.dtype).unsqueeze(1)
        return scatter_rows(weighted, plan.assignment_index, plan.num_tokens, plan.num_slots)
