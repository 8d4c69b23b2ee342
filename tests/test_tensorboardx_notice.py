"""No "Please install tensorboardX" line when a user runs fairseq's tools or our scripts.

fairseq imports every task at start-up, and its text_to_speech task logs that line at
INFO when tensorboardX is missing. tensorboardX is a requirement of this package
(requirements.txt, setup.py) so that the import succeeds and the line never comes; the
commands below are run as a user runs them, as real subprocesses. A control run with
tensorboardX made unimportable shows the same command would print the line.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, USER_DIR, subprocess_env

NOTICE = "Please install tensorboardX"
BIN = Path(sys.executable).parent


def _run(cmd, autoload=False):
    env = subprocess_env()  # autoload off: --user-dir alone brings the plugin in
    if autoload:
        env["MOE_FAIRSEQ_AUTOLOAD"] = "1"
    proc = subprocess.run([str(c) for c in cmd], cwd=str(REPO_ROOT), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def test_tensorboardx_is_installed():
    # a venv made before tensorboardX joined the requirements: say how to fix it
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        pytest.fail("tensorboardX is missing: run `make venv` (it is in requirements.txt)")


@pytest.mark.parametrize("cmd, autoload", [
    ([BIN / "fairseq-train", "--help", "--user-dir", USER_DIR], False),
    ([BIN / "fairseq-generate", "--help", "--user-dir", USER_DIR], False),
    ([BIN / "fairseq-interactive", "--help"], True),  # the plugin through the autoload hook
    ([sys.executable, REPO_ROOT / "scripts" / "average_checkpoints.py", "--help"], False),
], ids=["train-user-dir", "generate-user-dir", "interactive-autoload", "script"])
def test_no_tensorboardx_notice(cmd, autoload):
    output = _run(cmd, autoload)
    assert "usage:" in output  # the tool really started (and imported fairseq's tasks)
    assert NOTICE not in output, output[-2000:]


def test_control_without_tensorboardx_the_notice_shows():
    # None in sys.modules makes `import tensorboardX` raise ImportError, as if not installed
    code = ("import runpy, sys; sys.modules['tensorboardX'] = None; "
            f"sys.argv = ['fairseq-train', '--help', '--user-dir', {str(USER_DIR)!r}]; "
            "runpy.run_module('fairseq_cli.train', run_name='__main__')")
    assert NOTICE in _run([sys.executable, "-c", code])
