"""Bad rows: whether a row has the fields its data.format needs, and the error (or skip) for one that has not, in
the data's own words (the columns data.columns reads fields from, a ShareGPT row's conversations) with the
recipe key or flag that fixes it (data.on_bad_rows, data.format, --format).
"""

from __future__ import annotations

import re

from peftkit.data.formats import OPTIONAL_FIELDS, REQUIRED_FIELDS, _row_problem, sharegpt_words
from peftkit.data.tokenized import PastVocabulary
from peftkit.errors import PeftkitError
from peftkit.recipe import DataConfig

# Keys a row may hold beside its format's fields, read by some formats (a task id, ShareGPT's turns, a chat's extras).
ROW_EXTRAS = ("task", "conversations", "system", "tools")


def row_problem(row: object, fmt: str, target: bool = True, train_on: str = "answers") -> str | None:
    """What a row lacks for format `fmt` (`peftkit.data.formats._row_problem`), also for a row that is not an object;
    None for a good row."""
    return _row_problem(row, fmt, target, train_on) if isinstance(row, dict) else "not an object"


def usable_row(row: object, cfg: DataConfig, where: str, target: bool = True, columns_key: str | None = None,
               format_key: str | None = None, problem: str | None = None, found: str | None = None) -> bool:
    """Whether a row has what data.format needs (`target`: a nonempty answer too); a bad row is False under
    data.on_bad_rows: skip, else an error naming `where` and the fields (`columns_key`: the key of cfg.columns, by
    default the one it came from: data.columns, or a list entry's as `DataConfig.reading` read it; `format_key`: of
    cfg.format, by default the one it came from as well: data.format, or a list entry's, data.train[1].format;
    `problem`: one found beyond the row's fields, by the caller, a tokenized row's id past the tokenizer's, raised as
    `PastVocabulary`; `found`: another the caller found with the tokenizer, a text pair's answers alike but for the
    EOS's text, raised as any bad row's)."""
    given = problem
    problem = problem or found or row_problem(row, cfg.format, target, cfg.train_on)
    if not problem:
        return True
    if cfg.on_bad_rows == "skip":
        return False
    hint = columns_hint(problem, row, cfg, columns_key or cfg._columns_key)
    problem = in_columns(problem, cfg.columns, columns_key or cfg._columns_key)
    format_key = format_key or cfg._format_key
    # a recipe key's way out, and the command's flag over it where it has one; a flag's own (no recipe key would do)
    fix_format = (f"pass the right {format_key}" if format_key.startswith("--") else
                  f"set the right {format_key}" + (" (or pass --format)" if "--format" in cfg._flags else ""))
    skip = bad_rows_fix(cfg, "skip")
    said = (f"{where}: {problem} for {format_key} '{cfg.format}' (each row needs {needed_fields(cfg)}). "
            + (f"Fix the row, {fix_format}, or {skip}." if skip else f"Fix the row or {fix_format}.")
            + (f" {note}." if (note := format_note(cfg, format_key)) else "") + hint)
    raise PeftkitError(said) if given is None else PastVocabulary(said, where, given)


def columns_hint(problem: str, row: object, cfg: DataConfig, key: str) -> str:
    """For a field the row lacks, where the row has columns no format reads (`question` beside a missing alpaca
    instruction), the key that reads the field from one of them: data.format and on_bad_rows, which the error
    offers, cannot. Columns of another format's fields (`messages`) are the format's problem, which it names."""
    missing = re.match(r"missing field '(\w+)'", problem)
    known = {*ROW_EXTRAS, *cfg.columns.values()}.union(*REQUIRED_FIELDS.values(), *OPTIONAL_FIELDS.values())
    others = [column for column in row if column not in known] if isinstance(row, dict) else []
    if not missing or missing[1] in cfg.columns or not others:
        return ""
    # every field the row lacks, so that one edit maps them all (question/answer rows lack instruction and output)
    fields = [f for f in REQUIRED_FIELDS.get(cfg.format, ()) if f not in row and f not in cfg.columns] or [missing[1]]
    if len(fields) == 1:
        return (f" If one of its columns ({', '.join(others)}) is the {fields[0]}, a recipe's {key} reads it: "
                f"{{{fields[0]}: COLUMN}}.")
    return (f" If its columns ({', '.join(others)}) hold the {' and '.join(fields)}, a recipe's {key} reads them: "
            f"{{{', '.join(f'{field}: COLUMN' for field in fields)}}}.")


def format_note(cfg: DataConfig, format_key: str) -> str:
    """Why rows are read in data.format where the recipe does not set it (`DataConfig._format_note`: a set of
    data.eval's, read in the format of data.train's datasets or, theirs mixed, in the default), to end an error
    about them; none where another key gave the format (--format, an entry's own)."""
    return cfg._format_note if format_key == "data.format" else ""


def bad_rows_fix(cfg: DataConfig, value: str) -> str:
    """How to set on_bad_rows to `value` in the command reading `cfg`: `set data.on_bad_rows: error` in a recipe
    (with `(or pass --on-bad-rows error)` where the command has the flag: peftkit eval), `pass --on-bad-rows error`
    where the flag gave it (and overrides the recipe's key) or there is no recipe; "" where nothing sets it."""
    key = cfg._on_bad_rows_key
    if not key or key.startswith("--"):
        return key and f"pass {key} {value}"
    return f"set {key}: {value}" + (f" (or pass --on-bad-rows {value})" if "--on-bad-rows" in cfg._flags else "")


def all_skipped(bad: int, cfg: DataConfig) -> str:
    """Why no row was left of `bad` rows under on_bad_rows: skip, and the fix: the fields `cfg`'s format needs."""
    return (f"all {bad} rows were skipped as malformed or missing the fields of {cfg._format_key} '{cfg.format}' "
            f"({needed_fields(cfg)}); check {cfg._format_key}, or {bad_rows_fix(cfg, 'error')} to see the first bad "
            "row" + (f". {note}" if (note := format_note(cfg, cfg._format_key)) else ""))


def in_columns(problem: str, columns: dict[str, str], key: str = "data.columns") -> str:
    """A row's `problem` in the data's own words: a field data.columns reads from another column named by it
    (`missing field 'output'`: `missing column 'answer' (data.columns.output)`; `messages[1]`: `dialog[1]`)."""
    for field, column in columns.items():
        named = f"column '{column}' ({key}.{field})"
        problem = problem.replace(f"missing field '{field}'", f"missing {named}").replace(f"field '{field}'", named)
        problem = re.sub(rf"(?<![\w.'])('?){re.escape(field)}(?=\[|\1 must)", lambda m: m.group(1) + column, problem)
    return problem


def in_data_words(text: str, row: dict, columns: tuple[dict[str, str], str]) -> str:
    """`text` about a row (a warning's "field 'output' holds '</s>'") naming its fields and messages as the data
    does, as a bad row's error does: a column its `columns` (and their key: `row_columns`) read a field from, a
    ShareGPT row's conversations."""
    return in_columns(sharegpt_words(text, row), *columns)


def needed_fields(cfg: DataConfig) -> str:
    """The fields each row of data.format needs, by the column names data.columns gives them (a chat row's messages
    may be ShareGPT's conversations)."""
    fields = ", ".join(f"{cfg.columns[f]} (as {f})" if f in cfg.columns else f for f in REQUIRED_FIELDS[cfg.format])
    return fields + (", or ShareGPT's conversations" if cfg.format == "chat" else "")
