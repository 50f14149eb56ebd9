"""The run directory: which files in it are peftkit's, who may write it, and tidying what a crash left.

peftkit deletes only what a run writes (`RUN_ENTRIES`, its temp files, its lock file), never a file of the
user's, and only once the new run's recipe, data and model have loaded, so a run that fails early leaves
the previous one whole. One directory has one writer at a time: an advisory `flock` on `.peftkit.lock`,
which the kernel releases when the process dies however it dies, so a crashed run never leaves it stuck.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.fileio import atomic_write_text, being_written

if TYPE_CHECKING:
    from peftkit.recipe import Recipe

RUN_ENTRIES = ("adapter", "merged", "checkpoints", "metrics.jsonl", "recipe.yaml", "manifest.json", "report",
               "trackers")
LOCK_NAME = ".peftkit.lock"
REPLACED_PREFIX = ".peftkit-replaced-"
"""`clear_run`'s folder for an earlier run's entries on their way out: one a kill left is finished off."""


def is_temp_name(name: str, owned: Callable[[str], bool] = RUN_ENTRIES.__contains__) -> bool:
    """A name fileio gives work in progress on an entry `owned` accepts (by default a run's own entries):
    `.ENTRY.XXXXXXXX.tmp` (files and directories) or `.ENTRY.old`; in a run directory, `clear_run`'s folder too.
    A user's `.draft.tmp` is not one."""
    if not name.startswith("."):
        return False
    if name.startswith(REPLACED_PREFIX):
        return owned == RUN_ENTRIES.__contains__
    if name.endswith(".old"):
        return owned(name[1:-4])
    return name.endswith(".tmp") and "." in name[1:-4] and owned(name[1:-4].rsplit(".", 1)[0])


def is_step(name: str) -> bool:
    return re.fullmatch(r"step-\d+", name) is not None


def is_run(out: Path) -> bool:
    """A directory a peftkit run has claimed (it writes recipe.yaml once its inputs have loaded)."""
    return (out / "recipe.yaml").exists() or (out / "manifest.json").exists()


def check_output_dir(out: Path, recipe_yaml: str, resume: bool, overwrite: bool) -> list[str]:
    """Refuse, before anything expensive, every way a run could clobber or mix with what is in `out` (an
    existing directory); notes for the console.

    Args:
        out: export.output_dir.
        recipe_yaml: the resolved recipe, to recognise a directory holding this same recipe's run.
        resume: --resume (needs a checkpoint of this recipe).
        overwrite: --overwrite (replace a run of another recipe; user files still stay).
    """
    if not is_run(out):
        # Not a run: every entry is the user's, even one named like ours (a downloaded `adapter/`).
        foreign = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and not is_temp_name(p.name))
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        clash = [name for name in foreign if name in RUN_ENTRIES]
        if clash and overwrite:
            raise PeftkitError(
                f"export.output_dir {out} holds {', '.join(clash)}, which peftkit did not write and a run would "
                "replace, even with --overwrite. Move it away or choose another export.output_dir."
            )
        if foreign and not overwrite:
            raise PeftkitError(
                f"export.output_dir {out} already holds files that peftkit did not write ({shown}). Choose a new or "
                f"empty directory, or pass --overwrite (a run writes only {', '.join(RUN_ENTRIES)}; your files "
                "stay)."
            )
    previous = out / "recipe.yaml"
    notes = []
    if not overwrite and previous.exists() and (before := _normalised(previous)) != recipe_yaml:
        changed = _changed_keys(before, recipe_yaml)
        if not changed or (other := [key for key, (old, new) in changed.items() if not _moved_path(key, old, new)]):
            keys = f" in {', '.join(other[:5])}" if changed else ""  # (not in the paths: those may have moved)
            raise PeftkitError(
                f"{out} holds a run of a different recipe (its recipe.yaml differs{keys}). Choose another "
                "export.output_dir, or pass --overwrite to replace that run." + _derived_format_hint(changed)
            )
        # The same recipe, its files at other paths (a moved project, a copied run): the same run. A resume checks
        # the files' contents against what its checkpoint recorded.
        shown = "; ".join(f"{key}: {old} -> {new}" for key, (old, new) in list(changed.items())[:3])
        hub = any(_pinned(value) for pair in changed.values() for value in pair)
        notes.append(f"{out} holds a run of this recipe made with its files at other paths"
                     f"{' or its hub adapters at other commits' if hub else ''} ({shown}"
                     f"{'; ...' if len(changed) > 3 else ''}); it is taken as the same run"
                     + (", its inputs checked against its checkpoint." if resume else "."))
    has_checkpoints = bool(checkpoint_names(out / "checkpoints"))
    if resume and not has_checkpoints:
        raise PeftkitError(f"--resume: no checkpoint in {out / 'checkpoints'} to continue from (the run stopped before "
                           "its first one, or training.save_steps is not set). Run without --resume to train it "
                           "again from step 0.")
    unfinished = has_checkpoints and not (out / "manifest.json").exists()
    if unfinished and not resume and not overwrite:
        raise PeftkitError(
            f"{out} holds an unfinished run of this recipe, with checkpoints in {out / 'checkpoints'}. Continue it "
            "with --resume, or pass --overwrite to start again from step 0 (its checkpoints are then removed)."
        )
    return notes


