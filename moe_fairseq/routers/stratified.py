"""SMoE stratified router (Xu et al. 2023, arXiv 2305.02176): dynamic capacity.

The E experts of a layer are split into L strata of consecutive experts
(``--smoe-strata 4,12``: experts 0-3 are stratum 0, experts 4-15 stratum 1).
Every token starts at stratum 0. At stratum i:

- the token vector is ``LN_i(h)`` (``h`` its residual stream so far; stratum 0
  sees the layer's usual FFN input, strata i >= 1 their own LayerNorm with
  ``--smoe-stratum-layernorm``, else ``h`` itself);
- a gate of its own scores the *visible* experts, those of strata i..L-1, and
  the token goes to its top-k of them (k = ``--moe-top-k``, 2 in the paper);
- capacity per expert is ``ceil(C * k * T_i / E_i)`` (C = ``--moe-capacity-factor``,
  1 in the paper, so ``2 T_i / E_i``), with T_i the tokens at stratum i and E_i
  the visible experts; inference honours ``--moe-eval-capacity-token-fraction``;
- the balance loss is ``E_i * sum_e f_e p_e`` over the visible experts; the layer
  averages it over the strata that had tokens;
- the token's next stratum is (stratum of its top-1 expert) + 1: it may skip
  strata, never goes back, and leaves the layer after the last stratum.

So a token gets 1..L expert passes; their mean is the "requested capacity".
Each stratum is one pass of the MoE layer's pass loop (``num_passes = L``); tokens
wait in the layer while an earlier stratum runs.

Differences from the authors' fork (fe1ixxu/Stratified_Mixture_of_Experts), kept
on purpose: under expert parallelism every rank runs all L passes instead of an
all-reduce of the lowest stratum each pass (same outputs, no extra collective);
the layer's own dropout and final LayerNorm apply to the summed output as in
any MoE layer (the fork drops out inside each expert, and with its per-stratum
LayerNorm on it normalizes the layer output with the last stratum's norm
instead of ``final_layer_norm``).
"""

from typing import List, Sequence

import torch
from torch import Tensor, nn

from .base import Router, Routing
from .top_k import TopKRouter


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
        stratum_layernorm: a LayerNorm on the tokens entering each stratum i >= 1.
        **top_k_kwargs: passed to each stratum's :class:`TopKRouter` (``top_k``,
            ``capacity_factor``, ``eval_capacity_token_fraction``,
            ``second_expert_policy``, ``normalize_gates``, ``jitter_eps``).

    Parameters: ``gates[i]`` (a :class:`TopKRouter` over the ``E_i`` visible
    experts of stratum i) and ``norms[i - 1]`` (the LayerNorm of stratum i >= 1).
    """

    def __init__(self, embed_dim: int, strata: Sequence[int], stratum_layernorm: bool = True,
                 **top_k_kwargs):
        super().__init__()
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
        self.norms = (
            nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(L - 1))
            if stratum_layernorm else None
        )
        stratum_of = torch.repeat_interleave(torch.arange(L), torch.tensor(self.strata))
        self.register_buffer("stratum_of_expert", stratum_of, persistent=False)

    def pass_input(self, h: Tensor, pass_index: int) -> Tensor:
        if self.norms is None or pass_index == 0:
            return h
        return self.norms[pass_index - 1](h)

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
        return f"strata={self.strata}, stratum_layernorm={self.norms is not None}"
