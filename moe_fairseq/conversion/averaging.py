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
  schedule) or ``--restore-file`` (fairseq then resumes at the newest checkpoint's
  update and epoch with fresh Adam moments);
- the output is written atomically (temp file, fsync, rename).
"""

import os
import re
from typing import Dict, List, Sequence

import torch

from ..atomic_files import output_path_problem, write_atomically
from ..errors import OneLineError


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


def _num_updates(state: dict):
    history = state.get("optimizer_history") or []
    last = history[-1] if history and isinstance(history[-1], dict) else {}
    return last.get("num_updates")


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
        updates = _num_updates(state)
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


def last_checkpoints(folder: str, n: int, by_updates: bool, upper_bound=None) -> List[str]:
    """The ``n`` newest ``checkpoint<E>.pt`` (by epoch) or ``checkpoint_<E>_<U>.pt`` (by
    update) in ``folder``, oldest first, none past ``upper_bound``."""
    pattern = r"checkpoint_\d+_(\d+)\.pt" if by_updates else r"checkpoint(\d+)\.pt"
    if not os.path.isdir(folder):
        raise AveragingError(f"--inputs {folder}: not a folder")
    found = sorted((num, name) for name in os.listdir(folder)
                   if (num := _number(pattern, name)) is not None
                   and (upper_bound is None or num <= upper_bound))
    kind = "--num-update-checkpoints" if by_updates else "--num-epoch-checkpoints"
    if len(found) < n:
        files = "checkpoint_<epoch>_<update>.pt" if by_updates else "checkpoint<epoch>.pt"
        bound = "" if upper_bound is None else f" up to --checkpoint-upper-bound {upper_bound}"
        hint = ("fairseq-train writes them with --save-interval-updates" if by_updates
                else "fairseq-train writes one per epoch unless --no-epoch-checkpoints")
        raise AveragingError(f"{kind} {n}: {folder} has {len(found)} {files} files{bound}; {hint}")
    return [os.path.join(folder, name) for _, name in found[-n:]]


def check_output(path: str) -> None:
    """Before any checkpoint is read: ``path`` can be written (missing folders are
    created), so a long averaging does not end in a crash."""
    problem = output_path_problem(path, "checkpoint_avg.pt")
    if problem:
        raise AveragingError(f"--output {path}: {problem}")


def save_atomically(state: dict, path: str) -> None:
    """Temp file in the same folder, fsync, rename: a kill leaves the old file or the
    new one, never half of one (the plugin's own checkpoint saves do the same)."""
    from ..fairseq_fixes.checkpoint_compat import plain_types

    check_output(path)
    state = plain_types(state)  # readable by any torch, as the plugin's own saves
    write_atomically(path, lambda f: torch.save(state, f))
