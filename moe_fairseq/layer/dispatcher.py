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
token (row-major order of the layer's input) wins; with a ``Routing.priority``
(batch-prioritized routing) the token with the higher priority wins instead. An expert keeps its first
``capacity`` assignments in that order; the rest are dropped and contribute
nothing (the token's residual passes through the transformer layer).

Two layouts of the dispatched rows (``SortDispatcher(layout=...)``):

- ``compact`` (CPU, expert parallelism): only the kept assignments, ``N`` rows.
  Their number is data-dependent, so building the block reads it back to the host.
- ``static`` (default on CUDA): all ``k * T`` slots, every shape fixed by T, so the
  plan never syncs with the host. A dropped assignment stays in its expert's group
  with gate 0 (``row_mask`` False); slots without an expert (-1, padding) join the
  last expert's group with gate 0. The experts compute those rows and the combine
  discards them: the dropless amount of work, which the grouped GEMM takes in one call.
"""

from dataclasses import dataclass
from typing import Optional, Tuple
import torch
from torch import Tensor

from ..routers.base import Routing


class _GatherRows(torch.autograd.Function):
    """``x.index_select(0, index % T)`` whose backward avoids a scatter-add.

    ``index`` holds distinct positions in a virtual ``[k * T, d]`` stack of k
    copies of x (slot j of token t at ``j * T + t``), so the gradient can be
    written with a plain copy into that stack and summed over the k copies;
    ``index_add`` (the default backward) is several times slower on CPU.
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, copies: int, covers_all: bool) -> Tensor:
        num_rows = x.size(0)
        ctx.save_for_backward(index)
        ctx.shape = (copies, num_rows, x.size(1))
        ctx.covers_all = covers_all
        return x.index_select(0, index % max(num_rows, 1))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        copies, num_rows, dim = ctx.shape
        stack = _stack_of(grad, copies * num_rows, ctx.covers_all).index_copy_(0, index, grad)
        return stack.view(copies, num_rows, dim).sum(0), None, None, None


def _stack_of(like: Tensor, rows: int, covers_all: bool) -> Tensor:
    # A stack every row of which is written next needs no zero fill.
    if covers_all:
        return like.new_empty(rows, like.size(1))
    return like.new_zeros(rows, like.size(1))


def gather_rows(x: Tensor, index: Tensor, copies: int = 1, covers_all: bool = False) -> Tensor:
    """Rows ``x[index % T]`` for distinct ``index`` in ``[0, copies * T)``; x ``[T, d]``.
    ``covers_all``: ``index`` is a permutation of all ``copies * T`` positions."""
    return _GatherRows.apply(x, index, copies, covers_all)


def scatter_rows(rows: Tensor, index: Tensor, num_rows: int, copies: int = 1,
                 covers_all: bool = False) -> Tensor:
    """Inverse of :func:`gather_rows` with summation: ``out[t] = sum of rows
    placed at j * T + t``; rows ``[N, d]`` -> ``[num_rows, d]``. Absent rows are 0.
    ``covers_all``: ``index`` is a permutation of all ``copies * num_rows`` positions."""
    # In place on a fresh stack (autograd still differentiates wrt rows): the
    # out-of-place index_copy would first copy the whole stack.
    stack = _stack_of(rows, copies * num_rows, covers_all).index_copy_(0, index, rows)
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
    # Static layout only: [N] bool, rows whose output counts (kept assignments), and
    # [E] int64 rows per expert as laid out (kept + dropped + unassigned). None in
    # the compact layout, where every row counts and bank_sizes == group_sizes.
    row_mask: Optional[Tensor] = None
    bank_sizes: Optional[Tensor] = None
    # Fused plan only (kernels/plan.py): [E] int32 cumulative bank_sizes (the grouped
    # GEMMs' offsets), and [3E + 3] int64 sizes: requested, group_sizes and bank_sizes
    # are views of it, followed by the assignments, the dropped ones and the tokens.
    offsets: Optional[Tensor] = None
    sizes: Optional[Tensor] = None

    @property
    def token_index(self) -> Tensor:
        """``[N]`` int64, source token of each row (rows grouped by expert)."""
        return self.assignment_index % max(self.num_tokens, 1)

    @property
    def rows_per_expert(self) -> Tensor:
        """``[E]`` int64, dispatched rows per expert (what the expert bank is given)."""
        return self.group_sizes if self.bank_sizes is None else self.bank_sizes

    @property
    def num_assignments(self) -> int:
        """Assignments with an expert, before capacity."""
        return int(self.requested.sum())

    @property
    def num_dropped(self) -> int:
        return self.num_assignments - int(self.group_sizes.sum())


LAYOUTS = ("auto", "compact", "static")


class SortDispatcher:
    """Plans, gathers and combines for experts that all live in this process.

    ``layout``: ``compact``, ``static`` or ``auto`` (static for CUDA tensors, compact
    elsewhere); see the module docstring.
    """

    # No communication: the layer may skip a routing pass that has no token.
    collective = False

    def __init__(self, num_experts: int, layout: str = "auto"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts
        self.layout = layout

    def _static(self, t: Tensor) -> bool:
        return self.layout == "static" or (self.layout == "auto" and t.is_cuda)

    def plan(self, routing: Routing) -> DispatchPlan:
        """The rows' layout, gates and sizes for ``routing``: by the plan kernel for a
        routing of the fused kernels (``Routing.block_counts``) in the static layout,
        else by a stable sort."""
        if (routing.block_counts is not None and not routing.mix_input
                and routing.priority is None and self._static(routing.expert_index)):
            return self._fused_plan(routing)
        return self._sort_plan(routing)

    def _sort_plan(self, routing: Routing) -> DispatchPlan:
        expert_index, gates, capacity = routing.expert_index, routing.gates, routing.capacity
        num_tokens, k = expert_index.shape
        E = self.num_experts
        flat = expert_index.t().reshape(-1)  # priority order j * T + t
        claim = None  # [kT] assignment indices in the order they claim capacity
        if routing.priority is not None and num_tokens > 0:
            # Batch-prioritized: slot by slot, tokens by decreasing priority (stable).
            ranked = torch.sort(routing.priority, descending=True, stable=True).indices
            claim = (torch.arange(k, device=flat.device).unsqueeze(1) * num_tokens
                     + ranked.unsqueeze(0)).reshape(-1)
            flat = flat[claim]
        # Slots without an expert (-1) sort after every real expert.
        key = torch.where(flat >= 0, flat, torch.full_like(flat, E))
        sorted_key, order = torch.sort(key, stable=True)
        if claim is not None:
            order = claim[order]
        # scatter_add, not bincount: CUDA bincount reads its maximum back to the host.
        counts = torch.zeros(E + 1, dtype=torch.long, device=key.device).scatter_add_(
            0, key, torch.ones_like(key))
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(key.numel(), device=key.device) - starts[sorted_key]
        keep = sorted_key < E
        requested = counts[:E]
        if capacity is not None:
            keep &= position < capacity
            group_sizes = requested.clamp(max=capacity)
        else:
            group_sizes = requested
        gates_sorted = gates.t().reshape(-1)[order]
        if self._static(flat):
            index, row_mask = order, keep
            row_gates = torch.where(keep, gates_sorted, torch.zeros_like(gates_sorted))
            # Unassigned slots (sorted last) ride in the last expert's group.
            bank_sizes = requested.clone()
            bank_sizes[E - 1:] += counts[E:]
        else:
            index, row_mask, bank_sizes = order[keep], None, None
            row_gates = gates_sorted[keep]
        kept_sum = None
        if routing.normalize_after_drop or routing.mix_input:
            kept_sum = scatter_rows(row_gates.unsqueeze(1), index, num_tokens, k,
                                    covers_all=row_mask is not None).squeeze(1)  # [T]
        if routing.normalize_after_drop:
            denom = kept_sum.clamp_min(torch.finfo(kept_sum.dtype).eps)
            row_gates = row_gates / denom[index % max(num_tokens, 1)]
            kept_sum = kept_sum / denom
        return DispatchPlan(
            row_gates=row_gates,
            group_sizes=group_sizes,
            requested=requested,
            assignment_index=index,
            num_tokens=num_tokens,
            num_slots=k,
            input_weight=(1.0 - kept_sum) if routing.mix_input else None,
            row_mask=row_mask,
            bank_sizes=bank_sizes,
        )

    def _fused_plan(self, routing: Routing) -> DispatchPlan:
        """The static layout by the plan kernel (a counting sort over the routing
        kernel's block counts): the same rows, gates and sizes as :meth:`plan`'s."""
        from .. import kernels  # Triton only on this path

        num_tokens, k = routing.expert_index.shape
        E = self.num_experts
        out = kernels.static_plan(routing.expert_index, routing.gates, routing.block_counts,
                                  routing.capacity, routing.normalize_after_drop)
        sizes = out.sizes
        return DispatchPlan(row_gates=out.row_gates, group_sizes=sizes[E:2 * E],
                            requested=sizes[:E], assignment_index=out.order,
                            num_tokens=num_tokens, num_slots=k, row_mask=out.row_mask,
                            bank_sizes=sizes[2 * E:3 * E], offsets=out.offsets, sizes=sizes)

    def dispatch(self, x: Tensor, plan: DispatchPlan) -> Tuple[Tensor, Tensor]:
        """x ``[T, d]`` -> (rows ``[N, d]`` grouped by expert, rows per local expert ``[E]``).

        The second value is what the expert bank needs: for this dispatcher all
        experts are local, so it is ``plan.rows_per_expert``; an expert-parallel
        dispatcher returns the rows it received for its own experts instead.
        """
        return (gather_rows(x, plan.assignment_index, plan.num_slots, plan.row_mask is not None),
                plan.rows_per_expert)

    def combine(self, rows: Tensor, plan: DispatchPlan) -> Tensor:
        """Expert outputs ``[N, d]`` -> ``[T, d]``: sum of gate * output per token."""
        weighted = rows * plan.row_gates.to(rows.dtype).unsqueeze(1)
        if plan.row_mask is not None:
            # where, not only the zero gate: a non-finite output of a discarded row
            # (e.g. fp16 overflow on padding) must not reach the token.
            weighted = torch.where(plan.row_mask.unsqueeze(1), weighted, torch.zeros_like(weighted))
        return scatter_rows(weighted, plan.assignment_index, plan.num_tokens, plan.num_slots,
                            covers_all=plan.row_mask is not None)
