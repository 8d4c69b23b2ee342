"""The router interface every routing method implements.

A router looks at token vectors and decides, for one *routing pass*, which experts
each token visits and with what gate weight. The MoE layer (``moe_layer.py``) only
talks to routers through this interface, so a linear top-k gate, a cosine gate
with expert clusters or a stratified multi-pass gate are interchangeable.

Conventions (T = routed tokens in the pass, k = experts per token, E = experts):
- ``expert_index`` is ``[T, k]`` int64; ``-1`` means "no expert for this slot"
  (e.g. a second expert skipped by the ``random`` policy, or a token that has
  already left a multi-pass router).
- ``gates`` is ``[T, k]`` float32; the expert output of slot ``j`` is scaled by
  ``gates[:, j]`` before it is added back to the token.
- ``capacity`` is the most assignments one expert accepts in this pass, or
  ``None`` for no limit. Assignments past capacity are dropped in priority
  order: all first choices before any second choice, then by token order.

Multi-pass routers (SMoE's strata) route a token several times in one layer: a
pass may send a token on to a later pass (``Routing.next_pass``); the layer feeds
that pass the token's running residual stream, transformed by
:meth:`Router.pass_input`.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import Tensor, nn


@dataclass
class Routing:
    """One routing pass's decision for the tokens the layer handed in."""

    expert_index: Tensor  # [T, k] int64, -1 = no expert
    gates: Tensor  # [T, k] float32
    capacity: Optional[int]
    # Differentiable losses this pass adds (name -> scalar tensor). The criterion
    # weighs them: "balance" by --moe-gate-loss-wt, "z" by --moe-router-z-loss-wt;
    # other names are weighed by the router's own flags and reported as they are.
    losses: Dict[str, Tensor] = field(default_factory=dict)
    # Router probabilities [T, E] in fp32, kept for statistics (entropy).
    probs: Optional[Tensor] = None
    # For multi-pass routers: [T] int64, the pass at which each token is routed
    # next (> the current pass; >= num_passes means the token is done). Tokens may
    # skip passes. None means every token is done after this pass.
    next_pass: Optional[Tensor] = None


class Router(nn.Module):
    """Base class of routers.

    Subclasses implement :meth:`route`. Single-pass routers (the usual case) keep
    ``num_passes == 1``. A multi-pass router (stratified MoE) is called once per
    pass with the tokens due at that pass. Pass 0 routes the layer's input ``x``
    (every token). A later pass routes ``pass_input(h, p)``, where ``h`` is the
    token's residual stream so far, ``r + y_0 + ... + y_q`` (``r`` is the
    residual the block's output is added to, ``y_q`` the token's gated expert
    outputs of its earlier passes). The layer returns ``y_0 + ... + y_last``.
    """

    num_experts: int
    num_passes: int = 1

    def route(self, x: Tensor, pass_index: int = 0) -> Routing:
        """x: ``[T, d]`` token vectors (padding already removed) -> :class:`Routing`."""
        raise NotImplementedError

    def pass_input(self, h: Tensor, pass_index: int) -> Tensor:
        """Multi-pass routers: the vectors that pass ``pass_index >= 1`` routes and
        its experts see, from the residual streams ``h [T, d]`` of its tokens."""
        return h

    def forward(self, x: Tensor, pass_index: int = 0) -> Routing:
        return self.route(x, pass_index)


def capacity_for(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    training: bool,
    capacity_factor: float,
    eval_capacity_token_fraction: float,
) -> Optional[int]:
    """Expert capacity as in GShard/Switch and fairseq's MoE branch.

    Training: ``ceil(capacity_factor * k * T / E)``. Inference:
    ``ceil(fraction * T)``, where a fraction <= 0 or >= 1 means no limit (an
    expert can never receive more than T assignments in one pass).
    """
    if num_tokens == 0:
        return 0
    if training:
        return max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts))
    frac = eval_capacity_token_fraction
    if frac <= 0 or frac >= 1:
        return None
    return max(1, math.ceil(frac * num_tokens))


def entropy_of(probs: Tensor) -> Tensor:
    """Mean per-token entropy (nats) of ``probs [T, E]``; 0 for no tokens."""
    if probs.numel() == 0:
        return probs.new_zeros(())
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-9))).sum(-1).mean()
