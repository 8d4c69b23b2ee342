"""Average the weights of several checkpoints (a standard last step before decoding).

fairseq's own ``scripts/average_checkpoints.py`` cannot read checkpoints on torch >= 2.6
(weights-only loading refuses the types older checkpoints hold) and fails on boolean
buffers such as MoEC's ``kept_experts``. Here:

- checkpoints are read weights-only, through the plugin's allowlist (importing
  ``moe_fairseq`` installs it), and a file that cannot be read stops with one line;
- floating-point tensors of ``state["model"]`` are averaged in float64 and cast back to
  their dtype, so averaging N copies of one checkpoint gives it back bit for bit;
- other tensors (integer and boolean buffers: MoEC's expert-dropout counter and kept
  set, versions) are training-time state, not weights: they are taken from the newest
  checkpoint, the one whose other fields the output keeps;
- every input must have the same keys and shapes (one line names the key and file
  otherwise); expert-parallel checkpoints hold all experts and average like any other;
- the optimizer state is left out (it belongs to none of the averaged weights): the
  output decodes, and training continues from it with ``--finetune-from-model``;
- the output is written atomically (temp file, fsync, rename).
"""

import os
import re
from typing import Dict, List, Sequence

import torch

from .errors import OneLineError


class AveragingError(OneLineError):
    pass


def _load(path: str) -> dict:
    from .fairseq_fixes.checkpoint_compat import describe_load_error

    try:
        with open(path, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every cause becomes one line naming the file
        raise AveragingError(describe_load_error(path, exc)) from exc
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise AveragingError(f"{path} is not a fairseq checkpoint (no 'model' state dict)")
    return state


def average_checkpoints(paths: Sequence[str]) -> dict:
    """The newest checkpoint (the last of ``paths``) with its model weights replaced
    by the average over ``paths`` and without optimizer state."""
    if not paths:
        raise AveragingError("no checkpoints to average")
    sums: Dict[str, torch.Tensor] = {}
    first_path, reference = paths[0], None
    state = None
    for path in paths:
        state = _load(path)
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
    n = len(paths)
    newest = state["model"]
    averaged = type(newest)()
    for key, value in newest.items():
        averaged[key] = (sums[key] / n).to(value.dtype) if key in sums else value.clone()
    if hasattr(newest, "_metadata"):
        averaged._metadata = newest._metadata
    state["model"] = averaged
    state.pop("last_optimizer_state", None)
    extra = state.setdefault("extra_state", {}) or {}
    extra["averaged_checkpoints"] = [os.path.abspath(p) for p in paths]
    state["extra_state"] = extra
    return state


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
        raise AveragingError(
            f"{kind} {n}: {folder} has {len(found)} such checkpoints"
            + ("" if by_updates else " (saved per epoch unless --no-epoch-checkpoints)")
            + ("; save them with --save-interval-updates" if by_updates else ""))
    return [os.path.join(folder, name) for _, name in found[-n:]]


def save_atomically(state: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AveragingError(f"--output {path}: folder {folder} does not exist")
    from .fairseq_fixes.checkpoint_compat import plain_types

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(plain_types(state), f)  # readable by any torch, as our saves
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
