"""Routers, interchangeable behind :class:`~moe_fairseq.routers.base.Router`.

``ROUTERS`` maps a ``--moe-router`` name to a builder ``(options, embed_dim) -> Router``.
A new routing method registers itself here and the MoE layer needs no change.
"""

from .base import Router, Routing, capacity_for
from .top_k import TopKRouter


def _build_linear(options, embed_dim: int) -> Router:
    return TopKRouter(
        embed_dim,
        options.expert_count,
        top_k=options.top_k,
        capacity_factor=options.capacity_factor,
        eval_capacity_token_fraction=options.eval_capacity_token_fraction,
        second_expert_policy=options.second_expert_policy,
        normalize_gates=options.normalize_gates,
        jitter_eps=options.jitter_eps,
    )


ROUTERS = {
    "linear": _build_linear,
}


def build_router(options, embed_dim: int) -> Router:
    return ROUTERS[options.router](options, embed_dim)


__all__ = ["Router", "Routing", "TopKRouter", "ROUTERS", "build_router", "capacity_for"]
