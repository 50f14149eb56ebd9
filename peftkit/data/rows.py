"""Data files and hub datasets -> rows (dicts): a malformed line is an error naming it, or skipped and counted
(data.on_bad_rows). What each data.format reads of a row, and a row's problems: `peftkit.data.formats`."""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from peftkit.data.class_labels import class_label_names, with_class_ids
from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.recipe import DATA_EXTENSIONS, is_hub_dataset

# What `datasets` says when a readable file yields no rows (its ValueError has no type of its own).
_NO_ROWS = "corresponds to no data"


def _read_jsonl(path: Path, on_bad_rows: str, skip: str) -> tuple[list[dict], list[int], list[int]]:
    """(rows, the line number of each malformed line skipped, the line number of each row): blank and skipped lines
    make row numbers and line numbers differ, and messages about a row must name its line. `skip`: how the command
    sets on_bad_rows to skip, as a malformed line's error says it ("" where nothing does: `bad_rows_fix`)."""
    bad: list[int] = []
    numbered = list(_jsonl_rows(path, on_bad_rows, skip, bad))
    return [row for _, row in numbered], bad, [lineno for lineno, _ in numbered]


def _jsonl_rows(path: Path, on_bad_rows: str, skip: str, bad: list[int]) -> Iterator[tuple[int, dict]]:
    """(line number, row) of each row of a .jsonl file, read one line at a time (as far as they are taken); a
    malformed line is an error naming it, or skipped (`on_bad_rows`), its number appended to `bad`."""
    # -sig: a byte order mark (Windows editors write one) is not a row's; surrogateescape: a byte that is not UTF-8
    # (a line saved as Latin-1) is that line's problem, found below, not an error at some offset of the whole file.
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = _json_object(line)
            except ValueError as e:
                if on_bad_rows == "skip":
                    bad.append(lineno)
                    continue
                fix = ("Save the file as UTF-8" if isinstance(e, _NotUtf8) else "Fix the line")
                raise PeftkitError(f"{path}:{lineno}: {e}. " + (f"{fix}, or {skip} to drop such rows."
                                                                 if skip else f"{fix}.")) from None
            yield lineno, row


class _NotUtf8(ValueError):
    """A line holding bytes that are not UTF-8."""


_UNDECODED = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte that is not UTF-8


def _undecoded(line: str) -> str | None:
    """What is wrong with a line read with errors="surrogateescape" that holds a byte that is not UTF-8, or None."""
    if byte := _UNDECODED.search(line):
        return (f"not UTF-8 text (byte 0x{ord(byte.group()) - 0xDC00:02x} at character {byte.start() + 1}; a file "
                "saved as Latin-1 or Windows-1252?)")
    return None


def _read_text(path: Path) -> tuple[list[dict], list[int], list[int]]:
    """A text file's lines as rows {"text": line}, as `datasets`' text reader splits them (at newlines, \\r\\n and \\r
    read as newlines; not at the other line breaks str.splitlines knows: a form feed stays in its line), with their
    line numbers; a blank line separates paragraphs and is no example (a .jsonl's blank lines are skipped too), and
    a byte order mark is no text."""
    rows, line_numbers = [], []
    text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    for lineno, line in enumerate(text.split("\n"), 1):
        if problem := _undecoded(line):
            raise PeftkitError(f"{path}:{lineno}: {problem}. Save the file as UTF-8.")
        if line.strip():
            rows.append({"text": line})
            line_numbers.append(lineno)
    return rows, [], line_numbers


def _json_object(line: str) -> dict:
    if problem := _undecoded(line):
        raise _NotUtf8(problem)
    try:
        row = json.loads(line)
    except RecursionError:  # the json module recurses per bracket: `[[[[...` 100,000 deep is not a row
        raise ValueError("not a valid JSON object (nested too deeply)") from None
    except ValueError as e:
        raise ValueError(f"not a valid JSON object ({e})") from None
    if not isinstance(row, dict):
        raise ValueError(f"not a valid JSON object (expected a JSON object, got {type(row).__name__})")  # noqa: TRY004
    return row


