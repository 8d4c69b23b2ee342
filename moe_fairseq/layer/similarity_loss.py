"""The sample-similarity loss for translation, on a bounded sample of tokens.

Krishnamurthy et al. (arXiv 2302.14703) compute L_s over a whole batch of images;
over the tokens of a translation batch its O(N^2) pair matrix would grow with the
square of the batch. Here each MoE layer computes it on at most ``sample_tokens``
of its tokens, taken at an even stride over the batch's rows (every sentence and
position has its turn; deterministic, so W expert-parallel ranks and one process
with their union batch pick the same rows), from the first routing pass's
probabilities and the layer's input vectors. The cost is a ``[S, S]`` distance and
pair matrix per MoE layer: linear in batch size, about S^2 (d + E) multiply-adds.

The criterion weighs it (``--moe-similarity-loss-wt``) and asks the layers for it
(:attr:`MoELayer.similarity`); the router does not know about it, so it works with
every router.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..routers.losses import sample_similarity_loss


@dataclass(frozen=True)
class SimilarityLoss:
    """L_s with the authors' weights and a token budget."""

    beta_s: float
    beta_d: float
    sample_tokens: int

    def sample_rows(self, num_rows: int, device) -> Optional[Tensor]:
        """``[<= S]`` int64 rows at an even stride, or None for all rows (num_rows <= S)."""
        if num_rows <= self.sample_tokens:
            return None
        stride = -(-num_rows // self.sample_tokens)  # ceil: at most sample_tokens rows
        return torch.arange(0, num_rows, stride, device=device)

    def masked_sample_rows(self, token_mask: Tensor):
        """The rows :meth:`sample_rows` picks among the tokens of a padded batch,
        found without a host sync: (``[S]`` rows, ``[S]`` bool valid). The k-th pick
        is the token of rank ``k * ceil(n / S)`` (n tokens), as when the padding had
        been removed first."""
        S = self.sample_tokens
        n = token_mask.sum()
        stride = torch.div(n + S - 1, S, rounding_mode="floor").clamp_min(1)
        ranks = torch.arange(S, device=token_mask.device) * stride
        cumulative = token_mask.long().cumsum(0)  # rank + 1 of each token row
        rows = torch.searchsorted(cumulative, ranks + 1).clamp_max(token_mask.numel() - 1)
        return rows, ranks < n

    def __call__(self, probs: Tensor, x: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
        """probs ``[T, E]`` (differentiable), x ``[T, d]``, token_mask ``[T]`` bool or
        None (every row a token) -> the scalar loss (graph-connected; 0 for fewer
        than 2 tokens). A padded batch and the same batch without its padding give
        the same value."""
        if token_mask is not None and probs.size(0) > self.sample_tokens:
            rows, token_mask = self.masked_sample_rows(token_mask)
        else:
            rows = self.sample_rows(probs.size(0), probs.device)
            if rows is not None and token_mask is not None:
                token_mask = token_mask.index_select(0, rows)
        if rows is not None:
            probs, x = probs.index_select(0, rows), x.index_select(0, rows)
        return sample_similarity_loss(probs.float(), x, self.beta_s, self.beta_d, token_mask)
