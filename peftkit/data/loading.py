"""A dataset's examples as training reads them: its rows read (one file or hub dataset, or data.train's list),
tokenized (`peftkit.data.examples.tokenize_rows`) and counted, through the tokenized-data cache
(`peftkit.data.cache`) where the data is keyed: `data_digests` and `cache_entry` key the preference and
unpaired data's entries too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from peftkit.data.examples import mixed_tasks_error, tokenize_rows
from peftkit.data.rows import HUB_ROWS
from peftkit.data.sources import mix_name, read_rows
from peftkit.data.stored import Examples
from peftkit.errors import PeftkitError
from peftkit.fileio import sha256_file
from peftkit.recipe import DataConfig, is_hub_dataset, is_local_dataset


def load_examples(tok, source: str | list, split: str | None, cfg: DataConfig, *, tasks: bool = False,
                  cache: bool = True) -> tuple[Examples, dict]:
    """The examples of `source` (one path or hub id at `split`, or data.train's list of datasets: `read_rows`) and
    their counts (`tokenize_rows`); `tasks`: read the rows' `task` column. With `cache`, read from the
    tokenized-data cache where they are there (`peftkit.data.cache`), and kept there when not."""
    from peftkit.data.cache import cache_root, kept_warnings

    root = cache_root() if cache else None
    # an entry's format keys it where it is its own (an entry of data.format's keys as it did before formats)
    parts = [(source, split, cfg.columns, None)] if isinstance(source, str) else \
        [(entry.path, entry.split, entry.columns, entry.format if entry.format != cfg.format else None)
         for entry in cfg.train_sources()]
    # (a path that is no file nor saved dataset fails in load_rows, in its words)
    local = root is not None and all(not is_hub_dataset(path) and is_local_dataset(path) for path, *_ in parts)
    name = source if isinstance(source, str) else mix_name(cfg)
    entry = cache_entry(root, tok, data_digests(parts, cfg), cfg, tasks, name) if local else None
    if entry is not None and (hit := entry.read()) is not None:
        return hit
    with kept_warnings() as said:
        rows, bad, line_numbers, name = read_rows(source, split, cfg)  # (the same name)
        if root is not None and not local and (digests := data_digests(parts, cfg)):  # a hub dataset: its rows' digest
            entry = cache_entry(root, tok, digests, cfg, tasks, name)
            if entry is not None and (hit := entry.read(said)) is not None:
                return hit
        examples, stats = tokenize_rows(tok, rows, cfg, name, line_numbers, skipped=bad, tasks=tasks)
    if tasks and (mixed := mixed_tasks_error(name, examples.task_ids)):  # a batch would fail mid-training
        raise PeftkitError(mixed)
    stats["bad_rows"] += bad
    stats["examples"] = len(examples)
    if entry is not None and (not local or data_digests(parts, cfg) == entry.digests):  # no file changed meanwhile
        entry.write(examples, stats | {"warnings": said})
    return examples, stats


def data_digests(parts: list[tuple[str, str | None, dict, str | None]], cfg: DataConfig) -> list[tuple] | None:
    """(content digest, reader, split, columns[, format]) of each dataset: a file's sha256 and extension, a saved
    dataset's files' (`saved.saved_hashes`: those of the splits read), a hub dataset's rows' digest as read
    (`rows.HUB_ROWS`), and a list entry's format where it is not data.format's; None where a hub dataset's rows are
    not read yet."""
    from peftkit.data.saved import saved_hashes

    found = []
    for path, split, columns, fmt in parts:
        if is_hub_dataset(path):
            if (hub := HUB_ROWS.get((path, split, cfg.revision))) is None:
                return None
            digest = (hub["rows"], "hub", split, columns)
        elif Path(path).is_dir():
            files = json.dumps(saved_hashes(path, split), sort_keys=True).encode()
            digest = (hashlib.sha256(files).hexdigest(), "save_to_disk", split, columns)
        else:
            digest = (sha256_file(path), Path(path).suffix.lower(), split, columns)
        found.append(digest + ((fmt,) if fmt is not None else ()))
    return found


def cache_entry(root, tok, digests: list[tuple], cfg: DataConfig, tasks: bool, source: str,
                 chunk: int | None = None):
    """The cache entry of these rows (`chunk`: unpaired rows', `ExampleCache`); None, said, where it cannot be keyed:
    its key hashes the tokenizer as save_pretrained writes it, into a temporary directory, and a full TMPDIR failed the
    run (a 17 MB tokenizer.json)."""
    import tempfile
    import warnings

    from peftkit.data.cache import CACHE_ENV, ExampleCache
    from peftkit.errors import LocalWarning

    try:
        return ExampleCache(root, tok, digests, cfg, tasks, source, chunk)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a full disk
        space = "space" in str(e) or getattr(e, "errno", None) == 28
        fix = "Free space there (or set TMPDIR to another directory), or" if space else "To skip it,"
        warnings.warn(LocalWarning(f"the tokenized-data cache is not used: saving the tokenizer to "
                                   f"{tempfile.gettempdir()} to key it failed ({e}). {fix} set {CACHE_ENV}=off."),
                      stacklevel=3)
        return None
