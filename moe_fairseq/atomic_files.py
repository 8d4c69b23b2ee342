"""Files that are whole or absent: written to ``NAME.tmp-<pid>``, fsync'd, renamed.

A crash or kill -9 at any moment leaves the previous file (or none), never a
truncated one; the temp name says which process wrote it, so a later run can remove
the leftovers of processes that are gone (``pid_alive``).
"""

import os
from typing import IO, Callable, Optional


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
    if not os.access(folder, os.W_OK):
        return f"the folder {folder} is not writable"
    return None
