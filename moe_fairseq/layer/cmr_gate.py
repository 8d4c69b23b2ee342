"""Conditional MoE routing (CMR, ``--moe-cmr``): NLLB-MoE's gate between a shared dense
FFN and the MoE layer (arXiv 2207.04672, Sec. 6.2; fairseq's ``CMRLayer``).

Per token, ``g = dropout(sigmoid(w . x + b))`` (``--cmr-gate-drop``, torch's dropout as
fairseq's: a kept gate is scaled by ``1 / (1 - p)``) and 0 at padding; the transformer
block outputs ``(1 - g) FFN(x) + g MoE(x)`` (``transformer_layers.py``). The budget term
``|sum g / non-padding tokens - p|`` over all CMR layers is the criterion's
(``--cmr-gate-loss-wt``, ``--cmr-gate-loss-p``).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CMRGate(nn.Module):
    """``x [..., d]``, ``padding_mask [...]`` (True = padding) -> ``g [...]``, computed in
    fp32 (fp64 stays fp64). ``wg``: ``Linear(d, 1)`` with bias, as fairseq's."""

    def __init__(self, embed_dim: int, gate_drop: float = 0.0):
        super().__init__()
        if not 0 <= gate_drop < 1:
            raise ValueError(f"--cmr-gate-drop must be in [0, 1), got {gate_drop}")
        self.wg = nn.Linear(embed_dim, 1)
        self.gate_drop = gate_drop

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        h = x if x.dtype == torch.float64 else x.float()
        logits = F.linear(h, self.wg.weight.to(h.dtype), self.wg.bias.to(h.dtype))
        g = F.dropout(torch.sigmoid(logits.squeeze(-1)), self.gate_drop, self.training)
        if padding_mask is not None:
            g = g * (~padding_mask.to(torch.bool)).to(g.dtype)
        return g

    def extra_repr(self) -> str:
        return f"gate_drop={self.gate_drop}"
