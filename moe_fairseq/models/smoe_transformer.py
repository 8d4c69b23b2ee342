"""SMoE presets (arXiv 2305.02176) on the ``moe_transformer`` model: stratified
experts with dynamic capacity (``--moe-router stratified``, see
``routers/stratified.py``).

| preset | experts | ``--smoe-strata`` | sizes |
| --- | --- | --- | --- |
| ``smoe_transformer_tiny`` | 4 | 2,2 | ``moe_transformer_tiny`` |
| ``smoe_transformer_base`` | 8 | 2,2,2,2 (the paper's best M4 model, SMoE-2-2-2-2) | ``moe_transformer_base`` |
| ``smoe_transformer_big`` | 16 | 4,12 (the paper's M15 model, SMoE-4-12) | ``moe_transformer_big`` |

Common to all, from the authors' code and recipe (fe1ixxu/Stratified_Mixture_of_Experts):
pre-norm encoder and decoder; top-2 within the visible experts, the two gates
renormalized after capacity dropping (``--moe-normalize-gates``, fairseq's rule);
capacity ``2 * ceil(T_i / E_i)`` (``--moe-capacity-rule per-slot``,
``--moe-capacity-factor 1``); post-LN strata (``--smoe-stratum-norm post-ln``: each
stratum >= 1 continues from LN(stream), the block outputs LN of the final stream);
MoE in every other FFN (``--moe-freq 2``); gate loss weight 0.01 averaged over MoE
layers (the criterion's defaults). Every routing flag can be overridden on the
command line; ``--moe-expert-count`` must then still equal the sum of
``--smoe-strata``. Pre-norm is fixed by the preset (fairseq has no flag to turn it
off): for a post-norm SMoE use ``--arch moe_transformer_* --moe-router stratified``.
Ours, not the authors': the second expert at inference is the second best
(``--moe-eval-second-expert-policy sampling`` samples it as they do).
"""

from fairseq.models import register_model_architecture

from ..args_version import apply_args_version, set_defaults
from ..routers.stratified import parse_strata
from .moe_transformer import moe_transformer_base, moe_transformer_big, moe_transformer_tiny


def _smoe_defaults(args, strata: str) -> None:
    if apply_args_version(args):
        # Pre-norm, on a fresh command line (fairseq has no flag to turn it off; an
        # upcycled dense model's post-norm is replaced, as upcycle.py reports). A
        # checkpoint, or the one a run resumes, keeps the placement it records
        # (post-norm in version 1).
        args.encoder_normalize_before = True
        args.decoder_normalize_before = True
    set_defaults(
        args,
        moe_router="stratified",
        moe_top_k=2,
        moe_capacity_factor=1.0,
        moe_capacity_rule="per-slot",
        smoe_strata=strata,
        smoe_stratum_norm="post-ln",
    )
    # The expert count follows the strata unless given; a mismatch, or strata that
    # do not parse, are refused with the flag named by validate_smoe_args.
    if getattr(args, "moe_expert_count", None) is None:
        try:
            args.moe_expert_count = sum(parse_strata(args.smoe_strata))
        except ValueError:
            pass


@register_model_architecture("moe_transformer", "smoe_transformer_tiny")
def smoe_transformer_tiny(args):
    _smoe_defaults(args, "2,2")
    moe_transformer_tiny(args)


@register_model_architecture("moe_transformer", "smoe_transformer_base")
def smoe_transformer_base(args):
    _smoe_defaults(args, "2,2,2,2")
    moe_transformer_base(args)


@register_model_architecture("moe_transformer", "smoe_transformer_big")
def smoe_transformer_big(args):
    _smoe_defaults(args, "4,12")
    moe_transformer_big(args)
