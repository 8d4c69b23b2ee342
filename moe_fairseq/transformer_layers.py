"""Transformer encoder and decoder layers whose FFN is an MoE block.

They subclass fairseq's layers, so attention, layer norms and dropout (and
their checkpoint names) are fairseq's own; the dense ``fc1``/``fc2`` are replaced by
``self.moe`` (with ``--moe-cmr`` they stay, as the shared dense FFN that the CMR gate
``self.cmr_gate`` mixes with the MoE layer). The forwards are written out because
fairseq's inline the dense FFN and do not hand the padding mask to it; the MoE block
needs the mask so that padding takes no expert capacity and stays out of the routing
losses.
"""

from typing import Dict, List, Optional

import torch
from torch import Tensor

from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)

from .layer.cmr_gate import CMRGate
from .layer.moe_layer import build_moe_layer


def _seq_major(mask: Optional[Tensor]) -> Optional[Tensor]:
    """fairseq's ``[batch, seq]`` padding mask -> ``[seq, batch]`` like the hidden states."""
    return None if mask is None else mask.transpose(0, 1)


def _stats_to_seq_major(stats) -> None:
    """Per-position statistics of a layer that routed ``[batch, seq]`` -> ``[seq, batch]``."""
    for name in ("token_passes", "first_expert", "first_probs"):
        values = getattr(stats, name)
        if values is not None:
            setattr(stats, name, values.transpose(0, 1))


class _MoEBlock:
    """The FFN half of a layer: (pre-norm) -> MoE -> dropout -> residual (-> post-norm).

    ``moe_output_dropout`` (``--moe-output-dropout``) False leaves out the dropout.
    ``moe_token_order`` (``--moe-token-order``): ``batch-major`` hands the MoE layer
    ``[batch, seq, d]`` tokens, as fairseq's MoE branch and the authors' codes do, so
    that when capacity binds the first sentences of the batch keep their tokens;
    ``seq-major`` routes fairseq's ``[seq, batch, d]`` as it is.
    ``cmr_gate`` (``--moe-cmr``): the block's FFN output is ``(1 - g) FFN(x) + g MoE(x)``
    (each dropped out, as fairseq's CMR layer), before the residual.
    """

    moe_output_dropout: bool = True
    moe_token_order: str = "batch-major"

    def _build_moe(self, moe_options, ffn_dim: int, activation_fn: str) -> None:
        """``self.moe`` (and with ``--moe-cmr`` the gate, keeping fairseq's fc1/fc2 as the
        shared dense FFN) in place of the dense FFN."""
        self.moe = build_moe_layer(
            moe_options,
            self.embed_dim,
            ffn_dim,
            activation_fn,
            float(self.activation_dropout_module.p),
        )
        # A module attribute, not a class default: nn.Module keeps submodules out of
        # __dict__, so a class attribute would hide the gate.
        if moe_options.cmr:
            self.cmr_gate = CMRGate(self.embed_dim, moe_options.cmr_gate_drop)
        else:
            del self.fc1, self.fc2
            self.cmr_gate = None
        self.moe_output_dropout = moe_options.output_dropout
        self.moe_token_order = moe_options.token_order
        self._drop_unused_final_norm()

    def _moe_block(self, x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """x ``[seq, batch, d]``, padding_mask ``[batch, seq]`` -> ``[seq, batch, d]``.

        Multi-pass routers (SMoE) continue from the residual stream, so the MoE
        block gets ``residual`` too; their per-sentence pass counts are filled in
        here, where the batch dim is known.
        """
        residual = x
        if self.normalize_before:
            x = self.final_layer_norm(x)
        ffn_input = x
        dropout = self.dropout_module if self.moe_output_dropout else None
        if self.moe_token_order == "batch-major":
            # The transposes copy [seq, batch, d] once each way (none when seq is 1,
            # i.e. at every incremental decoding step).
            x = self.moe(x.transpose(0, 1), padding_mask, residual=residual.transpose(0, 1),
                         dropout=dropout).transpose(0, 1).contiguous()
            _stats_to_seq_major(self.moe.stats)
        else:
            x = self.moe(x, _seq_major(padding_mask), residual=residual, dropout=dropout)
        stats = self.moe.stats
        if stats.token_passes is not None:
            # Every routed token makes at least one pass and padding none.
            stats.sentence_passes = stats.token_passes.sum(0)
            stats.sentence_tokens = (stats.token_passes > 0).sum(0)
        if self.moe.returns_block_output:
            # e.g. SMoE's post-LN strata: the MoE layer already added the residual
            # and normalized the result.
            return x
        if self.moe_output_dropout:
            x = self.dropout_module(x)
        if self.cmr_gate is not None:
            x = self._conditional_mix(ffn_input, x, padding_mask, stats)
        x = self.residual_connection(x, residual)
        if not self.normalize_before:
            x = self.final_layer_norm(x)
        return x

    def _conditional_mix(self, x: Tensor, moe_out: Tensor, padding_mask: Optional[Tensor],
                         stats) -> Tensor:
        """CMR: ``(1 - g) FFN(x) + g MoE(x)`` with the dense FFN dropped out as fairseq's
        ``_ffn`` does; x, moe_out ``[seq, batch, d]`` -> ``[seq, batch, d]``. Records the
        gate's budget sums in ``stats`` (see :class:`~moe_fairseq.layer.moe_layer.MoEStats`)."""
        pad = _seq_major(padding_mask)
        g = self.cmr_gate(x, pad)  # [seq, batch], 0 at padding
        h = self.activation_dropout_module(self.activation_fn(self.fc1(x)))
        dense = self.dropout_module(self.fc2(h))
        nonpad = (torch.ones_like(g) if pad is None else (~pad.to(torch.bool)).to(g.dtype))
        stats.cmr_gate_sum = g.sum()
        stats.cmr_tokens = nonpad.sum()
        stats.sentence_cmr_gate = g.detach().sum(0)
        stats.sentence_cmr_tokens = nonpad.sum(0)
        w = g.to(moe_out.dtype).unsqueeze(-1)
        return dense * (1 - w) + moe_out * w

    def _drop_unused_final_norm(self) -> None:
        """A post-norm block whose MoE layer returns the block output never uses
        ``final_layer_norm``; drop it so torch DDP sees no unused parameter."""
        if self.moe.returns_block_output and not self.normalize_before:
            del self.final_layer_norm
            self.final_layer_norm = None


class MoETransformerEncoderLayer(_MoEBlock, TransformerEncoderLayerBase):
    """Encoder layer: self-attention, then an MoE FFN block (post- or pre-norm)."""

    def __init__(self, cfg, moe_options):
        super().__init__(cfg)
        self._build_moe(moe_options, cfg.encoder.ffn_embed_dim, cfg.activation_fn)

    def forward(
        self,
        x: Tensor,
        encoder_padding_mask: Optional[Tensor],
        attn_mask: Optional[Tensor] = None,
    ):
        """x ``[seq, batch, d]``, encoder_padding_mask ``[batch, seq]`` -> ``[seq, batch, d]``."""
        if attn_mask is not None:
            # Large negative rather than -inf: a fully masked row would give NaN.
            attn_mask = attn_mask.masked_fill(
                attn_mask.to(torch.bool), -1e8 if x.dtype == torch.float32 else -1e4
            )
        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        x, _ = self.self_attn(
            query=x, key=x, value=x,
            key_padding_mask=encoder_padding_mask,
            need_weights=False,
            attn_mask=attn_mask,
        )
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)
        return self._moe_block(x, encoder_padding_mask)


