"""Routing losses shared by routers.

All take fp32 router quantities of routed (non-padding) tokens and return a scalar
tensor that stays connected to the graph even when there are no tokens, so every
rank runs the same backward.
"""

import torch
from torch import Tensor


def load_balance_loss(probs: Tensor, first_choice: Tensor, num_experts: int) -> Tensor:
    """GShard/Switch balance loss ``E * sum_e f_e * p_e``.

    probs: ``[T, E]`` softmax probabilities; first_choice: ``[T]`` int64 expert of
    each token's first choice. ``f_e`` is the fraction of tokens whose first choice
    is e (not differentiable), ``p_e`` the mean probability of e. Equals 1.0 when
    routing is perfectly uniform.
    """
    if probs.size(0) == 0:
        return probs.sum() * 0.0
    counts = torch.bincount(first_choice, minlength=num_experts).to(probs.dtype)
    frac = counts / probs.size(0)
    return num_experts * torch.sum(frac * probs.mean(dim=0))


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2``; logits ``[T, E]``."""
    if logits.size(0) == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).pow(2).mean()
