"""The static dispatch plan as a counting sort: one kernel forward, one backward.

:meth:`SortDispatcher.plan <moe_fairseq.layer.dispatcher.SortDispatcher.plan>` sorts the
``k * T`` slots by expert (stable, priority ``j * T + t``), ranks each slot within its
expert, drops ranks past capacity and lays the rows out by expert, in ~25 torch
launches. With the routing kernel's per-block counts (``kernels/route.py``: for every
block of ``ROUTE_BLOCK_T`` tokens, how many of its slot-j choices went to each expert,
bin E = no expert) and their running sum over blocks, each slot's place is arithmetic:

    row(j, t) = start[b] + sum_{j' < j} total[j', b] + before[block(t), j, b] + rank

with b = the slot's expert (E for none), ``start`` the exclusive running sum of the
bins' totals, ``before`` the slot-j count of b in earlier blocks and ``rank`` the count
in this block before t. The position within the expert (row - start[b]) is what the
capacity is compared with. Equal to the sort's layout, row for row.

:func:`static_plan` (one program per token block) writes the slot of each row
(``order``), the row of each slot, each row's gate (0 when dropped; renormalised over
the token's kept slots with ``normalize_after``) and keep mask; program 0 also writes
the per-expert sizes and the grouped GEMMs' ``offsets``. :func:`static_plan_backward`
gives the gates' gradient from the row gates'.
"""

from typing import Optional

from torch import Tensor

import triton
import triton.language as tl

from .common import mask_arg
from .route import FP32_EPS, ROUTE_BLOCK_T

# Capacity modes (constexpr): no limit, a host int, a 0-dim device tensor.
CAP_NONE, CAP_VALUE, CAP_TENSOR = 0, 1, 2


