"""Atomic writes: every file peftkit produces appears whole or not at all.

A file is written to a temporary name in the same directory, flushed to disk, then renamed over the
target (`os.replace` is atomic on POSIX within one filesystem). A directory is built under a temporary
name and renamed into place the same way, so a run killed at any moment leaves either the previous
version or the new one, never half of one.
"""

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from peftkit.errors import PeftkitError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): directories are written unlocked
    fcntl = None


class DiskFullError(PeftkitError):
    """The disk (or quota) filled up during an atomic write; what was there before is intact. Callers add
    what the user can do next (a checkpoint to resume from, or none)."""


def resolved(path: str | os.PathLike, what: str) -> Path:
    """`Path.resolve()`, with a symlink loop said as a user's error (pathlib raises RuntimeError, or OSError ELOOP)."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:
        if isinstance(e, OSError) and e.errno != errno.ELOOP:
            raise
        raise PeftkitError(f"{what} {path}: a loop of symbolic links; point it at a real directory.") from None


def _short(name: str, limit: int = 200) -> str:
    """`name`, or where it is over `limit` bytes its first whole characters and `~` and 8 hex digits of its hash, in
    `limit` bytes: the temporary and set-aside names beside a file add ~15 bytes to it, and a name near the
    filesystem's 255-byte limit would not fit. (Cut alone, two long names alike in their first `limit` bytes shared
    their `.NAME.old` and `.NAME.pair`: a roll-back of one would put the other's set-aside copy in its place.)"""
    if len(data := name.encode()) <= limit:
        return name
    return f"{data[:limit - 9].decode(errors='ignore')}~{hashlib.sha256(data).hexdigest()[:8]}"


@contextlib.contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except Exception as e:
        if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
            raise PeftkitError(f"{path}: a name in this path is longer than the filesystem allows (255 bytes a "
                               "name); choose a shorter one.") from e
        if _out_of_space(e, path):
            raise DiskFullError(
                f"No space left on the device while writing {path}. The previous version of it, if any, is "
                "intact; free some disk space, or write somewhere else."
            ) from e
        if _too_large(e):
            raise DiskFullError(
                f"{path} would be larger than this process may write (File too large: a file-size limit such as "
                "`ulimit -f`). The previous version of it, if any, is intact; raise the limit, or write somewhere else."
            ) from e
        raise


_FULL = ("No space left on device", "Disk quota exceeded")
_SHORT_WRITE = ("iostream error", "unexpected pos", "file write failed")


def _out_of_space(error: Exception, path: Path) -> bool:
    """Whether `error`, raised writing `path`, means the disk (or quota) is full. Libraries that write files
    themselves say it their own way: safetensors as "No space left on device (os error 28)" in a SafetensorError,
    torch.save as a short write of its zip writer ("basic_ios::clear: iostream error", "unexpected pos N vs M"),
    which is taken as a full disk when the filesystem has less than 1 MiB left."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    if any(words in text for words in _FULL):
        return True
    if not any(words in text for words in _SHORT_WRITE):
        return False
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    with contextlib.suppress(OSError):
        return existing is not None and shutil.disk_usage(existing).free < 1 << 20
    return False


def _too_large(error: Exception) -> bool:
    """Whether `error` is a file-size limit (`ulimit -f`): EFBIG, said by safetensors as "File too large (os error
    27)", and by torch.save as a short write (see `_out_of_space`) under a limit."""
    if isinstance(error, OSError):
        return error.errno == errno.EFBIG
    text = str(error)
    if "File too large" in text:
        return True
    try:
        import resource
    except ImportError:  # not POSIX: no such limit
        return False
    return any(words in text for words in _SHORT_WRITE) and resource.getrlimit(resource.RLIMIT_FSIZE)[0] != \
        resource.RLIM_INFINITY


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


