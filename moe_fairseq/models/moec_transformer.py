"""MoEC presets (arXiv 2207.09094) on the ``moe_transformer`` model: the cosine router
with expert clusters, the within-cluster variance loss, cluster-level expert dropout,
output mixing and experts of stacked sublayers, as in the authors' WMT recipe
(xy980523/MoEc_model README: 64 experts, 8 clusters, ``--exp-level-drop 0.5``,
``--dropout-interval 250``, ``--var-coef 1.0 --coef-type 1``, ``--capacity-factor 2``,
top-1, ``--moe-sublayers 3``, MoE only in 0-based layer 3 of encoder and decoder,
``--moe-gate-loss-wt 0.01 --moe-gate-loss-combine-method sum``, post-norm).

| preset | experts | clusters | expert dropout | MoE layers | expert sublayers | sizes |
| --- | --- | --- | --- | --- | --- | --- |
| ``moec_transformer_tiny`` | 4 | 2 | 0 (one kept expert per cluster would leave no choice) | 2 (``--moe-freq 2``) | 3 | ``moe_transformer_tiny`` |
| ``moec_transformer_base`` | 8 | 2 | 0.5 (2 of 4 kept per cluster) | 4 (``--moe-freq 4``) | 3 | ``moe_transformer_base`` |
| ``moec_transformer_big`` | 16 | 4 | 0.5 (2 of 4 kept per cluster) | 4 (``--moe-freq 4``) | 3 | ``moe_transformer_big`` |

Common to all: ``--moe-router cosine``, ``--moe-top-k 1``, ``--moe-capacity-factor 2``
with ``--moe-capacity-rule tokens`` (int(2 T) per expert), ``--moec-var-coef 1``,
``--moec-var-type cluster``, ``--moec-dropout-interval 250``, ``--moec-routing-dim 32``,
``--moec-output-mixing``, ``--no-moe-output-dropout`` (their layer adds the MoE output
to the residual without dropout) and, for the criterion, ``--moe-gate-loss-combine-method sum``
(its default ``--moe-gate-loss-wt`` is the authors' 0.01). Every one of them can be
overridden on the command line: a named flag changes that setting only, on top of the
preset's others (``tests/test_presets_on_command_line.py``).
"""

from fairseq.models import register_model_architecture

from ..args_version import apply_args_version, set_defaults
from .moe_transformer import moe_transformer_base, moe_transformer_big, moe_transformer_tiny


def _moec_defaults(args, clusters: int, expert_dropout: float, moe_freq: int = 2) -> None:
    apply_args_version(args)
    set_defaults(
        args,
        # base/big: every 4th FFN, i.e. layer 4 only of the 6-layer stacks (the authors'
        # 0-based --encoder-moe-layers 3 --decoder-moe-layers 3). A placement by a flag,
        # not by layer lists, so that naming --moe-freq simply places MoE layers anew.
        moe_freq=moe_freq,
        moe_router="cosine",
        moe_top_k=1,
        moe_capacity_factor=2.0,
        moe_capacity_rule="tokens",
        moec_routing_dim=32,
        moec_clusters=clusters,
        moec_var_coef=1.0,
        moec_var_type="cluster",
        moec_expert_dropout=expert_dropout,
        moec_dropout_interval=250,
        moec_output_mixing=True,
        moec_expert_sublayers=3,
        moe_output_dropout=False,
        # read by the criterion (moe_label_smoothed_cross_entropy)
        moe_gate_loss_combine_method="sum",
    )


@register_model_architecture("moe_transformer", "moec_transformer_tiny")
def moec_transformer_tiny(args):
    _moec_defaults(args, clusters=2, expert_dropout=0.0)
    moe_transformer_tiny(args)


@register_model_architecture("moe_transformer", "moec_transformer_base")
def moec_transformer_base(args):
    _moec_defaults(args, clusters=2, expert_dropout=0.5, moe_freq=4)
    moe_transformer_base(args)


@register_model_architecture("moe_transformer", "moec_transformer_big")
def moec_transformer_big(args):
    _moec_defaults(args, clusters=4, expert_dropout=0.5, moe_freq=4)
    moe_transformer_big(args)
