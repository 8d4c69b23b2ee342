"""Run a trained model over a data split, one translation direction at a time, and
count what its routers did (:class:`~moe_fairseq.analysis.routing_counts.RoutingCounts`).

Batches of one direction at a time tell every token's source and target language,
with or without language tokens in the batch: for ``translation_multi_simple_epoch``
the task is set up once per ``--lang-pairs`` entry with ``--source-lang``/``--target-lang``
(as ``fairseq-generate`` does); a ``translation`` task has its one direction. The
model runs teacher-forced in eval mode (inference routing: eval capacity, no expert
dropout).
"""

import copy
import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..errors import OneLineError
from .routing_counts import LayerInfo, RoutingCounts

logger = logging.getLogger(__name__)


class RouteSplitError(OneLineError, ValueError):
    """Bad input for a routing pass: names the flag or file and what is allowed."""


@dataclass
class LoadedModel:
    path: str
    model: torch.nn.Module
    cfg: object
    task: object
    num_updates: Optional[int]

    @property
    def arch(self) -> str:
        return str(getattr(self.cfg.model, "arch", None) or getattr(self.cfg.model, "_name", "?"))


def _recorded_languages(path: str) -> List[str]:
    """The languages a checkpoint's task names (none if it lets fairseq infer them)."""
    from ..fairseq_fixes.checkpoint_fit import read_header

    _, state = read_header(path)
    task = (state or {}).get("cfg", {}).get("task") if isinstance(state, dict) else None
    get = (task.get if isinstance(task, dict) else lambda k, d=None: getattr(task, k, d))
    pairs = get("lang_pairs", None)
    if pairs:
        pairs = pairs.split(",") if isinstance(pairs, str) else list(pairs)
        return sorted({lang for pair in pairs for lang in pair.split("-")})
    return [lang for lang in (get("source_lang", None), get("target_lang", None)) if lang]


def check_data(path: str, data: str) -> None:
    """Before loading: ``--data`` is a folder holding the dictionaries of the languages
    the checkpoint was trained on (fairseq fails on it with a traceback otherwise)."""
    import os

    folder = str(data).split(os.pathsep)[0]
    if not os.path.isdir(folder):
        raise RouteSplitError(f"--data {data}: no such folder (give the data-bin the model "
                              "was trained on)")
    languages = _recorded_languages(path)
    missing = [lang for lang in languages
               if not os.path.isfile(os.path.join(folder, f"dict.{lang}.txt"))]
    if missing:
        raise RouteSplitError(
            f"--data {data} has no dict.{missing[0]}.txt: {path} was trained on the languages "
            f"{', '.join(languages)}; give the data-bin it was trained on")


def load_model(path: str, data: Optional[str] = None, device: str = "cpu") -> LoadedModel:
    """A checkpoint's model (eval mode, on ``device``), its config and task."""
    from fairseq import checkpoint_utils

    from ..fairseq_fixes.checkpoint_compat import recorded_updates

    if data:
        check_data(path, data)
    overrides = {"data": data} if data else {}
    state = checkpoint_utils.load_checkpoint_to_cpu(path, overrides)
    num_updates = recorded_updates(state)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [path], arg_overrides=overrides, state=state)
    model = models[0].eval()
    if device == "cuda":
        model.cuda()
    return LoadedModel(path, model, cfg, task, num_updates)


def model_directions(loaded: LoadedModel) -> List[str]:
    """``src-tgt`` directions the checkpoint was trained on."""
    task_cfg = loaded.cfg.task
    pairs = getattr(task_cfg, "lang_pairs", None)
    if pairs:
        return list(pairs.split(",") if isinstance(pairs, str) else pairs)
    # translation infers the pair from the data files when the flags were not given
    task_cfg = getattr(loaded.task, "cfg", None) or getattr(loaded.task, "args", None) or task_cfg
    src, tgt = getattr(task_cfg, "source_lang", None), getattr(task_cfg, "target_lang", None)
    if src and tgt:
        return [f"{src}-{tgt}"]
    raise RouteSplitError(
        f"--path {loaded.path}: its task ({getattr(task_cfg, '_name', '?')}) names no "
        "language pair (--source-lang/--target-lang or --lang-pairs)")


