"""A pydantic error of a recipe in our words: where (file:line, or the --set that made it), which key, what is wrong
and how to fix it; which of pydantic's errors are worth saying (the deepest of a union's, not a 'missing' key that an
unknown one misspells), and the message of an optional section left empty."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from peftkit.methods import METHODS
from peftkit.recipe.keys import (_all_fields, _home_sections, _members, _method_without, _plain_value,
                                 _section_model, _suggest, _synonym_home, _valid_keys)
from peftkit.recipe.schema import Recipe

def _data_loc(loc: tuple, data: Any) -> tuple:
    """pydantic's error location without the union-member tags it inserts ('list[str]', ...)."""
    kept: list = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif i < len(loc) - 1 or not isinstance(node, dict) or part not in _FIELD_NAMES:
            continue  # a union-member tag ('list[str]', 'TargetRegex'), not a key
        kept.append(part)
    return tuple(kept)


def format_validation_error(err: dict, data: dict, path: str | Path, lines: dict[tuple, int], overridden: set[tuple]) -> str:
    """One pydantic error of a recipe in our words: where (file:line, or the --set that made it), which key,
    what is wrong and how to fix it. `path` names the source (a file, or e.g. 'recipe in manifest.json')."""
    loc = _data_loc(err["loc"], data)
    dotted = _dotted(loc) or "(top level)"
    where = _where(loc, path, lines, overridden)
    kind = err["type"]
    if kind in ("invalid_key", "extra_forbidden"):
        return f"{where}: {_key_message(err, loc, data)}"
    if err["loc"][-1:] == ("[key]",) and not isinstance(err["input"], str):  # `rank_pattern: {1: 4}`: a mapping's key
        mapping, key = _data_loc(err["loc"][:-2], data), err["input"]
        written = next((k[-1] for k in lines if k[:-1] == mapping and len(k) == len(mapping) + 1
                        and type(value := _plain_value(k[-1])) is type(key) and value == key), None)  # `yes`, `on`
        where = _where((*mapping, written) if written else mapping, path, lines, overridden)
        return f"{where}: {_not_a_name(key, '.'.join(map(str, mapping)), written)}."
    if kind == "adapter_method":  # the discriminator of the adapter union: point at the `method:` line
        where = _where((*loc, "method"), path, lines, overridden)
        methods = ", ".join(repr(m) for m in METHODS)
        return f"{where}: 'adapter.method' = {err['input'].get('method')!r}: must be one of {methods}."
    if kind == "missing":
        parent = _dotted(loc[:-1])
        place = f"under '{parent}:'" if parent else "as a top-level section"
        return (
            f"{where}: missing required key '{dotted}'. Add '{loc[-1]}:' {place}; recipes/quickstart.yaml shows a "
            "complete recipe."
        )
    given = err.get("input")
    shown = repr(given) if not isinstance(given, dict | list) else type(given).__name__
    if len(shown) > 80:
        shown = shown[:60] + "..." + shown[-10:]
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "literal_error":
        msg = msg.replace("Input should be", "must be one of")
    msg = re.sub(r" or instance of \w+", " (a section of keys)", msg.replace("Input should be", "must be"))
    if kind != "value_error":  # a validator's own message (`target_modules: []`) is more precise than the hint
        entry = {("data", "train"): "[i]", ("data", "eval"): "[name]"}.get(loc[:2]) if len(loc) == 3 else None
        msg = _UNION_HINTS.get(loc[:2] + (entry,) if entry else loc, msg)
    if given is None and kind in ("model_type", "dict_type"):
        field = Recipe.model_fields.get(str(loc[0])) if len(loc) == 1 else None
        msg = "the section is empty; indent its keys under it" + (
            " (the section is required)" if field is not None and field.is_required()
            else ", or delete the line to use the defaults")
    if kind == "value_error" and isinstance(given, dict):
        # A check across several keys of one section (or of the whole recipe): the message names the keys. One
        # that starts with a key's full name (`training.mixed_precision: fp16 with a 4-bit base ...`) is placed there.
        named = (tuple(int(part) if part.isdigit() else part for part in re.findall(r"\w+", m[1]))
                 if (m := re.match(r"([a-z_]+(?:\.[a-z_][a-z_0-9]*|\[\d+\])*)[: ]", msg)) else ())  # data.train[1].columns
        if named[:1] and named[0] in Recipe.model_fields and named[:len(loc)] == loc:
            where = _where(named, path, lines, overridden)
        elif _own_key_first(named, loc, given, lines, overridden):  # `adam_betas [0.9, 1.0]: ...` under training
            where = _where(loc + named[:1], path, lines, overridden)
        # The other keys it names may have been given by --set (`data.format=classification` against the file's
        # model.task): say so, as a check inside one section does, or the file's line is blamed alone.
        mentioned = {tuple(k.split(".")) for k in re.findall(r"\b[a-z_]+(?:\.[a-z_0-9]+)+", msg)}
        sets = sorted({".".join(map(str, key)) for key in overridden for m in mentioned
                       if m[0] in Recipe.model_fields and (key[:len(m)] == m or m[:len(key)] == key)})
        if sets and "--set" not in where:
            where += f" (with --set {', --set '.join(sets)})"
        named_first = msg.startswith((f"{dotted}.", f"{dotted}["))  # `data.train[1].columns: ...` under data
        return f"{where}: {dotted + ': ' if loc and not named_first else ''}{msg.rstrip('.')}."
    return f"{where}: '{dotted}' = {shown}: {msg.rstrip('.')}."


