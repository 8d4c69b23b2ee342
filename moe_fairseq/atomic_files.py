"""Files that are whole or absent: written to ``NAME.tmp-<pid>``, fsync'd, renamed.

A crash or kill -9 at any moment leaves the previous file (or none), never a
truncated one; the temp name says which process wrote it, so a later run can remove
the leftovers of processes that are gone (``pid_alive``).
"""

import os
import re
import signal
import sys
from typing import IO, Callable, List, Optional

_TEMP_NAME = re.compile(r"(?P<target>.+)\.tmp-(?P<pid>\d+)")


def temp_name(path: str) -> str:
    return f"{path}.tmp-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temp_files(folder: str, is_target: Callable[[str], bool]) -> List[str]:
    """Remove the temp files (``NAME.tmp-<pid>``) that writers killed before their
    rename left in ``folder``, for the targets ``NAME`` that ``is_target`` accepts;
    files of live processes (a writer still at work) are kept. Returns the removed
    paths. Training saves and the checkpoint tools share this."""
    removed = []
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return removed
    for name in sorted(names):
        m = _TEMP_NAME.fullmatch(name)
        if m is None or not is_target(m.group("target")):
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or pid_alive(pid):
            continue
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        try:
            os.remove(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``kill``, a scheduler's time limit) into ``SystemExit`` so the
    ``finally`` of :func:`write_atomically` removes the temp file of a write in
    progress; a kill -9 cannot be caught, and the next run removes what it left
    (:func:`remove_stale_temp_files`)."""
    def handler(signum, frame):
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def fsync_folder(path: str) -> None:
    """Make a rename in ``path``'s folder durable (best effort)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """``write(f)`` into a temp file next to ``path``, then fsync and rename it over
    ``path``; on any failure the temp file is removed and ``path`` is untouched."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def output_path_problem(path: str, example_name: str) -> Optional[str]:
    """Why a file cannot be written at ``path`` (None if it can), checked before long
    work; missing folders are created. ``example_name`` completes the hint when
    ``path`` is a folder."""
    if os.path.isdir(path):
        return f"is a folder; give a file name such as {os.path.join(path, example_name)}"
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        return f"cannot create the folder {folder} ({exc.strerror})"
    # A file is really created: os.access says yes to root on folders that refuse
    # writes (read-only mounts, sysfs), and the write would fail after the long work.
    probe = os.path.join(folder, f".write-probe.tmp-{os.getpid()}")
    try:
        with open(probe, "wb"):
            pass
    except OSError as exc:
        return f"the folder {folder} is not writable ({exc.strerror})"
    os.remove(probe)
    return None
