"""Which target language each sentence of a multilingual batch translates into.

For ``--task translation_multi_simple_epoch`` the language is read from the
``__tgt__`` token fairseq puts in the batch: at the start of the target with
``--decoder-langtok``, in the source with ``--encoder-langtok tgt``. The criterion
uses this to log SMoE's requested capacity per target language.
"""

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor


def _langtok_table(task) -> Optional[Tuple[Tensor, List[str]]]:
    """``[V]`` int64 (vocabulary id -> index in task.langs, -1 if not a language
    token) and the language names; None for tasks without language tokens."""
    cached = getattr(task, "_moe_langtok_table", None)
    if cached is not None:
        return cached
    langs = getattr(task, "langs", None)
    args = getattr(task, "args", None)
    if not langs or args is None:
        return None
    from fairseq.data.multilingual.multilingual_utils import get_lang_tok

    dictionary = task.target_dictionary
    style = getattr(args, "lang_tok_style", "multilingual")
    table = torch.full((len(dictionary),), -1, dtype=torch.long)
    for i, lang in enumerate(langs):
        idx = dictionary.index(get_lang_tok(lang, style))
        if idx != dictionary.unk_index:
            table[idx] = i
    task._moe_langtok_table = (table, list(langs))
    return task._moe_langtok_table


def target_language_index(task, sample) -> Optional[Tuple[Tensor, List[str]]]:
    """``([B] int64 index into the names, -1 = unknown), names)`` for a batch, or
    None when the task or its flags carry no target-language token."""
    table = _langtok_table(task)
    if table is None:
        return None
    lookup, names = table
    args = task.args
    net_input = sample["net_input"]
    if getattr(args, "decoder_langtok", False) and "prev_output_tokens" in net_input:
        # fairseq versions differ: the token leads the target (training) or replaces
        # the beginning-of-sentence of prev_output_tokens.
        prev = net_input["prev_output_tokens"][:, :2]
        columns = [prev] if sample.get("target") is None else [sample["target"][:, :1], prev]
        candidates = torch.cat(columns, dim=1)
    elif getattr(args, "encoder_langtok", None) == "tgt":
        # Prepended to the source or put in place of its end-of-sentence token.
        candidates = net_input["src_tokens"]
    else:
        return None
    lookup = lookup.to(candidates.device)
    in_vocab = (candidates >= 0) & (candidates < lookup.numel())
    langs = torch.where(in_vocab, lookup[candidates.clamp(0, lookup.numel() - 1)],
                        torch.full_like(candidates, -1))
    if langs.size(1) == 0:
        return torch.full((langs.size(0),), -1, dtype=torch.long, device=langs.device), names
    first = (langs >= 0).to(torch.int8).argmax(dim=1)  # first language token of each row
    return langs.gather(1, first[:, None]).squeeze(1), names


def sums_by_target_language(task, sample, values: Dict[str, Tensor]
                            ) -> Dict[str, Union[int, float]]:
    """Log keys ``<prefix><lang>``: each ``values[prefix]`` (``[B]``, one value per
    sentence of the batch) summed over the sentences translated into ``lang`` (integer
    tensors give ints), the keys :func:`ratios_by_target_language` reads. Empty when the
    batch carries no target-language token or a value is not ``[B]``-shaped."""
    found = target_language_index(task, sample)
    if found is None:
        return {}
    index, names = found
    if any(v.numel() != index.numel() for v in values.values()):
        return {}
    out = {}
    for i in index.unique().tolist():
        if i >= 0:
            for prefix, v in values.items():
                out[prefix + names[i]] = v[(index == i).to(v.device)].sum().item()
    return out


def ratios_by_target_language(counts: Dict[str, float], numerator: str, denominator: str
                              ) -> Tuple[Dict[str, float], Dict[str, float]]:
    """From summed per-language log keys ``<numerator><lang>`` / ``<denominator><lang>``
    (as :func:`sums_by_target_language` writes them): ``({lang: ratio},
    {lang: denominator})`` for the languages whose denominator is not 0, sorted."""
    langs = sorted(k[len(denominator):] for k in counts
                   if k.startswith(denominator) and counts[k])
    return ({lang: counts[numerator + lang] / counts[denominator + lang] for lang in langs},
            {lang: counts[denominator + lang] for lang in langs})


def expert_language_counts(first_expert: Tensor, sentence_language: Tensor, num_experts: int,
                           num_languages: int) -> Optional[Tensor]:
    """``[E, L]`` int64 counts of (first-choice expert, sentence language) over the routed
    tokens of a layer, on the device and without a host sync.

    ``first_expert`` ``[T, B]`` (``MoEStats.first_expert`` of a fairseq transformer layer,
    which sees ``[T, B, C]``; -1 = padding), ``sentence_language`` ``[B]`` (from
    :func:`target_language_index`; -1 = unknown). None when ``first_expert`` is not laid
    out that way."""
    if first_expert is None or first_expert.dim() != 2 or first_expert.size(1) != sentence_language.numel():
        return None
    lang = sentence_language.to(first_expert.device)[None, :].expand_as(first_expert)
    keep = (first_expert >= 0) & (lang >= 0)
    counts = torch.zeros(num_experts * num_languages, dtype=torch.long, device=first_expert.device)
    counts.scatter_add_(0, (first_expert.clamp_min(0) * num_languages + lang.clamp_min(0)).reshape(-1),
                        keep.reshape(-1).long())
    return counts.view(num_experts, num_languages)
