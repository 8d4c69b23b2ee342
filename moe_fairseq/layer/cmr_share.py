"""CMR's gate share (``--moe-cmr``): how much of each token's FFN output the MoE layer
gives (the mean CMR gate g over non-padding tokens), counted from the MoE layers'
stats of a forward, overall and per target language.

As ``requested_capacity.py`` for SMoE: :func:`cmr_counts` gives sums that add up over
batches and ranks (the criterion logs them, and fairseq's TensorBoard writer shows the
logged shares); :func:`cmr_summary` turns summed counts into shares. fairseq's CMR logs
the same share per language from the source prefix token (``cmr_lang_gates``), as a
mean over sentences; here it is token-weighted, per target language.

Count keys: ``cmr_gate`` (sum of g over layers and tokens), ``cmr_tokens``, and, when
the batch carries target-language tokens, ``cmr_gate_<lang>`` / ``cmr_tokens_<lang>``.
"""

from typing import Dict, List, Optional

from ..target_language import ratios_by_target_language, sums_by_target_language

_LANG_GATE = "cmr_gate_"
_LANG_TOKENS = "cmr_tokens_"


def cmr_layers(stats: List) -> List:
    """The stats of the layers with a CMR gate."""
    return [s for s in stats if s.cmr_gate_sum is not None]


def cmr_counts(stats: List, task=None, sample=None) -> Dict[str, float]:
    """Sums of one forward (empty without CMR layers); with ``task`` and ``sample``,
    also per target language."""
    layers = cmr_layers(stats)
    if not layers:
        return {}
    out = {"cmr_gate": sum(float(s.cmr_gate_sum.detach()) for s in layers),
           "cmr_tokens": sum(int(s.cmr_tokens) for s in layers)}
    if task is None:
        return out
    # Token counts as ints (the gate's dtype holds them exactly).
    out.update(sums_by_target_language(task, sample, {
        _LANG_GATE: sum(s.sentence_cmr_gate for s in layers),
        _LANG_TOKENS: sum(s.sentence_cmr_tokens for s in layers).long()}))
    return out


def cmr_summary(counts: Dict[str, float]) -> Optional[dict]:
    """Summed counts -> ``{"gate_share", "tokens", "by_target_language": {lang: share},
    "language_tokens": {lang: tokens}}``, or None without CMR tokens."""
    tokens = counts.get("cmr_tokens", 0)
    if not tokens:
        return None
    by_lang, lang_tokens = ratios_by_target_language(counts, _LANG_GATE, _LANG_TOKENS)
    return {"gate_share": counts["cmr_gate"] / tokens, "tokens": tokens,
            "by_target_language": by_lang, "language_tokens": lang_tokens}


def is_cmr_count_key(key: str) -> bool:
    return key in ("cmr_gate", "cmr_tokens") or key.startswith((_LANG_GATE, _LANG_TOKENS))
