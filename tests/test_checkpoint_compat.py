"""Checkpoint safety (checkpoint_compat): plain-type checkpoints any fairseq reads, the
load allowlist for older ones, crash-safe saves and copies, one-line errors for files
that cannot be read, and the autoload that spares fairseq-generate the --user-dir."""

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


# ---------------------------------------------------------------- as a user meets it

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from conftest import REPO_ROOT, USER_DIR, run_cli, subprocess_env, train_args  # noqa: E402
from moe_fairseq.autoload import pth_path  # noqa: E402
from moe_fairseq.fairseq_fixes.checkpoint_compat import NAMESPACE_TAG  # noqa: E402


@pytest.fixture(scope="module")
def trained(data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("ckpt")
    run_cli("train", train_args(data_bin, save, "--validate-interval-updates", "4",
                                max_update=4, validate=True))
    return save / "checkpoint_last.pt"


def _generate(data_bin, path, *extra, env=None):
    return run_cli("generate", [data_bin, "--path", path, "--cpu", "--max-tokens", "2000",
                                "--beam", "2", *extra], check=False, env=env)


def _last_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_checkpoint_holds_only_plain_types(trained):
    """Stock torch >= 2.6 (weights-only, no allowlist) reads it in a process that
    never imports the plugin."""
    code = ("import sys, torch; s = torch.load(sys.argv[1]); "
            "assert 'moe_fairseq' not in sys.modules; "
            "m = s['cfg']['model']; print(type(m).__name__, m['arch'], "
            "type(s['extra_state']['best']).__name__)")
    out = subprocess.run([sys.executable, "-c", code, str(trained)], env=subprocess_env(),
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["dict", "moe_transformer_tiny", "float"]


def test_generate_without_user_dir_uses_the_installed_plugin(data_bin, trained):
    assert os.path.exists(pth_path()), f"{pth_path()} missing: run `make venv`"
    proc = _generate(data_bin, trained, env={"MOE_FAIRSEQ_AUTOLOAD": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Generate test with beam=2" in proc.stdout + proc.stderr


def test_generate_without_the_plugin_names_it(data_bin, trained):
    proc = _generate(data_bin, trained)  # autoload off, no --user-dir: stock fairseq
    assert proc.returncode != 0
    assert "this checkpoint needs the moe_fairseq plugin" in _last_line(proc)
    assert "--user-dir" in _last_line(proc)


def test_older_checkpoints_with_namespaces_still_load(data_bin, trained, tmp_path):
    """A checkpoint written before plain types (Namespace model config, numpy best)
    decodes and resumes training through the allowlist."""
    state = torch.load(trained, weights_only=True)
    model_cfg = {k: v for k, v in state["cfg"]["model"].items() if k != NAMESPACE_TAG}
    state["cfg"]["model"] = argparse.Namespace(**model_cfg)
    state["extra_state"]["best"] = np.float64(state["extra_state"]["best"])
    old = tmp_path / "old" / "checkpoint_last.pt"
    old.parent.mkdir()
    torch.save(state, old)
    proc = _generate(data_bin, old, "--user-dir", USER_DIR)
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = run_cli("train", train_args(data_bin, old.parent, max_update=6))
    assert "Loaded checkpoint" in resumed.stdout + resumed.stderr
    assert "argparse.Namespace" not in str(torch.load(old, weights_only=True)["cfg"]["model"])


def test_unreadable_checkpoints_end_in_one_line_naming_the_file(data_bin, trained, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(trained.read_bytes()[: 20000])

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo ran > " + str(tmp_path / "ran"),))

    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}, "x": Payload()}, foreign)
    cases = [(empty, "is empty (0 bytes)"), (truncated, "is truncated or corrupt"),
             (foreign, "so it is not loaded"), (tmp_path / "missing.pt", "does not exist")]
    for path, says in cases:
        proc = _generate(data_bin, path, "--user-dir", USER_DIR)
        assert proc.returncode != 0
        line = _last_line(proc)
        assert line.startswith(f"moe_fairseq: error: checkpoint {path}") and says in line, line
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ran").exists()
    for restore, says in ((truncated, "is truncated or corrupt"),
                          (tmp_path / "missing.pt", "--restore-file")):
        proc = run_cli("train", train_args(data_bin, tmp_path / "ck", "--restore-file", restore),
                       check=False)
        assert proc.returncode != 0 and says in _last_line(proc), _last_line(proc)
        assert "Traceback" not in proc.stderr


def test_stale_temp_files_of_killed_saves_are_removed(data_bin, tmp_path):
    save = tmp_path / "ck"
    save.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = [save / f"checkpoint_last.pt.tmp-{dead.pid}", save / "checkpoint_1_2.pt.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    alive = save / f"checkpoint_best.pt.tmp-{os.getpid()}"  # a live writer's file stays
    alive.write_bytes(b"writing")
    proc = run_cli("train", train_args(data_bin, save, max_update=2))
    assert "removed 2 unfinished checkpoint file(s)" in proc.stdout + proc.stderr
    assert not any(p.exists() for p in stale) and alive.exists()
    assert not list(save.glob("*.tmp*"))[1:]  # nothing else left behind by this run


def test_kill_during_saves_never_loses_checkpoint_last(data_bin, tmp_path):
    """kill -9 a training that saves every update, at several moments: the
    checkpoint_last.pt left behind always loads."""
    save = tmp_path / "ck"
    args = [str(a) for a in train_args(data_bin, save, "--save-interval-updates", "1",
                                       max_update=10000)]
    cmd = [sys.executable, "-m", "fairseq_cli.train", *args]
    seen = set()
    for delay in (0.2, 0.45, 0.7, 0.95):
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        last = save / "checkpoint_last.pt"
        # wait for training to be saving (a first checkpoint exists), then kill mid-run
        for _ in range(600):
            if last.exists() and last.stat().st_mtime_ns not in seen:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        state = torch.load(last, weights_only=True)
        assert "model" in state and state["optimizer_history"]
        seen.add(last.stat().st_mtime_ns)
