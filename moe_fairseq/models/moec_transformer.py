"""MoEC presets (arXiv 2207.09094) on the ``moe_transformer`` model: the cosine router
with expert clusters, the within-cluster variance loss and cluster-level expert dropout.

| preset | experts | clusters | expert dropout | sizes |
| --- | --- | --- | --- | --- |
| ``moec_transformer_tiny`` | 4 | 2 | 0 (one kept expert per cluster would leave no choice) | ``moe_transformer_tiny`` |
| ``moec_transformer_base`` | 8 | 2 | 0.5 (2 of 4 kept per cluster) | ``moe_transformer_base`` |
| ``moec_transformer_big`` | 16 | 4 | 0.5 (2 of 4 kept per cluster) | ``moe_transformer_big`` |

Common to all, from the authors' WMT recipe (64 experts, 8 clusters, dropout 0.5,
dropout interval 250, var coef 1.0, capacity factor 2, top-1): ``--moe-router cosine``,
``--moe-top-k 1``, ``--moe-capacity-factor 2``, ``--moec-var-coef 1``,
``--moec-var-type cluster``, ``--moec-dropout-interval 250``, ``--moec-routing-dim 32``.
Every one of them can be overridden on the command line. The authors' gate loss
weight (0.01) is the criterion's default ``--moe-gate-loss-wt`` already.
"""

from fairseq.models import register_model_architecture

from ..options import set_defaults
from .moe_transformer import moe_transformer_base, moe_transformer_big, moe_transformer_tiny


def _moec_defaults(args, clusters: int, expert_dropout: float) -> None:
    set_defaults(
        args,
        moe_router="cosine",
        moe_top_k=1,
        moe_capacity_factor=2.0,
        moec_routing_dim=32,
        moec_clusters=clusters,
        moec_var_coef=1.0,
        moec_var_type="cluster",
        moec_expert_dropout=expert_dropout,
        moec_dropout_interval=250,
    )


@register_model_architecture("moe_transformer", "moec_transformer_tiny")
def moec_transformer_tiny(args):
    _moec_defaults(args, clusters=2, expert_dropout=0.0)
    moe_transformer_tiny(args)


@register_model_architecture("moe_transformer", "moec_transformer_base")
def moec_transformer_base(args):
    _moec_defaults(args, clusters=2, expert_dropout=0.5)
    moe_transformer_base(args)


@register_model_architecture("moe_transformer", "moec_transformer_big")
def moec_transformer_big(args):
    _moec_defaults(args, clusters=4, expert_dropout=0.5)
    moe_transformer_big(args)
