"""The networks of the study, as the authors describe and ran them (arXiv 2302.14703,
code aistats2023-1554/moe; see ../../../shared/docs/methods.md section 3).

- Expert (also the single model): conv 1->1 3x3, ReLU, max-pool 2 -> 169 -> 64, ReLU
  -> 32 (``h_e``, the hidden representation the attentive gate reads) -> ReLU -> 10,
  softmax.
- Gate trunk: conv 1->8 3x3, BatchNorm, ReLU, max-pool 2 -> 1352 -> 512, ReLU -> 32,
  ReLU. The softmax gate adds a linear 32 -> E head; the attentive gate scores
  ``(W_q g(x)) . (W_k h_e(x)) / sqrt(32)`` over the experts.
- Dense expectation MoE: ``y(x) = sum_e p(e|x) softmax(f_e(x))``.

The E experts see the same input, so they run batched (one conv with E output
channels, batched matmuls); each expert's parameters are its own and initialised as
torch's Conv2d/Linear would initialise a separate expert.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN = 32  # the experts' and the gate's hidden size, and the attention's scale


def conv3x3(patches, conv: nn.Conv2d):
    """A 1-channel 3x3 valid convolution from shared im2col patches: ``patches``
    ``[B, 9, 26*26]`` (``F.unfold(x, 3)``) -> ``[B, C, 26, 26]``. The same as
    ``conv(x)``; on the CPU a matmul is several times faster than the convolution's
    backward for one input channel, and the experts and the gate share the patches."""
    out = torch.matmul(conv.weight.view(conv.out_channels, 9), patches) + conv.bias[:, None]
    return out.view(out.size(0), conv.out_channels, 26, 26)


class BatchedLinear(nn.Module):
    """E independent linear maps: ``[E, B, fan_in] -> [E, B, fan_out]``."""

    def __init__(self, num: int, fan_in: int, fan_out: int):
        super().__init__()
        bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init, per expert
        self.weight = nn.Parameter(torch.empty(num, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class ExpertBank(nn.Module):
    """``num_experts`` copies of the paper's expert CNN.

    forward(patches ``[B, 9, 676]``) -> (probs ``[B, E, C]``, hidden ``[B, E, 32]``)
    """

    def __init__(self, num_experts: int, num_classes: int = 10):
        super().__init__()
        self.num_experts = num_experts
        # channel e of this conv is expert e's own 1->1 conv (same fan-in, same init)
        self.conv = nn.Conv2d(1, num_experts, kernel_size=3)
        self.fc1 = BatchedLinear(num_experts, 13 * 13, 64)
        self.fc2 = BatchedLinear(num_experts, 64, HIDDEN)
        self.fc3 = BatchedLinear(num_experts, HIDDEN, num_classes)

    def forward(self, patches):
        h = F.max_pool2d(F.relu(conv3x3(patches, self.conv)), 2)  # [B, E, 13, 13]
        h = h.flatten(2).transpose(0, 1)                     # [E, B, 169]
        hidden = self.fc2(F.relu(self.fc1(h)))               # [E, B, 32]
        probs = F.softmax(self.fc3(F.relu(hidden)), dim=-1)  # [E, B, C]
        return probs.transpose(0, 1), hidden.transpose(0, 1)


class GateTrunk(nn.Module):
    """patches ``[B, 9, 676]`` -> g(x) ``[B, 32]``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, kernel_size=3)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 13 * 13, 512)
        self.fc2 = nn.Linear(512, HIDDEN)

    def forward(self, patches):
        h = F.max_pool2d(F.relu(self.bn(conv3x3(patches, self.conv))), 2).flatten(1)
        return F.relu(self.fc2(F.relu(self.fc1(h))))


class SoftmaxGate(nn.Module):
    """p(e|x) ``[B, E]`` = softmax of a linear head on the trunk."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.trunk = GateTrunk()
        self.head = nn.Linear(HIDDEN, num_experts)

    def forward(self, patches, hidden):
        return F.softmax(self.head(self.trunk(patches)), dim=-1)


class AttentiveGate(nn.Module):
    """p(e|x) ``[B, E]`` = softmax_e of scaled dot products between a query of the
    gate's trunk and a key of each expert's hidden representation ``[B, E, 32]``.
    The keys are not detached: the gate's loss also trains the experts' fc1/fc2."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.trunk = GateTrunk()
        self.query = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.key = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, patches, hidden):
        q = self.query(self.trunk(patches)).unsqueeze(-1)   # [B, 32, 1]
        k = self.key(hidden)                          # [B, E, 32]
        return F.softmax((k @ q).squeeze(-1) / math.sqrt(HIDDEN), dim=-1)


class Model(nn.Module):
    """The single model (``gate=None``, one expert) or a dense expectation MoE.

    forward(x) -> (y ``[B, C]``, gate probs ``[B, E]`` or None, expert probs ``[B, E, C]``)
    """

    def __init__(self, num_experts: int, gate: str = None, num_classes: int = 10):
        super().__init__()
        if gate is None and num_experts != 1:
            raise ValueError("the single model has one expert and no gate")
        self.experts = ExpertBank(num_experts, num_classes)
        gates = {"softmax": SoftmaxGate, "attentive": AttentiveGate}
        if gate is not None and gate not in gates:
            raise ValueError(f"gate must be one of {sorted(gates)}, got {gate!r}")
        self.gate = gates[gate](num_experts) if gate else None

    def forward(self, x):
        if x.shape[1:] != (1, 28, 28):
            raise ValueError(f"images must be [B, 1, 28, 28], got {list(x.shape)}")
        patches = F.unfold(x, 3)  # [B, 9, 676], shared by the experts and the gate
        expert_probs, hidden = self.experts(patches)
        if self.gate is None:
            return expert_probs[:, 0], None, expert_probs
        p = self.gate(patches, hidden)
        return (p.unsqueeze(-1) * expert_probs).sum(1), p, expert_probs