def _is_blank(path: Path) -> bool:
    """Whether the file holds only whitespace; reads up to the first other byte, so a real file costs one chunk."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _generation_error() -> type[Exception]:
    from datasets.exceptions import DatasetGenerationError

    return DatasetGenerationError


HUB_ROWS: dict[tuple[str, str, str | None], dict[str, str]] = {}
"""{(hub id, split, revision): {"rows": sha256}} of the hub datasets this process has read: a hub dataset has no
file of its own to hash, so a run records a digest of the rows it read (`data_hashes`)."""
HUB_COMMITS: dict[tuple[str, str, str | None], str] = {}
"""The commit each of those was read at, where `datasets` says (its cache directory is named after it)."""


def rows_digest(rows: list[dict]) -> str:
    """sha256 of rows as canonical JSON, one row a line; a value JSON has no form for (bytes, an image, an array, a
    date) counts by its content (`_content`), never by a repr that holds a memory address."""
    digest = hashlib.sha256()
    for row in rows:
        line = json.dumps(row, sort_keys=True, ensure_ascii=False, default=_content)
        digest.update(line.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()


def _content(value) -> str:
    data = value if isinstance(value, bytes | bytearray) else value.tobytes() if hasattr(value, "tobytes") else None
    if data is not None:  # bytes, a PIL image or a numpy array: its type, shape and bytes
        shape = getattr(value, "shape", None) or getattr(value, "size", None)
        return f"{type(value).__name__} {shape} {getattr(value, 'mode', '')} {hashlib.sha256(data).hexdigest()}"
    text = str(value)  # a date, a Decimal: what it says
    return type(value).__name__ if " at 0x" in text else text


def load_rows(source: str, split: str, on_bad_rows: str = "error", revision: str | None = None,
              skip: str = "set data.on_bad_rows: skip") -> tuple[list[dict], int, list[int] | None]:
    """Rows of a local file or hub dataset (at `revision`); returns (rows, bad_rows_skipped, line number of each row
    or None). `skip`: how the command reading them sets on_bad_rows to skip (`bad_rows_fix`), as a malformed line's
    error says it.

    A .jsonl file is parsed here line by line so a malformed line is reported by number; other formats go
    through `datasets.load_dataset` (imported only for them: it takes 0.7 s of a process's start). A local file is
    one split, `train`, which `split` may slice as a hub dataset's (`local_split`).
    """
    if not is_hub_dataset(source) and Path(source).is_dir():  # a dataset save_to_disk wrote (`peftkit.data.saved`)
        from peftkit.data.saved import saved_rows

        rows, where = saved_rows(source, split)
        return rows, 0, where
    if not is_hub_dataset(source):
        rows, bad, line_numbers = _local_rows(source, on_bad_rows, skip)
        picked, numbers = local_split(rows, line_numbers, split, source)
        return picked, _skipped_in(bad, line_numbers, numbers), numbers
    return _hub_rows(source, split, revision)


def rows_in_order(source: str, split: str | None, on_bad_rows: str = "error") -> Iterator[dict]:
    """`load_rows`' rows of `source`, one at a time: a whole local .jsonl file's (split train, or none) read only as
    far as they are taken (validate wants a 300k-row file's first usable row, not every row); any other source, or a
    slice, is read whole first. A malformed line is an error, or skipped (`on_bad_rows`), as `load_rows` has it."""
    path = Path(source)
    if split not in ("train", None) or path.suffix.lower() != ".jsonl" or not path.is_file():
        yield from load_rows(source, split, on_bad_rows)[0]
        return
    yield from (row for _, row in _jsonl_rows(path, on_bad_rows, "set data.on_bad_rows: skip", []))


def _skipped_in(bad: list[int], line_numbers: list[int] | None, picked: list[int] | None) -> int:
    """How many of the malformed lines skipped (`bad`, their line numbers) fall in the slice of the file's rows whose
    lines are `picked`: each counts in the slice of the row after it (of the last row, at the end of the file), so
    the slices that split a file split its count; each slice counts them all where the file has no row. Counted
    whole for every slice, `train[:50%]` and `train[50%:]` both said the file's count."""
    if not bad or not line_numbers or picked is line_numbers:  # (the whole file: `local_split` hands it back)
        return len(bad)
    picked = set(picked)
    return sum(line_numbers[min(bisect.bisect(line_numbers, line), len(line_numbers) - 1)] in picked for line in bad)


@contextlib.contextmanager
def _no_progress_bars(datasets):
    """datasets' own bar off while it converts a local file (`Generating train split: 2 examples [00:00, ...]`, printed
    among peftkit's lines and in logs), and back as the user had it after."""
    was_off = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            datasets.enable_progress_bars()


def _local_rows(source: str, on_bad_rows: str, skip: str) -> tuple[list[dict], list[int], list[int] | None]:
    path = Path(source)
    if not path.exists():
        raise PeftkitError(f"Data file not found: {source}. Check the path: a relative one is resolved against the "
                           "recipe's directory in a recipe (data.train, data.eval), against the current "
                           "directory in --data.")
    kind = DATA_EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise PeftkitError(f"Data file {source}: unknown extension '{path.suffix}'. Use one of "
                           f"{', '.join(DATA_EXTENSIONS)}.")
    try:
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl(path, on_bad_rows, skip)
        if kind == "text":
            return _read_text(path)
        if _is_blank(path):  # `datasets` fails on these with StopIteration or a message about its own internals
            return [], [], None
        if kind == "json" and (rows := _read_json_array(path)) is not None:
            return rows, [], None
        import datasets

        # (`datasets` keys its own cache of a file by path and modification time: a file rewritten with its time
        # kept, as `cp -p`, `rsync -t` or a checkout can, was read as the old rows. Read the bytes there are.)
        with _no_progress_bars(datasets):
            ds = datasets.load_dataset(kind, data_files=str(path), split="train", download_mode="force_redownload",
                                       **_read_options(path, kind))
    except PermissionError:
        raise PeftkitError(f"Data file {source} is not readable (permission denied).") from None
    except (ValueError, OSError, _generation_error()) as e:  # (an except clause's types are read when it is tried)
        if _NO_ROWS in str(e):  # `[]`, `{}`, a CSV with only its header: no rows, said the way .jsonl says it
            return [], [], None
        # DatasetGenerationError's own text is "An error occurred while generating the dataset"; the cause says what.
        why = str(e.__cause__ or e)
        if "disk space" in why or "No space left" in why:  # (datasets' NotEnoughDiskSpace; ENOSPC) its cache's
            import datasets

            raise PeftkitError(f"Could not read data file {source}: the datasets library's cache, where it converts "
                               f"the file first, is full ({datasets.config.HF_DATASETS_CACHE}). Free space there, "
                               "or set HF_DATASETS_CACHE to a directory with room.") from None
        raise PeftkitError(f"Could not read data file {source}: {why}") from None
    return ([_with_csv_label(row) for row in ds] if kind == "csv" else with_class_ids(ds, list(ds))), [], None


def local_split(rows: list[dict], line_numbers: list[int] | None, split: str,
                source: str) -> tuple[list[dict], list[int] | None]:
    """The rows of a local file that `split` names: `train` (all), or a slice of it in the datasets library's split
    syntax, as a hub dataset's split is sliced (`train[:95%]`, `train[95%:]`, `train[:1000]`, `train[-200:]`,
    joined with `+`), so one file gives a training split and a held-out one. Another name without a slice reads
    every row, with a warning: so it did before local files were sliced, and a run made then still resumes and
    verifies on the rows it trained on."""
    if split in ("train", None):  # (None: no split asked for, as a caller given no recipe passes)
        return rows, line_numbers
    if "[" not in split:
        warnings.warn(PeftkitWarning(f"Data file {source}: split '{split}': a local file is one split, 'train', so "
                                     "every row is read. Set the split to train, or slice the file as a hub "
                                     "dataset's split is sliced: 'train[:95%]' and 'train[95%:]'."), stacklevel=2)
        return rows, line_numbers
    import datasets

    try:
        parts = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(rows)})
    except (ValueError, AssertionError) as e:
        raise PeftkitError(f"Data file {source}: split '{split}': {str(e).rstrip('.')}. A local file is one split, "
                           "'train', which may be sliced as a hub dataset's: 'train[:95%]' and 'train[95%:]', "
                           "'train[:1000]', 'train[-200:]'.") from None
    picked = [i for part in parts for i in range(part.from_, part.to)]
    if rows and not picked:  # (a hub split's slice too is an error: "corresponds to no data")
        raise PeftkitError(f"Data file {source}: split '{split}' is none of its {len(rows)} rows; take a larger slice "
                           "(percentages are rounded to whole rows).")
    numbers = RowNumbers(i + 1 for i in picked) if line_numbers is None else [line_numbers[i] for i in picked]
    return [rows[i] for i in picked], numbers


