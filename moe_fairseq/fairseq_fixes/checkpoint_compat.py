"""Checkpoints that any fairseq on torch >= 2.6 can read, written and read safely.

torch 2.6 made ``torch.load`` default to ``weights_only=True``. fairseq 0.12 keeps
the legacy model config as an ``argparse.Namespace`` and metric values as numpy
scalars, which the weights-only unpickler refuses, so stock fairseq (and its own
``scripts/average_checkpoints.py``) cannot read its own checkpoints. Two fixes:

- Writing: every checkpoint fairseq saves goes through ``plain_types`` first: a
  Namespace becomes a dict tagged with ``NAMESPACE_TAG``, numpy scalars become Python
  numbers. The pickle then holds only tensors and plain containers, which any
  ``torch.load`` reads. Reading (``load_checkpoint_to_cpu``) turns the tagged dict back
  into the Namespace fairseq expects, so nothing downstream changes.
- Reading older checkpoints: instead of turning weights-only loading off for every
  file, we allowlist exactly the types above; everything else must still be tensors
  and plain containers. A file that cannot be read (missing, empty, truncated, or
  holding other types) stops with one line naming it (``CheckpointError``).

Writes are crash-safe: fairseq writes a checkpoint to ``NAME.tmp`` and renames it, and
copies it to ``checkpoint_last.pt``/``checkpoint_best.pt`` with a plain copy. Both now
write ``NAME.tmp-<pid>``, fsync and rename, so a crash or kill -9 at any point leaves
the previous file whole. Temp files of dead processes are removed at the next start
(``remove_stale_temp_files``).
"""

import argparse
import copy
import glob
import logging
import os
import pickle
import re
import shutil
import zipfile
from typing import Optional

import numpy as np
import torch

from ..args_version import (read_model_args, recorded_version, resume_checkpoint_path,
                            stamp_checkpoint_args)
from .. import atomic_files
from . import checkpoint_fit
from ..atomic_files import write_atomically
from ..errors import CheckpointError

logger = logging.getLogger(__name__)

# Marks a dict that was an argparse.Namespace (fairseq's legacy model config). It is
# the dict's first key and reads as a hint because, without the plugin, fairseq ends
# on an error that quotes the model config's first key (KeyError from formatting its
# "Could not infer model type" message): the user then reads what to do.
# (No '.', ':', '!' or '[' in it: the formatting error would cut the key there.)
NAMESPACE_TAG = ("this checkpoint needs the moe_fairseq plugin - pip install -e <moe_fairseq "
                 "repo>, or pass --user-dir <path of the moe_fairseq package>")


def checkpoint_safe_globals():
    """The non-tensor types fairseq checkpoints hold."""
    types = [argparse.Namespace, np.dtype]
    core = getattr(np, "_core", None) or getattr(np, "core")
    types.append(core.multiarray.scalar)
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        dtype_cls = getattr(getattr(np, "dtypes", None), name, None)
        if dtype_cls is not None:
            types.append(dtype_cls)
    return types


def plain_types(obj):
    """``obj`` with every Namespace turned into a tagged dict and numpy scalars and
    arrays into Python numbers and lists. Containers with nothing to convert are
    returned as they are (a state dict keeps its ``_metadata``)."""
    if isinstance(obj, argparse.Namespace):
        return {NAMESPACE_TAG: True, **{k: plain_types(v) for k, v in vars(obj).items()}}
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, dict):
        items = {k: plain_types(v) for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj
        if type(obj) is dict:
            return items
        converted = copy.copy(obj)  # an OrderedDict keeps its attributes
        converted.update(items)
        return converted
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        values = [plain_types(v) for v in obj]
        if all(a is b for a, b in zip(values, obj)):
            return obj
        return type(obj)(values)
    return obj


def restore_namespaces(obj):
    """Inverse of :func:`plain_types` for the Namespaces (plain dicts or DictConfigs)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, (DictConfig, ListConfig)):
        obj = OmegaConf.to_container(obj)
    if isinstance(obj, dict):
        if obj.get(NAMESPACE_TAG):
            return argparse.Namespace(**{k: restore_namespaces(v) for k, v in obj.items()
                                         if k != NAMESPACE_TAG})
        return {k: restore_namespaces(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [restore_namespaces(v) for v in obj]
    return obj


def _has_tag(node) -> bool:
    from omegaconf import DictConfig

    return isinstance(node, (dict, DictConfig)) and NAMESPACE_TAG in node


def _restore_cfg_namespaces(state) -> None:
    """fairseq has made ``state["cfg"]`` a DictConfig; put the Namespaces back."""
    from omegaconf import open_dict

    cfg = state.get("cfg")
    if cfg is None:
        return
    with open_dict(cfg):
        for key in list(cfg.keys()):
            node = cfg[key]
            if _has_tag(node):
                cfg[key] = restore_namespaces(node)
    if isinstance(state.get("args"), dict) and state["args"].get(NAMESPACE_TAG):
        state["args"] = restore_namespaces(state["args"])


def load_plain_state(path: str):
    """A checkpoint's contents, weights-only through the allowlist; memory-mapped when
    the file is a zip archive, so reading its config does not read its tensors."""
    torch.serialization.add_safe_globals(checkpoint_safe_globals())
    return torch.load(path, map_location="cpu", weights_only=True,
                      mmap=zipfile.is_zipfile(path))


def recorded_updates(state) -> Optional[int]:
    """The update count a checkpoint's contents record (its last optimizer history
    entry), or None."""
    history = (state.get("optimizer_history") if isinstance(state, dict) else None) or []
    last = history[-1] if history and isinstance(history[-1], dict) else {}
    return last.get("num_updates")


def _is_intact_zip(path: str) -> bool:
    """torch.save writes a zip archive; a truncated one has no central directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def _refused_by_allowlist(exc: BaseException) -> bool:
    return isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc)


