"""Reading a JSON settings file (adapter_config.json, peftkit.json, a model's config.json) with its errors in the
file's words: a file that is no JSON object, or is not a regular file, is refused naming the file; a field pydantic
rejects is said as one phrase per field ('"r" is "eight"; it should be a whole number'), not in pydantic's text.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from peftkit.errors import PeftkitError

# What a list-or-string field should be, in words: pydantic reports one error per member of the union,
# or per list element, where one phrase about the whole field reads better.
_WHOLE_FIELDS = {
    "target_modules": "a list of module names, or a regular expression string",
    "modules_to_save": "a list of module names, or null",
    "layers_to_transform": "a list of layer numbers, a layer number, or null",
}


def _expected(err: dict) -> str:
    """What a pydantic error says the value should have been, in the words of a JSON file."""
    kind, ctx = err["type"], err.get("ctx", {})
    if kind == "literal_error":
        return f"one of {ctx['expected']}"
    for prefix, words in (("int", "a whole number"), ("float", "a number"), ("finite", "a finite number"),
                          ("bool", "true or false"), ("string", "a string"), ("list", "a list"), ("dict", "an object"),
                          ("model", "an object")):
        if kind.startswith(prefix):
            return words
    bounds = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
              "less_than_equal": "<= {le}"}
    if kind in bounds:
        return "a number " + bounds[kind].format(**ctx)
    return err["msg"].lower()


def field_problems(err: ValidationError, data: dict) -> list[str]:
    """One phrase per wrong field ('"r" is "eight"; it should be a whole number'), instead of pydantic's text."""
    problems: dict[str, str] = {}
    for e in err.errors():
        loc = [str(part) for part in e["loc"]]
        whole = bool(loc) and loc[0] in _WHOLE_FIELDS
        field = loc[0] if whole else ".".join(loc)
        if field in problems:
            continue
        if e["type"] == "missing":
            problems[field] = f'"{field}" is missing'
        elif e["type"] == "extra_forbidden":
            problems[field] = f'"{field}" is not a setting peftkit knows'
        elif e["type"] == "value_error":  # a validator's own words
            problems[field] = f'"{field}" is {show_value(e["input"])}: {e["msg"].removeprefix("Value error, ")}'
        else:
            value, expected = (data[field], _WHOLE_FIELDS[field]) if whole else (e["input"], _expected(e))
            problems[field] = f'"{field}" is {show_value(value)}; it should be {expected}'
    return list(problems.values())


def show_value(value: object) -> str:
    """A value as its file would spell it, cut to 60 characters: errors quote what the file says."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


MAX_JSON_BYTES = 64 * 2**20
"""The largest settings file read (adapter_config.json, peftkit.json, a model's config.json): real ones are kilobytes."""


def read_json_object(file: Path, what: str) -> dict:
    """A JSON file that must hold an object; anything else is a PeftkitError naming the file. Only a regular file of
    at most MAX_JSON_BYTES is read: a FIFO in its place would block for ever (deaf to Ctrl-C), /dev/zero fill memory."""
    try:
        if file.exists() and not file.is_file():
            raise PeftkitError(f"{file} is not a regular file (a device, a FIFO or a directory). {what}")
        with open(file, "rb") as handle:
            data = handle.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise PeftkitError(f"{file} is larger than {MAX_JSON_BYTES // 2**20} MiB: not a settings file. {what}")
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftkitError(f"{file}: not valid JSON ({e}). {what}") from None
    except RecursionError:  # the json module recurses once per bracket
        raise PeftkitError(f"{file}: not a settings file (JSON nested thousands of levels deep). {what}") from None
    if not isinstance(raw, dict):
        raise PeftkitError(f"{file} must hold a JSON object of settings, but holds {json_kind(raw)}. {what}")
    return raw


def json_kind(value: object) -> str:
    """'a list', 'a string', 'null': a JSON value's type in the words of the file it came from."""
    if value is None:
        return "null"
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def validated(model: type[BaseModel], file: Path, raw: dict, what: str):
    """`raw` as `model`; a PeftkitError naming `file` and each wrong field (`field_problems`), then `what` to do."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise PeftkitError(f"{file}: {'; '.join(field_problems(e, raw))}. {what}") from None
