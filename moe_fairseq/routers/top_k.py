"""Linear top-1 / top-2 router (Switch / GShard, as in fairseq's MoE branch)."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Router, Routing, capacity_for, count_tokens
from .losses import load_balance_loss, router_z_loss

SECOND_EXPERT_POLICIES = ("all", "sampling", "random")
# At inference: the second-best expert (ours, deterministic) or a Gumbel-sampled
# one (fairseq's top2gating and the SMoE authors' code sample at generation too).
EVAL_SECOND_EXPERT_POLICIES = ("all", "sampling")


def mask_padding(expert_index: Tensor, gates: Tensor, token_mask: Optional[Tensor]):
    """Padding rows (``token_mask`` False) get expert -1 and gate 0 in every slot.
    expert_index ``[T, k]``, gates ``[T, k]``."""
    if token_mask is None:
        return expert_index, gates
    m = token_mask.unsqueeze(1)
    return (torch.where(m, expert_index, torch.full_like(expert_index, -1)),
            torch.where(m, gates, torch.zeros_like(gates)))


class TopKRouter(Router):
    """``softmax(W x)`` over E experts, computed in fp32, top-k experts per token.

    Second-expert policies (top-2, training; at inference ``eval_second_expert_policy``,
    default ``all``, i.e. the second-best expert deterministically):
    - ``all``: always route to the second-best expert;
    - ``sampling``: pick the second expert by argmax of logits + Gumbel noise
      (GShard), so less likely experts also get trained;
    - ``random``: keep the second-best expert only with probability
      ``min(1, 2 * g2)`` (GShard's random routing).

    Top-2 gate weights are the softmax probabilities of the two experts; with
    ``normalize_gates`` they are renormalized to sum to 1, after capacity dropping
    (fairseq's rule: a token whose second choice is dropped keeps its first with
    weight 1) or, with ``normalize_before_dropping``, before it. Top-1 gates are
    the raw probability (Switch).

    ``batch_prioritized`` (``--moe-batch-prioritized-routing``, V-MoE; fairseq's
    top2gating): each token's priority for capacity is its highest router probability
    (:meth:`priority_of`), for its first and its second choice alike.
    """

    def __init__(
        self,
        embed_dim: int,
        num_experts: int,
        top_k: int = 2,
        capacity_factor: float = 1.0,
        eval_capacity_token_fraction: float = 1.0,
        second_expert_policy: str = "sampling",
        normalize_gates: bool = False,
        jitter_eps: float = 0.0,
        normalize_before_dropping: bool = False,
        eval_second_expert_policy: str = "all",
        capacity_rule: str = "joint",
        batch_prioritized: bool = False,
    ):
        super().__init__()
        if top_k not in (1, 2):
            raise ValueError(f"--moe-top-k must be 1 or 2, got {top_k}")
        if second_expert_policy not in SECOND_EXPERT_POLICIES:
            raise ValueError(
                f"--moe-second-expert-policy must be one of {SECOND_EXPERT_POLICIES}, "
                f"got {second_expert_policy!r}"
            )
        if eval_second_expert_policy not in EVAL_SECOND_EXPERT_POLICIES:
            raise ValueError(
                f"--moe-eval-second-expert-policy must be one of {EVAL_SECOND_EXPERT_POLICIES}, "
                f"got {eval_second_expert_policy!r}"
            )
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_token_fraction = eval_capacity_token_fraction
        self.second_expert_policy = second_expert_policy
        self.normalize_gates = normalize_gates
        self.normalize_before_dropping = normalize_before_dropping
        self.eval_second_expert_policy = eval_second_expert_policy
        self.capacity_rule = capacity_rule
        self.jitter_eps = jitter_eps
        self.batch_prioritized = batch_prioritized
        self.wg = nn.Linear(embed_dim, num_experts, bias=False)

    def router_input(self, x: Tensor) -> Tensor:
        """x ``[T, d]`` in fp32 (fp64 stays fp64, for exact reference tests), with the
        training-time jitter (``--moe-jitter-eps``)."""
        x32 = x if x.dtype == torch.float64 else x.float()
        if self.training and self.jitter_eps > 0:
            noise = torch.empty_like(x32).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            x32 = x32 * noise
        return x32

    def logits(self, x: Tensor) -> Tensor:
        """x ``[T, d]`` -> fp32 logits ``[T, E]``."""
        h = self.router_input(x)
        return F.linear(h, self.wg.weight.to(h.dtype))

    accepts_token_mask = True

    def route(self, x: Tensor, pass_index: int = 0, token_mask: Optional[Tensor] = None) -> Routing:
        logits = self.logits(x)
        probs = torch.softmax(logits, dim=-1)
        first = probs.argmax(dim=-1)
        index = [first]
        gates = [probs.gather(1, first[:, None]).squeeze(1)]
        if self.top_k == 2:
            second, g2 = self._second_choice(logits, probs, first)
            index.append(second)
            gates.append(g2)
        expert_index, gate = mask_padding(torch.stack(index, dim=1), torch.stack(gates, dim=1),
                                          token_mask)
        gate, after_drop = self.normalized_gates(gate)
        losses = {
            "balance": load_balance_loss(probs, first, self.num_experts, token_mask),
            "z": router_z_loss(logits, token_mask),
        }
        capacity = self.capacity(count_tokens(x, token_mask), self.num_experts)
        return Routing(expert_index, gate, capacity, losses, probs,
                       normalize_after_drop=after_drop, token_mask=token_mask,
                       priority=self.priority_of(probs))

    def priority_of(self, probs: Tensor) -> Optional[Tensor]:
        """Batch-prioritized routing: each token's highest probability ``[T]``
        (detached; fairseq's ``importance_scores``), or None (token order)."""
        if not self.batch_prioritized:
            return None
        return probs.detach().max(dim=-1).values

    def fused_route(self, x: Tensor, token_mask: Optional[Tensor] = None) -> Optional[Routing]:
        """:meth:`route` by the routing kernels (``kernels/route.py``): softmax, top-k,
        gates, both losses and the plan's block counts in three launches, their
        backward in one. The ``random`` second-expert policy and batch-prioritized
        routing (the plan kernel lays tokens out in their order) have no kernel (None)."""
        policy = self.second_expert_policy if self.training else self.eval_second_expert_policy
        if (self.top_k == 2 and policy == "random") or self.batch_prioritized:
            return None
        from .. import kernels  # Triton only on this path

        logits = self.logits(x)
        # The same draw as _second_choice's, so a seeded run routes as the torch path does.
        noise = torch.rand_like(logits) if self.top_k == 2 and policy == "sampling" else None
        normalize = self.normalize_gates and self.top_k > 1
        out = kernels.top_k_routing(logits, token_mask, noise, self.top_k,
                                    normalize_before=normalize and self.normalize_before_dropping)
        capacity = self.capacity(count_tokens(x, token_mask), self.num_experts)
        return Routing(out.expert_index, out.gates, capacity,
                       {"balance": out.balance, "z": out.z}, out.probs,
                       normalize_after_drop=normalize and not self.normalize_before_dropping,
                       token_mask=token_mask, block_counts=out.block_counts,
                       entropy_sum=out.entropy_sum)

    def normalized_gates(self, gate: Tensor):
        """Top-2 gate normalisation: ``gate [T, k]`` -> (gates, whether the dispatcher
        must renormalise them after capacity dropping). Before dropping, it is done
        here; top-1 gates are never normalised."""
        if not (self.normalize_gates and self.top_k > 1):
            return gate, False
        if self.normalize_before_dropping:
            return gate / gate.sum(dim=1, keepdim=True).clamp_min(torch.finfo(gate.dtype).eps), False
        return gate, True

    def capacity(self, num_tokens, num_experts: int):
        """Per-expert capacity for ``num_tokens`` (int or 0-dim tensor) tokens choosing
        among ``num_experts``."""
        return capacity_for(num_tokens, num_experts, self.top_k, self.training,
                            self.capacity_factor, self.eval_capacity_token_fraction,
                            self.capacity_rule)

    def _second_choice(self, logits: Tensor, probs: Tensor, first: Tensor):
        policy = self.second_expert_policy if self.training else self.eval_second_expert_policy
        scores = logits
        if policy == "sampling":
            u = torch.rand_like(logits).clamp_(1e-9, 1.0 - 1e-9)
            scores = logits - torch.log(-torch.log(u))
        scores = scores.scatter(1, first[:, None], float("-inf"))
        second = scores.argmax(dim=-1)
        g2 = probs.gather(1, second[:, None]).squeeze(1)
        if policy == "random":
            keep = (2.0 * g2.detach()) > torch.rand_like(g2)
            second = torch.where(keep, second, torch.full_like(second, -1))
            g2 = g2 * keep.to(g2.dtype)
        return second, g2