def unreadable_file(path: str, exc: BaseException) -> bool:
    """Whether ``exc`` came from the file itself (not from upgrading what it holds)."""
    return (not os.path.exists(path) or os.path.getsize(path) == 0
            or _refused_by_allowlist(exc) or not _is_intact_zip(path))


def describe_load_error(path: str, exc: BaseException) -> str:
    """One line saying why ``path`` could not be read as a checkpoint."""
    if not os.path.exists(path):
        return f"checkpoint {path} does not exist"
    size = os.path.getsize(path)
    if size == 0:
        return f"checkpoint {path} is empty (0 bytes): it was never written; use another checkpoint"
    text = str(exc)
    if _refused_by_allowlist(exc):
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = (f"a {found.group(1)} object" if found
                else "something other than tensors and plain containers")
        return (f"checkpoint {path} holds {what}, which fairseq checkpoints do not hold, so it "
                "is not loaded (unpickling it could run code); if you trust the file, load it "
                "with torch.load(weights_only=False) and save its tensors again")
    if not _is_intact_zip(path):
        return (f"checkpoint {path} is truncated or corrupt ({size} bytes, not a complete "
                "torch.save archive); use another checkpoint, e.g. checkpoint_last.pt or an "
                "earlier checkpoint_N.pt")
    first = text.splitlines()[0][:200] if text else ""
    return f"checkpoint {path} cannot be read: {type(exc).__name__}: {first}"


def _atomic_copy(src_path: str, dst_path: str) -> bool:
    with open(src_path, "rb") as src:
        write_atomically(dst_path, lambda dst: shutil.copyfileobj(src, dst, length=16 << 20))
    return True


def remove_stale_temp_files(save_dir: str) -> list:
    """Remove ``*.pt.tmp-<pid>`` files of processes that are gone (a killed save) and
    fairseq's own ``*.pt.tmp``; returns the removed paths."""
    removed = atomic_files.remove_stale_temp_files(save_dir, lambda name: name.endswith(".pt"))
    # fairseq's own temp name carries no pid: it is stale once no save is running,
    # which is the case when a run starts.
    for path in glob.glob(os.path.join(glob.escape(save_dir), "*.pt.tmp")):
        try:
            os.remove(path)
        except OSError:
            continue
        removed.append(path)
    if removed:
        logger.info("removed %d unfinished checkpoint file(s) of an interrupted save: %s",
                    len(removed), ", ".join(os.path.basename(p) for p in removed))
    return removed


