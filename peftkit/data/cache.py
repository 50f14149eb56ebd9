"""The tokenized-data cache: a dataset's examples and counts (`load_examples`), kept on disk under a key of all that
made them, so that the next `train`, `--resume` or `eval` of the same data reads them instead of tokenizing again.

The key is a sha256 of: the data's content (a file's bytes; a save_to_disk directory's files of the splits read,
`saved.saved_files`; a hub dataset's rows, `rows.HUB_ROWS`; each dataset's,
with its split, columns and (where not data.format) format, in order, for a list in data.train), the tokenizer as
`save_pretrained` writes it (vocabulary, special tokens, chat template, pad token), the data settings that shape an
example (format, max_length, truncation, on_bad_rows, task ids; for unpaired rows the `chunk` their mismatched
examples are made within, `peftkit.data.unpaired`) and the key of the columns read (which a warning
names: data.columns, or data.train[i].columns for `eval --data` of a list entry), how the rows were read (a file's
extension, and the reader each extension gets), the source of `peftkit.data` and the versions of transformers,
tokenizers, jinja2 and the readers of other files than .jsonl (datasets, pyarrow, pandas). A change to any of them is
another key; nothing is invalidated in place.

Each entry is one safetensors file, written atomically, holding the flat arrays of `Examples` and the counts (with
the warnings said while they were made, `kept_warnings`, which a read says again), with a sha256 of both and its
key: a damaged entry, or one under another key's name, is said and replaced, never read.
Where the cache cannot be read (a directory another user made private) or written (a read-only or full
disk), the run goes on without it. `PEFTKIT_CACHE` names its directory (default: `$XDG_CACHE_HOME/peftkit`,
else `~/.cache/peftkit`); `PEFTKIT_CACHE=off` turns it off, as `peftkit train --no-cache` does for one run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from array import array
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from peftkit.data.stored import Examples
from peftkit.errors import LocalWarning, PeftkitWarning
from peftkit.recipe import DATA_EXTENSIONS, DataConfig

CACHE_ENV = "PEFTKIT_CACHE"
FORMAT = 1
"""The entries' layout; a change makes every key new."""
_NO_TASK = -1  # a task id of None in the stored array


def cache_root() -> Path | None:
    """The cache's directory, or None when `PEFTKIT_CACHE=off`."""
    chosen = os.environ.get(CACHE_ENV, "")
    if chosen.strip().lower() in ("off", "0", "false", "no"):
        return None
    if chosen:
        return Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "peftkit"