PATH_KEYS = ("model.name_or_path", "data.train", "data.eval", "export.output_dir", "adapter.init_from",
             "adapter.fuse", "adapter.source_adapter", "adapter.adapters")
"""A recipe's keys that hold paths, resolved to absolute ones in a run's recipe.yaml: they change when a project moves
(and an adapter's hub id, recorded pinned to the commit read, `user/name@COMMIT`, when its branch moves to another)."""


def moved_project(recipe: Recipe, run_dir: Path) -> tuple[Recipe, dict[str, tuple[str, str]]]:
    """The recorded recipe with each input path that no longer exists read where it lies relative to RUN_DIR as it
    lay relative to the recorded export.output_dir (a project moved or copied with its run: its recipe.yaml records
    absolute paths), where that exists; {recipe key: (recorded path, path now)} of those. The files' hashes decide
    whether they are the run's, as for `--resume` of a moved project (`verify`), or read (`eval RUN_DIR`, `generate
    RUN_DIR`, `chat RUN_DIR`, which say so)."""
    from peftkit.recipe import Recipe

    before, moved = Path(recipe.export.output_dir), {}

    def rebased(key: str, value):
        if isinstance(value, dict):
            return {k: rebased(f"{key}.{k}", v) for k, v in value.items()}
        if isinstance(value, list):
            return [rebased(f"{key}[{i}]", v) for i, v in enumerate(value)]
        if isinstance(value, str) and os.path.isabs(value) and not os.path.exists(value):
            if os.path.exists(now := os.path.normpath(run_dir / os.path.relpath(value, before))):
                moved[key.removesuffix(".path")] = (value, now)
                return now
        return value

    raw = recipe.model_dump(mode="json")
    for key in (key for key in PATH_KEYS if key != "export.output_dir"):  # (the run's own directory: RUN_DIR)
        section, name = key.split(".")
        if raw[section].get(name) is not None:
            raw[section][name] = rebased(key, raw[section][name])
    return (Recipe.model_validate(raw) if moved else recipe), moved


def _moved_path(key: str, old, new) -> bool:
    """Whether a change of recipe key `key` from `old` to `new` may be a moved file: a path key (an entry of a list of
    them, data.train[1] or its .path; a set of data.eval's, data.eval.general or its .path; an X-LoRA expert,
    adapter.adapters.0) that holds a path before and after (one added or removed is another recipe). A hub adapter
    pinned at two commits (its branch moved on) is one of one repository (and folder) at two: the checkpoint's hashes of
    its files decide, as for a moved file; another repository's is another recipe."""
    import re

    listed = re.sub(r"\[\d+\](\.path)?$", "", key)
    named = re.sub(r"^data\.eval\.[A-Za-z0-9_-]+(\.path)?$", "data.eval", listed)  # a set of data.eval's mapping
    named = re.sub(r"^adapter\.adapters\.\d+$", "adapter.adapters", named)  # an X-LoRA expert, by position
    if named not in PATH_KEYS or not (isinstance(old, str) and isinstance(new, str)):
        return False
    before, after = _pinned(old), _pinned(new)
    return before is None or after is None or (before[0], before[2]) == (after[0], after[2])


def _pinned(value) -> tuple[str, str, str | None] | None:
    """(repository, commit, subfolder) of a hub adapter as a run records it, `user/name[/SUBFOLDER]@COMMIT`; None for
    anything else."""
    from peftkit.hub import pinned_commit

    return pinned_commit(value) if isinstance(value, str) and "@" in value else None


def _derived_format_hint(changed: dict) -> str:
    """Where data.format differs from a run's `alpaca`: a recipe that sets none reads its data.eval (and a file
    `eval`/`generate --data` name), since 5 December 2026, in the one format its data.train datasets name
    (`DataConfig._format_of_the_datasets`), which a run made before read as alpaca."""
    old, new = changed.get("data.format", (None, None))
    if old != "alpaca" or new in (None, "alpaca"):
        return ""
    return (f" If this recipe sets no data.format: it now reads data.eval and --data files as {new}, the format "
            "every dataset of data.train names (since 5 December 2026), where that run read them as alpaca; set "
            "data.format: alpaca to go on with that run.")


