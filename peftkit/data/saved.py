"""A directory `datasets` wrote with `save_to_disk` (LLaMA-Factory's `tokenized_path`, axolotl's
`dataset_prepared_path`, what TRL users read with `load_from_disk`) as a data source: its rows read with
`datasets.load_from_disk`, and the files that hold them, which the tokenized-data cache and a run's `data_sha256` hash.

A Dataset's directory (state.json beside its arrow files) is one split, `train`, read whole or sliced as a local file
is (`train[:95%]`). A DatasetDict's (dataset_dict.json, a directory a split) is read at the split asked, spelled as a
hub dataset's (data.train_split, data.eval_split, a list entry's `split`: `test`, `train[:1000]`, `train+test`). A row
is named by its index as `load_from_disk(DIR)[i]` (`DIR[split][i]`) gives it: `DIR[7]`, `DIR[train][7]`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.fileio import sha256_file
from peftkit.recipe import DATA_EXTENSIONS, is_saved_dataset

DATASET_STATE, DICT_INDEX = "state.json", "dataset_dict.json"
"""What `save_to_disk` writes beside a Dataset's arrow files, and at the top of a DatasetDict's directory."""


def split_names(path: str | Path) -> list[str] | None:
    """The splits of a saved DatasetDict (its dataset_dict.json's, in order); None for another directory."""
    index = Path(path) / DICT_INDEX
    if not index.is_file():
        return None
    try:
        splits = json.loads(index.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PeftkitError(f"Saved dataset {path}: {DICT_INDEX} is unreadable ({e}); save the DatasetDict again "
                           "with save_to_disk.") from None
    return [str(name) for name in splits]


def split_problem(path: str | Path, split: str | None) -> str | None:
    """Why `split` cannot be read of the saved dataset at `path` (a DatasetDict without that split; a Dataset, which
    is one split, asked for another), or None. Read from the split's names alone (no `datasets` import): what
    `load_recipe` checks before anything runs, and `saved_rows` again when reading."""
    asked = splits_read(split or "train")
    splits = split_names(path)
    if splits is None:  # a Dataset: one split, train (a slice of it is checked where the rows are counted)
        if asked - {"train"}:
            return (f"split '{split}': a saved Dataset (not a DatasetDict) is one split, 'train', which may be sliced "
                    "as a hub dataset's split is: 'train[:95%]', 'train[95%:]'")
        return None
    if unknown := sorted(asked - set(splits)):
        return (f"split '{split}': {', '.join(map(repr, unknown))} is not a split of this DatasetDict, whose splits "
                f"are {', '.join(map(repr, splits))}")
    return None


def splits_read(split: str) -> set[str]:
    """The split names a split spec reads: `train[:10%]+test` -> {train, test}."""
    return {re.sub(r"\[.*\]$", "", part.strip()) for part in split.split("+")}


def saved_rows(path: str, split: str | None) -> tuple[list[dict], list[str]]:
    """The rows of the saved dataset at `path` (a directory) at `split`, each as a dict of Python values (the saved
    format, `torch` or `numpy`, set aside), and each row's place (`rows.RowIndices`). A directory that is no saved
    dataset, a split it lacks and a slice of none of its rows are errors saying so."""
    import datasets

    from peftkit.data.class_labels import with_class_ids
    from peftkit.data.rows import RowIndices, _no_progress_bars

    check_saved(path)
    if problem := split_problem(path, split):
        raise PeftkitError(f"Saved dataset {path}: {problem}. Set data.train_split or data.eval_split (a data.train "
                           "entry's or data.eval set's own `split`), or --split, to a split it has.")
    spec, names = split or "train", split_names(path)
    try:  # the splits read only (another's files may be gone, or be an empty split's, which load_from_disk refuses)
        with _no_progress_bars(datasets):
            splits = ({"train": _split(datasets, Path(path))} if names is None else
                      {name: _split(datasets, Path(path, name)) for name in names if name in splits_read(spec)})
    except (OSError, ValueError, KeyError, TypeError) as e:  # (an arrow file missing or cut short, a state.json edited)
        raise PeftkitError(f"Could not read saved dataset {path}: {str(e).rstrip('.')}. Save it again with "
                           "save_to_disk.") from None
    try:  # (a split whose name datasets' split syntax cannot spell, `train-sft`, is read whole by its name)
        parts = [(spec, 0, len(splits[spec]))] if spec in splits else [
            (part.splitname, part.from_, part.to) for part in
            datasets.ReadInstruction.from_spec(spec).to_absolute({name: len(ds) for name, ds in splits.items()})]
    except (ValueError, AssertionError) as e:
        raise PeftkitError(f"Saved dataset {path}: split '{spec}': {str(e).rstrip('.')}. Slice a split as a hub "
                           "dataset's: 'train[:95%]', 'train[95%:]', 'train[:1000]', 'train[-200:]'.") from None
    rows, where = [], RowIndices()
    for name, start, stop in (part for part in parts if part[1] < part[2]):  # (an empty slice: nothing to select)
        # arrow's own to_pylist, 20x faster than iterating (100k alpaca rows: 0.09 s, not 1.7 s), the same values but
        # for features decoded on access (images, audio: their stored dicts), which no data.format reads; whatever
        # format it was saved with (set_format("torch"): tensors), read as Python values; a ClassLabel's ids as ClassIds
        rows += with_class_ids(splits[name], splits[name].select(range(start, stop)).to_list())
        where += (f"[{i}]" if names is None else f"[{name}][{i}]" for i in range(start, stop))
    if not rows and any(len(splits[name]) for name, _, _ in parts):
        raise PeftkitError(f"Saved dataset {path}: split '{spec}' is none of its rows; take a larger slice "
                           "(percentages are rounded to whole rows).")
    return rows, where


def _split(datasets, directory: Path):
    """The Dataset saved at `directory` (a Dataset's, or one split's of a DatasetDict). One saved without rows
    (`Dataset.from_dict({"text": []})`: state.json names no arrow file) is an empty Dataset: datasets 5.2's
    load_from_disk fails on it with a bare IndexError, and so on each split of a DatasetDict holding it."""
    state = json.loads((directory / DATASET_STATE).read_text(encoding="utf-8"))
    if state.get("_data_files") == []:
        return datasets.Dataset.from_list([])
    return datasets.Dataset.load_from_disk(str(directory))


def check_saved(path: str | Path) -> None:
    """An error, saying what peftkit reads, where the directory `path` is no dataset `save_to_disk` wrote."""
    if is_saved_dataset(str(path)):
        return
    directory = Path(path)
    files = sorted(f.name for f in directory.iterdir() if f.suffix.lower() in DATA_EXTENSIONS and f.is_file())
    held = (f" It holds {', '.join(files[:3])}{', ...' if len(files) > 3 else ''}: name a file (a recipe's "
            "data.train may list several)." if files else "")
    raise PeftkitError(f"Data path {path} is a directory without {DATASET_STATE} or {DICT_INDEX}, so not a dataset "
                       "saved with datasets' save_to_disk (a Dataset's directory holds state.json beside its arrow "
                       f"files, a DatasetDict's dataset_dict.json and a directory a split). Point it at such a "
                       f"directory, or at a {'/'.join(DATA_EXTENSIONS)} file.{held}")


def saved_files(path: str | Path, split: str | None) -> list[str]:
    """The files (relative to `path`) that hold the rows `split` reads of a saved dataset: a DatasetDict's
    dataset_dict.json (its splits), and of each split read (the Dataset itself) its state.json (which arrow files,
    in what order, and the saved format), dataset_info.json (the features its columns are read as) and the arrow
    files state.json names. Not the other splits' files, nor other files beside them: `Dataset.map` of a loaded
    dataset writes its `cache-*.arrow` files there, which `load_from_disk` never reads."""
    directory = Path(path)
    splits = split_names(directory)
    names = [] if splits is None else [DICT_INDEX]
    for sub in ([""] if splits is None else [f"{name}/" for name in splits if name in splits_read(split or "train")]):
        names += [f"{sub}{DATASET_STATE}", f"{sub}dataset_info.json"]
        try:
            state = json.loads((directory / sub / DATASET_STATE).read_text(encoding="utf-8"))
            names += [f"{sub}{entry['filename']}" for entry in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):  # (unreadable: its own hash says it changed)
            pass
    return names


def saved_hashes(path: str | Path, split: str | None) -> dict[str, str]:
    """{file: sha256} of `saved_files` (those that exist): what a run records of a saved dataset (data_sha256), so
    that `--resume` refuses, and `verify` names, one rewritten since."""
    directory = Path(path)
    return {name: sha256_file(directory / name) for name in saved_files(directory, split)
            if (directory / name).is_file()}
