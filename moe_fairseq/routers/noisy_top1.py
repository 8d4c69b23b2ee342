"""The top-1 router of Chen et al., "Towards Understanding the Mixture-of-Experts
Layer in Deep Learning" (NeurIPS 2022, arXiv 2208.02813), as their code runs it
(uclaml/MoE, synthetic_demo notebooks):

- scores ``h(x) = W sum_p x_p``: a linear map, without bias, of the sum of the
  token's P patches (P = 1: a plain linear router), ``W`` initialised at zero;
- top-1 on ``h(x) + U[0, 1)`` noise, drawn afresh on every forward (their models are
  never put in eval mode, so test accuracy is measured with the noise too;
  ``noise_at_eval=False`` routes on the plain scores at inference);
- the gate is the chosen noisy score itself, not a softmax probability: the layer's
  output is ``score * expert(x)``.

No capacity (every token is routed) and no auxiliary loss. ``probs`` (the softmax of
the scores) are for statistics only. This router serves the cluster-structure study
(examples/cluster_study); it is not registered as a ``--moe-router``.
"""

import torch
from torch import Tensor, nn

from .base import Router, Routing


class NoisyTop1Router(Router):
    """x ``[T, P * d]`` -> top-1 routing over ``num_experts``; ``W [E, d]``."""

    def __init__(self, input_dim: int, num_experts: int, patches: int = 1, noise: bool = True,
                 noise_at_eval: bool = True):
        super().__init__()
        if patches < 1 or input_dim % patches:
            raise ValueError(f"input_dim {input_dim} is not {patches} patches of equal length")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        self.patches = patches
        self.noise = noise
        self.noise_at_eval = noise_at_eval
        self.weight = nn.Parameter(torch.zeros(num_experts, input_dim // patches))

    def scores(self, x: Tensor) -> Tensor:
        """``[T, P * d]`` -> ``[T, E]`` noiseless scores, fp32."""
        summed = x.float().view(x.size(0), self.patches, -1).sum(1)
        return summed @ self.weight.float().t()

    def route(self, x: Tensor, pass_index: int = 0, token_mask=None) -> Routing:
        logits = self.scores(x)
        noisy = logits
        if self.noise and (self.training or self.noise_at_eval):
            noisy = logits + torch.rand_like(logits)
        gate, index = noisy.max(dim=-1)
        return Routing(index.unsqueeze(1), gate.unsqueeze(1), None, {},
                       torch.softmax(logits, dim=-1))