def _own_key_first(named: tuple, loc: tuple, section: dict, lines: dict[tuple, int], overridden: set[tuple]) -> bool:
    """A section's check whose message starts with one of the section's own keys, written in the file
    (`adam_betas [0.9, 1.0]: each beta is in [0, 1)`, `warmup_steps (5) and warmup_ratio ...`): said at that key's
    line, not the section's. Where a --set gave a key of the section, the section's line stays, naming the --sets."""
    return (len(named) == 1 and bool(loc) and named[0] in section and (*loc, named[0]) in lines
            and not any(key[:len(loc)] == loc for key in overridden))


def _dotted(loc: tuple) -> str:
    """A key path as a recipe names it: `data.train[1].path` (a list's entries by index)."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _where(loc: tuple, path: str | Path, lines: dict[tuple, int], overridden: set[tuple]) -> str:
    """The --set that gave `loc` (or a section above it); else 'file:line' of the deepest written part of `loc`, the
    bare file when none, with the --sets inside `loc` named beside it (a check across a section's keys)."""
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in overridden:
            return f"{path} (--set {'.'.join(map(str, loc[:depth]))})"
    written = [loc[:depth] for depth in range(len(loc), 0, -1) if loc[:depth] in lines]
    where = f"{path}:{lines[written[0]]}" if written else str(path)
    inside = sorted(".".join(map(str, key)) for key in overridden if key[:len(loc)] == loc)
    return where + (f" (with --set {', --set '.join(inside)})" if inside else "")


def _key_message(err: dict, loc: tuple, data: dict) -> str:
    """What is wrong with a key itself: not a name (YAML made it a number, boolean or null), or unknown."""
    if err["type"] == "invalid_key":  # `1: x` or `null: x`: YAML made a non-string key
        section_loc = _data_loc(err["loc"][:-1], data)
        section = ".".join(map(str, section_loc)) or "the recipe"
        return (f"{_not_a_name(err['input'], section)}. Valid keys: "
                f"{', '.join(_valid_keys(section_loc, data))}.")
    valid = _valid_keys(loc[:-1], data)
    section = _dotted(loc[:-1]) or "the recipe"
    if len(loc) <= 2 and (moved := _synonym_home(str(loc[-1]), loc[:-1], data, _value_at(data, loc))) \
            and moved[1] not in valid:
        return (f"unknown key '{loc[-1]}' in {section}: it is {moved[0]}'s '{moved[1]}' here; write it under "
                f"'{moved[0]}:' as '{moved[1]}'.")
    if len(loc) <= 2 and (homes := _home_sections(str(loc[-1]), loc[:-1], data, _value_at(data, loc))):
        return (f"unknown key '{loc[-1]}' in {section}: it is a key of " + " and of ".join(f"'{h}:'" for h in homes)
                + ("; move it there." if len(homes) == 1 else "; move it under the one you mean."))
    if method := _method_without(_section_model(loc[:-1], data), str(loc[-1])):
        return (f"unknown key '{loc[-1]}' in {section}: {METHODS[method].title} (method: {method}) has no "
                f"'{loc[-1]}'.{_suggest(str(loc[-1]), valid)} Valid keys for method {method}: {', '.join(valid)}.")
    hint = _suggest(str(loc[-1]), valid)
    if loc[-1] == "type" and "format" in valid and (value := _value_at(data, loc)) in _AXOLOTL_TYPES:
        hint += f" axolotl's `type: {value}` is `format: {_AXOLOTL_TYPES[value]}` here."
    return f"unknown key '{loc[-1]}' in {section}.{hint} Valid keys: {', '.join(valid)}."


def _not_a_name(key: Any, section: str, written: str | None = None) -> str:
    """A key of `section` that YAML did not read as a string (`1:`, `yes:`, `null:`), as `written` when known."""
    read_as = {bool: "a boolean", int: "a number", float: "a number", type(None): "null"}.get(
        type(key), f"a {type(key).__name__}")
    return (f"key {written or repr(key)} in {section} is not a name (YAML read it as {read_as}); quote it if it is "
            "meant as one")

# A union-typed key fails once per member type; one message says what any of them would accept.
_UNION_HINTS = {
    ("adapter", "target_modules"): "must be 'all-linear', a list of module-name suffixes, or {regex: PATTERN}",
    ("training", "max_steps"): "must be a positive integer, or null to train for `epochs`",
    ("data", "train", "[i]"): "must be a path or hub id, or {path: ..., split: ..., columns: {...}, format: ...}",
    ("data", "train"): ("must be a path or hub id, or a list of datasets (each a path or hub id or {path: ..., split: "
                        "..., columns: {...}, format: ...}); one dataset's {path: ...} is a list of one: put '- ' before "
                        "it"),
    ("data", "eval"): ("must be a path or hub id, or a mapping of names to datasets (`{NAME: path, NAME2: {path: ..., "
                       "split: ..., columns: {...}, format: ...}}`); a list of datasets is data.train's"),
    ("data", "eval", "[name]"): "must be a path or hub id, or {path: ..., split: ..., columns: {...}, format: ...}",
}

# axolotl's dataset `type:` values that are another format here (its alpaca and completion are ours by name).
_AXOLOTL_TYPES = {"sharegpt": "chat", "chat_template": "chat"}

def _most_specific(errors: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """Drop an error when another lies deeper under the same key: a union member that got further (a
    {regex: ...} with a bad pattern) explains better than the others. A set of prefixes keeps it linear."""
    deeper = {loc[:i] for loc, _ in errors for i in range(len(loc))}
    return [(loc, err) for loc, err in errors if loc not in deeper]


def _drop_misspelled(errors: list[tuple[tuple, dict]], data: Any) -> list[tuple[tuple, dict]]:
    """Drop a missing key that an unknown sibling key is a misspelling of (`nme_or_path`): that sibling's
    'Did you mean' message already says how to fix it, so the 'missing' one is only noise."""
    missing_in = {loc[:-1] for loc, err in errors if err["type"] == "missing"}
    meant = {(loc[:-1], _suggest(str(loc[-1]), _valid_keys(loc[:-1], data)))
             for loc, err in errors if err["type"] == "extra_forbidden" and loc[:-1] in missing_in}
    return [(loc, err) for loc, err in errors
            if not (err["type"] == "missing" and (loc[:-1], f" Did you mean '{loc[-1]}'?") in meant)]


def _value_at(data: Any, loc: tuple) -> Any:
    for key in loc:  # a list's entry by its index (data.train[0].type)
        data = (data[key] if isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data)
                else data.get(key) if isinstance(data, dict) else None)
    return data


def _optional_section(loc: tuple, data: Any) -> type[BaseModel] | None:
    """The section the key at `loc` holds when it may be left out (`quantization`, `training.early_stopping`)."""
    model = _section_model(loc[:-1], data)
    field = model.model_fields.get(str(loc[-1])) if model is not None else None
    members = _members(field.annotation) if field is not None else []
    sections = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
    return sections[0] if type(None) in members and len(sections) == 1 else None


def _empty_section_message(loc: tuple, path: Path, lines: dict[tuple, int], section: type[BaseModel]) -> str:
    """`quantization:` with nothing under it reads as "no quantization", which is rarely what it was written for."""
    dotted, key = ".".join(map(str, loc)), loc[-1]
    defaults = (f", write '{key}: {{}}' for its defaults" if not any(f.is_required() for f in section.model_fields.values())
                else "")
    return (f"{path}:{lines[loc]}: '{dotted}' = None: the section is empty, which would mean no {key} at all; indent "
            f"its keys under it{defaults}, or write '{key}: null' (or delete the line) to go without it.")

_FIELD_NAMES = _all_fields(Recipe)