class MoETransformerDecoderLayer(_MoEBlock, TransformerDecoderLayerBase):
    """Decoder layer: self-attention, cross-attention, then an MoE FFN block.

    Incremental decoding works unchanged: each step routes the new position's
    tokens; the MoE block keeps no state between steps.
    """

    def __init__(self, cfg, moe_options, no_encoder_attn: bool = False):
        super().__init__(cfg, no_encoder_attn)
        self._build_moe(moe_options, cfg.decoder.ffn_embed_dim, cfg.activation_fn)

    def forward(
        self,
        x: Tensor,
        encoder_out: Optional[Tensor] = None,
        encoder_padding_mask: Optional[Tensor] = None,
        incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
        prev_self_attn_state: Optional[List[Tensor]] = None,
        prev_attn_state: Optional[List[Tensor]] = None,
        self_attn_mask: Optional[Tensor] = None,
        self_attn_padding_mask: Optional[Tensor] = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ):
        """x ``[tgt_len, batch, d]`` -> (x, cross-attention weights or None, None)."""
        if need_head_weights:
            need_attn = True

        residual = x
        if self.normalize_before:
            x = self.self_attn_layer_norm(x)
        if prev_self_attn_state is not None:
            self.self_attn._set_input_buffer(
                incremental_state, _as_saved_state(prev_self_attn_state)
            )
        x, _ = self.self_attn(
            query=x, key=x, value=x,
            key_padding_mask=self_attn_padding_mask,
            incremental_state=incremental_state,
            need_weights=False,
            attn_mask=self_attn_mask,
        )
        x = self.residual_connection(self.dropout_module(x), residual)
        if not self.normalize_before:
            x = self.self_attn_layer_norm(x)

        attn = None
        if self.encoder_attn is not None and encoder_out is not None:
            residual = x
            if self.normalize_before:
                x = self.encoder_attn_layer_norm(x)
            if prev_attn_state is not None:
                self.encoder_attn._set_input_buffer(
                    incremental_state, _as_saved_state(prev_attn_state)
                )
            x, attn = self.encoder_attn(
                query=x, key=encoder_out, value=encoder_out,
                key_padding_mask=encoder_padding_mask,
                incremental_state=incremental_state,
                static_kv=True,
                need_weights=need_attn or (not self.training and self.need_attn),
                need_head_weights=need_head_weights,
            )
            x = self.residual_connection(self.dropout_module(x), residual)
            if not self.normalize_before:
                x = self.encoder_attn_layer_norm(x)

        x = self._moe_block(x, self_attn_padding_mask)
        return x, attn, None


def _as_saved_state(state: List[Tensor]) -> Dict[str, Optional[Tensor]]:
    saved: Dict[str, Optional[Tensor]] = {"prev_key": state[0], "prev_value": state[1]}
    if len(state) >= 3:
        saved["prev_key_padding_mask"] = state[2]
    return saved