def _as_created(path: Path, directory: bool = False) -> None:
    """Give `path` the mode an ordinary `open`/`mkdir` would (0666/0777 less the umask): mkstemp and mkdtemp make
    their entries private (0600/0700), which left a run's adapter unreadable to a serving account or a colleague."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes, temp_of: str | None = None) -> None:
    """Write `data` to `path` whole or not at all (a temporary file renamed over it). A symbolic link keeps pointing
    at its file, which is the one replaced; a pipe or device (`--json /dev/stdout`) is written as it is. `temp_of`:
    the entry whose name the temporary file takes (`.ENTRY.XXXXXXXX.tmp`), so that the tidy of that entry's leftovers
    removes it (by default `path`'s own)."""
    path = Path(path)
    with _disk_errors(path):  # (a name over 255 bytes fails its first look, here)
        if special_file(path):
            _write_stream(path, data)
            return
        if path.is_symlink():
            path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with _disk_errors(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{_short(temp_of or path.name)}.", suffix=".tmp")
        try:
            _as_created(Path(tmp))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    _fsync_dir(path.parent)


_STANDARD = {"/dev/stdout": 1, "/dev/fd/1": 1, "/proc/self/fd/1": 1, "/dev/stderr": 2, "/dev/fd/2": 2,
             "/proc/self/fd/2": 2}


def _write_stream(path: Path, data: bytes) -> None:
    """Write into a stream: this process's own stdout or stderr through Python's (their other lines and this one
    keep their order, and a redirection to a file is not truncated), anything else appended. The caller says a full
    disk (`atomic_write_bytes`'s `_disk_errors`)."""
    import sys

    fd = _STANDARD.get(os.path.abspath(path))
    if fd is not None:
        stream = sys.stdout if fd == 1 else sys.stderr
        stream.flush()
        stream.buffer.write(data)
        stream.buffer.flush()
    else:
        with open(path, "ab") as f:
            f.write(data)


def special_file(path: Path) -> bool:
    """Whether `path` is a stream to write into, never to replace: a process's file descriptor (/dev/stdout,
    /dev/fd/N, /proc/...: whatever it leads to, a terminal, a pipe or the log file of a redirection), or a file there
    that is neither regular nor a directory (a named pipe, /dev/null). /dev/shm's files are files."""
    absolute = os.path.abspath(path)
    if absolute in _STANDARD or absolute.startswith(("/dev/fd/", "/proc/")):
        return True
    return path.exists() and not (path.is_file() or path.is_dir())


def atomic_write_text(path: str | os.PathLike, text: str, temp_of: str | None = None) -> None:
    atomic_write_bytes(path, text.encode(), temp_of)


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_line(path: str | os.PathLike, line: str, sync: bool = True) -> None:
    """Append one line (and fsync unless `sync=False`). A kill can at worst leave a partial last line, which
    readers skip. Without fsync a line survives a killed process (it is in the page cache) but not a power
    cut. The training loop appends unsynced and calls `fsync_path` at each checkpoint: an fsync costs 0.24 ms
    (median) on a local disk here but can take far longer on network or VM disks, on every step."""
    with _disk_errors(Path(path)), open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        if sync:
            os.fsync(f.fileno())


def unlink_durably(path: Path) -> None:
    """Remove the file `path` (if there) and make the removal durable before anything after it."""
    if path.exists():
        with _disk_errors(path):
            path.unlink()
        _fsync_dir(path.parent)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file written earlier without it (no-op if it does not exist)."""
    with contextlib.suppress(FileNotFoundError), _disk_errors(Path(path)), open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` (old contents removed).

    The temporary directory is locked while it is written (`locked_directory`), so another process tidying leftovers
    of killed writes passes it by (`being_written`). replace=False: a `path` that another process wrote meanwhile
    (anything but an empty directory) is an error, and stays as it is."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _disk_errors(path):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{_short(path.name)}.", suffix=".tmp"))
    try:
        with locked_directory(tmp):
            _as_created(tmp, directory=True)
            with _disk_errors(path), _named_as(tmp, path):
                yield tmp
                _settle(tmp)
                if path.exists() and replace:
                    # Two renames: the old directory stays whole until the new one is complete.
                    old = _set_aside_name(path)
                    _delete(old, of=path)  # (a stale one: renamed first, so that a kill leaves no half of it)
                    os.replace(path, old)
                    os.replace(tmp, path)
                    _delete(old, of=path)  # (renamed first: a `.NAME.old` is always whole, for `roll_back_interrupted`)
                else:
                    _rename_into_place(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _settle(tmp: Path) -> None:
    """Give what was written inside `tmp` the modes an ordinary write would (a library writes some privately too) and
    sync it to disk, before it is renamed into place."""
    for f in tmp.rglob("*"):
        if f.is_file():
            _as_created(f)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        elif f.is_dir():
            _as_created(f, directory=True)


def _set_aside_name(path: Path) -> Path:
    return path.with_name(f".{_short(path.name)}.old")


def _delete(path: Path, of: Path | None = None) -> None:
    """Remove `path` in one step as far as its name goes: renamed first to a temp name of `of` (default `path`), the
    directory it is a copy of, so that a kill midway leaves no half of it under a name a tidy would put back
    (`.NAME.old`), only a `.NAME.XXXXXXXX.tmp` that the next tidy of NAME removes."""
    if (doomed := _renamed_away(path, of)) is not None:
        _remove(doomed)


def _renamed_away(path: Path, of: Path | None = None) -> Path | None:
    """`_delete`'s rename: `path` under a temp name of `of` (default `path`), returned; None where it is not there."""
    if not (path.exists() or path.is_symlink()):
        return None
    doomed = path.with_name(f".{_short((of or path).name)}.{os.urandom(4).hex()}.tmp")
    os.replace(path, doomed)
    return doomed


def _pair_record(anchor: Path) -> Path:
    """`.NAME.pair` beside the first of directories `_put_in_place` replaces together, naming them all while the
    replace is under way: a kill of that write is rolled back as one (`roll_back_interrupted`), and a `.NAME.old` a
    single directory's write left is not (a later `merge --requantize` into it took one for a pair's, and deleted the
    user's OUTPUT-nf4 and put the older OUTPUT back)."""
    return anchor.with_name(f".{_short(anchor.name)}.pair")


def _read_record(record: Path) -> tuple[list[str], bool] | None:
    """(the directory names a pair record holds, whether the pair was kept: `{"kept": names}`, written once every new
    directory is in place), or None where it is not there or not one."""
    try:
        names = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    kept = isinstance(names, dict)
    names = names.get("kept") if kept else names
    if not (isinstance(names, list) and names and all(isinstance(name, str) for name in names)):
        return None
    return names, kept


@contextlib.contextmanager
def atomic_directories(paths: list[Path], replace: bool = True) -> Iterator[list[Path]]:
    """`atomic_directory` for directories that belong together (a merged model and its re-quantized copy): one
    temporary sibling each, and on success every path is replaced, so that their names never show a new one beside an
    old one, however the write ends (a failure, Ctrl-C, or a kill, after which `roll_back_interrupted` of the same
    paths puts the old ones back). The paths are siblings: their record names them beside the first.
    replace=False: each path must be free (not there, or an empty directory)."""
    paths = [Path(p) for p in paths]
    if len({path.parent for path in paths}) > 1:  # (the record names them by name, beside the first)
        raise ValueError(f"atomic_directories writes directories side by side, not {[str(p) for p in paths]}")
    tmps: list[Path] = []
    try:
        with contextlib.ExitStack() as locks:
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            with names_locked(paths[0].parent):  # (made and locked before another's tidy may look at them)
                for path in paths:
                    with _disk_errors(path):
                        tmps.append(Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{_short(path.name)}.",
                                                          suffix=".tmp")))
                    locks.enter_context(locked_directory(tmps[-1]))
                    _as_created(tmps[-1], directory=True)
            with _disk_errors(paths[0]), contextlib.ExitStack() as named:
                for tmp, path in zip(tmps, paths, strict=True):
                    named.enter_context(_named_as(tmp, path))
                yield tmps
                for tmp in tmps:
                    _settle(tmp)
                with names_locked(paths[0].parent):
                    try:
                        _put_in_place(tmps, paths, replace)
                    except BaseException:  # (removed before the lock goes: another merge's checks, waiting for it,
                        for tmp in tmps:  # took them, locked, for a write under way and refused the --output)
                            shutil.rmtree(tmp, ignore_errors=True)
                        raise
        for parent in dict.fromkeys(path.parent for path in paths):
            _fsync_dir(parent)
    except BaseException:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _put_in_place(tmps: list[Path], paths: list[Path], replace: bool) -> None:
    """Rename each of `tmps` over its path. The earlier directories are set aside first (`.NAME.old`), the first path's
    last: while its `.NAME.old` is there the replace is under way, and rolling back (here on an error, or
    `roll_back_interrupted` after a kill) restores every old one and removes every new one. Rewriting the record as
    kept, once every new one is in place, is the moment the new set is kept: the old ones are then deleted, by the
    next merge's `roll_back_interrupted` where a kill stops that."""
    if not replace:
        for tmp, path in zip(tmps, paths, strict=True):
            _rename_into_place(tmp, path)
        return
    anchor, record = paths[0], _pair_record(paths[0])
    record.unlink(missing_ok=True)  # (a stale one, of a pair write whose end was cut short: not this write's)
    if len(paths) > 1:  # (whole and synced before anything moves: a power cut must not leave an empty record; a
        # kill as it is renamed into place leaves a `.NAME.XXXXXXXX.tmp` of the first directory's, which its tidy removes)
        atomic_write_text(record, json.dumps([path.name for path in paths]), temp_of=anchor.name)
    try:
        for path in reversed(paths):
            if path.exists() or path.is_symlink():
                if path == anchor or anchor.exists():
                    _delete(_set_aside_name(path), of=path)
                    os.replace(path, _set_aside_name(path))
                else:  # no first directory to pair it with: an old one is no use to put back
                    _delete(path)
        for tmp, path in zip(tmps, paths, strict=True):
            _rename_into_place(tmp, path)  # (one another process made meanwhile is kept, and said)
        if len(paths) > 1:  # the moment the new set is kept: the record says so until every old copy is gone (a
            # whole `.NAME-nf4.old` left without it was put back by a tidy once the user had removed NAME-nf4)
            atomic_write_text(record, json.dumps({"kept": [path.name for path in paths]}), temp_of=anchor.name)
    except BaseException:
        _roll_back(paths)
        raise
    for path in paths:  # (renamed first: a kill midway left half of one, which a tidy put back once NAME was gone)
        _delete(_set_aside_name(path), of=path)
    record.unlink(missing_ok=True)