def _changed_keys(before: str | None, after: str) -> dict[str, tuple]:
    """{dotted key: (value in `before`, value in `after`)} of two resolved recipes' YAML; {} when `before` is None."""
    import yaml

    if before is None:
        return {}

    def flat(value, prefix: str = "") -> dict:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
        if isinstance(value, list) and value and all(isinstance(item, str | dict) for item in value):  # data.train's
            return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix[:-1]}[{i}].").items()}
        return {prefix[:-1]: value}

    old, new = flat(yaml.safe_load(before)), flat(yaml.safe_load(after))
    return {key: (old.get(key), new.get(key)) for key in dict.fromkeys([*old, *new]) if old.get(key) != new.get(key)}


def checkpoint_names(checkpoints: Path) -> list[str]:
    """The checkpoints in `checkpoints`, by name: whole ones, and one a kill left only as `.step-N.old` in the middle
    of its replace (`atomic_directory`), which opening the run restores (`recover_and_tidy`)."""
    if not checkpoints.is_dir():
        return []
    names = {p.name for p in checkpoints.iterdir() if is_step(p.name)}
    return sorted(names | {p.name[1:-4] for p in checkpoints.glob(".step-*.old") if is_step(p.name[1:-4])})


def _normalised(recipe_file: Path) -> str | None:
    """A run's recipe.yaml as today's schema writes it, so that a key added to peftkit since (with its default)
    does not make the same recipe look different, and a hub adapter that a run made before recorded by its snapshot
    in the local cache as today's run records it (`recorded`: pinned to that commit); None if it no longer reads as a
    recipe."""
    import yaml
    from pydantic import ValidationError

    from peftkit.recipe import Recipe, recorded

    try:
        return recorded(Recipe.model_validate(yaml.safe_load(recipe_file.read_text(encoding="utf-8")))).to_yaml()
    except (OSError, ValueError, yaml.YAMLError, ValidationError):
        return None


def _written_before(recipe_file: Path, recipe_yaml: str) -> bool:
    """Whether `recipe_file` is a run's recipe.yaml as an earlier peftkit wrote it, without the keys added since
    (data.group_by_length, training.decay_ratio...): a plain YAML dump (nothing of a user's: no comments, no layout of
    their own) of this same recipe once read through today's schema (`_normalised`)."""
    import yaml

    text = recipe_file.read_text(encoding="utf-8")
    try:
        plain = yaml.safe_dump(yaml.safe_load(text), sort_keys=False) == text
    except yaml.YAMLError:
        return False
    return plain and _normalised(recipe_file) == recipe_yaml


def check_recipe_file(recipe_file: Path, out: Path, recipe_yaml: str) -> None:
    """Refuse a recipe kept as recipe.yaml in its own export.output_dir: the run writes its resolved recipe there,
    over the user's (comments and all; with --overwrite the old run's entries, that file among them, are removed
    first). The run's own recipe.yaml, exactly as a run wrote it (`peftkit train RUN/recipe.yaml --resume`), is fine."""
    with contextlib.suppress(OSError):
        if (recipe_file.resolve() == (out / "recipe.yaml").resolve()
                and recipe_file.read_text(encoding="utf-8") != recipe_yaml
                and not _written_before(recipe_file, recipe_yaml)):
            raise PeftkitError(
                f"{recipe_file}: this recipe is the recipe.yaml of its own export.output_dir ({out}), where the run "
                "writes its resolved recipe over yours. Set export.output_dir to another directory (e.g. ./run, next "
                "to the recipe), or keep the recipe under another name or elsewhere."
            )
        run_dir = recipe_file.resolve().parent
        if recipe_file.name == "recipe.yaml" and run_dir != out.resolve() and (
                (run_dir / "manifest.json").is_file() or (run_dir / "metrics.jsonl").is_file()
                or checkpoint_names(run_dir / "checkpoints")):  # (a project's checkpoints/lora-a/ is no run's)
            raise PeftkitError(
                f"{recipe_file} is the recipe of the run in {run_dir}, copied or moved there from {out}, which its "
                f"export.output_dir still names: this would train there (--resume, --overwrite), not in {run_dir}. "
                f"A run goes on where it was made: use {out / 'recipe.yaml'} (or move the run back there); for a new "
                "run, copy the recipe elsewhere and set its export.output_dir.")


