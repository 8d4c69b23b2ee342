"""Make fairseq checkpoints load safely on torch >= 2.6 and be copied atomically.

torch 2.6 made ``torch.load`` default to ``weights_only=True``; fairseq 0.12
checkpoints hold an ``argparse.Namespace`` (the legacy model/task config) and can
hold numpy scalars (``best`` metric values), which the weights-only unpickler
refuses. Instead of turning weights-only loading off for every file, we allowlist
exactly these types: everything else in a checkpoint must still be tensors and
plain containers.

fairseq writes the first checkpoint of a save atomically (tmp file + rename) but
copies it to ``checkpoint_last.pt``/``checkpoint_best.pt`` with a plain copy; a
crash mid-copy would leave a truncated ``checkpoint_last.pt``. Local copies are
made atomic the same way.
"""

import argparse
import os
import shutil

import numpy as np
import torch


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


def _atomic_copy(src_path: str, dst_path: str) -> bool:
    tmp = f"{dst_path}.tmp-{os.getpid()}"
    try:
        with open(src_path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, dst_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return True


def install() -> None:
    """Idempotent; called when ``moe_fairseq`` is imported."""
    torch.serialization.add_safe_globals(checkpoint_safe_globals())

    from fairseq.file_io import PathManager

    if getattr(PathManager.copy, "_moe_fairseq_atomic", False):
        return
    original_copy = PathManager.copy

    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if PathManager.path_requires_pathmanager(dst_path):
            return original_copy(src_path, dst_path, overwrite=overwrite)
        if not overwrite and os.path.exists(dst_path):
            return False
        return _atomic_copy(src_path, dst_path)

    copy._moe_fairseq_atomic = True
    PathManager.copy = staticmethod(copy)