def recorded_pair(path: Path) -> list[Path]:
    """The directories of a pair write whose record (`_pair_record`) is still there and names `path`, first or not
    (siblings of it, by name, its first directory first), or none. A merge into any of them (a plain one into OUTPUT,
    or into OUTPUT-nf4 itself) rolls such a pair back first: the tidy of `.NAME.old` alone kept a new OUTPUT and put
    the old OUTPUT-nf4 back beside it, and a later roll-back deleted what was written there meanwhile."""
    for record in sorted(path.parent.glob(".*.pair")):
        names = (_read_record(record) or ([], False))[0]
        if path.name in names and _pair_record(path.with_name(names[0])) == record:
            return [path.with_name(name) for name in names]
    return []


def roll_back_interrupted(paths: list[Path]) -> bool:
    """Undo an `atomic_directories(paths)` that stopped while replacing its directories (a kill: its record of these
    paths, `_pair_record`, and its first path's `.NAME.old` are still there): the old directories are put back and the
    new ones removed, so the set is the earlier one again, never a mix; one that stopped after its record said the new
    set was kept has its old copies deleted. Returns whether anything was rolled back; nothing is while a live process
    writes them, nor for a `.NAME.old` of another write (a single directory's)."""
    paths = [Path(p) for p in paths]
    if any(being_written(entry) for path in paths
           for entry in (path, *path.parent.glob(f".{glob.escape(_short(path.name))}.*.tmp"))):
        return False  # (a live write holds its temporary directories, and each once it is in place)
    record = _pair_record(paths[0])
    names, kept = _read_record(record) or ([], False)
    if names != [path.name for path in paths]:
        return False
    if kept:  # stopped once the new set was kept: the old copies go
        for path in paths:
            _delete(_set_aside_name(path), of=path)
        record.unlink(missing_ok=True)
        return False
    if not _set_aside_name(paths[0]).is_dir():  # stopped before the first was set aside: the rest is a tidy's
        record.unlink(missing_ok=True)
        return False
    _roll_back(paths)
    return True


