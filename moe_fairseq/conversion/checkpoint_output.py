"""Whether a checkpoint tool may write its output, decided before any work.

``average_checkpoints.py``, ``prune_experts.py`` and ``upcycle.py`` write one
checkpoint each. Before reading their inputs they check (:func:`check_checkpoint_output`):

- the path can be written (missing folders are created);
- it is not one of the inputs: the same file by inode, so a hard link, a symbolic
  link or another spelling of the path counts too (no ``--force`` overrides this:
  a failed write would lose the only copy, and a successful one the input);
- it does not replace a training checkpoint (``checkpoint_last.pt``,
  ``checkpoint_best.pt``, ``checkpoint<N>.pt``, ``checkpoint_<N>_<M>.pt``, or any
  file holding optimizer state) unless ``--force`` is given: the converted file
  holds no optimizer state, so the run could no longer resume from it.

They also remove the temp files that an earlier run, killed while writing, left next
to the output (shared with training saves: ``atomic_files.remove_stale_temp_files``).
"""

import os
import re
from typing import Optional, Sequence

from ..atomic_files import output_path_problem, remove_stale_temp_files
from ..errors import OneLineError

# The names fairseq-train gives its checkpoints (with an optional --checkpoint-suffix).
TRAINING_NAME = re.compile(r"checkpoint(_last|_best|\d+|_\d+_\d+)(-.*)?\.pt")


class CheckpointOutputError(OneLineError):
    """An output path a tool must not write; names the flag."""


def same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def training_state(path: str) -> Optional[str]:
    """Why ``path`` is a training checkpoint (None if it is not one): its name is one
    fairseq-train writes, or it holds optimizer state (read memory-mapped)."""
    name = os.path.basename(path)
    if TRAINING_NAME.fullmatch(name):
        return f"{name} is a name fairseq-train writes and resumes from"
    try:
        from ..fairseq_fixes.checkpoint_compat import load_plain_state, recorded_updates

        state = load_plain_state(path)
    except Exception:  # noqa: BLE001 - not a readable checkpoint: nothing to resume
        return None
    if isinstance(state, dict) and state.get("last_optimizer_state"):
        updates = recorded_updates(state)
        at = f" at update {updates}" if updates is not None else ""
        return f"it holds a training run's optimizer state{at}"
    return None


def check_checkpoint_output(path: str, inputs: Sequence[str], flag: str, force: bool = False,
                            example_name: str = "checkpoint_converted.pt") -> None:
    """Raise :class:`CheckpointOutputError` (one line naming ``flag``) if a tool that
    reads ``inputs`` must not write ``path``; remove stale temp files of the output."""
    problem = output_path_problem(path, example_name)
    if problem:
        raise CheckpointOutputError(f"{flag} {path}: {problem}")
    for source in inputs:
        if same_file(path, source):
            spelled = "" if os.path.abspath(path) == os.path.abspath(source) else \
                f" (the same file as {source})"
            raise CheckpointOutputError(
                f"{flag} {path} is an input of this run{spelled}: write the result to another "
                "path; the input is left as it is")
    if os.path.exists(path) and not force:
        why = training_state(path)
        if why:
            raise CheckpointOutputError(
                f"{flag} {path} would replace a training checkpoint ({why}); the written file "
                "has no optimizer state, so the run could not resume from it: write to another "
                "path, or pass --force to replace it")
    remove_stale_temp_files(os.path.dirname(os.path.abspath(path)),
                            lambda target: target == os.path.basename(path)
                            or target.endswith(".pt"))


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` with plain types (readable by any torch, like the plugin's own
    saves) into a temp file next to ``path``, fsync and rename: a kill leaves the old
    file or the new one, never half of one."""
    import torch

    from ..atomic_files import write_atomically
    from ..fairseq_fixes.checkpoint_compat import plain_types

    state = plain_types(state)
    write_atomically(path, lambda f: torch.save(state, f))
