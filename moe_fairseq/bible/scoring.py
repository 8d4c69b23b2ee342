"""Corpus BLEU and chrF with sacrebleu, single- and multi-reference.

Each score is sacrebleu's own corpus score; its signature is kept with it so a
table says how it was computed (tokenizer, number of references, version).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

#: sacrebleu tokenizer per target language. Chinese has its own; Japanese
#: ('ja-mecab') needs MeCab, so characters are used instead; everything else
#: uses the default 13a. chrF does not tokenize.
TOKENIZERS: Dict[str, str] = {"zh": "zh", "ja": "char"}


def tokenizer_for(lang: str, override: Optional[str] = None) -> str:
    return override or TOKENIZERS.get(lang, "13a")


def _check(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if not refs:
        raise ValueError("no reference stream given")
    for i, stream in enumerate(refs):
        if len(stream) != len(hyps):
            raise ValueError(
                f"reference stream {i} has {len(stream)} lines, the hypotheses {len(hyps)}"
            )


def corpus_scores(
    hyps: Sequence[str],
    refs: Sequence[Sequence[str]],
    tokenize: str = "13a",
) -> Dict[str, object]:
    """BLEU and chrF of ``hyps`` against one or more reference streams.

    ``refs`` is a list of streams, each as long as ``hyps`` (sacrebleu's
    layout). Returns ``{"bleu", "chrf", "bleu_signature", "chrf_signature",
    "nrefs", "bleu_details"}``.
    """
    from sacrebleu.metrics import BLEU, CHRF

    hyps = list(hyps)
    refs = [list(r) for r in refs]
    _check(hyps, refs)
    bleu = BLEU(tokenize=tokenize)
    chrf = CHRF()
    b = bleu.corpus_score(hyps, refs)
    c = chrf.corpus_score(hyps, refs)
    return {
        "bleu": b.score,
        "chrf": c.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "nrefs": len(refs),
        "bleu_details": {
            "precisions": list(b.precisions),
            "bp": b.bp,
            "sys_len": b.sys_len,
            "ref_len": b.ref_len,
        },
    }


def score_direction(
    hyps: Sequence[str],
    ref: Sequence[str],
    extra_refs: Optional[Dict[str, Sequence[str]]] = None,
    tgt_lang: str = "en",
    tokenize: Optional[str] = None,
) -> Dict[str, object]:
    """Single-reference scores, plus multi-reference ones when ``extra_refs`` are given.

    Multi-reference: ``ref`` followed by the extra streams in the order given.
    """
    tok = tokenizer_for(tgt_lang, tokenize)
    out: Dict[str, object] = {"n": len(hyps), "tokenize": tok}
    single = corpus_scores(hyps, [ref], tok)
    out.update(single)
    if extra_refs:
        streams: List[Sequence[str]] = [ref, *extra_refs.values()]
        multi = corpus_scores(hyps, streams, tok)
        out["multi"] = {**multi, "refs": ["primary", *extra_refs.keys()]}
    return out
