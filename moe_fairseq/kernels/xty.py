"""Per-expert ``X^T D`` with the bias gradient fused: the weight gradients of both FFN
matrices.

For rows grouped by expert (``offsets``)::

    out[e]  = sum over rows r of e of  X[x(r)]^T D'[r]     [K, Nout]
    bias[e] = sum over rows r of e of  D'[r]               [Nout]

where ``x(r) = slot[r] % T`` with ``x_gather`` (else r), and D'[r] is ``D[d(r)]``
(``d(r) = slot[r] % T`` with ``d_gather``) times ``act'(z[r])`` (``d_act_grad``) times
``gate[r]``, with rows whose ``row_mask`` is False zeroed by ``where`` in D' (``d_mask``)
and in X (``x_mask``), so that a non-finite dropped row cannot reach the sums.

Grid: (E, K tiles, Nout tiles); each program walks its expert's rows in chunks of
``block_k``. No atomics: each output tile has one writer, and an empty expert writes
zeros. The bias is summed by the programs of the first K tile.
"""

from typing import Optional

from torch import Tensor

import triton
import triton.language as tl

from .common import BlockConfig, act_grad, dot_precision, mask_arg, mma, upcast_dot


@triton.jit
def _grouped_xty_kernel(
    x_ptr, stride_xm, stride_xk,
    d_ptr, stride_dm, stride_dn,
    z_ptr, stride_zm, stride_zn,
    out_ptr, stride_oe, stride_ok, stride_on,
    bias_ptr, stride_be, stride_bn,
    slot_ptr, gate_ptr, mask_ptr, offs_ptr,
    num_tokens, K, NOUT,
    X_GATHER: tl.constexpr, X_MASK: tl.constexpr, D_GATHER: tl.constexpr,
    D_ACT_GRAD: tl.constexpr, D_GATE: tl.constexpr, D_MASK: tl.constexpr,
    HAS_MASK: tl.constexpr, BIAS_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    e = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    row_start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    row_end = tl.load(offs_ptr + e)
    ks = pid_k * BLOCK_M + tl.arange(0, BLOCK_M)
    k_ok = ks < K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < NOUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < row_end
        rows = rows.to(tl.int64)
        tokens = tl.load(slot_ptr + rows, mask=row_ok, other=0) % num_tokens
        if X_GATHER:
            x_rows = tokens
        else:
            x_rows = rows
        if D_GATHER:
            d_rows = tokens
        else:
            d_rows = rows
        if HAS_MASK:
            keep = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
        else:
            keep = row_ok
        x = tl.load(x_ptr + x_rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if X_MASK:
            x = tl.where(keep[:, None], x, 0.0)
        rc_ok = row_ok[:, None] & col_ok[None, :]
        d = tl.load(d_ptr + d_rows[:, None] * stride_dm + cols[None, :] * stride_dn,
                    mask=rc_ok, other=0.0).to(tl.float32)
        if D_ACT_GRAD != 0:
            z = tl.load(z_ptr + rows[:, None] * stride_zm + cols[None, :] * stride_zn,
                        mask=rc_ok, other=0.0)
            d = act_grad(d, z.to(tl.float32), D_ACT_GRAD)
        if D_GATE:
            gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            d = d * gate[:, None]
        if D_MASK:
            d = tl.where(keep[:, None], d, 0.0)
        acc = mma(tl.trans(x), d.to(x.dtype), acc, PRECISION, UPCAST)
        if BIAS_GRAD:
            bias_acc += tl.sum(d, 0)
    e = e.to(tl.int64)
    tl.store(out_ptr + e * stride_oe + ks[:, None] * stride_ok + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])
    if BIAS_GRAD:
        bias_cols = tl.where(pid_k == 0, NOUT, 0)  # only the first K tile stores it
        tl.store(bias_ptr + e * stride_be + cols * stride_bn,
                 bias_acc.to(bias_ptr.dtype.element_ty), mask=cols < bias_cols)


def grouped_xty(x: Tensor, d: Tensor, offsets: Tensor, slot: Tensor, out: Tensor, *,
                num_tokens: int, config: BlockConfig, bias: Optional[Tensor] = None,
                x_gather: bool = False, x_mask: bool = False, d_gather: bool = False,
                d_act_grad: int = 0, z: Optional[Tensor] = None, gate: Optional[Tensor] = None,
                d_mask: bool = False, row_mask: Optional[Tensor] = None) -> None:
    """Launch the kernel (see the module docstring); writes every element of ``out``
    ``[E, K, Nout]`` and ``bias`` ``[E, Nout]`` in place.

    x ``[T or N, K]``, d ``[T or N, Nout]``, offsets ``[E]`` int32 (group ends),
    slot ``[N]`` int64, z ``[N, Nout]``, gate ``[N]``, row_mask ``[N]`` bool.
    """
    E, K, NOUT = out.shape
    if E == 0 or K == 0 or NOUT == 0:
        return
    dummy = offsets
    z_ = z if z is not None else d
    b_ = bias if bias is not None else out[:, 0]
    grid = (E, triton.cdiv(K, config.block_m), triton.cdiv(NOUT, config.block_n))
    _grouped_xty_kernel[grid](
        x, x.stride(0), x.stride(1),
        d, d.stride(0), d.stride(1),
        z_, z_.stride(0), z_.stride(1),
        out, out.stride(0), out.stride(1), out.stride(2),
        b_, b_.stride(0), b_.stride(1),
        slot, gate if gate is not None else dummy, mask_arg(row_mask, dummy), offsets,
        num_tokens, K, NOUT,
        X_GATHER=x_gather, X_MASK=x_mask and row_mask is not None, D_GATHER=d_gather,
        D_ACT_GRAD=d_act_grad, D_GATE=gate is not None,
        D_MASK=d_mask and row_mask is not None, HAS_MASK=row_mask is not None,
        BIAS_GRAD=bias is not None,
        PRECISION=dot_precision(x.dtype), UPCAST=upcast_dot(x.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
