"""The router interface every routing method implements.

A router looks at token vectors and decides, for one *routing pass*, which experts
each token visits and with what gate weight. The MoE layer (``layer/moe_layer.py``) only
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
  order: all first choices before any second choice, then by token order (or,
  with ``Routing.priority``, by decreasing priority: batch-prioritized routing).

Multi-pass routers (SMoE's strata) route a token several times in one layer: a
pass may send a token on to a later pass (``Routing.next_pass``); the layer feeds
that pass the token's running residual stream, transformed by
:meth:`Router.pass_stream` and :meth:`Router.pass_input`.
"""

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn

from .losses import masked_mean


@dataclass
class Routing:
    """One routing pass's decision for the tokens the layer handed in."""

    expert_index: Tensor  # [T, k] int64, -1 = no expert
    gates: Tensor  # [T, k] float32
    # None = no limit; a 0-dim int64 tensor when computed from a masked batch.
    capacity: Union[None, int, Tensor]
    # Differentiable losses this pass adds (name -> scalar tensor). The criterion
    # weighs them: "balance" by --moe-gate-loss-wt, "z" by --moe-router-z-loss-wt
    # ("similarity", added by the layer, by --moe-similarity-loss-wt);
    # other names are weighed by the router's own flags and reported as they are.
    losses: Dict[str, Tensor] = field(default_factory=dict)
    # Router probabilities [T, E] in fp32, differentiable: the layer detaches them for
    # statistics (entropy) and back-propagates the sample-similarity loss through them.
    probs: Optional[Tensor] = None
    # For multi-pass routers: [T] int64, the pass at which each token is routed
    # next (> the current pass; >= num_passes means the token is done). Tokens may
    # skip passes. None means every token is done after this pass.
    next_pass: Optional[Tensor] = None
    # Renormalize each token's gates over the slots that survive capacity
    # dropping, so they sum to 1 (fairseq's top2gating default; a token whose
    # second choice is dropped keeps its first with weight 1).
    normalize_after_drop: bool = False
    # Output mixing (MoEC): the token's own vector fills the gate mass its kept
    # experts do not use, y = sum_kept g_j FFN_j(x) + (1 - sum_kept g_j) x; a token
    # dropped for capacity outputs x itself.
    mix_input: bool = False
    # [T] bool when the router was given the whole padded batch (Router.accepts_token_mask):
    # False rows are padding, have expert_index -1 and are left out of losses and
    # statistics. None = every row is a token.
    token_mask: Optional[Tensor] = None
    # Routings of fused kernels (Router.fused_route) only: [B, k, E+1] int64 running
    # counts over token blocks of each slot's experts (bin E: none), from which the
    # dispatcher's fused plan lays rows out without a sort; and the detached sum over
    # tokens of the routing entropy (a statistic the kernels compute on the way).
    block_counts: Optional[Tensor] = None
    entropy_sum: Optional[Tensor] = None
    # Batch-prioritized routing (--moe-batch-prioritized-routing): [T] fp32, detached;
    # within each slot, tokens claim capacity in decreasing priority (ties: token
    # order) instead of token order. None = token order.
    priority: Optional[Tensor] = None

    @property
    def token_count(self) -> Union[int, Tensor]:
        """Tokens routed in this pass (padding rows of a masked batch left out)."""
        return count_tokens(self.expert_index, self.token_mask)


def count_tokens(rows: Tensor, token_mask: Optional[Tensor]) -> Union[int, Tensor]:
    """Tokens among the rows of ``rows [T, ...]``: an int, or a 0-dim tensor under a
    ``token_mask`` (no host sync)."""
    return rows.size(0) if token_mask is None else token_mask.sum()


