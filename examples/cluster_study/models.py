"""Models of the cluster-structure study (Chen et al., NeurIPS 2022, arXiv 2208.02813),
as the authors' code builds them (uclaml/MoE, synthetic_demo notebooks):

- a *patch classifier*: ``2m`` filters of one patch (a Conv1d with kernel = stride =
  patch length), activation ``z^3`` (nonlinear) or identity (linear), summed over the
  P patches; class 0's logit is the sum of the first m filters, class 1's of the rest;
- the MoE: the package's own :class:`~moe_fairseq.layer.moe_layer.MoELayer` with the
  authors' noisy top-1 router (:class:`~moe_fairseq.routers.noisy_top1.NoisyTop1Router`)
  and E patch-classifier experts (m = 8, initialised at 0.001 x torch's default);
  its output is ``softmax(gate * expert logits)``, on which the authors then apply a
  cross-entropy (a double softmax, kept as coded);
- the single model: one patch classifier (m = 40, torch's default init).
"""

import math

import torch
from torch import Tensor, nn

from moe_fairseq.layer.moe_layer import MoELayer
from moe_fairseq.routers.noisy_top1 import NoisyTop1Router


def _activation(z: Tensor, nonlinear: bool) -> Tensor:
    return z.pow(3) if nonlinear else z


class PatchExperts(nn.Module):
    """E patch classifiers with the :class:`~moe_fairseq.layer.expert_bank.ExpertBank`
    interface: rows ``[N, P * d]`` grouped by expert, group_sizes ``[E]`` -> logits
    ``[N, 2]``. Parameters ``weight [E, 2m, d]``, ``bias [E, 2m]``."""

    def __init__(self, num_experts: int, filters_per_class: int, patch_len: int,
                 nonlinear: bool = True, init_scale: float = 1e-3):
        super().__init__()
        self.num_experts = num_experts
        self.m = filters_per_class
        self.patch_len = patch_len
        self.nonlinear = nonlinear
        bound = 1.0 / math.sqrt(patch_len)  # torch's Conv1d default for fan-in d
        shape = (num_experts, 2 * filters_per_class)
        self.weight = nn.Parameter(torch.empty(*shape, patch_len).uniform_(-bound, bound) * init_scale)
        self.bias = nn.Parameter(torch.empty(*shape).uniform_(-bound, bound) * init_scale)

    def expert_logits(self, x: Tensor, e: int) -> Tensor:
        """Expert e on x ``[N, P * d]`` -> ``[N, 2]``."""
        patches = x.reshape(x.size(0), x.size(1) // self.patch_len, self.patch_len)  # [N, P, d]
        z = patches @ self.weight[e].t() + self.bias[e]                 # [N, P, 2m]
        per_filter = _activation(z, self.nonlinear).sum(1)              # [N, 2m]
        return torch.stack([per_filter[:, :self.m].sum(1), per_filter[:, self.m:].sum(1)], 1)

    def forward(self, rows: Tensor, group_sizes: Tensor) -> Tensor:
        outs = [self.expert_logits(chunk, e)
                for e, chunk in enumerate(torch.split(rows, group_sizes.tolist()))]
        return torch.cat(outs, 0)


class PatchClassifier(nn.Module):
    """The single model: x ``[N, P * d]`` -> logits ``[N, 2]``."""

    def __init__(self, filters_per_class: int, patch_len: int, nonlinear: bool = True,
                 init_scale: float = 1.0):
        super().__init__()
        self.net = PatchExperts(1, filters_per_class, patch_len, nonlinear, init_scale)

    def forward(self, x: Tensor) -> Tensor:
        return self.net.expert_logits(x, 0)


class ClusterMoE(nn.Module):
    """x ``[N, P * d]`` -> class probabilities ``[N, 2]`` (see the module docstring).
    After a forward, ``self.moe.stats.first_expert`` ``[N]`` is each sample's expert."""

    def __init__(self, num_experts: int = 8, filters_per_class: int = 8, patches: int = 4,
                 patch_len: int = 50, nonlinear: bool = True, init_scale: float = 1e-3,
                 noise_at_eval: bool = True):
        super().__init__()
        router = NoisyTop1Router(patches * patch_len, num_experts, patches,
                                 noise_at_eval=noise_at_eval)
        experts = PatchExperts(num_experts, filters_per_class, patch_len, nonlinear, init_scale)
        self.moe = MoELayer(router, experts)
        self.moe.record_first_expert = True

    @property
    def router(self) -> NoisyTop1Router:
        return self.moe.router

    @property
    def experts(self) -> PatchExperts:
        return self.moe.experts

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.moe(x), dim=-1)
