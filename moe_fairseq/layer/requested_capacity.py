"""SMoE's requested capacity: expert passes per token, counted from the MoE layers'
stats of a forward, overall, per stratum and per target language.

:func:`capacity_counts` gives integer counts that can be summed over batches and
ranks (the criterion logs them, ``scripts/expert_load.py`` sums them over a split);
:func:`capacity_summary` turns summed counts into ratios. Only layers whose router
makes more than one pass count.

Count keys: ``smoe_tokens`` (routed tokens, summed over layers), ``smoe_passes``
(token-passes), ``smoe_s<i>_tokens`` (tokens reaching stratum i) and, when the
batch carries target-language tokens, ``smoe_passes_<lang>`` / ``smoe_tokens_<lang>``.
"""

import re
from typing import Dict, List, Optional

from ..target_language import ratios_by_target_language, sums_by_target_language

_STRATUM_KEY = re.compile(r"smoe_s(\d+)_tokens$")
_LANG_TOKENS = "smoe_tokens_"
_LANG_PASSES = "smoe_passes_"


def capacity_counts(stats: List, task=None, sample=None) -> Dict[str, int]:
    """Counts of one forward from the MoE layers' :class:`MoEStats` (empty when no
    layer is multi-pass). With ``task`` and ``sample``, also per target language."""
    layers = [s for s in stats if s.pass_tokens is not None and s.pass_tokens.numel() > 1]
    if not layers:
        return {}
    out = {
        "smoe_tokens": sum(int(s.tokens) for s in layers),
        "smoe_passes": sum(int(s.expert_passes) for s in layers),
    }
    for s in layers:
        for i, n in enumerate(s.pass_tokens.tolist()):
            out[f"smoe_s{i}_tokens"] = out.get(f"smoe_s{i}_tokens", 0) + n
    if task is None or any(s.sentence_passes is None for s in layers):
        return out
    out.update(sums_by_target_language(task, sample, {
        _LANG_PASSES: sum(s.sentence_passes for s in layers),
        _LANG_TOKENS: sum(s.sentence_tokens for s in layers)}))
    return out


def capacity_summary(counts: Dict[str, float]) -> Optional[dict]:
    """Summed counts -> ``{"requested_capacity", "tokens", "stratum_share": [...],
    "by_target_language": {lang: rc}, "language_tokens": {lang: tokens}}``, or None
    without multi-pass tokens."""
    tokens = counts.get("smoe_tokens", 0)
    if not tokens:
        return None
    strata = sorted(int(m.group(1)) for k in counts for m in [_STRATUM_KEY.match(k)] if m)
    by_lang, lang_tokens = ratios_by_target_language(counts, _LANG_PASSES, _LANG_TOKENS)
    return {
        "requested_capacity": counts["smoe_passes"] / tokens,
        "tokens": tokens,
        "stratum_share": [counts[f"smoe_s{i}_tokens"] / tokens for i in strata],
        "by_target_language": by_lang,
        "language_tokens": lang_tokens,
    }


def is_count_key(key: str) -> bool:
    return key in ("smoe_tokens", "smoe_passes") or bool(
        _STRATUM_KEY.match(key) or key.startswith((_LANG_TOKENS, _LANG_PASSES)))
