"""Routing losses shared by routers.

All take fp32 router quantities and return a scalar tensor that stays connected to
the graph even when there are no tokens, so every rank runs the same backward.
``token_mask`` ``[T]`` bool (None = every row is a token) leaves padding rows out:
routers given the whole padded batch (no host sync to remove padding) pass it.
Counts use ``scatter_add`` rather than ``bincount``, whose CUDA kernel reads the
maximum back to the host.
"""

from typing import Optional

import torch
from torch import Tensor


def count_per_expert(index: Tensor, num_experts: int, weight: Optional[Tensor] = None) -> Tensor:
    """``[E]`` counts of ``index [T]`` (values in ``[0, E)``), each entry weighted by
    ``weight [T]`` (default 1), in ``weight``'s dtype (int64 without weights)."""
    if weight is None:
        weight = torch.ones_like(index)
    out = torch.zeros(num_experts, dtype=weight.dtype, device=index.device)
    return out.scatter_add_(0, index, weight)


def masked_mean(values: Tensor, token_mask: Optional[Tensor]) -> Tensor:
    """Mean over the tokens (dim 0) of ``values [T, ...]``; 0 for no tokens."""
    if token_mask is None:
        return values.mean(dim=0) if values.size(0) else values.sum(dim=0) * 0.0
    m = token_mask.view(-1, *([1] * (values.dim() - 1)))
    # where, not a product: a non-finite padding row must not leak in.
    total = torch.where(m, values, torch.zeros_like(values)).sum(dim=0)
    return total / token_mask.sum().to(values.dtype).clamp_min(1.0)


def load_balance_loss(probs: Tensor, first_choice: Tensor, num_experts: int,
                      token_mask: Optional[Tensor] = None) -> Tensor:
    """GShard/Switch balance loss ``E * sum_e f_e * p_e``.

    probs: ``[T, E]`` softmax probabilities; first_choice: ``[T]`` int64 expert of
    each token's first choice. ``f_e`` is the fraction of tokens whose first choice
    is e (not differentiable), ``p_e`` the mean probability of e. Equals 1.0 when
    routing is perfectly uniform.
    """
    if probs.size(0) == 0:
        return probs.sum() * 0.0
    weight = None if token_mask is None else token_mask.to(probs.dtype)
    counts = count_per_expert(first_choice, num_experts,
                              weight if weight is not None else torch.ones_like(probs[:, 0]))
    frac = counts / (probs.size(0) if weight is None else weight.sum().clamp_min(1.0))
    return num_experts * torch.sum(frac * masked_mean(probs, token_mask))


def router_z_loss(logits: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2``; logits ``[T, E]``."""
    if logits.size(0) == 0:
        return logits.sum() * 0.0
    return masked_mean(torch.logsumexp(logits, dim=-1).pow(2), token_mask)
