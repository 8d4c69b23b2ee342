"""The MoE feed-forward block: router -> dispatcher -> expert bank -> combine.

The layer knows nothing about the routing method: it asks its router for one
:class:`~moe_fairseq.routers.base.Routing` per pass, lets the dispatcher group the
kept assignments by expert, runs the expert bank once per pass and adds the gated
outputs back. After each forward, :attr:`MoELayer.stats` holds the routing losses
(differentiable, for the criterion) and detached statistics (for logging).
"""

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .dispatcher import SortDispatcher, gather_rows, scatter_rows
from .expert_bank import ExpertBank
from .expert_parallel import expert_parallel_group, scale_expert_grads
from .expert_parallel_dispatcher import AllToAllDispatcher, build_local_expert_bank
from .routers import Router, build_router
from .routers.base import entropy_of


@dataclass
class MoEStats:
    """What one forward of one MoE layer reports. Counts are 0-dim tensors.

    - ``losses``: mean over passes of each routing loss (differentiable);
    - ``tokens``: routed (non-padding) tokens;
    - ``assignments`` / ``dropped``: token-expert assignments requested / dropped
      for capacity, summed over passes;
    - ``expert_load``: ``[E]`` assignments requested per expert;
    - ``entropy_sum``: sum over routed tokens (and passes) of the routing entropy
      in nats, with ``entropy_count`` the number of terms;
    - ``expert_passes``: token-pass count (= tokens for single-pass routers).
    """

    losses: Dict[str, Tensor] = field(default_factory=dict)
    tokens: Optional[Tensor] = None
    assignments: Optional[Tensor] = None
    dropped: Optional[Tensor] = None
    expert_load: Optional[Tensor] = None
    entropy_sum: Optional[Tensor] = None
    entropy_count: Optional[Tensor] = None
    expert_passes: Optional[Tensor] = None

    @property
    def starved_fraction(self) -> Tensor:
        """Share of experts given < 10% of their fair share of assignments (MoEC's
        "sparse data allocation")."""
        load = self.expert_load.float()
        return (load < 0.1 * load.mean()).float().mean()

    @property
    def load_cv(self) -> Tensor:
        """Coefficient of variation (std / mean, population std) of ``expert_load``."""
        load = self.expert_load.float()
        mean = load.mean()
        return torch.where(mean > 0, load.std(unbiased=False) / mean.clamp_min(1e-9), mean * 0)


class MoELayer(nn.Module):
    """A sparse MoE FFN block.

    Args:
        router: any :class:`Router`.
        experts: the :class:`ExpertBank` of the experts this process runs (all
            ``router.num_experts`` of them unless the dispatcher shards experts).
        dispatcher: default :class:`SortDispatcher` (every expert local).
    """

    def __init__(self, router: Router, experts: ExpertBank, dispatcher=None):
        super().__init__()
        dispatcher = dispatcher or SortDispatcher(router.num_experts)
        if dispatcher.num_experts != router.num_experts:
            raise ValueError(
                f"router has {router.num_experts} experts, dispatcher {dispatcher.num_experts}"
            )
        if dispatcher.num_local_experts != experts.num_experts:
            raise ValueError(
                f"dispatcher sends to {dispatcher.num_local_experts} local experts, "
                f"expert bank has {experts.num_experts}"
            )
        self.router = router
        self.experts = experts
        self.dispatcher = dispatcher
        self.stats: Optional[MoEStats] = None
        # Running count of assignments per expert, for analysis tools
        # (reset with reset_expert_load); not saved in checkpoints.
        self.register_buffer(
            "expert_load_total", torch.zeros(router.num_experts, dtype=torch.long), persistent=False
        )

    @property
    def num_experts(self) -> int:
        """Experts the router chooses from (all ranks together)."""
        return self.router.num_experts

    def reset_expert_load(self) -> None:
        self.expert_load_total.zero_()

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """x ``[..., d]``, padding_mask ``[...]`` (True = padding) -> ``[..., d]``.

        Padding positions are not routed: they use no capacity, do not enter the
        routing losses and get a zero output.
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if padding_mask is not None:
            token_pos = (~padding_mask.reshape(-1).to(torch.bool)).nonzero().squeeze(1)
            out = self._route_and_compute(gather_rows(flat, token_pos))
            out = scatter_rows(out, token_pos, flat.size(0))
        else:
            out = self._route_and_compute(flat)
        return out.reshape(shape)

    def _route_and_compute(self, tokens: Tensor) -> Tensor:
        """tokens ``[T, d]`` -> sum over passes of the gated expert outputs ``[T, d]``."""
        E = self.num_experts
        device = tokens.device
        zero = torch.zeros((), dtype=torch.long, device=device)
        stats = MoEStats(
            tokens=zero + tokens.size(0),
            assignments=zero.clone(),
            dropped=zero.clone(),
            expert_load=torch.zeros(E, dtype=torch.long, device=device),
            entropy_sum=torch.zeros((), dtype=torch.float32, device=device),
            entropy_count=zero.clone(),
            expert_passes=zero.clone(),
        )
        total: Optional[Tensor] = None
        active_pos = None  # rows of `tokens` still routed; None = all
        h = tokens
        losses: Dict[str, list] = {}
        for pass_index in range(self.router.num_passes):
            routing = self.router(h, pass_index)
            plan = self.dispatcher.plan(routing)
            rows, local_sizes = self.dispatcher.dispatch(h, plan)
            rows = self.experts(rows, local_sizes)
            y = self.dispatcher.combine(rows, plan)  # [T_active, d]

            for name, value in routing.losses.items():
                losses.setdefault(name, []).append(value)
            stats.assignments += plan.requested.sum()
            stats.dropped += plan.requested.sum() - plan.group_sizes.sum()
            stats.expert_load += plan.requested
            stats.expert_passes += h.size(0)
            if routing.probs is not None and routing.probs.size(0) > 0:
                stats.entropy_sum += entropy_of(routing.probs) * routing.probs.size(0)
                stats.entropy_count += routing.probs.size(0)

            y_all = y if active_pos is None else scatter_rows(y, active_pos, tokens.size(0))
            total = y_all if total is None else total + y_all
            if routing.continue_mask is None:
                break
            # Multi-pass routers: survivors continue from their running sum.
            keep = routing.continue_mask.nonzero().squeeze(1)
            h = gather_rows(h + y, keep)
            active_pos = keep if active_pos is None else active_pos.index_select(0, keep)

        stats.losses = {name: torch.stack(v).mean() for name, v in losses.items()}
        self.expert_load_total += stats.expert_load.detach()
        self.stats = stats
        return total


def build_moe_layer(
    options,
    embed_dim: int,
    ffn_dim: int,
    activation_fn: str,
    activation_dropout: float,
) -> MoELayer:
    """Build the MoE block of one transformer layer from parsed :class:`MoEOptions`.

    Under distributed training the experts are sharded over the data-parallel
    ranks (see ``expert_parallel.py``); otherwise every expert is local.
    """
    router = build_router(options, embed_dim)
    ffn_dim = options.expert_ffn_dim or ffn_dim
    group, rank, world = expert_parallel_group()
    if world == 1:
        experts = ExpertBank(options.expert_count, embed_dim, ffn_dim,
                             activation_fn=activation_fn, activation_dropout=activation_dropout)
        return MoELayer(router, experts)
    experts = build_local_expert_bank(options.expert_count, embed_dim, ffn_dim, rank, world,
                                      activation_fn=activation_fn,
                                      activation_dropout=activation_dropout)
    scale_expert_grads(experts.parameters(), world)
    return MoELayer(router, experts, AllToAllDispatcher(options.expert_count, group))
