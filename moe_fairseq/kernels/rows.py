"""The row-tile grouped GEMM behind every per-row product of the MoE FFN.

For rows grouped by expert (``offsets``), row r of expert e computes::

    out[o(r)] = epilogue( A[a(r)] @ W[e] )       A rows [*, K], W [E, K, Nout]

with its loads and stores redirected through the dispatch ``slot`` of each row
(token ``slot % T``, slot ``j * T + t`` in a ``[k * T, ...]`` stack), so the gather of
tokens into rows and the scatter of rows back into slots cost no separate pass:

- ``a_gather``: ``a(r) = slot[r] % T`` (else ``r``); ``out_scatter``: ``o(r) = slot[r]``.
- ``a_act_grad`` (with ``z``): A is loaded as ``A * act'(z)``, the activation's
  backward fused into the loads (z rows indexed by r).
- ``a_mask``: rows with ``row_mask`` False load as 0 (even if not finite).
- epilogue, in order: ``+ b[e]``; store the pre-activation to ``pre``; activation;
  ``row_dot``: ``dot[r] = <acc_r, hd[r]>`` over all columns (the program then loops
  over every column tile) plus ``<A[a(r)], vb[e]>`` -- the gate gradient, stored for
  every row (0 where ``row_mask`` is False), so ``dot`` needs no zero fill; gate:
  ``gate[r] * acc`` and rows with ``row_mask`` False stored as exactly 0.

Grid: (row tiles, column tiles); row tiles are found in-kernel from ``offsets``
(see :func:`~.common.expert_tile`), so nothing is read back to the host.
"""

from typing import Optional

from torch import Tensor

import triton
import triton.language as tl

from .common import BlockConfig, act_fwd, act_grad, block_e, dot_precision, expert_tile, \
    mask_arg, mma, num_row_tiles, upcast_dot