def _roll_back(paths: list[Path]) -> None:
    """Put back each directory `_put_in_place` set aside, removing the new one in its place. Once the first path is
    set aside, every other one is (they go first): one there without a `.NAME.old` is new, and goes too. Every new one
    goes before any old one comes back, the first path's first: a kill midway then leaves either the replace under
    way (its `.NAME.old`: rolled back again) or the first one back and the others' `.NAME.old` where nothing is, which
    a tidy puts back (put back one by one, a kill after the first left its new OUTPUT-nf4 beside the old OUTPUT, and
    the next check, the first's `.NAME.old` gone, tidied the rest away as a single write's leftovers)."""
    underway = _set_aside_name(paths[0]).exists()
    for path in paths:
        if _set_aside_name(path).exists() or (underway and path != paths[0]):
            _delete(path)
    for path in paths:
        if _set_aside_name(path).exists():
            os.replace(_set_aside_name(path), path)
    _pair_record(paths[0]).unlink(missing_ok=True)


def names_locked(parent: Path) -> contextlib.AbstractContextManager:
    """The lock of the names of merge outputs in directory `parent` (its flock, `locked_directory`): held by
    `atomic_directories` while it makes and locks its temporary directories and while it puts them in place (the
    set-aside `.NAME.old`, the pair record `.NAME.pair`, the roll-back of an error), and by a merge's checks and tidy
    of an --output there (`peftkit.merge.check_merge_output`). A second merge's checks, in the milliseconds of a first
    one's swap, passed its unlocked `.NAME.old` for a leftover and deleted it (or put it back over the name the swap
    was about to fill), so that a failure of that swap left a new OUTPUT beside the old OUTPUT-nf4. Each holder holds
    it for renames and deletions only, never while a model is written."""
    return locked_directory(parent)


