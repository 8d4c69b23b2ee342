"""Which target language each sentence of a multilingual batch translates into.

For ``--task translation_multi_simple_epoch`` the language is read from the
language tokens fairseq puts in the batch: with ``--decoder-langtok``,
``prev_output_tokens[:, 0]`` is ``__tgt__``; with ``--encoder-langtok tgt``, the
source's end-of-sentence token was replaced by ``__tgt__``. The criterion uses
this to log SMoE's requested capacity per target language.
"""

from typing import List, Optional, Tuple

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
        tokens = net_input["prev_output_tokens"][:, 0]
    elif getattr(args, "encoder_langtok", None) == "tgt":
        src = net_input["src_tokens"]
        if getattr(args, "left_pad_source", True):
            tokens = src[:, -1]
        else:
            tokens = src.gather(1, (net_input["src_lengths"] - 1).clamp_min(0)[:, None]).squeeze(1)
    else:
        return None
    lookup = lookup.to(tokens.device)
    valid = (tokens >= 0) & (tokens < lookup.numel())
    index = torch.where(valid, lookup[tokens.clamp(0, lookup.numel() - 1)],
                        torch.full_like(tokens, -1))
    return index, names