class RowNumbers(list):
    """The row numbers in the file (from 1) of a slice of a file without lines to name (.json, .csv, .parquet): a
    row is `FILE row N` by its place in the file, not in the slice (`row_location`)."""


class RowIndices(list):
    """Each row's place in a dataset save_to_disk wrote (`peftkit.data.saved`), `[7]` or `[train][7]` (its index in
    the split, not in a slice of it), as `load_from_disk(DIR)[7]` gives it: a row is `DIR[7]`, there being no lines."""


class Locations(list):
    """Each row's own location, `FILE:LINE` or `FILE row N`, where the rows come from several datasets (a list in
    data.train): what `row_location` names a row by in place of a file's line numbers. `parts`: (dataset, its rows,
    its unreadable lines skipped) of each, in order."""

    parts: list[tuple[str, int, int]]


def row_location(source: str, index: int, line_numbers: list[int] | None) -> str:
    """`FILE:LINE` for a row of a .jsonl file, `DIR[N]` for a saved dataset's, `SOURCE row N` otherwise (N in the
    file, for a slice of one)."""
    if isinstance(line_numbers, Locations):
        return line_numbers[index]
    if isinstance(line_numbers, RowIndices):
        return f"{source}{line_numbers[index]}"
    if isinstance(line_numbers, RowNumbers):
        return f"{source} row {line_numbers[index]}"
    return f"{source}:{line_numbers[index]}" if line_numbers else f"{source} row {index + 1}"