def _direction_task(loaded: LoadedModel, direction: str):
    """The checkpoint's task set up for one direction."""
    from fairseq import tasks
    from omegaconf import DictConfig, open_dict

    if not getattr(loaded.cfg.task, "lang_pairs", None):
        return loaded.task  # a bilingual task has its one direction
    src, tgt = direction.split("-")
    # A Namespace for tasks without a dataclass (translation_multi_simple_epoch).
    task_cfg = copy.deepcopy(loaded.cfg.task)
    if isinstance(task_cfg, DictConfig):
        with open_dict(task_cfg):
            task_cfg.source_lang, task_cfg.target_lang = src, tgt
    else:
        task_cfg.source_lang, task_cfg.target_lang = src, tgt
    return tasks.setup_task(task_cfg)


def split_exists(data: str, split: str, direction: str) -> bool:
    """Whether fairseq-preprocess wrote ``split`` for ``direction`` (either pair order)
    in the first folder of ``data`` (fairseq's multilingual loader fails with a KeyError
    on a missing split instead of saying so)."""
    import os

    src, tgt = direction.split("-")
    folder = str(data).split(os.pathsep)[0]
    return any(os.path.exists(os.path.join(folder, f"{split}.{a}-{b}.{src}{ext}"))
               for a, b in ((src, tgt), (tgt, src)) for ext in (".idx", ""))


def route_split(loaded: LoadedModel, split: str, directions: Optional[Sequence[str]] = None,
                max_tokens: int = 4000, max_sentences: int = 0) -> RoutingCounts:
    """Counts of every MoE layer of ``loaded.model`` over ``split``, per direction.

    ``directions``: a subset of the model's (default all); ``max_sentences``: stop each
    direction after about that many sentences (0 = the whole split). Directions whose
    split is missing are left out with a warning; none found is an error.
    """
    from fairseq import utils

    from ..layer.moe_layer import MoELayer

    model = loaded.model
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
    if not layers:
        raise RouteSplitError(f"--path {loaded.path}: {type(model).__name__} has no MoE layer")
    known = model_directions(loaded)
    directions = list(directions or known)
    unknown = [d for d in directions if d not in known]
    if unknown:
        raise RouteSplitError(f"--lang-pairs {','.join(unknown)}: not a direction of "
                              f"{loaded.path} (it has {','.join(known)})")
    ready = []  # (direction, task, dataset) of the directions that have the split
    data = getattr(loaded.cfg.task, "data", "")
    for direction in directions:
        if not split_exists(data, split, direction):
            logger.warning("%s: no '%s' split in %s; left out", direction, split, data)
            continue
        task = _direction_task(loaded, direction)
        task.load_dataset(split)
        if len(task.dataset(split)) == 0:
            logger.warning("%s: the '%s' split is empty; left out", direction, split)
            continue
        ready.append((direction, task, task.dataset(split)))
    if not ready:
        raise RouteSplitError(
            f"--split {split}: no such split for any direction ({','.join(directions)}) in "
            f"--data {data}; fairseq-preprocess writes "
            "train, valid and test")
    counts = RoutingCounts([LayerInfo.of(name, m) for name, m in layers], [d for d, _, _ in ready])
    device = next(model.parameters()).device
    for _, m in layers:
        m.record_first_expert = True
    try:
        for direction, task, dataset in ready:
            itr = task.get_batch_iterator(
                dataset=dataset, max_tokens=max_tokens,
                max_positions=utils.resolve_max_positions(task.max_positions(),
                                                          model.max_positions()),
                ignore_invalid_inputs=True,
            ).next_epoch_itr(shuffle=False)
            seen = 0
            with torch.no_grad():
                for sample in itr:
                    if max_sentences and seen >= max_sentences:
                        break
                    sample = utils.move_to_cuda(sample) if device.type == "cuda" else sample
                    model(**sample["net_input"])
                    for i, (_, m) in enumerate(layers):
                        counts.add(i, direction, m.stats)
                    seen += sample["nsentences"]
    finally:
        for _, m in layers:
            m.record_first_expert = False
    return counts
