"""Triton plumbing shared by the MoE kernels: launch settings and the in-kernel helpers
(row-tile lookup, activations). What needs no Triton lives in :mod:`.host`.

Importing this module imports Triton, and ``@triton.jit`` decides *here*, once, whether
the kernels are compiled for the GPU or run by Triton's interpreter: set
``TRITON_INTERPRET=1`` before the first import of ``moe_fairseq.kernels.*`` to run
them on CPU tensors.
"""

from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

# Re-exported: the kernels' modules and tests import them from here.
from .host import (ACTIVATIONS, DEFAULT_CONFIG, SUPPORTED_DTYPES, BlockConfig,  # noqa: F401
                   activation_code, check_routing_args, check_same_device, slot_buffer,
                   sum_slots)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 operands follow torch's matmul TF32 switch
    (off by default), so a kernel matches torch's fp32 matmul unless TF32 is allowed."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # the default; ignored for 16-bit operands


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` gets fp32 copies of its operands: Triton's interpreter
    multiplies bf16 blocks as raw bits (garbage, seen in 3.9), so there bf16 goes
    through fp32 (exact products, fp32 sums: what the bf16 MMA does). Compiled: never."""
    return dtype == torch.bfloat16 and INTERPRETED


def block_e(num_experts: int) -> int:
    """Width of the in-kernel vector over experts (a power of two)."""
    return max(2, triton.next_power_of_2(num_experts))


def num_row_tiles(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound of sum_e ceil(n_e / block_m) over groups summing to num_rows: a grid
    sized from shapes alone, so launching never reads group sizes back to the host.
    Programs past the real tiles find an empty row range and do nothing."""
    return (num_rows + num_experts * (block_m - 1)) // block_m


def mask_arg(row_mask: Optional[Tensor], dummy: Tensor) -> Tensor:
    # Triton pointers to torch.bool are awkward across versions; bytes load everywhere.
    return dummy if row_mask is None else row_mask.view(torch.uint8)


# ----------------------------------------------------------------- in-kernel helpers


@triton.jit
def expert_tile(pid, offs_ptr, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Row tile ``pid`` of rows grouped by expert (``offs [E]`` cumulative group ends)
    -> (expert, first row, end row of the expert). Tiles never straddle two experts;
    a pid past the last tile gets an empty range (first row >= end row).

    Computed from the offsets in every program (E is small): no host-side schedule."""
    e = tl.arange(0, BLOCK_E)
    real = e < E
    ends = tl.load(offs_ptr + e, mask=real, other=0)
    starts = tl.load(offs_ptr + e - 1, mask=real & (e > 0), other=0)
    tiles = tl.where(real, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tile_ends = tl.cumsum(tiles, 0)
    # Empty experts have no tile, so they never match.
    expert = tl.sum((tile_ends <= pid).to(tl.int32), 0)
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, tile_ends - tiles, 0), 0)
    row_start = tl.sum(tl.where(mine, starts, 0), 0) + (pid - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(mine, ends, 0), 0)
    # A valid index for pointer arithmetic even past the last tile.
    return tl.minimum(expert, E - 1), row_start, row_end


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; ``UPCAST``: see :func:`upcast_dot`."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


# Whether @triton.jit built interpreter functions (TRITON_INTERPRET set at import).
INTERPRETED = type(expert_tile).__name__ == "InterpretedFunction"


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    """Activation of fp32 ``z``: 0 identity, 1 relu, 2 exact gelu."""
    out = z
    if ACT == 1:
        out = tl.maximum(z, 0.0)
    if ACT == 2:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    return out


@triton.jit
def act_grad(g, z, ACT: tl.constexpr):
    """``g * act'(z)`` for fp32 ``g``. relu takes the activation's output or input as
    ``z`` (same sign test); gelu needs the input. ``where`` for relu, so that a 0
    gradient stays 0 even where ``z`` is not finite."""
    out = g
    if ACT == 1:
        out = tl.where(z > 0, g, 0.0)
    if ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        out = g * (cdf + z * pdf)
    return out