def _hub_rows(source: str, split: str, revision: str | None) -> tuple[list[dict], int, None]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split, revision=revision)
    except Exception as e:  # noqa: BLE001 - the hub client raises many types; all mean "could not get it"
        at = f" at revision '{revision}'" if revision else ""
        raise PeftkitError(
            f"Could not load dataset '{source}' (split '{split}'{at}) from the hub: {str(e).rstrip('.')}. A name that is "
            "no local path is read as a hub id: for local data, give a file with its extension (.jsonl, .json, .csv, "
            ".parquet, .txt) or a directory save_to_disk wrote, that exists (a recipe's relative to its directory)."
        ) from None
    cached = Path(ds.cache_files[0]["filename"]).parent.name if ds.cache_files else ""
    if re.fullmatch(r"[0-9a-f]{40}", cached):
        _check_commit(source, revision, cached, Path(ds.cache_files[0]["filename"]).parent.parent)
        HUB_COMMITS[(source, split, revision)] = cached
    rows = with_class_ids(ds, list(ds))
    # a ClassLabel's names are the classes the rows give (the ids alone would not show them renamed)
    classes = {"classes": rows_digest([names])} if (names := class_label_names(ds)) else {}
    HUB_ROWS[(source, split, revision)] = {"rows": rows_digest(rows)} | classes
    return rows, 0, None


