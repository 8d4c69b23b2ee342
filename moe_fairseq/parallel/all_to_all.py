"""All-to-all of token rows with uneven splits, differentiable.

Expert parallelism moves the rows of the kept token-expert assignments to the
ranks that own their experts and the expert outputs back. Both directions are one
``all_to_all_single`` over dimension 0 with *exact* split sizes: rank ``i`` sends
``input_split_sizes[j]`` rows to rank ``j`` and receives ``output_split_sizes[j]``
rows from it, and ``input_split_sizes[j]`` on rank ``i`` equals
``output_split_sizes[i]`` on rank ``j`` (the count exchange below establishes it).
No row is padded to a capacity.

The backward of an all-to-all is the all-to-all of the incoming gradient with the
splits swapped: the gradient of each received row goes back to the rank that sent
the row, to the position it came from.

Every rank of the group must call every collective, in the same order, even when
it has nothing to send or receive (zero-row splits, a zero-row total): gloo (CPU)
and NCCL both accept empty tensors. In backward that holds as long as every rank
builds the same autograd graph shape, which the expert-parallel dispatcher
ensures (see ``parallel/dispatcher.py``).
"""

from typing import List, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def group_size(group=None) -> int:
    """World size of ``group`` (None = the default group)."""
    return dist.get_world_size(group=group)


def group_rank(group=None) -> int:
    """This process's rank within ``group`` (None = the default group)."""
    return dist.get_rank(group=group)


def _as_splits(sizes: Sequence[int], world: int, what: str) -> List[int]:
    splits = [int(s) for s in sizes]
    if len(splits) != world:
        raise ValueError(f"{what} has {len(splits)} entries for a group of {world} ranks")
    if any(s < 0 for s in splits):
        raise ValueError(f"{what} has a negative entry: {splits}")
    return splits


def _all_to_all(
    input: Tensor, output_split_sizes: List[int], input_split_sizes: List[int], group
) -> Tensor:
    """One ``all_to_all_single`` over dim 0; returns a new ``[sum(output splits), ...]``."""
    if input.size(0) != sum(input_split_sizes):
        raise ValueError(
            f"input has {input.size(0)} rows, input_split_sizes sum to {sum(input_split_sizes)}"
        )
    input = input.contiguous()
    output = input.new_empty((sum(output_split_sizes),) + tuple(input.shape[1:]))
    dist.all_to_all_single(
        output,
        input,
        output_split_sizes=output_split_sizes,
        input_split_sizes=input_split_sizes,
        group=group,
    )
    return output


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, output_split_sizes, input_split_sizes, group):
        ctx.group = group
        ctx.output_split_sizes = output_split_sizes
        ctx.input_split_sizes = input_split_sizes
        return _all_to_all(input, output_split_sizes, input_split_sizes, group)

    @staticmethod
    def backward(ctx, grad):
        # The gradient rows go back where the rows came from: splits swapped.
        grad_input = _all_to_all(grad, ctx.input_split_sizes, ctx.output_split_sizes, ctx.group)
        return grad_input, None, None, None


def all_to_all_rows(
    input: Tensor,
    output_split_sizes: Sequence[int],
    input_split_sizes: Sequence[int],
    group=None,
) -> Tensor:
    """Differentiable uneven all-to-all of the rows of ``input [N, ...]``.

    Rows ``[sum(input_split_sizes[:j]), sum(input_split_sizes[:j+1]))`` go to rank
    ``j``; the result holds, in rank order, the ``output_split_sizes[j]`` rows rank
    ``j`` sent here. Collective: every rank of ``group`` must call it, with split
    sizes that agree pairwise, whatever the row counts (zero included).
    Gradients flow back through the same all-to-all with the splits swapped.
    """
    world = group_size(group)
    out_splits = _as_splits(output_split_sizes, world, "output_split_sizes")
    in_splits = _as_splits(input_split_sizes, world, "input_split_sizes")
    return _AllToAllRows.apply(input, out_splits, in_splits, group)


def exchange_counts(counts: Tensor, group=None) -> Tensor:
    """Exchange per-expert row counts; collective, not differentiable.

    ``counts`` is ``[W * E_l]`` int64 (W ranks with E_l experts each):
    ``counts[r * E_l + e]`` = rows this rank sends to local expert ``e`` of rank
    ``r``. Returns the ``[W * E_l]`` int64 tensor whose entry ``s * E_l + e`` is the
    number of rows rank ``s`` sends to this rank's local expert ``e``. On NCCL
    both tensors live on this rank's GPU.
    """
    world = group_size(group)
    if counts.dim() != 1 or counts.numel() % world:
        raise ValueError(
            f"counts must be a flat [W * E_l] tensor, got shape {tuple(counts.shape)} "
            f"for a group of {world} ranks"
        )
    counts = counts.detach().to(torch.int64).contiguous()
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    return received

