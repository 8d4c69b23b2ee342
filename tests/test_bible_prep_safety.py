"""scripts/prepare_bible.py never destroys data, as a user meets it (real subprocesses):
it refuses folders that are not its own and silent rebuilds with other settings, a
failed or killed build leaves the previous dataset byte for byte, and the next run
tidies up what a killed one left."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, subprocess_env
from test_bible_prep import make_db, prep_args

from moe_fairseq.bible import prepare as P

SCRIPT = str(REPO_ROOT / "scripts" / "prepare_bible.py")


def prepare(*args, check=True):
    proc = subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True,
                          text=True, env=subprocess_env(), timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bible_safety")
    db = make_db(root / "bible.db")
    out = root / "good"
    prepare(*prep_args(db, out))
    return db, out, snapshot(out)


def test_a_folder_of_someone_elses_files_is_refused(dataset, tmp_path):
    db, _, _ = dataset
    mine = tmp_path / "mine"
    (mine / "bin").mkdir(parents=True)
    (mine / "bin" / "important.bin").write_bytes(b"user data")
    (mine / "raw").mkdir()
    (mine / "raw" / "notes.txt").write_text("keep me")
    before = snapshot(mine)
    line = error_line(prepare(*prep_args(db, mine), check=False))
    assert f"--out {mine} is not empty and holds no manifest.json" in line
    assert snapshot(mine) == before
    assert not list(tmp_path.glob("mine.tmp-*"))


def test_a_failed_rebuild_leaves_the_previous_dataset(dataset, tmp_path):
    db, good, files = dataset
    out = tmp_path / "data"
    prepare(*prep_args(db, out))
    before = snapshot(out)
    # the report: --test-books Obadiah fails validation late, after the build started
    argv = prep_args(db, out, "--force")
    argv[argv.index("--test-books") + 1] = "Obadiah"
    line = error_line(prepare(*argv, check=False))
    assert "en-de has only 0 test segments in the test books (Obadiah)" in line
    assert snapshot(out) == before
    assert not list(tmp_path.glob("data.*"))  # the failed build folder is gone too


def test_files_added_to_a_dataset_are_not_replaced_with_it(dataset, tmp_path):
    """--force replaces the dataset, not the user's files put inside its folder."""
    db, good, _ = dataset
    out = tmp_path / "data"
    subprocess.run(["cp", "-r", str(good), str(out)], check=True)
    (out / "notes.txt").write_text("mine")
    (out / "bin" / "extra.bin").write_bytes(b"mine too")
    before = snapshot(out)
    argv = prep_args(db, out, "--force")
    argv[argv.index("--vocab-size") + 1] = "250"
    line = error_line(prepare(*argv, check=False))
    assert (f"--out {out} holds files prepare_bible.py did not write (bin/extra.bin, "
            "notes.txt); a rebuild replaces the folder: move them out of it first") in line
    assert snapshot(out) == before
    assert not list(tmp_path.glob("data.*"))


def test_removing_an_old_dataset_keeps_files_it_did_not_write(dataset, tmp_path):
    """Files that appear in the old dataset during a rebuild survive the swap."""
    _, good, _ = dataset
    old = tmp_path / "data.old-1"
    subprocess.run(["cp", "-r", str(good), str(old)], check=True)
    (old / "spm" / "mine.txt").write_text("mine")
    assert P.remove_dataset(str(old)) == ["spm/mine.txt"]
    assert snapshot(old) == {"spm/mine.txt": hashlib.sha256(b"mine").hexdigest()}
    (old / "spm" / "mine.txt").unlink()
    assert P.remove_dataset(str(old)) == [] and not old.exists()


def test_other_settings_are_refused_without_force(dataset, tmp_path):
    db, _, _ = dataset
    out = tmp_path / "data"
    prepare(*prep_args(db, out))
    before = snapshot(out)
    argv = prep_args(db, out)
    argv[argv.index("--vocab-size") + 1] = "250"
    line = error_line(prepare(*argv, check=False))
    assert "built with other settings (vocab_size 300 -> 250)" in line and "--force" in line
    assert snapshot(out) == before
    prepare(*argv, "--force")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["vocab_size"] == 250
    assert "up to date" in prepare(*argv).stdout  # same settings again: nothing to do


def _kill_when(proc, ready, timeout=120):
    start = time.time()
    while not ready():
        if proc.poll() is not None:
            pytest.fail("the build ended before it could be killed")
        if time.time() - start > timeout:
            proc.kill()
            pytest.fail("the build never reached the point to kill it at")
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_during_a_rebuild_keeps_the_previous_dataset(dataset, tmp_path):
    db, _, _ = dataset
    out = tmp_path / "data"
    prepare(*prep_args(db, out))
    before = snapshot(out)
    argv = prep_args(db, out, "--force")
    argv[argv.index("--vocab-size") + 1] = "250"
    proc = subprocess.Popen([sys.executable, SCRIPT, *argv], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    build = tmp_path / f"data.tmp-{proc.pid}"
    # kill it in the middle of the build: once SentencePiece has written its model
    _kill_when(proc, lambda: (build / "spm" / "train.en-de.en").exists()
               or (build / "spm.model").exists())
    assert build.exists() and snapshot(out) == before
    # the next run removes the dead build and finds the dataset up to date
    again = prepare(*prep_args(db, out))
    assert "up to date" in again.stdout and not build.exists()
    assert f"removed {build}, the build folder of a run that was killed" in again.stderr
    assert snapshot(out) == before


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_a_swap_cut_short_is_undone_by_the_next_run(dataset, tmp_path):
    """Killed between setting the old dataset aside and renaming the new one in:
    the next run puts the old one back, removes the dead build and leaves alone a
    folder that only looks like one of its builds."""
    db, good, files = dataset
    out = tmp_path / "data"
    pid, other = _dead_pid(), _dead_pid()
    aside = tmp_path / f"data.old-{pid}"
    unfinished = tmp_path / f"data.tmp-{pid}"
    lookalike = tmp_path / f"data.tmp-{other}"
    subprocess.run(["cp", "-r", str(good), str(aside)], check=True)
    unfinished.mkdir()
    (unfinished / P.BUILD_MARKER).touch()
    (unfinished / "raw").mkdir()
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("not a build")
    proc = prepare(*prep_args(db, out))
    assert f"restored {out}, which an interrupted rebuild had set aside as {aside}" \
        in proc.stderr and "up to date" in proc.stdout
    assert snapshot(out) == files
    assert not aside.exists() and not unfinished.exists()
    assert (lookalike / "keep.txt").read_text() == "not a build"


def test_a_linked_out_stays_a_link_to_the_new_data(dataset, tmp_path):
    db, good, _ = dataset
    real = tmp_path / "disk" / "data"
    real.parent.mkdir()
    subprocess.run(["cp", "-r", str(good), str(real)], check=True)
    link = tmp_path / "data"
    link.symlink_to(real)
    argv = prep_args(db, link, "--force")
    argv[argv.index("--vocab-size") + 1] = "250"
    prepare(*argv)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads((real / "manifest.json").read_text())["settings"]["vocab_size"] == 250
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "disk"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["data"]
