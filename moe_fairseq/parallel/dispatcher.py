"""Expert-parallel dispatch: experts sharded over W ranks, rows moved by all-to-all.

Rank ``r`` of the expert-parallel group owns the ``E_l = E / W`` experts
``[r * E_l, (r + 1) * E_l)`` (:func:`build_local_expert_bank` builds its bank).
Every rank routes its own tokens over all E experts; one MoE pass then goes:

1. **plan** (:meth:`AllToAllDispatcher.plan`): the :class:`SortDispatcher` plan of
   this rank's tokens (kept assignments sorted by *global* expert, which also
   groups them by destination rank, capacity applied per rank), then an exchange
   of the per-expert row counts, from which every rank knows how many rows it
   sends to and receives from each rank, per local expert.
2. **dispatch**: gather the kept assignments' rows, all-to-all them with exactly
   those split sizes (no padding to capacity: only kept assignments travel),
   and permute the received rows, which arrive ordered by (source rank, local
   expert), into local-expert order for the expert bank.
3. the layer runs the local expert bank.
4. **combine**: undo the permutation, all-to-all the outputs back with the splits
   swapped, and sum ``gate * output`` into each token exactly as
   :class:`SortDispatcher` does.

Gathers and un-gathers use :func:`gather_rows` / :func:`scatter_rows`, whose
backward is a copy (no ``index_add``); the all-to-alls are differentiable
(:mod:`moe_fairseq.parallel.all_to_all`). Everything ``combine`` needs lives on the
:class:`ExpertParallelPlan` that ``plan`` returns.

Collectives and deadlocks: ``plan``, ``dispatch`` and ``combine`` are collective
(every rank of the group must call them, once per routing pass, even with zero
tokens), and so are the backward passes of ``dispatch`` and ``combine``. For the
backward to run on every rank, the autograd graph must reach both all-to-alls on
every rank, whatever the local data; two guards see to it:

- with gradients enabled, the rows sent always require grad (a rank whose input
  does not would otherwise skip the return all-to-all of the dispatch gradient);
- when a rank receives no rows, its expert bank's (empty) output does not depend
  on its (empty) input, so ``combine`` adds the two to keep the dispatch
  all-to-all in the graph.
"""

import copy
from dataclasses import dataclass, fields
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .all_to_all import all_to_all_rows, exchange_counts, group_rank, group_size
from ..layer.dispatcher import DispatchPlan, SortDispatcher, gather_rows, scatter_rows
from ..layer.expert_bank import ExpertBank
from ..options import MoEConfigError
from ..routers.base import Routing



def _check_divisible(num_experts: int, world: int) -> int:
    if world < 1 or num_experts % world:
        raise MoEConfigError(
            f"--moe-expert-count {num_experts} must be divisible by the number of "
            f"expert-parallel ranks {world}"
        )
    return num_experts // world


# kw_only: its fields follow DispatchPlan's defaulted ones.
@dataclass(kw_only=True)
class ExpertParallelPlan(DispatchPlan):
    """A :class:`DispatchPlan` of this rank's tokens plus where their rows travel.

    The inherited fields describe this rank's tokens and their kept assignments
    over the E global experts (``group_sizes``/``requested`` are ``[E]``), exactly
    as :class:`SortDispatcher` plans them. W = ranks, E_l = experts per rank,
    N = rows this rank sends (its kept assignments), M = rows it receives.
    """

    rank: int  # this rank in the expert-parallel group
    send_splits: List[int]  # [W] rows sent to each rank (to rank r: experts of rank r)
    recv_splits: List[int]  # [W] rows received from each rank
    recv_counts: Tensor  # [W, E_l] int64, rows from rank s for local expert e
    local_group_sizes: Tensor  # [E_l] int64, rows per local expert (all sources)
    # [M] int64: row i of the local-expert-ordered block is received row permutation[i];
    # received rows are ordered by (source rank, local expert).
    permutation: Tensor
    # The local-expert-ordered rows dispatch handed to the experts (set by dispatch).
    expert_input: Optional[Tensor] = None

    @property
    def rows_sent(self) -> int:
        """Rows this rank puts into the dispatch all-to-all (= its kept assignments)."""
        return sum(self.send_splits)

    @property
    def rows_sent_to_peers(self) -> int:
        """Rows that leave this rank (kept assignments to other ranks' experts)."""
        return self.rows_sent - self.send_splits[self.rank]

    @property
    def rows_received(self) -> int:
        """Rows this rank's experts process (all ranks' assignments to them)."""
        return sum(self.recv_splits)


def source_to_expert_order(recv_counts: Tensor, num_rows: Optional[int] = None) -> Tensor:
    """Permutation from (source rank, local expert) order to (local expert, source rank).

    ``recv_counts [W, E_l]``: rows received from rank s for local expert e, stored
    in the received block ordered by s, then e. Returns ``perm [M]`` such that
    ``received[perm]`` lists expert 0's rows (from rank 0, then 1, ...), then
    expert 1's, and so on; each (s, e) block keeps its order.
    """
    W, E_l = recv_counts.shape
    flat = recv_counts.reshape(-1)
    if num_rows is None:
        num_rows = int(flat.sum())
    starts = (torch.cumsum(flat, 0) - flat).view(W, E_l)  # block (s, e) in received order
    sizes = recv_counts.t().reshape(-1)  # blocks in (e, s) order
    block_start = torch.repeat_interleave(starts.t().reshape(-1), sizes, output_size=num_rows)
    out_start = torch.cumsum(sizes, 0) - sizes
    offset = torch.arange(num_rows, device=recv_counts.device) - torch.repeat_interleave(
        out_start, sizes, output_size=num_rows
    )
    return block_start + offset