def make_writable_dir(out: Path, key: str = "export.output_dir", create: bool = True) -> None:
    """Create `out` if needed and check that a file can be written in it, before any model is loaded. With
    `create=False` a missing `out` is left missing: its nearest existing parent must be a directory we may write."""
    if out.exists() and not out.is_dir():
        raise PeftkitError(f"{key} {out} is a file, not a directory; choose another path.")
    if not create and not out.exists():
        above = next(p for p in out.parents if p.exists())
        if not above.is_dir():
            raise PeftkitError(f"{key} {out} cannot be made: {above} is a file, not a directory; choose another path.")
        if not os.access(above, os.W_OK | os.X_OK):
            raise PeftkitError(f"{key} {out} cannot be made in {above} (permission denied); choose another path or "
                               "fix its permissions.")
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise PeftkitError(f"{key} {out} is not writable ({e.strerror or e}); choose another path or fix its "
                           "permissions.") from None


@contextlib.contextmanager
def open_run_dir(out: Path, recipe_yaml: str, resume: bool, overwrite: bool, console) -> Iterator[None]:
    """Everything `train` needs of its run directory before loading: created, writable, locked for this
    process, checked against what it holds (`check_output_dir`), and tidied after a crash."""
    if resume and overwrite:
        raise PeftkitError("--resume and --overwrite contradict each other: --resume continues the run in "
                           "export.output_dir, --overwrite starts it afresh. Pass one of them.")
    make_writable_dir(out)
    fresh_lock = not (out / LOCK_NAME).exists()
    with run_lock(out):
        try:
            _refuse_linked_files(out)
            notes = check_output_dir(out, recipe_yaml, resume, overwrite)
        except PeftkitError:
            if fresh_lock:  # refused before writing anything: leave the directory as it was found
                (out / LOCK_NAME).unlink(missing_ok=True)
            raise
        for note in notes + recover_and_tidy(out):
            console.print(f"note: {note}", highlight=False, markup=False)
        if not resume and (out / "manifest.json").exists():
            console.print(f"note: {out} holds a finished run; this run replaces it once its data and model have "
                          "loaded.", highlight=False, markup=False)
        yield


_WRITTEN_FILES = ("metrics.jsonl", "manifest.json", "recipe.yaml")
"""The run's files `train` appends to or replaces: through a symbolic link, that would be the file it points to."""


def _refuse_linked_files(out: Path) -> None:
    """A run's own files are never symbolic links; one planted in a run from elsewhere had `train --resume` rewrite the
    file it pointed to (a user's ~/.bashrc as metrics.jsonl)."""
    for name in _WRITTEN_FILES:
        try:
            mode = os.lstat(out / name).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode):
            raise PeftkitError(f"{out / name} is a symbolic link (to {os.readlink(out / name)}); a run's own files never "
                               "are, and train would write through it. Replace it with a copy of the file, or remove "
                               "it.")
        if not stat.S_ISREG(mode):  # a FIFO: reading it would hang
            raise PeftkitError(f"{out / name} is not a plain file (a FIFO, a device or a directory); a run's own files "
                               "never are. Remove it.")


def lock_holder(out: Path) -> str:
    with contextlib.suppress(OSError):
        return (out / LOCK_NAME).read_text(encoding="utf-8").strip() or "unknown"
    return "unknown"


_HELD_LOCKS: set[int] = set()
"""The file descriptors of the run locks this process holds."""


def _close_locks_in_child() -> None:
    """In a forked child (a DataLoader worker): close the run locks' descriptors. A flock belongs to the open file,
    which a child shares; a worker outlives a killed run by seconds (until it notices), and would hold the lock that
    long: `--resume` at once was refused, naming the dead process."""
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold `out/.peftkit.lock` for the run; a second writer is refused at once, naming the holder."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, as before
        yield
        return
    # Never through a symbolic link, nor onto a FIFO or device: the lock is truncated and written (a link planted in a
    # downloaded run once had `train` overwrite the file it pointed to).
    flags = os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        try:
            fd, writable = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT | flags, 0o644), True
        except PermissionError:  # another user's lock file (a shared project): flock needs no write access to it
            try:
                fd, writable = os.open(out / LOCK_NAME, os.O_RDONLY | flags), False
            except PermissionError:
                raise PeftkitError(f"{out / LOCK_NAME}, the lock file of another user's run, cannot be opened "
                                   "(permission denied). Once no run of theirs uses the directory, remove the file.") from None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        fd = None
    if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd is not None:
            os.close(fd)
        raise PeftkitError(f"{out / LOCK_NAME} is not a plain file (a symbolic link, a FIFO or a device): a run's lock "
                           "file never is. Remove it and run again.")
    try:
        unlockable = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system without locks (some NFS, FUSE)
                unlockable = e.strerror  # (said outside this handler: the run's own errors are not chained to it)
            elif e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            else:
                raise PeftkitError(
                    f"export.output_dir {out} is in use by another peftkit run ({lock_holder(out)}). Wait for it to "
                    "finish or stop it, or choose another export.output_dir."
                ) from None
        if unlockable is not None:
            warnings.warn(PeftkitWarning(f"{out} is on a file system that cannot lock files ({unlockable}): this run "
                                         "goes on unlocked, so make sure no other peftkit run writes there."),
                          stacklevel=3)
            yield
            return
        _HELD_LOCKS.add(fd)
        if writable:  # else the holder named to a second writer is the file's last one
            with contextlib.suppress(OSError):  # a full disk: the holder's name is a courtesy, the flock the lock
                os.ftruncate(fd, 0)
                os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        _HELD_LOCKS.discard(fd)
        os.close(fd)  # closing drops the flock; the file stays (removing it would race a new writer)