class Router(nn.Module):
    """Base class of routers.

    Subclasses implement :meth:`route`. Single-pass routers (the usual case) keep
    ``num_passes == 1``. A multi-pass router (stratified MoE) is called once per
    pass with the tokens due at that pass. Pass 0 routes the layer's input ``x``
    (every token) and the token's stream becomes ``z = r + y_0`` (``r`` is the
    residual the block's output is added to, ``y_q`` the token's gated expert
    output at pass q). A later pass p continues from ``s = pass_stream(z, p)``,
    routes (and its experts see) ``pass_input(s, p)``, and leaves ``z = s + y_p``.

    Two ways a layer can end:
    - ``stream_output = False`` (default): the layer returns ``y_0 + ... + y_last``
      and the transformer block adds it to its residual as for any FFN;
    - ``stream_output = True``: the layer returns ``finish_stream(z)``, the block's
      whole output (the block adds no residual, dropout or norm of its own), as
      SMoE's authors do with their per-stratum LayerNorms.
    """

    num_experts: int
    num_passes: int = 1
    stream_output: bool = False
    # Single-pass routers that set this take ``token_mask`` and route the whole
    # padded batch; the layer then needs no host sync to remove the padding.
    # Others get the non-padding tokens only (gathered with ``nonzero``, a sync).
    accepts_token_mask: bool = False

    def route(self, x: Tensor, pass_index: int = 0, token_mask: Optional[Tensor] = None) -> Routing:
        """x: ``[T, d]`` token vectors -> :class:`Routing`. ``token_mask`` ``[T]`` bool
        (only for ``accepts_token_mask`` routers): False rows are padding, which get
        expert -1 and stay out of capacity and losses; None = every row is a token."""
        raise NotImplementedError

    def fused_route(self, x: Tensor, token_mask: Optional[Tensor] = None) -> Optional[Routing]:
        """The single-pass routing of ``x [T, d]`` computed by fused GPU kernels
        (``moe_fairseq.kernels``), equal to :meth:`route`'s, with
        ``Routing.block_counts`` set so that the dispatcher can plan without a sort; or
        None when this router has no fused kernels for its settings (the layer then
        calls the router as usual). The layer asks only on its fused path
        (``--moe-kernels``), where the kernels can run on ``x``."""
        return None

    def pass_stream(self, z: Tensor, pass_index: int) -> Tensor:
        """Multi-pass routers: the stream ``[T, d]`` pass ``pass_index >= 1`` continues
        from (its output is added to it), from the tokens' running streams ``z``."""
        return z

    def pass_input(self, s: Tensor, pass_index: int) -> Tensor:
        """Multi-pass routers: the vectors ``[T, d]`` that pass ``pass_index >= 1``
        routes and its experts see, from the streams ``s`` of :meth:`pass_stream`."""
        return s

    def finish_stream(self, z: Tensor) -> Tensor:
        """``stream_output`` routers: the block output ``[T, d]`` from the final streams."""
        return z

    def forward(self, x: Tensor, pass_index: int = 0, token_mask: Optional[Tensor] = None) -> Routing:
        if token_mask is None:
            return self.route(x, pass_index)
        if not self.accepts_token_mask:
            raise TypeError(f"{type(self).__name__} does not take a token_mask")
        return self.route(x, pass_index, token_mask=token_mask)


# Training capacity rules (``--moe-capacity-rule``), C = capacity factor, k = top-k,
# T = tokens of the pass, E = experts that can be chosen:
# - joint:    ceil(C * k * T / E)  (GShard/Switch formula, rounded once)
# - per-slot: k * ceil(C * T / E)  (fairseq's top2gating and the SMoE authors' code:
#             2 * ceil(T / E) with C = 1)
# - tokens:   int(C * T)           (the MoEC authors' code: capacity factor times the
#             local tokens, whatever E; with C >= 1 it never binds in one process)
CAPACITY_RULES = ("joint", "per-slot", "tokens")


def capacity_for(
    num_tokens: Union[int, Tensor],
    num_experts: int,
    top_k: int,
    training: bool,
    capacity_factor: float,
    eval_capacity_token_fraction: float,
    rule: str = "joint",
) -> Union[None, int, Tensor]:
    """Expert capacity as in GShard/Switch and fairseq's MoE branch.

    Training: by ``rule`` (see ``CAPACITY_RULES``; default ``ceil(C * k * T / E)``);
    ``capacity_factor == 0`` means dropless (no limit, as in MegaBlocks).
    Inference: ``ceil(fraction * T)``, where a fraction <= 0 or >= 1 means no limit
    (an expert can never receive more than T assignments in one pass).

    ``num_tokens`` may be a 0-dim int64 tensor (the tokens of a masked batch, still
    on the device): the capacity is then a 0-dim int64 tensor computed there in
    float64, equal to the int the same formula gives, with no host sync.
    """
    if training and rule not in CAPACITY_RULES:
        raise ValueError(f"--moe-capacity-rule must be one of {list(CAPACITY_RULES)}, got {rule!r}")
    if training and capacity_factor == 0:
        return None
    frac = eval_capacity_token_fraction
    if not training and (frac <= 0 or frac >= 1):
        return None
    if isinstance(num_tokens, Tensor):
        T = num_tokens.to(torch.float64)
        if not training:
            cap = torch.ceil(frac * T)
        elif rule == "joint":
            cap = torch.ceil(capacity_factor * top_k * T / num_experts)
        elif rule == "per-slot":
            cap = top_k * torch.ceil(capacity_factor * T / num_experts)
        else:
            cap = torch.floor(capacity_factor * T)
        cap = cap.clamp_min(1).to(torch.long)
        return torch.where(num_tokens > 0, cap, torch.zeros_like(cap))
    if num_tokens == 0:
        return 0
    if not training:
        return max(1, math.ceil(frac * num_tokens))
    if rule == "joint":
        return max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts))
    if rule == "per-slot":
        return max(1, top_k * math.ceil(capacity_factor * num_tokens / num_experts))
    return max(1, int(capacity_factor * num_tokens))


def entropy_of(probs: Tensor, token_mask: Optional[Tensor] = None) -> Tensor:
    """Mean per-token entropy (nats) of ``probs [T, E]`` over the tokens of
    ``token_mask [T]`` (None = all rows); 0 for no tokens."""
    if probs.numel() == 0:
        return probs.new_zeros(())
    p = probs.float()
    return masked_mean(-(p * torch.log(p.clamp_min(1e-9))).sum(-1), token_mask)
