"""Expert-specialization metrics of Krishnamurthy et al. (arXiv 2302.14703), in bits.

- ``I(E; Y)``: mutual information between the expert a sample goes to and a label
  (the class, or a translation's target language), from their joint counts;
- ``H_s``: mean per-sample entropy of the gate distribution (0 = every sample goes
  to one expert with certainty);
- ``H_u``: entropy of the experts' average usage (log2 E = all used equally).

Zero probabilities contribute 0 (``0 log 0 = 0``), as in the authors' code.
"""

import math

import torch
from torch import Tensor


def _entropy_bits(p: Tensor, dim: int = -1) -> Tensor:
    p = p.double()
    return -(p * torch.log2(torch.where(p > 0, p, torch.ones_like(p)))).sum(dim)


def joint_counts(expert: Tensor, label: Tensor, num_experts: int, num_labels: int) -> Tensor:
    """``[E, Y]`` int64 counts of (expert, label) pairs; expert, label ``[N]`` int64."""
    flat = expert.long() * num_labels + label.long()
    counts = torch.zeros(num_experts * num_labels, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return counts.view(num_experts, num_labels)


def mutual_information_bits(counts: Tensor) -> float:
    """``I(E; Y) = H(E) + H(Y) - H(E, Y)`` in bits from ``[E, Y]`` joint counts."""
    total = counts.sum()
    if total == 0:
        return 0.0
    joint = counts.double() / total
    h_joint = _entropy_bits(joint.reshape(-1))
    h_e = _entropy_bits(joint.sum(1))
    h_y = _entropy_bits(joint.sum(0))
    return max(0.0, float(h_e + h_y - h_joint))


def marginal_entropies_bits(counts: Tensor):
    """``(H(E), H(Y))`` in bits from ``[E, Y]`` joint counts (0, 0 for no counts)."""
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    joint = counts.double() / total
    return float(_entropy_bits(joint.sum(1))), float(_entropy_bits(joint.sum(0)))


def dispatch_entropy_nats(counts: Tensor) -> float:
    """Chen et al.'s dispatch entropy ``sum_e (n_e / N) H(Y | E = e)`` in nats from
    ``[E, Y]`` joint counts (Y = cluster or language): 0 when every expert sees one
    value of Y, ``ln |Y|`` when each expert sees all of them in proportion."""
    counts = counts.double()
    n_e = counts.sum(1)
    if float(n_e.sum()) == 0:
        return 0.0
    p = counts / n_e.clamp_min(1)[:, None]
    h = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(1)
    return float((n_e / n_e.sum() * h).sum())


def conditional_entropies_bits(counts: Tensor) -> Tensor:
    """``[Y]`` entropies ``H(E | Y = y)`` in bits from ``[E, Y]`` counts: how many
    experts' worth each y is spread over (0 = all of y goes to one expert)."""
    col = counts.double().sum(0)
    p = counts.double() / col.clamp_min(1)[None, :]
    return _entropy_bits(p.t())


def sample_entropy_bits(probs: Tensor) -> float:
    """``H_s``: mean over samples of the entropy of ``probs [N, E]`` (bits)."""
    if probs.size(0) == 0:
        return 0.0
    return float(_entropy_bits(probs).mean())


def usage_entropy_bits(probs: Tensor) -> float:
    """``H_u``: entropy of the mean gate distribution ``mean_x p(e|x)`` (bits)."""
    if probs.size(0) == 0:
        return 0.0
    return float(_entropy_bits(probs.double().mean(0)))


def max_bits(n: int) -> float:
    """``log2 n``: the largest entropy over n outcomes."""
    return math.log2(n) if n > 0 else 0.0