def _code_digest() -> str:
    """sha256 of `peftkit.data`'s source: a change to how examples are built is a new key."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def tokenizer_digest(tok) -> str:
    """sha256 of the files `tok.save_pretrained` writes: everything that makes it tokenize as it does."""
    digest = hashlib.sha256(f"{type(tok).__module__}.{type(tok).__qualname__}".encode())
    with tempfile.TemporaryDirectory(prefix="peftkit-tokenizer-") as saved:
        tok.save_pretrained(saved)
        for path in sorted(Path(saved).rglob("*")):
            if path.is_file():
                digest.update(str(path.relative_to(saved)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("transformers", "tokenizers", "jinja2", "sentencepiece", "datasets", "pyarrow", "pandas"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


@contextlib.contextmanager
def kept_warnings() -> Iterator[list[str]]:
    """The PeftkitWarnings said while a dataset's examples are made (read and tokenized), but those about this
    machine's state (LocalWarning: this cache's own): an entry keeps them (its counts' `warnings`) and
    `ExampleCache.read` says them again, so that a run whose examples come from the cache warns as the run that made
    them did. (A local file read at split 'validation' warned the first run only; under a launch, the main process
    read the entry another process had just kept and warned of nothing.)"""
    said: list[str] = []
    show = warnings.showwarning

    def keep(message, category, *where, **kwargs) -> None:
        if issubclass(category, PeftkitWarning) and not issubclass(category, LocalWarning):
            said.append(str(message))
        show(message, category, *where, **kwargs)

    warnings.showwarning = keep
    try:
        yield said
    finally:
        warnings.showwarning = show


class ExampleCache:
    """The entry of one dataset's examples: `read` it (None on a miss), or `write` it after tokenizing."""

    def __init__(self, root: Path, tok, digests: list[tuple], cfg: DataConfig, tasks: bool, source: str,
                 chunk: int | None = None) -> None:
        """`digests`: (content digest, reader, split, columns[, format]) of each dataset read, in order (several:
        data.train's list). The reader is how the rows were read (a file's extension; "save_to_disk"; "hub"): the
        same bytes as .jsonl and as .txt are other rows; the split which of them (a local file's slice,
        `train[95%:]`); the columns the dataset's own (data.columns, or a list entry's), and the recipe key they came
        from, which the counts' warnings name; the format a list entry's own, where not data.format. `chunk`:
        unpaired rows' (KTO's), whose mismatched examples pair the rows within each run of `chunk` (another batch size
        is other examples)."""
        key = {"format": FORMAT, "code": _code_digest(), "versions": _versions(), "tokenizer": tokenizer_digest(tok),
               "data": digests, "readers": DATA_EXTENSIONS, "tasks": tasks, "chunk": chunk,
               "columns_key": cfg._columns_key,  # the counts' warnings name it (data.train[1].columns.output)
               # model.add_tokens' tokens, the data's to write (not warned of): a token the tokenizer had already
               # leaves its files as they were, so the tokenizer's digest does not tell
               "added_tokens": list(getattr(tok, "peftkit_added_tokens", ())),
               "settings": cfg.model_dump(include={"format", "max_length", "truncation", "on_bad_rows", "train_on",
                                                   "columns", "system_prompt"})}
        self.key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.path = root / "examples" / f"{self.key}.safetensors"
        self.digests, self.source = digests, source

    def read(self, said: list[str] = ()) -> tuple[Examples, dict] | None:
        """The cached examples and counts, the counts with `cached`: the entry's path; None where there are none (or
        they are damaged: said, then remade). The warnings said while they were made are said again (`kept_warnings`),
        but those in `said` (said already, reading a hub dataset's rows to key its entry)."""
        try:
            if not self.path.is_file():
                return None
        except OSError as e:  # (is_file raises on EACCES: a cache directory another user made private)
            warnings.warn(LocalWarning(f"could not read the tokenized-data cache at {self.path} ({e}); tokenizing "
                                       f"again. Set {CACHE_ENV} to a directory of your own, or {CACHE_ENV}=off."),
                          stacklevel=2)
            return None
        try:
            examples, stats = _load(self.path, self.key)
        except ValueError as e:  # unreadable, cut short, altered: tokenize again and replace it
            warnings.warn(LocalWarning(f"the cached examples of {self.source} at {self.path} are damaged ({e}); "
                                       "tokenizing again."), stacklevel=2)
            return None
        for warned in stats.pop("warnings", []):
            if warned not in said:
                warnings.warn(PeftkitWarning(warned), stacklevel=2)
        return examples, stats | {"cached": str(self.path)}

    def write(self, examples: Examples, stats: dict) -> None:
        """Keep the examples for the next run; a cache that cannot be written is said, and the run goes on. `stats`'
        `warnings`: those said while they were made (`kept_warnings`), left out where none was."""
        from peftkit.fileio import _as_created

        stats = {key: value for key, value in stats.items() if key != "warnings" or value}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            os.close(fd)
            try:
                _save(Path(tmp), examples, stats, self.key)
                _as_created(Path(tmp))  # (a private file, as mkstemp and save_file make it; a cache is as readable
                # as the user's other files)
                os.replace(tmp, self.path)  # whole or not at all; another process writing the same key writes the same
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except (OSError, SafetensorError) as e:
            warnings.warn(LocalWarning(f"could not write the tokenized-data cache at {self.path} ({e}); going on "
                                       f"without it. Set {CACHE_ENV} to a writable directory, or {CACHE_ENV}=off."),
                          stacklevel=2)
            return
        _remove_stale_temporaries(self.path.parent)


STALE_TEMPORARY_S = 24 * 3600
"""A temporary entry this old was left by a run killed while writing it (a write takes seconds)."""


def _remove_stale_temporaries(directory: Path) -> None:
    """Remove what killed runs left half-written; a run writing now has a younger file."""
    import time

    for tmp in directory.glob(".*.safetensors.*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TEMPORARY_S:
                tmp.unlink()
        except OSError:  # gone meanwhile, or not ours to remove
            pass


def _arrays(examples: Examples) -> dict[str, array]:
    ids, labels, ends = examples.arrays()
    tasks = array("q", (_NO_TASK if task is None else task for task in examples.task_ids))
    types = {} if examples.types is None else {"input_type_mask": examples.types}  # (CPT's, where the rows have them)
    return {"input_ids": ids, "labels": labels, "ends": ends, "task_ids": tasks} | types


def _digest(arrays: dict[str, array], stats: str) -> str:
    digest = hashlib.sha256(stats.encode())
    for name in sorted(arrays):
        digest.update(name.encode() + b"\0")
        digest.update(arrays[name])  # (the buffer itself: no copy)
    return digest.hexdigest()


def _save(path: Path, examples: Examples, stats: dict, key: str) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    arrays = _arrays(examples)
    text = json.dumps(stats, sort_keys=True)
    tensors = {name: np.frombuffer(values, dtype=np.int32 if values.typecode == "i" else np.int64)
               for name, values in arrays.items()}  # views of the arrays, not copies
    save_file(tensors, path, metadata={"peftkit_examples": str(FORMAT), "key": key, "stats": text,
                                       "sha256": _digest(arrays, text)})
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


_LAYOUT = {"input_ids": ("i", "I32"), "labels": ("i", "I32"), "ends": ("q", "I64"), "task_ids": ("q", "I64")}
"""Each stored array's typecode here and dtype in the file (and `input_type_mask`'s, where an entry has one)."""
_TYPES = ("i", "I32")


class _Damaged(ValueError):
    """An entry read whole whose content is not what was written."""


def _load(path: Path, key: str) -> tuple[Examples, dict]:
    """An entry's examples and counts; ValueError where its content is not what was written for `key`.

    The safetensors layout (an 8-byte header length, the JSON header, the data) read straight into the arrays: through
    `safetensors.safe_open` each array was copied twice and the whole file mapped besides (peak memory +120 MiB on
    100k examples)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > os.fstat(f.fileno()).st_size - 8:
                raise ValueError("its header runs past its end")
            header = json.loads(f.read(size))
            metadata, arrays = header.pop("__metadata__"), {}
            if metadata["key"] != key:  # (an entry copied or renamed onto another's name)
                raise _Damaged("it was written for another key")
            layout = _LAYOUT | ({"input_type_mask": _TYPES} if "input_type_mask" in header else {})
            for name, (typecode, dtype) in layout.items():
                start, end = header[name]["data_offsets"]
                if header[name]["dtype"] != dtype:
                    raise _Damaged(f"{name} is {header[name]['dtype']}")
                f.seek(8 + size + start)
                arrays[name] = array(typecode)
                arrays[name].fromfile(f, (end - start) // arrays[name].itemsize)
        text = metadata["stats"]
        if metadata["sha256"] != _digest(arrays, text):
            raise _Damaged("its content does not match its sha256")
        stats = json.loads(text)
        tasks = [None if task == _NO_TASK else task for task in arrays["task_ids"]]
        examples = Examples.from_arrays(arrays["input_ids"], arrays["labels"], arrays["ends"], tasks,
                                        arrays.get("input_type_mask"))
        if stats["examples"] != len(examples):
            raise _Damaged("its counts do not match its examples")
    except _Damaged:
        raise
    except Exception as e:  # noqa: BLE001 - whatever an altered file makes of the reading: not this entry
        raise ValueError(f"not a readable entry: {type(e).__name__}: {e}") from None
    return examples, stats
