"""data.train's datasets -> one list of rows: a file or hub dataset as `load_rows` reads it, or a list of them (a
mix, as axolotl's `datasets:` and LLaMA-Factory's `dataset: a,b`) concatenated in the list's order, each read with
its own split, columns and format and each row named by its own file and line."""

from __future__ import annotations

from peftkit.data.bad_rows import bad_rows_fix, row_problem, usable_row
from peftkit.data.formats import format_rows
from peftkit.data.rows import Locations, load_rows, row_location
from peftkit.recipe import DataConfig, DataSource


def read_rows(source: str | list, split: str | None,
              cfg: DataConfig) -> tuple[list[dict], int, list[int] | None, str]:
    """(rows as data.format reads them, malformed lines skipped, each row's line number or location, a name for
    messages) of `source`: one path or hub id at `split`, or data.train's list (`cfg.train_sources`; `split`
    unused; each entry's rows as its own format reads them), whose name is `mix_name`."""
    if isinstance(source, str):
        rows, bad, line_numbers = load_rows(source, split, cfg.on_bad_rows, cfg.revision, bad_rows_fix(cfg, "skip"))
        return format_rows(rows, cfg), bad, line_numbers, source
    rows, bad, where = [], 0, Locations()
    where.parts = []
    for i, entry in enumerate(cfg.train_sources()):
        read, skipped, line_numbers = load_rows(entry.path, entry.split, cfg.on_bad_rows, cfg.revision,
                                                bad_rows_fix(cfg, "skip"))
        own = cfg.model_copy(update={"columns": entry.columns, "format": entry.format})
        read = format_rows(read, own)
        if cfg.on_bad_rows == "error":  # a bad row said here, in its entry's columns and format (the mix's checks
            # know data.columns only)
            _check_fields(read, own, entry.path, line_numbers, i)
        rows += read
        where += (row_location(entry.path, n, line_numbers) for n in range(len(read)))
        where.parts.append((entry.path, len(read), skipped))
        bad += skipped
    return rows, bad, where, mix_name(cfg)


def _check_fields(rows: list[dict], cfg: DataConfig, path: str, line_numbers: list[int] | None, index: int) -> None:
    """The first row of data.train[index] without the fields its format needs, as an error in that entry's columns
    and format (its own, or data.columns and data.format). A classifier's rows too: `usable_rows` checks the whole mix
    with data.columns only."""
    entry = cfg.train[index] if isinstance(cfg.train, list) else None
    key = f"data.train[{index}].columns" if getattr(entry, "columns", None) is not None else "data.columns"
    own = entry.format if isinstance(entry, DataSource) else None  # (a path's `format` is str's method)
    format_key = f"data.train[{index}].format" if own is not None else "data.format"
    for n, row in enumerate(rows):
        if row_problem(row, cfg.format, train_on=cfg.train_on):
            usable_row(row, cfg, row_location(path, n, line_numbers), columns_key=key, format_key=format_key)


def row_columns(cfg: DataConfig, where: list | None, index: int) -> tuple[dict[str, str], str]:
    """The columns row `index` had its fields read from, and their key: its list entry's own (data.train[1].columns)
    for a row of a mix (`where`: `Locations`) whose entry gives them, else cfg.columns' own (data.columns, or a list
    entry's as `DataConfig.reading` read it)."""
    if isinstance(where, Locations) and isinstance(cfg.train, list):
        start = 0
        for i, (_, count, _) in enumerate(where.parts):
            if index < start + count:
                if (own := getattr(cfg.train[i], "columns", None)) is not None:
                    return own, f"data.train[{i}].columns"
                break
            start += count
    return cfg.columns, cfg._columns_key


def bad_rows_by_dataset(where: Locations, skipped_rows: list[int]) -> dict[str, int]:
    """{dataset: rows skipped under data.on_bad_rows: skip} of a mix's datasets that had any: its unreadable lines
    and `skipped_rows`, the indices of the rows tokenizing skipped (`count_examples`: a row without its format's
    fields, a tokenized row's id past the tokenizer's), so the counts add up to the total it says."""
    found, start = {}, 0
    names = {path: _short(path) for path, _, _ in where.parts}
    alike = {name for name in names.values() if list(names.values()).count(name) > 1}  # two files of one name
    for path, count, skipped in where.parts:
        if bad := skipped + sum(start <= i < start + count for i in skipped_rows):
            name = path if names[path] in alike else names[path]
            found[name] = found.get(name, 0) + bad  # (a file listed twice: both its entries' rows)
        start += count
    return found


def format_spans(cfg: DataConfig, where: list | None, count: int) -> list[tuple[DataConfig, range]]:
    """The rows (their indices) each format reads, with the config to read them by: all `count` rows by `cfg`; or,
    for a mix (`where`: `Locations`) with an entry of another format than data.format, each entry's rows by `cfg` with
    that entry's format and columns (so a recipe without entry formats tokenizes exactly as before they existed)."""
    entries = cfg.train_sources() if isinstance(where, Locations) else []
    if all(entry.format == cfg.format for entry in entries):
        return [(cfg, range(count))]
    spans, start = [], 0
    for i, (entry, (_, n, _)) in enumerate(zip(entries, where.parts, strict=True)):
        own = cfg.model_copy(update={"format": entry.format, "columns": entry.columns})
        if entry.format != cfg.format:  # (the chat-template error names the key that made these rows chat)
            own._format_key = f"data.train[{i}].format"
        spans.append((own, range(start, start + n)))
        start += n
    return spans


def _short(path: str) -> str:
    """A file by its name, a hub id as it is."""
    return path.rsplit("/", 1)[-1] if path.startswith("/") else path


def mix_name(cfg: DataConfig) -> str:
    """data.train's list in a message: `data.train (a.jsonl, org/dataset)`."""
    return "data.train (" + ", ".join(_short(entry.path) for entry in cfg.train_sources()) + ")"
