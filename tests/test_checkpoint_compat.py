"""Checkpoint safety: the load allowlist and crash-safe copies (checkpoint_compat)."""

import argparse
import shutil

import numpy as np
import pytest
import torch

import moe_fairseq  # noqa: F401  (installs the allowlist and the atomic copy)
from fairseq.file_io import PathManager


class NotAllowed:
    """A type no fairseq checkpoint holds."""


def test_copy_interrupted_midway_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    last = tmp_path / "checkpoint_last.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, last)
    good = last.read_bytes()
    new = tmp_path / "checkpoint_7_700.pt"
    torch.save({"model": {"w": torch.ones(1000)}}, new)

    def crash_after_a_few_bytes(src, dst, length=0):
        dst.write(src.read(64))
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfileobj", crash_after_a_few_bytes)
    with pytest.raises(OSError):
        PathManager.copy(str(new), str(last), overwrite=True)
    assert last.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_7_700.pt", "checkpoint_last.pt"]


def test_copy_replaces_when_it_completes(tmp_path):
    src, dst = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"x": torch.arange(5)}, src)
    torch.save({"x": torch.zeros(1)}, dst)
    assert PathManager.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == src.read_bytes()
    assert not PathManager.copy(str(src), str(dst), overwrite=False)


def test_allowlist_loads_fairseq_types_and_refuses_others(tmp_path):
    ok = tmp_path / "ok.pt"
    torch.save({"args": argparse.Namespace(arch="moe_transformer_tiny"),
                "extra_state": {"best": np.float64(3.5)}, "model": {"w": torch.ones(2)}}, ok)
    state = torch.load(ok, weights_only=True)
    assert state["args"].arch == "moe_transformer_tiny" and float(state["extra_state"]["best"]) == 3.5

    bad = tmp_path / "bad.pt"
    torch.save({"obj": NotAllowed()}, bad)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(bad, weights_only=True)
