"""Expert output masking (EOM, ``--moe-eom P``): NLLB-MoE's regularizer against
overfitting low-resource directions (arXiv 2207.04672, Sec. 6.2).

In fairseq's ``MOELayer`` (its ``tok_dropout``, set from ``--moe-eom``) every
(token, expert) output slot is zeroed in training when a uniform draw is not above P,
with no rescaling of the rest, and at inference every expert output is scaled by 1 - P.
A token whose outputs are all masked passes on its residual only.

Here the mask is drawn per token and slot, ``[k * T]`` in the plan's assignment order
``j * T + t``, on the tokens' own rank: under expert parallelism each rank draws the
masks of its own tokens before any row travels, exactly what one process draws for the
same tokens. It is applied to the rows' gates, which drops the row's contribution and
the gradient through it as fairseq's mask on the expert output does. Output mixing
(``Routing.mix_input``, MoEC) keeps the token's own share: only expert outputs are masked.
"""

import dataclasses

import torch

from .dispatcher import DispatchPlan


def mask_expert_outputs(plan: DispatchPlan, p: float, training: bool) -> DispatchPlan:
    """``plan`` with its ``row_gates [N]`` masked (training: each token-expert slot kept
    when U[0,1) > p) or scaled by ``1 - p`` (inference); ``plan`` itself when p is 0."""
    if p <= 0:
        return plan
    gates = plan.row_gates
    if training:
        draw = torch.rand(plan.num_slots * plan.num_tokens, device=gates.device)
        scale = (draw > p)[plan.assignment_index].to(gates.dtype)
    else:
        scale = 1.0 - p
    return dataclasses.replace(plan, row_gates=gates * scale)
