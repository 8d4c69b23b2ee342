"""target_language_index: the target language of each sentence, from the language
token fairseq's multilingual task puts in the batch."""

from argparse import Namespace

import torch
from fairseq.data import Dictionary

from moe_fairseq.target_language import target_language_index


class FakeTask:
    def __init__(self, **flags):
        self.langs = ["de", "en", "sw"]
        self.args = Namespace(lang_tok_style="multilingual", **flags)
        d = Dictionary()
        for w in ("w1", "w2", "w3", "__de__", "__en__", "__sw__"):
            d.add_symbol(w)
        self.target_dictionary = d


def ids(task, *words):
    return [task.target_dictionary.index(w) for w in words]


def test_decoder_langtok_leading_the_target_or_prev_output_tokens():
    task = FakeTask(decoder_langtok=True, encoder_langtok=None)
    eos, pad = task.target_dictionary.eos(), task.target_dictionary.pad()
    target = torch.tensor([ids(task, "__sw__", "w1", "w2"), ids(task, "__de__", "w3", "w1")])
    prev = torch.cat([torch.full((2, 1), eos), target[:, :-1]], dim=1)
    sample = {"net_input": {"src_tokens": torch.tensor([[pad, 5], [6, 7]]),
                            "prev_output_tokens": prev}, "target": target}
    index, names = target_language_index(task, sample)
    assert [names[i] for i in index.tolist()] == ["sw", "de"]
    # Inference-style batch: no target, the token replaces the BOS.
    prev = torch.tensor([ids(task, "__en__", "w1"), ids(task, "w2", "w3")])
    index, names = target_language_index(task, {"net_input": {"prev_output_tokens": prev}})
    assert index.tolist() == [1, -1]  # second sentence carries no language token


def test_encoder_langtok_tgt_prepended_or_replacing_eos():
    task = FakeTask(decoder_langtok=False, encoder_langtok="tgt")
    pad, eos = task.target_dictionary.pad(), task.target_dictionary.eos()
    src = torch.tensor([
        [pad, *ids(task, "__de__", "w1", "w2"), eos],   # prepended, left padded
        [*ids(task, "w1", "w2", "w3", "w1"), ids(task, "__sw__")[0]],  # in place of eos
    ])
    index, names = target_language_index(task, {"net_input": {"src_tokens": src}})
    assert [names[i] for i in index.tolist()] == ["de", "sw"]


def test_no_language_tokens():
    assert target_language_index(FakeTask(decoder_langtok=False, encoder_langtok="src"),
                                 {"net_input": {"src_tokens": torch.ones(2, 3).long()}}) is None

    class Bilingual:
        args = Namespace()

    assert target_language_index(Bilingual(), {"net_input": {}}) is None
