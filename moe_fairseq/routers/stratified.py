"""SMoE stratified router (Xu et al. 2023, arXiv 2305.02176): dynamic capacity.

The E experts of a layer are split into L strata of consecutive experts
(``--smoe-strata 4,12``: experts 0-3 are stratum 0, experts 4-15 stratum 1).
Every token starts at stratum 0. At stratum i:

- the token vector: stratum 0 sees the layer's usual FFN input; strata i >= 1
  see the token's residual stream through a LayerNorm of their own, as set by
  ``--smoe-stratum-norm`` (below);
- a gate of its own scores the *visible* experts, those of strata i..L-1, and
  the token goes to its top-k of them (k = ``--moe-top-k``, 2 in the paper);
- capacity per expert follows ``--moe-capacity-rule`` (the presets: ``per-slot``,
  ``k * ceil(C * T_i / E_i)`` = ``2 * ceil(T_i / E_i)`` as in the authors' code),
  with T_i the tokens at stratum i and E_i the visible experts; inference honours
  ``--moe-eval-capacity-token-fraction``;
- the balance loss is ``E_i * sum_e f_e p_e`` over the visible experts; the layer
  averages it over the strata that had tokens;
- the token's next stratum is (stratum of its top-1 expert) + 1: it may skip
  strata, never goes back, and leaves the layer after the last stratum.

So a token gets 1..L expert passes; their mean is the "requested capacity".
Each stratum is one pass of the MoE layer's pass loop (``num_passes = L``); tokens
wait in the layer while an earlier stratum runs.

``--smoe-stratum-norm`` (z: the token's stream, r + outputs so far):
- ``post-ln`` (the authors' ``--hmoe-layernorm 1``, read from their fork
  fe1ixxu/Stratified_Mixture_of_Experts, ``transformer_layer_ed.py``): L
  LayerNorms; a token entering stratum i >= 1 continues from ``LN_{i-1}(z)``
  (stream and expert input alike), ``z <- LN_{i-1}(z) + MoE_i(LN_{i-1}(z))``, and
  the block's output is ``LN_{L-1}(z)`` of the final stream, in pre- and post-norm
  models alike (post-norm: it replaces ``final_layer_norm``; the block adds no
  residual of its own). The block's dropout applies to each stratum's output
  before it joins the stream (the fork drops out inside each expert);
- ``gate-input`` (this plugin's first design): L-1 LayerNorms; stratum i >= 1
  routes and runs ``LN_{i-1}(z)`` but the stream stays raw, ``z <- z + MoE_i``, and
  the block adds ``sum_i MoE_i`` to its residual like any FFN;
- ``none`` (``--hmoe-layernorm 0``): no LayerNorm, ``z <- z + MoE_i(z)``.

Difference from the authors' fork kept on purpose: under expert parallelism
every rank runs all L passes instead of an all-reduce of the lowest stratum
each pass (same outputs, no extra collective).
"""

from typing import List, Sequence

import torch
from torch import Tensor, nn

from .base import Router, Routing
from .top_k import TopKRouter

STRATUM_NORMS = ("post-ln", "gate-input", "none")


def parse_strata(spec) -> List[int]:
    """``"4,12"`` (or a sequence of ints) -> ``[4, 12]``; ValueError if malformed."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"expected comma-separated positive integers, got {spec!r}")
        strata = [int(p) for p in parts]
    else:
        strata = [int(n) for n in spec]
    if not strata or min(strata) < 1:
        raise ValueError(f"every stratum needs at least one expert, got {spec!r}")
    return strata


class StratifiedRouter(Router):
    """Top-k routing over strata of experts (module docstring).

    Args:
        embed_dim: token vector size d.
        strata: experts per stratum, e.g. ``[4, 12]``; E = their sum.
        stratum_norm: ``post-ln``, ``gate-input`` or ``none`` (module docstring).
        **top_k_kwargs: passed to each stratum's :class:`TopKRouter` (``top_k``,
            ``capacity_factor``, ``eval_capacity_token_fraction``,
            ``second_expert_policy``, ``normalize_gates``, ``jitter_eps``).

    Parameters: ``gates[i]`` (a :class:`TopKRouter` over the ``E_i`` visible
    experts of stratum i) and ``norms[i - 1]`` (the LayerNorm of stratum i >= 1;
    with ``post-ln`` also ``norms[L - 1]``, the block's output norm).
    """

    def __init__(self, embed_dim: int, strata: Sequence[int], stratum_norm: str = "post-ln",
                 **top_k_kwargs):
        super().__init__()
        if stratum_norm not in STRATUM_NORMS:
            raise ValueError(
                f"--smoe-stratum-norm must be one of {list(STRATUM_NORMS)}, got {stratum_norm!r}"
            )
        self.stratum_norm = stratum_norm
        self.stream_output = stratum_norm == "post-ln"
        self.strata = parse_strata(strata)
        L = len(self.strata)
        self.num_experts = sum(self.strata)
        self.num_passes = L
        top_k = top_k_kwargs.get("top_k", 2)
        if top_k > self.strata[-1]:
            raise ValueError(
                f"--moe-top-k {top_k} is larger than the last stratum ({self.strata[-1]} "
                f"experts in --smoe-strata {','.join(map(str, self.strata))})"
            )
        # First global expert of each stratum; stratum i sees experts offsets[i]..E-1.
        self.offsets = [sum(self.strata[:i]) for i in range(L)]
        self.gates = nn.ModuleList(
            TopKRouter(embed_dim, self.num_experts - self.offsets[i], **top_k_kwargs)
            for i in range(L)
        )
        num_norms = {"post-ln": L, "gate-input": L - 1, "none": 0}[stratum_norm]
        self.norms = (
            nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(num_norms))
            if stratum_norm != "none" else None
        )
        stratum_of = torch.repeat_interleave(torch.arange(L), torch.tensor(self.strata))
        self.register_buffer("stratum_of_expert", stratum_of, persistent=False)

    def pass_stream(self, z: Tensor, pass_index: int) -> Tensor:
        if self.stratum_norm == "post-ln" and pass_index > 0:
            return self.norms[pass_index - 1](z)
        return z

    def pass_input(self, s: Tensor, pass_index: int) -> Tensor:
        if self.stratum_norm == "gate-input" and pass_index > 0:
            return self.norms[pass_index - 1](s)
        return s

    def finish_stream(self, z: Tensor) -> Tensor:
        return self.norms[-1](z) if self.stratum_norm == "post-ln" else z

    def route(self, x: Tensor, pass_index: int = 0) -> Routing:
        """x ``[T_i, d]`` tokens at stratum ``pass_index`` -> Routing over global experts,
        with ``next_pass`` ``[T_i]`` = stratum of the top-1 expert + 1 (L = leave)."""
        gate = self.gates[pass_index]
        routing = gate.route(x)
        offset = self.offsets[pass_index]
        local = routing.expert_index
        routing.expert_index = torch.where(local >= 0, local + offset, local)
        first = routing.expert_index[:, 0]  # the top-1 expert is never left out
        routing.next_pass = self.stratum_of_expert[first] + 1
        return routing

    def extra_repr(self) -> str:
        return f"strata={self.strata}, stratum_norm={self.stratum_norm}"
