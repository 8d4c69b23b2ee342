"""Average the weights of several checkpoints (a standard last step before decoding).

fairseq's own ``scripts/average_checkpoints.py`` cannot read checkpoints on torch >= 2.6
(weights-only loading refuses the types older checkpoints hold) and fails on boolean
buffers such as MoEC's ``kept_experts``. Here:

- checkpoints are read weights-only, through the plugin's allowlist (importing
  ``moe_fairseq`` installs it), and a file that cannot be read stops with one line;
- floating-point tensors of ``state["model"]`` are averaged in float64 and cast back to
  their dtype, so averaging N copies of one checkpoint gives it back bit for bit;
- other tensors (integer and boolean buffers: MoEC's expert-dropout counter and kept
  set) are training-time state, not weights: they are taken from the newest
  checkpoint, the one whose other fields (cfg, args, extra_state, ...) the output keeps.
  Newest = most updates, whatever the order of the inputs (fairseq keeps the first
  input's fields, which is the newest only when it picks the files itself);
- every input must have the same keys and shapes (one line names the key and file
  otherwise); expert-parallel checkpoints hold all experts and average like any other;
- the optimizer state is left out, unlike fairseq (Adam's moments of the newest
  checkpoint do not belong to the averaged weights, and they triple the file): the
  output decodes; training continues from it with ``--finetune-from-model`` (new
  schedule). fairseq would resume a checkpoint without optimizer state (as
  ``checkpoint_last.pt`` or ``--restore-file``) at update 0 with a restarted
  learning-rate schedule, so the plugin stops such a resume with one line
  (``fairseq_fixes/checkpoint_fit.py``);
- the output is written atomically (temp file, fsync, rename), never over an input or,
  without ``--force``, over a training checkpoint (:mod:`.checkpoint_output`).
"""

import math
import os
import re
from typing import Dict, List, Sequence

import torch

from ..errors import OneLineError
from ..fairseq_fixes.checkpoint_compat import load_plain_state, recorded_updates
from .checkpoint_output import CheckpointOutputError, check_checkpoint_output


class AveragingError(OneLineError):
    pass


