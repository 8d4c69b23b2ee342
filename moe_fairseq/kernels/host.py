"""Host-side plumbing of the MoE kernels that needs no Triton: tile settings, argument
checks, activation codes and the slot stacks rows are scattered into.

The custom ops (:mod:`.ops`) and their meta implementations use these, so that
registering the ops, checking their arguments and running them on ``meta`` tensors
(shapes only: :mod:`moe_fairseq.layer.op_budget`) never imports Triton.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Activation codes of the kernels' ACT / *_ACT_GRAD constexprs. "gelu" is the exact
# (erf) GELU of torch.nn.functional.gelu and fairseq's "gelu".
ACTIVATIONS = {"linear": 0, "relu": 1, "gelu": 2}

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tokens per program of the routing kernels (kernels/route.py); the plan kernel reads
# the routing kernel's per-block counts, so both use it.
ROUTE_BLOCK_T = 64


def route_blocks(num_tokens: int) -> int:
    """Programs (token blocks) of the routing and plan kernels for ``num_tokens``."""
    return -(-num_tokens // ROUTE_BLOCK_T)


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch settings.

    Row-tile kernels (forward GEMMs, dX, dH): ``block_m`` rows x ``block_n`` output
    columns, reducing over ``block_k``. Weight-gradient kernel (X^T D per expert):
    ``block_m`` x ``block_n`` tiles of the ``[K, N]`` gradient, reducing over rows in
    chunks of ``block_k``. Every block must be a power of two >= 16 (``tl.dot``).
    ``num_warps`` / ``num_stages`` only matter when compiled (ignored by the interpreter).
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"BlockConfig.{name} must be a power of two >= 16, got {v}")


DEFAULT_CONFIG = BlockConfig()


def activation_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return ACTIVATIONS[activation]


def check_same_device(device: torch.device, **tensors: Tensor) -> None:
    # A compiled kernel handed a CPU pointer faults instead of raising: check first.
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the rows on {device}")


def check_routing_args(offsets: Tensor, slot: Tensor, num_rows: int, num_experts: int,
                       device: torch.device, row_mask: Optional[Tensor] = None,
                       gates: Optional[Tensor] = None) -> None:
    if offsets.dtype != torch.int32 or offsets.shape != (num_experts,):
        raise ValueError(f"offsets must be int32 [{num_experts}], got {offsets.dtype} "
                         f"{tuple(offsets.shape)}")
    if slot.dtype != torch.int64 or slot.shape != (num_rows,):
        raise ValueError(f"slot must be int64 [{num_rows}], got {slot.dtype} "
                         f"{tuple(slot.shape)}")
    named = dict(offsets=offsets, slot=slot, row_mask=row_mask, gates=gates)
    check_same_device(device, **{name: t for name, t in named.items() if t is not None})
    if row_mask is not None and (row_mask.dtype != torch.bool or row_mask.shape != (num_rows,)):
        raise ValueError(f"row_mask must be bool [{num_rows}], got {row_mask.dtype} "
                         f"{tuple(row_mask.shape)}")
    if gates is not None and gates.shape != (num_rows,):
        raise ValueError(f"gates must be [{num_rows}], got {tuple(gates.shape)}")


def slot_buffer(like: Tensor, num_slots: int, num_tokens: int, num_rows: int,
                width: int) -> Tensor:
    """``[k * T, width]`` stack of slots rows are stored into. When the rows fill every
    slot (``num_rows == k * T``: the static layout) each is written, no zero fill needed."""
    if num_rows == num_slots * num_tokens:
        return like.new_empty(num_slots * num_tokens, width)
    return like.new_zeros(num_slots * num_tokens, width)


def sum_slots(stack: Tensor, num_slots: int, num_tokens: int) -> Tensor:
    """``[k * T, w]`` -> ``[T, w]``: token t's sum over its k slots ``j * T + t``."""
    if num_slots == 1:
        return stack
    return stack.view(num_slots, num_tokens, stack.size(1)).sum(0)
