"""scripts/expert_load.py checks --json when it parses its arguments, before loading the
checkpoint and routing a whole split (it used to crash at the very end). Writing into
missing folders, which it creates, is covered with a real SMoE run in test_smoe_train.py."""

import subprocess
import sys

import pytest

from conftest import REPO_ROOT, subprocess_env


def expert_load(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "expert_load.py"),
                           *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)


@pytest.mark.parametrize("where", ["parent", "grandparent", "folder"])
def test_an_unwritable_json_path_stops_before_any_work(tmp_path, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    json_path, says = {
        "parent": (blocker / "load.json", f"{blocker} is a file, not a folder"),
        "grandparent": (blocker / "sub" / "load.json", f"{blocker} is a file, not a folder"),
        "folder": (tmp_path, f"is a folder; give a file name such as {tmp_path / 'load.json'}"),
    }[where]
    # The checkpoint does not exist either: the --json line comes first, so the
    # check runs before anything is loaded.
    proc = expert_load("--path", tmp_path / "none.pt", "--json", json_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines[-1] == f"expert_load.py: error: --json {json_path}: {says}", proc.stderr[-2000:]
    assert not (tmp_path / "a_file").is_dir()
