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


def masked_sum(values: Tensor, token_mask: Optional[Tensor]) -> Tensor:
    """Sum over the tokens (dim 0) of ``values [T, ...]``."""
    if token_mask is None:
        return values.sum(dim=0)
    m = token_mask.view(-1, *([1] * (values.dim() - 1)))
    # where, not a product: a non-finite padding row must not leak in.
    return torch.where(m, values, torch.zeros_like(values)).sum(dim=0)


def masked_mean(values: Tensor, token_mask: Optional[Tensor]) -> Tensor:
    """Mean over the tokens (dim 0) of ``values [T, ...]``; 0 for no tokens."""
    if token_mask is None:
        return values.mean(dim=0) if values.size(0) else values.sum(dim=0) * 0.0
    return masked_sum(values, token_mask) / token_mask.sum().to(values.dtype).clamp_min(1.0)


def first_choice_share(first_choice: Tensor, num_experts: int, token_mask: Optional[Tensor],
                       dtype: torch.dtype):
    """(``f [E]``, ``T``): the share of tokens whose first choice is each expert, and
    the token count it divides by (a 0-dim ``dtype`` tensor, at least 1).
    first_choice ``[T]`` int64; padding rows (``token_mask`` False) are left out."""
    weight = (torch.ones(first_choice.shape, dtype=dtype, device=first_choice.device)
              if token_mask is None else token_mask.to(dtype))
    count = weight.sum().clamp_min(1.0)
    # scatter_add, not bincount (see the module docstring)
    per_expert = torch.zeros(num_experts, dtype=dtype, device=first_choice.device)
    return per_expert.scatter_add_(0, first_choice, weight) / count, count


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
    frac, _ = first_choice_share(first_choice, num_experts, token_mask, probs.dtype)
    return num_experts * torch.sum(frac * masked_mean(probs, token_mask))


def router_z_loss(logits: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2``; logits ``[T, E]``."""
    if logits.size(0) == 0:
        return logits.sum() * 0.0
    return masked_mean(torch.logsumexp(logits, dim=-1).pow(2), token_mask)


def importance_loss(probs: Tensor, weight: float = 1.0) -> Tensor:
    """Importance loss of Krishnamurthy et al. (arXiv 2302.14703), as their code has it:
    ``weight * CV^2`` of the experts' importances ``I_e = sum_x p(e|x)``, where CV is
    the unbiased standard deviation over experts divided by the mean.

    probs: ``[N, E]`` gate probabilities (differentiable). 0 for E = 1 or no samples.
    """
    if probs.size(1) < 2 or probs.size(0) == 0:
        return probs.sum() * 0.0
    importance = probs.sum(dim=0)
    return weight * (importance.std() / importance.mean()).pow(2)


def sample_similarity_loss(probs: Tensor, x: Tensor, beta_s: float, beta_d: float,
                           mask: Optional[Tensor] = None) -> Tensor:
    """Sample-similarity loss L_s of Krishnamurthy et al. (arXiv 2302.14703).

    probs: ``[N, E]`` gate probabilities (differentiable); x: ``[N, ...]`` the samples
    (flattened; not differentiated); mask: ``[N]`` bool, False rows left out (padding
    of a masked batch; N then counts the True rows). With ``D_ij = |x_i - x_j| / max D``
    (Euclidean, within the batch)::

        same = sum_ij (1/E) sum_e p(e|x_i) p(e|x_j) D_ij
        diff = sum_ij 1/(E^2 - E) sum_{e != e'} p(e|x_i) p(e'|x_j) D_ij
        L_s  = beta_s * same - beta_d * diff / N^2

    As the authors coded it, only ``diff`` is divided by N^2. Minimising it keeps
    distant samples off the same expert and spreads them over different ones.
    Cost: O(N^2 (d + E)); callers bound N (the translation loss uses a sample).
    """
    N, E = probs.shape
    if N < 2 or E < 2:
        return probs.sum() * 0.0
    flat = x.detach().reshape(N, -1).to(probs.dtype)
    dist = torch.cdist(flat, flat)
    n = N
    if mask is not None:
        keep = mask.to(probs.dtype)
        dist = dist * (keep[:, None] * keep[None, :])
        probs = probs * keep[:, None]  # a left-out row has no mass: no pair term
        n = keep.sum()
    dist = dist / dist.max().clamp_min(torch.finfo(dist.dtype).tiny)
    pair_same = probs @ probs.t()  # [N, N]: sum_e p(e|x_i) p(e|x_j)
    mass = probs.sum(dim=1)
    pair_diff = mass[:, None] * mass[None, :] - pair_same  # sum over e != e'
    same = (pair_same * dist).sum() / E
    diff = (pair_diff * dist).sum() / (E * E - E)
    return beta_s * same - beta_d * diff / (n * n)