@triton.jit
def _plan_kernel(
    index_ptr, gates_ptr, cum_ptr, cap_ptr, cap_value,
    order_ptr, slot_row_ptr, row_gates_ptr, row_mask_ptr, sizes_ptr, offs_ptr,
    T, E, num_blocks,
    K: tl.constexpr, CAP_MODE: tl.constexpr, NORM_AFTER: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    W = E + 1
    bins = tl.arange(0, BLOCK_B)
    bin_ok = bins < W
    last = cum_ptr + (num_blocks - 1) * (K * W)
    total0 = tl.load(last + bins, mask=bin_ok, other=0)
    total = total0
    if K == 2:
        total1 = tl.load(last + W + bins, mask=bin_ok, other=0)
        total = total0 + total1
    start = tl.cumsum(total, 0) - total  # first row of each bin
    if CAP_MODE == 2:
        cap = tl.load(cap_ptr)
    else:
        cap = cap_value  # CAP_MODE 0: the host passes a value no rank reaches

    if pid == 0:
        real = bins < E
        requested = tl.where(real, total, 0)
        if CAP_MODE == 0:
            kept = requested
        else:
            kept = tl.minimum(requested, cap)
        # Rows of slots without an expert ride in the last expert's group.
        spare = tl.sum(tl.where(bins == E, total, 0), 0)
        bank = tl.where(bins == E - 1, requested + spare, requested)
        tl.store(sizes_ptr + bins, requested, mask=real)
        tl.store(sizes_ptr + E + bins, kept, mask=real)
        tl.store(sizes_ptr + 2 * E + bins, bank, mask=real)
        assigned = tl.sum(requested, 0)
        tl.store(sizes_ptr + 3 * E, assigned)
        tl.store(sizes_ptr + 3 * E + 1, assigned - tl.sum(kept, 0))
        tl.store(sizes_ptr + 3 * E + 2, tl.sum(tl.where(real, total0, 0), 0))
        tl.store(offs_ptr + bins, tl.cumsum(bank, 0).to(tl.int32), mask=real)

    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows = rows.to(tl.int64)
    before = cum_ptr + (pid - 1) * (K * W)
    has_before = bin_ok & ((bins * 0 + pid) > 0)

    # Slot 0.
    e0 = tl.load(index_ptr + rows * K, mask=row_ok, other=-1)
    key0 = tl.where(e0 >= 0, e0, E)
    hit0 = (key0[:, None] == bins[None, :]) & row_ok[:, None]
    rank0 = tl.sum(tl.where(hit0, tl.cumsum(hit0.to(tl.int64), 0) - 1, 0), 1)
    base0 = tl.load(before + bins, mask=has_before, other=0)
    pos0 = tl.sum(tl.where(hit0, base0[None, :], 0), 1) + rank0
    row0 = tl.sum(tl.where(hit0, start[None, :], 0), 1) + pos0
    keep0 = row_ok & (key0 < E)
    if CAP_MODE != 0:
        keep0 = keep0 & (pos0 < cap)
    g0 = tl.where(keep0, tl.load(gates_ptr + rows * K, mask=row_ok, other=0.0), 0.0)
    if K == 2:
        e1 = tl.load(index_ptr + rows * 2 + 1, mask=row_ok, other=-1)
        key1 = tl.where(e1 >= 0, e1, E)
        hit1 = (key1[:, None] == bins[None, :]) & row_ok[:, None]
        rank1 = tl.sum(tl.where(hit1, tl.cumsum(hit1.to(tl.int64), 0) - 1, 0), 1)
        base1 = tl.load(before + W + bins, mask=has_before, other=0) + total0
        pos1 = tl.sum(tl.where(hit1, base1[None, :], 0), 1) + rank1
        row1 = tl.sum(tl.where(hit1, start[None, :], 0), 1) + pos1
        keep1 = row_ok & (key1 < E)
        if CAP_MODE != 0:
            keep1 = keep1 & (pos1 < cap)
        g1 = tl.where(keep1, tl.load(gates_ptr + rows * 2 + 1, mask=row_ok, other=0.0), 0.0)
        if NORM_AFTER:
            denom = tl.maximum(g0 + g1, FP32_EPS)
            g0 = g0 / denom
            g1 = g1 / denom
        tl.store(order_ptr + row1, rows + T, mask=row_ok)
        tl.store(slot_row_ptr + T + rows, row1, mask=row_ok)
        tl.store(row_gates_ptr + row1, g1, mask=row_ok)
        tl.store(row_mask_ptr + row1, keep1.to(tl.uint8), mask=row_ok)
    tl.store(order_ptr + row0, rows, mask=row_ok)
    tl.store(slot_row_ptr + rows, row0, mask=row_ok)
    tl.store(row_gates_ptr + row0, g0, mask=row_ok)
    tl.store(row_mask_ptr + row0, keep0.to(tl.uint8), mask=row_ok)


@triton.jit
def _plan_backward_kernel(
    grad_ptr, gates_ptr, slot_row_ptr, row_mask_ptr, out_ptr, T,
    K: tl.constexpr, NORM_AFTER: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows = rows.to(tl.int64)
    r0 = tl.load(slot_row_ptr + rows, mask=row_ok, other=0)
    keep0 = row_ok & (tl.load(row_mask_ptr + r0, mask=row_ok, other=0) != 0)
    d0 = tl.load(grad_ptr + r0, mask=keep0, other=0.0)
    if K == 2:
        r1 = tl.load(slot_row_ptr + T + rows, mask=row_ok, other=0)
        keep1 = row_ok & (tl.load(row_mask_ptr + r1, mask=row_ok, other=0) != 0)
        d1 = tl.load(grad_ptr + r1, mask=keep1, other=0.0)
        if NORM_AFTER:
            # row gate_j = keep_j g_j / max(s, eps), s = sum of the kept gates
            g0 = tl.where(keep0, tl.load(gates_ptr + rows * 2, mask=row_ok, other=0.0), 0.0)
            g1 = tl.where(keep1, tl.load(gates_ptr + rows * 2 + 1, mask=row_ok, other=0.0), 0.0)
            s = g0 + g1
            denom = tl.maximum(s, FP32_EPS)
            dot = tl.where(s >= FP32_EPS, (d0 * g0 + d1 * g1) / (denom * denom), 0.0)
            d0 = tl.where(keep0, d0 / denom - dot, 0.0)
            d1 = tl.where(keep1, d1 / denom - dot, 0.0)
        tl.store(out_ptr + rows * 2 + 1, d1, mask=row_ok)
    tl.store(out_ptr + rows * K, d0, mask=row_ok)


def static_plan(index: Tensor, gates: Tensor, cum: Tensor, capacity: Optional[Tensor],
                cap_value: int, cap_mode: int, normalize_after: bool, order: Tensor,
                slot_row: Tensor, row_gates: Tensor, row_mask: Tensor, sizes: Tensor,
                offsets: Tensor) -> None:
    """Launch the plan kernel into the given outputs (see :mod:`.routing_ops`)."""
    T, K = index.shape
    num_blocks, _, bins = cum.shape
    E = bins - 1
    _plan_kernel[(num_blocks,)](
        index, gates, cum, index if capacity is None else capacity, cap_value,
        order, slot_row, row_gates, mask_arg(row_mask, index), sizes, offsets,
        T, E, num_blocks, K=K, CAP_MODE=cap_mode, NORM_AFTER=normalize_after,
        BLOCK_T=ROUTE_BLOCK_T, BLOCK_B=max(2, triton.next_power_of_2(bins)))


def static_plan_backward(grad: Tensor, gates: Tensor, slot_row: Tensor, row_mask: Tensor,
                         normalize_after: bool, out: Tensor) -> None:
    """Launch the plan's backward kernel: ``out [T, k]`` = the gates' gradient."""
    T, K = gates.shape
    _plan_backward_kernel[(triton.cdiv(T, ROUTE_BLOCK_T),)](
        grad, gates, slot_row, mask_arg(row_mask, grad), out, T, K=K,
        NORM_AFTER=normalize_after, BLOCK_T=ROUTE_BLOCK_T)

