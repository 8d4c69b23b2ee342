"""``moe_transformer``: fairseq's transformer with every ``--moe-freq``-th FFN an MoE block.

Presets: ``moe_transformer_tiny`` (tests, CPU demos), ``moe_transformer_base``
(transformer-base sizes, 8 experts) and ``moe_transformer_big`` (transformer-big
sizes, 16 experts). Works with ``--task translation`` and
``--task translation_multi_simple_epoch``.
"""

import logging

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerModel
from fairseq.models.transformer.transformer_legacy import (
    base_architecture,
    transformer_wmt_en_de_big,
)

from ..parallel.expert_parallel import (
    expert_parallel_group,
    ignore_experts_in_torch_ddp,
    validate_expert_parallel,
)
from ..options import MoEOptions, add_moe_args, moe_defaults
from ..transformer_layers import MoETransformerDecoderLayer, MoETransformerEncoderLayer

logger = logging.getLogger(__name__)


@register_model("moe_transformer")
class MoETransformerModel(TransformerModel):
    """A transformer whose MoE positions hold :class:`MoETransformerEncoderLayer` /
    :class:`MoETransformerDecoderLayer`; all other layers are fairseq's own."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_moe_args(parser)

    @classmethod
    def build_model(cls, args, task):
        moe_transformer_architecture(args)  # fills flags missing from old checkpoints
        options = MoEOptions.from_args(args)
        _, _, world = expert_parallel_group()
        if world > 1:
            for count in sorted(set(options.layer_expert_counts or [options.expert_count])):
                validate_expert_parallel(args, count, world)
        model = super().build_model(args, task)
        cfg = TransformerConfig.from_namespace(args)
        enc_idx = options.moe_layer_indices(len(model.encoder.layers), options.encoder_layers)
        dec_idx = options.moe_layer_indices(len(model.decoder.layers), options.decoder_layers)
        n = len(enc_idx) + len(dec_idx)
        for ordinal, i in enumerate(enc_idx):
            model.encoder.layers[i] = MoETransformerEncoderLayer(cfg, options.for_layer(ordinal, n))
        for ordinal, i in enumerate(dec_idx, start=len(enc_idx)):
            model.decoder.layers[i] = MoETransformerDecoderLayer(
                cfg, options.for_layer(ordinal, n), no_encoder_attn=cfg.no_cross_attention
            )
        ignore_experts_in_torch_ddp(model)
        logger.info(
            f"MoE layers: encoder {[i + 1 for i in enc_idx]}, decoder "
            f"{[i + 1 for i in dec_idx]} (1-based), "
            f"{args.moe_layer_expert_counts or options.expert_count} experts, "
            f"top-{options.top_k}, router {options.router}"
            + (f", experts sharded over {world} ranks" if world > 1 else "")
        )
        return model


def moe_transformer_architecture(args, expert_count: int = 8):
    moe_defaults(args, expert_count)
    base_architecture(args)


@register_model_architecture("moe_transformer", "moe_transformer")
def moe_transformer_default(args):
    moe_transformer_architecture(args)


@register_model_architecture("moe_transformer", "moe_transformer_tiny")
def moe_transformer_tiny(args):
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    moe_transformer_architecture(args, expert_count=4)


@register_model_architecture("moe_transformer", "moe_transformer_base")
def moe_transformer_base(args):
    moe_transformer_architecture(args, expert_count=8)


@register_model_architecture("moe_transformer", "moe_transformer_big")
def moe_transformer_big(args):
    moe_defaults(args, 16)
    transformer_wmt_en_de_big(args)
