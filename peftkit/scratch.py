"""`peftkit verify`'s temporary directories (its re-run's run directory: checkpoints, an adapter, a merged model), made
so that they do not pile up: a verify killed (SIGKILL, the machine's OOM killer) cannot delete its own, so each one
is named after the process that made it (`peftkit-verify-PID-XXXX`), held under an flock while it lives, and a later
verify removes those whose process is gone. A directory is removed only when both say so: its process is not alive
here, and its lock is free (another machine's or container's process, whose PID means nothing here, holds its lock
where the file system shares locks). One of an older peftkit, without a PID in its name, is left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from peftkit.fileio import fcntl, flocked

PREFIX = "peftkit-verify-"


@contextlib.contextmanager
def scratch_directory(kind: str = "") -> Iterator[str]:
    """A new temporary directory `peftkit-verify-[KIND-]PID-XXXX`, locked while the block runs and deleted after it
    (as `tempfile.TemporaryDirectory`), which a later `stale_directories` sweep removes if this process is killed."""
    path = tempfile.mkdtemp(prefix=f"{PREFIX}{kind + '-' if kind else ''}{os.getpid()}-")
    fd = flocked(Path(path), fcntl.LOCK_EX | fcntl.LOCK_NB) if fcntl is not None else None
    if fd is not None:
        _HELD[path] = fd
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        _HELD.pop(path, None)
        if fd is not None:
            os.close(fd)


_HELD: dict[str, int] = {}
"""The lock descriptors of this process's live scratch directories, by path (`held_locks`)."""


def held_locks() -> list[int]:
    """The descriptors holding this process's scratch directories' locks, for a launched re-run's launcher to inherit
    (`peftkit.launch.launch`): the lock is the open file's, so it stays held while the launcher lives, which waits for
    its processes. A verify SIGKILLed during a re-run in several processes freed its lock at once, and the next
    verify's sweep deleted the directory under the processes still stopping in it (a step, then a checkpoint)."""
    return list(_HELD.values())


def remove_stale_directories(root: str | None = None) -> list[tuple[Path, int]]:
    """Delete the verify directories in `root` (the temporary directory) that a verify killed left: this user's, whose
    process is gone and whose lock is free. Returns each with its size in bytes, as it was."""
    removed = []
    for path in sorted(Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*")):
        if _stale(path):
            size = _size(path)
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append((path, size))
    return removed


_NAMED = re.compile(rf"{PREFIX}(?:[a-z]+-)?(\d+)-[a-z0-9_]{{8}}")
"""The whole name `scratch_directory` gives (mkdtemp's 8 characters last): a folder of the user's own named like it,
`peftkit-verify-123-notes`, was swept too once process 123 was gone."""


def _stale(path: Path) -> bool:
    """Whether `path` is a verify directory of this user whose process is gone (see the module's docstring)."""
    match = _NAMED.fullmatch(path.name)
    if match is None or path.is_symlink() or not path.is_dir() or fcntl is None:
        return False
    try:
        if path.stat().st_uid != os.getuid() or _alive(int(match.group(1))):
            return False
        fd = flocked(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, OSError):  # locked: a live verify's (of another PID namespace)
        return False
    if fd is None:  # cannot be locked here: cannot be told
        return False
    os.close(fd)
    return True


def _alive(pid: int) -> bool:
    """Whether process `pid` exists here (one of another user counts: it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _size(path: Path) -> int:
    """The bytes of the files under `path`."""
    total = 0
    for entry in path.rglob("*"):
        with contextlib.suppress(OSError):
            if entry.is_file() and not entry.is_symlink():
                total += entry.stat().st_size
    return total
