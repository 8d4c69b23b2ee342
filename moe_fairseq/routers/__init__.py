"""Routers, interchangeable behind :class:`~moe_fairseq.routers.base.Router`.

``ROUTERS`` maps a ``--moe-router`` name to a builder ``(options, embed_dim) -> Router``.
A new routing method registers itself here and the MoE layer needs no change.
"""

from .attentive import AttentiveRouter
from .base import Router, Routing, capacity_for
from .cosine import CosineRouter
from .stratified import StratifiedRouter
from .top_k import TopKRouter


def _top_k_kwargs(options) -> dict:
    """The foundation flags every top-k router takes."""
    return dict(
        top_k=options.top_k,
        capacity_factor=options.capacity_factor,
        eval_capacity_token_fraction=options.eval_capacity_token_fraction,
        second_expert_policy=options.second_expert_policy,
        normalize_gates=options.normalize_gates,
        jitter_eps=options.jitter_eps,
        normalize_before_dropping=options.normalize_before_dropping,
        eval_second_expert_policy=options.eval_second_expert_policy,
        capacity_rule=options.capacity_rule,
        batch_prioritized=options.batch_prioritized,
    )


def _build_linear(options, embed_dim: int) -> Router:
    return TopKRouter(embed_dim, options.expert_count, **_top_k_kwargs(options))


def _build_attentive(options, embed_dim: int) -> Router:
    return AttentiveRouter(embed_dim, options.expert_count,
                           attention_dim=options.args.moe_attentive_dim, **_top_k_kwargs(options))


def _build_cosine(options, embed_dim: int) -> Router:
    args = options.args
    return CosineRouter(
        embed_dim,
        options.expert_count,
        **_top_k_kwargs(options),
        routing_dim=args.moec_routing_dim,
        clusters=args.moec_clusters,
        var_coef=args.moec_var_coef,
        var_type=args.moec_var_type,
        expert_dropout=args.moec_expert_dropout,
        dropout_interval=args.moec_dropout_interval,
        seed=getattr(args, "seed", 1) or 0,
        output_mixing=bool(getattr(args, "moec_output_mixing", False)),
    )


def _build_stratified(options, embed_dim: int) -> Router:
    args = options.args
    return StratifiedRouter(
        embed_dim,
        args.smoe_strata,
        stratum_norm=args.smoe_stratum_norm,
        **_top_k_kwargs(options),
    )


ROUTERS = {
    "linear": _build_linear,
    "attentive": _build_attentive,
    "cosine": _build_cosine,
    "stratified": _build_stratified,
}


def build_router(options, embed_dim: int) -> Router:
    return ROUTERS[options.router](options, embed_dim)


__all__ = ["Router", "Routing", "TopKRouter", "AttentiveRouter", "CosineRouter", "StratifiedRouter", "ROUTERS", "build_router", "capacity_for"]