def install() -> None:
    """Idempotent; called when ``moe_fairseq`` is imported."""
    torch.serialization.add_safe_globals(checkpoint_safe_globals())

    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    if getattr(PathManager.copy, "_moe_fairseq_atomic", False):
        return
    original_copy = PathManager.copy
    original_save = checkpoint_utils.torch_persistent_save
    original_load = checkpoint_utils.load_checkpoint_to_cpu
    original_ensemble = checkpoint_utils.load_model_ensemble_and_task
    original_load_checkpoint = checkpoint_utils.load_checkpoint

    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if PathManager.path_requires_pathmanager(dst_path):
            return original_copy(src_path, dst_path, overwrite=overwrite)
        if not overwrite and os.path.exists(dst_path):
            return False
        return _atomic_copy(src_path, dst_path)

    def torch_persistent_save(obj, filename, async_write: bool = False):
        obj = plain_types(obj)
        if async_write or PathManager.path_requires_pathmanager(filename):
            return original_save(obj, filename, async_write=async_write)
        write_atomically(filename, lambda f: torch.save(obj, f))

    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        local = None if PathManager.path_requires_pathmanager(path) else path
        try:
            state = original_load(path, arg_overrides, load_on_all_ranks)
        except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError,
                pickle.UnpicklingError) as exc:
            if local is None or not unreadable_file(local, exc):
                raise
            raise CheckpointError(describe_load_error(local, exc)) from exc
        _restore_cfg_namespaces(state)
        # fairseq applied arg_overrides already; the version must come from what the
        # file records (an override of moe_capacity_rule would make version 1 look like 2).
        version = None
        if local is not None and "moe_capacity_rule" in (arg_overrides or {}):
            version = recorded_version(read_model_args(local))
        cfg = state.get("cfg")
        stamp_checkpoint_args(state.get("args"), version)
        if cfg is not None and "model" in cfg:
            stamp_checkpoint_args(cfg["model"], version)
        return state

    def load_model_ensemble_and_task(filenames, *args, **kwargs):
        for name in filenames:  # fairseq's own message is a traceback
            suffix, shards = kwargs.get("suffix", ""), kwargs.get("num_shards", 1)
            first = checkpoint_utils.get_maybe_sharded_checkpoint_filename(name, suffix, 0, shards)
            if not PathManager.path_requires_pathmanager(first) and not os.path.exists(first):
                raise CheckpointError(f"checkpoint {first} does not exist (--path)")
        try:
            return original_ensemble(filenames, *args, **kwargs)
        except Exception as exc:
            text = checkpoint_fit.load_error_text(exc)
            if text is None:
                raise
            overrides = kwargs.get("arg_overrides") or (args[0] if args else None) or {}
            task = kwargs.get("task") or (args[1] if len(args) > 1 else None)
            task_cfg = getattr(task, "cfg", None) or getattr(task, "args", None)
            data = overrides.get("data") or getattr(task_cfg, "data", None)
            path = filenames[0] if len(filenames) == 1 else ", ".join(filenames)
            raise CheckpointError(checkpoint_fit.describe_misfit(path, text, data=data)) from None

    def load_checkpoint(cfg, trainer, **passthrough_args):
        remove_stale_temp_files(cfg.save_dir)
        restore = getattr(cfg, "restore_file", "checkpoint_last.pt")
        if restore != "checkpoint_last.pt" and not PathManager.path_requires_pathmanager(restore):
            suffix = getattr(cfg, "checkpoint_suffix", "") or ""
            path = restore.replace(".pt", suffix + ".pt") if suffix else restore
            if not os.path.exists(path):
                # fairseq would log "No existing checkpoint found" and start from scratch
                raise CheckpointError(f"--restore-file {path} does not exist")
        # The file fairseq resumes, picked as it picks it; with none, the one it fine-tunes.
        path, resume = resume_checkpoint_path(cfg), True
        if path is None and restore == "checkpoint_last.pt" and getattr(cfg, "finetune_from_model",
                                                                         None):
            path, resume = cfg.finetune_from_model, False
        if resume and path is not None:
            checkpoint_fit.check_resumable(path, bool(getattr(cfg, "reset_optimizer", False)))
        try:
            return original_load_checkpoint(cfg, trainer, **passthrough_args)
        except Exception as exc:
            text = checkpoint_fit.load_error_text(exc)
            if text is None or path is None:
                raise
            ckpt_args, _ = checkpoint_fit.read_header(path)
            run_args = getattr(getattr(trainer, "cfg", None), "model", None)
            raise CheckpointError(checkpoint_fit.describe_misfit(
                path, text, ckpt_args, run_args, data=getattr(getattr(trainer.cfg, "task", None),
                                                              "data", None),
                resume=resume)) from None

    copy._moe_fairseq_atomic = True
    PathManager.copy = staticmethod(copy)
    checkpoint_utils.torch_persistent_save = torch_persistent_save
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    checkpoint_utils.load_model_ensemble_and_task = load_model_ensemble_and_task
    checkpoint_utils.load_checkpoint = load_checkpoint