class AllToAllDispatcher:
    """Dispatcher for experts sharded over the ranks of ``group``.

    Same interface as :class:`SortDispatcher`: ``num_experts`` is the global E the
    router picks from, ``num_local_experts`` = E / W is what this rank's expert
    bank holds (experts ``[rank * E_l, (rank + 1) * E_l)``). ``group`` is a
    ``torch.distributed`` process group (None = the default group) on gloo or NCCL.
    """

    # plan/dispatch/combine are collectives: every rank must run every routing
    # pass of a multi-pass router, even one without local tokens.
    collective = True

    def __init__(self, num_experts: int, group=None):
        self.group = group
        self.world_size = group_size(group)
        self.rank = group_rank(group)
        self.num_experts = num_experts
        self.num_local_experts = _check_divisible(num_experts, self.world_size)
        # compact: only kept rows travel (the splits are read on the host anyway).
        self._sort = SortDispatcher(num_experts, layout="compact")

    def __deepcopy__(self, memo):
        # A process group is a handle to the ranks, not state: a copy of the model
        # (fairseq's --store-ema) talks to the same ranks through the same group.
        clone = copy.copy(self)
        memo[id(self)] = clone
        clone._sort = copy.deepcopy(self._sort, memo)
        return clone

    def plan(self, routing: Routing) -> ExpertParallelPlan:
        """This rank's sort plan, then the count exchange (collective)."""
        base = self._sort.plan(routing)
        W, E_l = self.world_size, self.num_local_experts
        # group_sizes [E] = kept rows per global expert, i.e. [W, E_l] by destination.
        recv_counts = exchange_counts(base.group_sizes, self.group).view(W, E_l)
        send_splits = base.group_sizes.view(W, E_l).sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        permutation = source_to_expert_order(recv_counts, sum(recv_splits))
        return ExpertParallelPlan(
            **{f.name: getattr(base, f.name) for f in fields(DispatchPlan)},
            rank=self.rank,
            send_splits=send_splits,
            recv_splits=recv_splits,
            recv_counts=recv_counts,
            local_group_sizes=recv_counts.sum(0),
            permutation=permutation,
        )

    def dispatch(self, x: Tensor, plan: ExpertParallelPlan) -> Tuple[Tensor, Tensor]:
        """x ``[T, d]`` -> (rows ``[M, d]`` for this rank's experts grouped by local
        expert, rows per local expert ``[E_l]``). Collective."""
        send = gather_rows(x, plan.assignment_index, plan.num_slots)  # [N, d] by global expert
        if torch.is_grad_enabled() and not send.requires_grad:
            # Keep the backward symmetric over ranks (module docstring).
            send = send.detach().requires_grad_()
        received = all_to_all_rows(send, plan.recv_splits, plan.send_splits, self.group)
        rows = gather_rows(received, plan.permutation)
        plan.expert_input = rows
        return rows, plan.local_group_sizes

    def combine(self, rows: Tensor, plan: ExpertParallelPlan) -> Tensor:
        """Expert outputs ``[M, d]`` (local-expert order) -> ``[T, d]``: for each of
        this rank's tokens, the sum of gate * output over its kept assignments.
        Collective."""
        expert_input = plan.expert_input
        if rows.size(0) == 0 and expert_input is not None and expert_input.requires_grad:
            # Both are [0, d]: ties the empty output to the dispatch all-to-all so
            # its backward runs here too (module docstring).
            rows = rows + expert_input.to(rows.dtype)
        by_source = scatter_rows(rows, plan.permutation, plan.rows_received)
        returned = all_to_all_rows(by_source, plan.send_splits, plan.recv_splits, self.group)
        weighted = returned * plan.row_gates.to(returned.dtype).unsqueeze(1)
        return scatter_rows(weighted, plan.assignment_index, plan.num_tokens, plan.num_slots)


def build_local_expert_bank(
    num_experts: int,
    embed_dim: int,
    ffn_dim: int,
    rank: int,
    world_size: int,
    activation_fn: str = "relu",
    activation_dropout: float = 0.0,
    sublayers: int = 1,
) -> ExpertBank:
    """This rank's bank of ``num_experts / world_size`` experts.

    Builds the full ``ExpertBank(num_experts, ...)`` under the current RNG state
    (drawing exactly the random numbers a single process would) and keeps this
    rank's slice (:meth:`ExpertBank.keep_shard`), so a W-rank and a 1-rank run with the
    same seed start from identical experts and leave the RNG in the same state.
    The full bank exists only during the call.
    """
    _check_divisible(num_experts, world_size)
    bank = ExpertBank(
        num_experts,
        embed_dim,
        ffn_dim,
        activation_fn=activation_fn,
        activation_dropout=activation_dropout,
        sublayers=sublayers,
    )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a group of {world_size} ranks")
    return bank.keep_shard(rank, world_size)