@contextlib.contextmanager
def locked_directory(path: Path) -> Iterator[None]:
    """An exclusive flock of directory `path` while the block runs, waiting for another holder. Where the system or
    its file system cannot lock a directory (Windows; some network and FUSE file systems) the block runs unlocked,
    as before there were locks: a lock only guards against other processes, never a condition to write."""
    fd = flocked(path, fcntl.LOCK_EX) if fcntl is not None else None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def flocked(path: Path, flags: int) -> int | None:
    """A descriptor of `path` holding `flock(flags)`, or None where `path` cannot be locked here. With LOCK_NB, a lock
    another holds raises BlockingIOError. (The locks of the writes here, and of `peftkit.scratch`'s verify
    directories.)"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, flags)
    except OSError as e:
        os.close(fd)
        if isinstance(e, BlockingIOError):
            raise
        return None
    return fd


def _rename_into_place(tmp: Path, path: Path) -> None:
    """tmp -> path, where path is not there or an empty directory (rename(2) refuses anything else, atomically)."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise PeftkitError(f"{path} was written by another process while this one worked; it is left as it is, and "
                           "this result was not kept. Choose another output, or replace it with --overwrite.") from None


def being_written(entry: Path) -> bool:
    """Whether `entry` is the temporary directory of an `atomic_directory` that a live process is writing now (False
    where that cannot be told: no locks here)."""
    if fcntl is None or entry.is_symlink() or not entry.is_dir():
        return False
    try:
        fd = flocked(entry, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    if fd is not None:
        os.close(fd)
    return False


@contextlib.contextmanager
def _named_as(tmp: Path, path: Path) -> Iterator[None]:
    """A full disk met by a write inside `tmp` (an atomic write of a file in it) is said of `path`, the directory
    the user asked for: `tmp` is gone by the time they read it."""
    try:
        yield
    except DiskFullError as e:
        raise DiskFullError(str(e).replace(str(tmp), str(path))) from e.__cause__


def _remove(path: Path) -> None:
    """Remove a file or directory tree if it exists (what a replaced --output was: either)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