def _load(path: str) -> dict:
    from ..fairseq_fixes.checkpoint_compat import describe_load_error

    if os.path.isdir(path):
        raise AveragingError(f"--inputs {path} is a folder: add --num-epoch-checkpoints N or "
                             "--num-update-checkpoints N to average its last N checkpoints")
    try:
        with open(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every cause becomes one line naming the file
        raise AveragingError(describe_load_error(path, exc)) from exc
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise AveragingError(f"{path} is not a fairseq checkpoint (no 'model' state dict)")
    return state


def average_checkpoints(paths: Sequence[str]) -> dict:
    """The newest of ``paths`` (most updates; the last given on a tie or without a count)
    with its model weights replaced by the average over ``paths`` and without optimizer
    state. ``state["extra_state"]["averaged_checkpoints"]`` lists the inputs and which
    one gave the other fields."""
    if not paths:
        raise AveragingError("no checkpoints to average")
    sums: Dict[str, torch.Tensor] = {}
    first_path, reference = paths[0], None
    newest, newest_path, newest_updates = None, None, None
    for path in paths:
        state = _load(path)
        # Dropped at once: it is not averaged, not kept, and Adam's is twice the model.
        state.pop("last_optimizer_state", None)
        model = state["model"]
        if reference is None:
            reference = {k: (tuple(v.shape), v.dtype) for k, v in model.items()}
        elif set(model) != set(reference):
            extra, missing = sorted(set(model) - set(reference)), sorted(set(reference) - set(model))
            key = (extra or missing)[0]
            raise AveragingError(
                f"{path} and {first_path} hold different parameters (e.g. {key!r} "
                f"{'only in ' + path if extra else 'missing in ' + path}): average checkpoints "
                "of one training run")
        for key, value in model.items():
            if (tuple(value.shape), value.dtype) != reference[key]:
                raise AveragingError(
                    f"{key!r} is {tuple(value.shape)} {value.dtype} in {path} but "
                    f"{reference[key][0]} {reference[key][1]} in {first_path}")
            if value.is_floating_point():
                value = value.to(torch.float64)
                sums[key] = value.clone() if key not in sums else sums[key].add_(value)
        # The order of --inputs says nothing (fairseq's own list is newest first): the
        # newest is the one that trained longest.
        updates = recorded_updates(state)
        if newest is None or (updates or 0) >= (newest_updates or 0):
            newest, newest_path, newest_updates = state, path, updates
    n = len(paths)
    kept = newest["model"]
    averaged = type(kept)()
    for key, value in kept.items():
        # Non-floating tensors are not weights but training-time state that legitimately
        # differs between checkpoints of one run (MoEC's dropout_calls counter and its
        # kept_experts set, redrawn during training and unused at inference): an average
        # means nothing and requiring equality would refuse every MoEC run with expert
        # dropout. They come from the newest checkpoint, like the fields kept with them.
        averaged[key] = (sums[key] / n).to(value.dtype) if key in sums else value.clone()
    if hasattr(kept, "_metadata"):
        averaged._metadata = kept._metadata
    newest["model"] = averaged
    extra = newest.get("extra_state") or {}
    extra["averaged_checkpoints"] = {"inputs": [os.path.abspath(p) for p in paths],
                                     "fields_from": os.path.abspath(newest_path)}
    newest["extra_state"] = extra
    return newest


def _number(pattern: str, name: str):
    m = re.fullmatch(pattern, name)
    return int(m.group(1)) if m else None


def _updates_of(path: str):
    """The update count a checkpoint records (memory-mapped: its tensors are not read)."""
    try:
        return recorded_updates(load_plain_state(path))
    except Exception:  # noqa: BLE001 - an unreadable file is reported when it is averaged
        return None


def _update_checkpoints(folder: str, names: List[str]) -> List[tuple]:
    """(update, name) of the checkpoints saved every --save-interval-updates.

    fairseq writes ``checkpoint_<E>_<U>.pt`` every interval but not when the update
    falls on the end of an epoch: that state is only in ``checkpoint<E>.pt``. The
    interval is read off the update-named files (the gcd of their update numbers) and
    an epoch checkpoint whose recorded update is a multiple of it fills the gap."""
    found = {num: name for name in names
             if (num := _number(r"checkpoint_\d+_(\d+)\.pt", name)) is not None}
    if not found:
        return []
    interval = math.gcd(*found)
    for name in names:
        if _number(r"checkpoint(\d+)\.pt", name) is None:
            continue
        updates = _updates_of(os.path.join(folder, name))
        if updates and updates % interval == 0 and updates not in found:
            found[updates] = name
    return sorted(found.items())


def last_checkpoints(folder: str, n: int, by_updates: bool, upper_bound=None) -> List[str]:
    """The ``n`` newest ``checkpoint<E>.pt`` (by epoch) or update checkpoints (by
    update: ``checkpoint_<E>_<U>.pt`` and the epoch checkpoints that stand in for the
    ones fairseq skips at an epoch's end) in ``folder``, oldest first, none past
    ``upper_bound``."""
    if not os.path.isdir(folder):
        raise AveragingError(f"--inputs {folder}: not a folder")
    names = os.listdir(folder)
    if by_updates:
        found = _update_checkpoints(folder, names)
    else:
        found = sorted((num, name) for name in names
                       if (num := _number(r"checkpoint(\d+)\.pt", name)) is not None)
    found = [(num, name) for num, name in found if upper_bound is None or num <= upper_bound]
    kind = "--num-update-checkpoints" if by_updates else "--num-epoch-checkpoints"
    if len(found) < n:
        files = ("checkpoint_<epoch>_<update>.pt files (and epoch checkpoints at those "
                 "intervals)" if by_updates else "checkpoint<epoch>.pt files")
        bound = "" if upper_bound is None else f" up to --checkpoint-upper-bound {upper_bound}"
        hint = ("fairseq-train writes them with --save-interval-updates" if by_updates
                else "fairseq-train writes one per epoch unless --no-epoch-checkpoints")
        raise AveragingError(f"{kind} {n}: {folder} has {len(found)} {files}{bound}; {hint}")
    return [os.path.join(folder, name) for _, name in found[-n:]]


def check_output(path: str, inputs: Sequence[str] = (), force: bool = False) -> None:
    """Before any checkpoint is read: ``path`` can be written, is none of ``inputs``
    and replaces no training checkpoint unless ``force`` (:mod:`.checkpoint_output`)."""
    try:
        check_checkpoint_output(path, inputs, "--output", force, "checkpoint_avg.pt")
    except CheckpointOutputError as exc:
        raise AveragingError(str(exc)) from None