@triton.jit
def _grouped_rows_kernel(
    a_ptr, stride_am, stride_ak,
    z_ptr, stride_zm, stride_zk,
    w_ptr, stride_we, stride_wk, stride_wn,
    b_ptr, stride_be, stride_bn,
    out_ptr, stride_om, stride_on,
    pre_ptr, stride_pm, stride_pn,
    hd_ptr, stride_hm, stride_hn,
    vb_ptr, stride_ve, stride_vk,
    dot_ptr,
    slot_ptr, gate_ptr, mask_ptr, offs_ptr,
    E, num_tokens, K, NOUT,
    A_GATHER: tl.constexpr, A_ACT_GRAD: tl.constexpr, A_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr,
    HAS_MASK: tl.constexpr, GATE: tl.constexpr, OUT_SCATTER: tl.constexpr,
    ROW_DOT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert, row_start, row_end = expert_tile(pid_m, offs_ptr, E, BLOCK_M, BLOCK_E)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    rows = rows.to(tl.int64)  # row * stride may pass 2**31
    slot = tl.load(slot_ptr + rows, mask=row_ok, other=0)
    if A_GATHER:
        a_rows = slot % num_tokens
    else:
        a_rows = rows
    if OUT_SCATTER:
        out_rows = slot
    else:
        out_rows = rows
    if HAS_MASK:
        keep = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    else:
        keep = row_ok
    if GATE:
        gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    expert = expert.to(tl.int64)
    w_base = w_ptr + expert * stride_we

    n_begin = pid_n * BLOCK_N
    if ROW_DOT:
        n_stop = NOUT  # the row dot needs every column: one program per row tile
        dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    else:
        n_stop = n_begin + BLOCK_N
    # Programs past the last tile skip all work.
    n_stop = tl.where(row_start < row_end, n_stop, n_begin)
    for n0 in range(n_begin, n_stop, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < NOUT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            ak_ok = row_ok[:, None] & k_ok[None, :]
            a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=ak_ok, other=0.0)
            if A_ACT_GRAD != 0:
                z = tl.load(z_ptr + rows[:, None] * stride_zm + ks[None, :] * stride_zk,
                            mask=ak_ok, other=0.0)
                a = act_grad(a.to(tl.float32), z.to(tl.float32), A_ACT_GRAD)
            if A_MASK:
                a = tl.where(keep[:, None], a, 0.0)
            w = tl.load(w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = mma(a.to(w.dtype), w, acc, PRECISION, UPCAST)
        if HAS_BIAS:
            b = tl.load(b_ptr + expert * stride_be + cols * stride_bn, mask=col_ok, other=0.0)
            acc += b.to(tl.float32)[None, :]
        tile_ok = row_ok[:, None] & col_ok[None, :]
        if STORE_PRE:
            tl.store(pre_ptr + rows[:, None] * stride_pm + cols[None, :] * stride_pn,
                     acc.to(pre_ptr.dtype.element_ty), mask=tile_ok)
        acc = act_fwd(acc, ACT)
        if ROW_DOT:
            hd = tl.load(hd_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hn,
                         mask=tile_ok, other=0.0)
            # A dropped row's hd may be inf / NaN: its dot is replaced below.
            dot += tl.sum(acc * hd.to(tl.float32), 1)
        if GATE:
            acc = tl.where(keep[:, None], gate[:, None] * acc, 0.0)
        tl.store(out_ptr + out_rows[:, None] * stride_om + cols[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=tile_ok)
    if ROW_DOT:
        # The bias's share of the row dot: <A[a(r)], vb[e]>.
        k_stop = tl.where(row_start < row_end, K, 0)
        for k0 in range(0, k_stop, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            v = tl.load(vb_ptr + expert * stride_ve + ks * stride_vk, mask=k_ok, other=0.0)
            dot += tl.sum(a.to(tl.float32) * v.to(tl.float32)[None, :], 1)
        # where, not a product with the mask: exact zeros for dropped rows.
        tl.store(dot_ptr + rows, tl.where(keep, dot, 0.0).to(dot_ptr.dtype.element_ty),
                 mask=row_ok)


def grouped_rows(a: Tensor, w: Tensor, offsets: Tensor, slot: Tensor, out: Tensor, *,
                 num_tokens: int, config: BlockConfig,
                 a_gather: bool = False, a_act_grad: int = 0, z: Optional[Tensor] = None,
                 a_mask: bool = False, bias: Optional[Tensor] = None, act: int = 0,
                 pre: Optional[Tensor] = None, row_mask: Optional[Tensor] = None,
                 gate: Optional[Tensor] = None, out_scatter: bool = False,
                 row_dot: Optional[tuple] = None) -> None:
    """Launch the row-tile kernel (see the module docstring); writes ``out`` (and
    ``pre``, ``row_dot``'s dot) in place.

    a ``[T or N, K]``, w ``[E, K, Nout]`` (any strides: pass a transposed view for
    ``A @ W[e]^T``), offsets ``[E]`` int32, slot ``[N]`` int64, out ``[N or k*T, Nout]``,
    z ``[N, K]``, bias ``[E, Nout]``, pre ``[N, Nout]``, row_mask ``[N]`` bool,
    gate ``[N]``, row_dot ``(hd [N, Nout], vb [E, K], dot [N])``.
    """
    num_rows = slot.numel()
    E, K, NOUT = w.shape
    if num_rows == 0 or NOUT == 0:
        return
    dummy = offsets  # stands for every pointer a constexpr switch leaves unused
    z_ = z if z is not None else a
    b_ = bias if bias is not None else dummy.view(1, -1)
    pre_ = pre if pre is not None else out
    hd, vb, dot = row_dot if row_dot is not None else (out, dummy.view(1, -1), dummy)
    grid = (num_row_tiles(num_rows, E, config.block_m),
            1 if row_dot is not None else triton.cdiv(NOUT, config.block_n))
    _grouped_rows_kernel[grid](
        a, a.stride(0), a.stride(1),
        z_, z_.stride(0), z_.stride(1),
        w, w.stride(0), w.stride(1), w.stride(2),
        b_, b_.stride(0), b_.stride(1),
        out, out.stride(0), out.stride(1),
        pre_, pre_.stride(0), pre_.stride(1),
        hd, hd.stride(0), hd.stride(1),
        vb, vb.stride(0), vb.stride(1),
        dot,
        slot, gate if gate is not None else dummy, mask_arg(row_mask, dummy), offsets,
        E, num_tokens, K, NOUT,
        A_GATHER=a_gather, A_ACT_GRAD=a_act_grad, A_MASK=a_mask and row_mask is not None,
        HAS_BIAS=bias is not None, ACT=act, STORE_PRE=pre is not None,
        HAS_MASK=row_mask is not None, GATE=gate is not None, OUT_SCATTER=out_scatter,
        ROW_DOT=row_dot is not None,
        PRECISION=dot_precision(w.dtype), UPCAST=upcast_dot(w.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_E=block_e(E), num_warps=config.num_warps, num_stages=config.num_stages,
    )
