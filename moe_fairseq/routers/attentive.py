"""Attentive gate (Krishnamurthy et al. 2023, arXiv 2302.14703), made sparse for translation.

The paper's gate attends from a query of the input to a key of each expert's hidden
representation: ``p(e|x) = softmax_e((W_q g(x))^T (W_k h_e(x)) / sqrt(H))``. Running
every expert to get ``h_e(x)`` would make the layer dense, so here each expert has a
small representation of its own, kept in the router: ``h_e(x) = U_e x`` with
``U_e [r, d]``, and

    score_e(x) = (W_q x)^T (W_k U_e x) / sqrt(r)      (W_q [r, d], W_k [r, r])

The token then goes to its top-k experts by ``softmax(score)`` exactly as with the
linear router (second-expert policies, capacity, gate normalisation, balance and
z-losses are :class:`TopKRouter`'s), so the layer stays sparse. The ``U_e`` live in the
router (replicated on every rank), so expert parallelism is unaffected.

Cost per token: ``r d`` (query) + ``E r d`` (expert representations, one GEMM) + ``E r``
multiply-adds, about ``r`` times the linear router's ``E d``; with d = 512, E = 8,
r = 16 that is 66k multiply-adds, about 3% of one expert FFN of 2048 (2.1M).
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .top_k import TopKRouter


class AttentiveRouter(TopKRouter):
    """See the module docstring; ``attention_dim`` is r (``--moe-attentive-dim``)."""

    def __init__(self, embed_dim: int, num_experts: int, attention_dim: int = 16, **top_k_kwargs):
        super().__init__(embed_dim, num_experts, **top_k_kwargs)
        if attention_dim < 1:
            raise ValueError(f"--moe-attentive-dim must be >= 1, got {attention_dim}")
        del self.wg  # the linear gate is replaced by the attention below
        self.attention_dim = attention_dim
        self.query = nn.Linear(embed_dim, attention_dim, bias=False)  # W_q
        self.key = nn.Linear(attention_dim, attention_dim, bias=False)  # W_k
        # U_e for every expert, stored [d, E * r] so one GEMM gives every h_e(x).
        bound = 1.0 / math.sqrt(embed_dim)
        self.expert_repr = nn.Parameter(
            torch.empty(embed_dim, num_experts * attention_dim).uniform_(-bound, bound))

    def logits(self, x: Tensor) -> Tensor:
        """x ``[T, d]`` -> fp32 scores ``[T, E]``."""
        h = self.router_input(x)
        T, r = h.size(0), self.attention_dim
        q = F.linear(h, self.query.weight.to(h.dtype))  # [T, r]
        # (W_k u)^T q = u^T (W_k^T q): apply W_k to the query once, not to E keys.
        q = q @ self.key.weight.to(h.dtype)  # [T, r]
        u = (h @ self.expert_repr.to(h.dtype)).view(T, self.num_experts, r)  # [T, E, r]
        return torch.einsum("ter,tr->te", u, q) / math.sqrt(r)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, attention_dim={self.attention_dim}"