def _check_commit(source: str, revision: str | None, read: str, commits: Path) -> None:
    """Offline, `datasets` (4.x) reads the newest cached copy of a hub dataset whatever revision was asked: a pinned
    commit (a hash of 7 to 40 hex digits) it did not read is an error; a branch or tag, which offline cannot be
    resolved, is a warning naming the commit read. `commits`: the directory of the cached commits."""
    pinned = revision is not None and re.fullmatch(r"[0-9a-f]{7,40}", revision)
    if revision is None or revision == read or pinned and read.startswith(revision):
        return
    import datasets

    if pinned:
        offline = datasets.config.HF_HUB_OFFLINE
        why = ("offline it reads the newest cached copy, whatever the revision" if offline
               else "the hub did not answer, and it read the newest cached copy")
        held = commits.is_dir() and any(commit.name.startswith(revision) for commit in commits.iterdir())
        switches = " and ".join(name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(name))
        fix = ("The cache holds that commit too: read it online" + (f" (unset {switches})" if switches else "")
               if held else "Read it once online, so that it is in the cache")
        raise PeftkitError(f"Hub dataset '{source}': revision {revision} was asked and `datasets` read commit {read} "
                           f"from its cache ({why}). {fix}, or pin the commit read ({read}).")
    if datasets.config.HF_HUB_OFFLINE:
        import warnings

        from peftkit.errors import LocalWarning

        warnings.warn(LocalWarning(  # (another machine's cache may hold another copy)
            f"hub dataset '{source}': offline, `datasets` reads the newest cached copy whatever the revision, and "
            f"revision '{revision}' cannot be resolved; it read commit {read}. Pin that commit to be sure."), stacklevel=3)


def _read_json_array(path: Path) -> list[dict] | None:
    """The rows of a .json file that is one JSON array of objects, each as written; None for any other .json (JSON
    lines, an object of columns, a file that is not JSON), which `datasets` reads. `datasets` gives a column one
    type: where one row's "input" is the number 5, it read every row's "input" as a JSON value, the string "4" as
    the number 4, and the row blamed was row 1."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # (JSON lines, the usual case, are not read twice: a look first)
            if not f.read(4096).lstrip().startswith("["):
                return None
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except (ValueError, RecursionError):  # (UnicodeDecodeError is a ValueError)
        return None
    return rows if isinstance(rows, list) and all(isinstance(row, dict) for row in rows) else None


_CSV_INTEGER = re.compile(r"\s*[+-]?\d+\s*")
_CSV_DECIMAL = re.compile(r"\s*[+-]?(\d+\.\d*|\.\d+|\d+[eE][+-]?\d+|\d+\.\d*[eE][+-]?\d+)\s*")


def _with_csv_label(row: dict) -> dict:
    """A CSV row (every cell read as text) with its `label` cell as a value: an integer is a class id, a decimal
    number a float (no class: the row is bad, and says so), other text a class name. pandas gave the column one
    type: one `1.5` made every label a float, and row 1 was blamed."""
    label = row.get("label")
    if isinstance(label, str) and _CSV_INTEGER.fullmatch(label):
        return {**row, "label": int(label)}
    if isinstance(label, str) and _CSV_DECIMAL.fullmatch(label):
        return {**row, "label": float(label)}
    return row


def _read_options(path: Path, kind: str) -> dict:
    """`datasets.load_dataset` options for a file: a CSV's columns read as the text they hold. pandas would make a
    completion "4" the number 4, an empty cell (an alpaca row without input) NaN, and "NA" missing; `label` is
    read per row afterwards (`_with_csv_label`)."""
    if kind != "csv":
        return {}
    import csv

    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: as pandas, which reads the rows, drops a BOM
        header = next(csv.reader(f), [])
    return {"converters": dict.fromkeys(header, str), "keep_default_na": False}