def recover_and_tidy(out: Path) -> list[str]:
    """Undo what a kill in the middle of an atomic write left in a run directory; returns what was done."""
    return tidy_leftovers(out) + tidy_leftovers(out / "checkpoints", is_step)


def tidy_leftovers(parent: Path, owned: Callable[[str], bool] = RUN_ENTRIES.__contains__) -> list[str]:
    """Recover or remove the temp entries of interrupted atomic writes in `parent`, of the entries `owned` accepts
    (by default a run's own): anything else is the user's, and stays.

    `atomic_directory` replaces DIR by renaming it to `.DIR.old` and the new one into place: killed between
    the two renames, `.DIR.old` is the only whole copy, so it is renamed back. Every other temp entry is an
    unfinished write whose previous version is intact, and is removed. Returns what was done, for a note.
    """
    done = []
    if not parent.is_dir():
        return done
    for entry in sorted(parent.iterdir()):
        if not is_temp_name(entry.name, owned) or being_written(entry):  # (another process's write in progress)
            continue
        original = parent / entry.name[1:].removesuffix(".old")
        if entry.name.startswith(REPLACED_PREFIX):  # the entries of a run being replaced: its deletion is finished
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed {entry.name}: the files of an earlier run, whose deletion was interrupted")
        elif entry.name.endswith(".old") and not original.exists():
            os.replace(entry, original)
            done.append(f"restored {original} from an interrupted replace")
        else:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()  # a link: itself
            done.append(f"removed {entry.name}, left by an interrupted write")
    return done


def clear_run(out: Path) -> None:
    """Remove what an earlier run wrote into `out` (RUN_ENTRIES only), before a fresh run writes its own."""
    if not is_run(out):
        return
    # Moved aside first, each a rename in `out`, so that an entry this user may not move (or a failure midway) leaves
    # the earlier run whole, not half deleted: what was moved goes back and the error names the entry. The manifest
    # goes first: a kill midway leaves no finished-looking run without its files (the next run finishes the job).
    aside = Path(tempfile.mkdtemp(dir=out, prefix=REPLACED_PREFIX))
    moved = []
    try:
        for name in sorted(RUN_ENTRIES, key=lambda entry: entry != "manifest.json"):
            if (out / name).exists() or (out / name).is_symlink():
                os.replace(out / name, aside / name)
                moved.append(name)
    except OSError as e:
        for entry in moved:
            os.replace(aside / entry, out / entry)
        aside.rmdir()
        raise PeftkitError(f"--overwrite: {out / name} cannot be moved out of the way "
                           f"({e.strerror}); the earlier run in {out} is left as it was. Fix its permissions, or "
                           "choose another export.output_dir.") from None
    shutil.rmtree(aside, ignore_errors=True)
    if aside.exists():
        warnings.warn(f"the earlier run's files in {aside} could not all be deleted; remove them by hand", stacklevel=2)


def truncate_metrics(path: Path, step: int, final_step: int) -> None:
    """On resume from checkpoint `step`: drop metric lines written after it (and a partial last line of a
    kill). The final evaluation's line (at `final_step`, after the last checkpoint) is dropped too, since the
    resumed run writes it again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            record = json.loads(line)
            if record["step"] < step or (record["step"] == step and not (step == final_step and "eval_loss" in record)):
                kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def metrics_records(path: Path) -> list[dict]:
    """The metrics.jsonl records (of a resumed run: those `truncate_metrics` kept, up to its checkpoint's step)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
