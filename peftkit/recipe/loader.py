"""`load_recipe`: YAML + --set overrides -> a validated Recipe, or one error listing every problem with its
key, file and line and how to fix it; relative paths resolved against the recipe's directory."""

from __future__ import annotations

import functools
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, PydanticSchemaGenerationError, TypeAdapter, ValidationError

from peftkit.errors import PeftkitError, did_you_mean
from peftkit.methods import DEFAULT_METHOD, METHODS
from peftkit.methods.alora import Activation
from peftkit.methods.bdlora import BlockDiagonalLora
from peftkit.methods.kasa import Kasa
from peftkit.methods.velora import Velora
from peftkit.methods.param_lora import TargetParameters
from peftkit.methods.target_filters import ExcludedTargets, LayerTargets
from peftkit.methods.replication import LayerReplication
from peftkit.methods.token_rows import TrainableTokenIndices
from peftkit.recipe.reader import _invalid, _parse_yaml, _read_yaml, _YamlProblem
from peftkit.recipe.schema import DATA_EXTENSIONS, Recipe
from peftkit.section import AdapterSection


def _members(annotation: Any) -> list[Any]:
    """The types a field accepts: the members of a union, without `Annotated` wrappers (discriminator tags)."""
    if typing.get_origin(annotation) is Annotated:
        return _members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    if typing.get_origin(annotation) is list and (item := typing.get_args(annotation)):  # a list of sections: theirs
        return [annotation, *(m for m in _members(item[0]) if isinstance(m, type) and issubclass(m, BaseModel))]
    return [annotation]


def _section_model(loc: tuple, data: Any = None) -> type[BaseModel] | None:
    """The pydantic model whose fields live at `loc` (a path of keys), or None. Where the section is a union of
    adapter methods' configs, the one that `data` (the recipe) picks with its `method:` key."""
    node, methods = data, []
    for key in loc:
        node = node.get(key) if isinstance(node, dict) else None
        name = node.get("method") if isinstance(node, dict) else None
        methods.append(name if isinstance(name, str) else None)
    return _section_model_of(tuple(loc), tuple(methods))


@functools.lru_cache(maxsize=1024)  # a recipe of thousands of unknown keys asks for the same few sections each time
def _section_model_of(loc: tuple, methods: tuple) -> type[BaseModel] | None:
    """`_section_model` of the keys `loc`, where `methods` holds the `method:` written at each of them (or None)."""
    model: Any = Recipe
    named: type[BaseModel] | None = None  # the section of each entry of a mapping of names to sections (data.eval's)
    for key, method in zip(loc, methods, strict=True):
        if isinstance(key, int):  # an entry of a list of sections (data.train's): the entry's section
            continue
        if named is not None:  # a name of such a mapping: its entry's section
            model, named = named, None
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or key not in model.model_fields:
            return None
        members = _members(model.model_fields[key].annotation)
        candidates = [a for a in members if isinstance(a, type)]
        models = [a for a in candidates if issubclass(a, BaseModel)]
        model = _chosen_method(models, method) if len(models) > 1 else next(iter(models), None)
        named = next((m for a in members if typing.get_origin(a) is dict for m in _members(typing.get_args(a)[1])
                      if isinstance(m, type) and issubclass(m, BaseModel)), None)
    return model


def _chosen_method(models: list[type[BaseModel]], name: str | None) -> type[BaseModel] | None:
    """The config of the method `name` (the default method for None, or an unknown one)."""
    config = METHODS[name].config if name in METHODS else METHODS[DEFAULT_METHOD].config
    return config if config in models else models[0]


def _apply_override(data: dict, assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise PeftkitError(f"--set {assignment!r}: expected KEY=VALUE, for example --set training.lr=2e-4")
    parts = key.strip().split(".")
    for depth in range(1, len(parts) + 1):
        model = _section_model(tuple(parts[: depth - 1]), data)
        if model is not None and parts[depth - 1] not in model.model_fields:
            # `adapter.target_modules.0=q_proj`: an entry of a list, where "unknown key '0' ... Valid keys: regex"
            # (target_modules may also be the section {regex: ...}) misled. No section has a key of digits.
            if depth > 1 and parts[depth - 1].isdigit():
                raise _set_into_a_value(key.strip(), parts[: depth - 1])
            valid = _field_order(model)
            where = ".".join(parts[: depth - 1]) or "the recipe"
            if depth <= 2 and (homes := _home_sections(parts[depth - 1], tuple(parts[: depth - 1]), data,
                                                       _plain_value(raw) if depth == len(parts) else None)):
                moved = " or ".join(f"--set {'.'.join([home, *parts[depth - 1:]])}={raw}" for home in homes)
                raise PeftkitError(f"--set {key}: unknown key '{parts[depth - 1]}' in {where}: it is a key of "
                                   + " and of ".join(f"'{h}:'" for h in homes) + f"; use {moved}.")
            if method := _method_without(model, parts[depth - 1]):
                where += f": {METHODS[method].title} (method: {method}) has no '{parts[depth - 1]}'"
            raise PeftkitError(
                f"--set {key}: unknown key '{parts[depth - 1]}' in {where}.{_suggest(parts[depth - 1], valid)} "
                f"Valid keys{f' for method {method}' if method else ''}: {', '.join(valid)}."
            )
    try:
        value, _, duplicates, _ = _parse_yaml(raw, "the value") if raw.strip() else (None, {}, [], set())
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PeftkitError(
            f"--set {key.strip()}={raw}: the value is not valid YAML ({problem}). Quote a string value, for "
            f"example --set '{key.strip()}=\"{raw}\"'."
        ) from None
    except _YamlProblem as e:
        raise PeftkitError(f"--set {key.strip()}: {e.message}") from None
    if duplicates:
        raise PeftkitError(f"--set {key.strip()}: key '{duplicates[0][0][-1]}' is given twice in the value; YAML would "
                           "silently keep only the last. Give each key once.")
    node = data
    for depth, part in enumerate(parts[:-1], start=1):
        if node.get(part) is not None and not isinstance(node[part], dict):  # `training.lr.x=1`: lr is a value
            raise _set_into_a_value(key.strip(), parts[:depth])
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _set_into_a_value(key: str, parts: list[str]) -> PeftkitError:
    """`--set KEY=...` where `parts` (a prefix of KEY) is a value, not a section; a key of digits under it would be
    an entry of a list."""
    name = ".".join(parts)
    whole = "[...]" if key.split(".")[len(parts)].isdigit() else "VALUE"
    return PeftkitError(f"--set {key}: '{name}' is a value, not a section with keys; set it whole: --set {name}={whole}.")


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


def _home_sections(key: str, section: tuple, data: Any, value: Any = None) -> list[str]:
    """The other top-level sections that have the key `key` (`max_length` written under training: data); of
    several, those that would take `value` (`method: lora` is adapter's, not quantization's)."""
    models = {name: _section_model((name,), data) for name in Recipe.model_fields if (name,) != tuple(section)}
    homes = {name: model for name, model in models.items() if model is not None and key in model.model_fields}
    return [name for name, model in homes.items() if _takes(name, model, key, value)] or list(homes)


def _plain_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _takes(section: str, model: type[BaseModel], key: str, value: Any) -> bool:
    if (section, key) == ("adapter", "method"):  # each method's config takes only its own name
        return isinstance(value, str) and value in METHODS
    try:
        TypeAdapter(model.model_fields[key].annotation).validate_python(value)
    except (ValidationError, PydanticSchemaGenerationError):
        return False
    return True


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

# Names other tools use for our keys: a user coming from peft/axolotl/transformers gets pointed at ours.
_SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "learning_rate": "lr", "gradient_accumulation_steps": "grad_accum", "num_epochs": "epochs",
    "num_train_epochs": "epochs", "micro_batch_size": "batch_size", "per_device_train_batch_size": "batch_size",
    "lr_scheduler": "scheduler", "lr_scheduler_type": "scheduler", "optim": "optimizer", "base_model": "name_or_path",
    "torch_dtype": "dtype", "sequence_len": "max_length", "max_seq_length": "max_length", "target": "target_modules",
    "bnb_4bit_quant_type": "method", "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype", "bnb_4bit_quant_storage": "quant_storage",
    "type": ("method", "format"),  # peft's config's (an adapter's method), axolotl's dataset entry's (its format)
}

# axolotl's dataset `type:` values that are another format here (its alpaca and completion are ours by name).
_AXOLOTL_TYPES = {"sharegpt": "chat", "chat_template": "chat"}


# peft keys whose closest name here is another setting: what they are, not a pointer to that setting.
_NOT_OURS = {
    ("bias", "lora_bias"): " peft's `bias` (all / lora_only: train the base's own biases) has no peftkit key; "
                           "'lora_bias' is another setting (a trained bias of the update, in lora_B).",
}


def _method_without(model: type[BaseModel] | None, key: str) -> str | None:
    """The method of an adapter config that lacks `key`, when saying so helps: the recipe chose a method other
    than the default, or `key` belongs to another method (`r` in an IA3 section). None otherwise."""
    method = next((m.name for m in METHODS.values() if m.config is model), None)
    if method is None:  # not an adapter section (quantization has a `method` too)
        return None
    elsewhere = any(key in m.config.model_fields for m in METHODS.values() if m.name != method)
    return method if method != DEFAULT_METHOD or elsewhere else None


def _all_fields(model: type[BaseModel]) -> set[str]:
    names = set(model.model_fields)
    for field in model.model_fields.values():
        for member in _members(field.annotation):
            if isinstance(member, type) and issubclass(member, BaseModel):
                names |= _all_fields(member)
    return names


def _suggest(key: str, valid: list[str]) -> str:
    normal = key.lower().replace("-", "_")  # `Batch-Size` is `batch_size` written another way
    if note := next((n for (theirs, ours), n in _NOT_OURS.items() if normal == theirs and ours in valid), None):
        return note
    for name in (key, normal):
        ours = _SYNONYMS.get(name, ())
        if meant := next((k for k in ((ours,) if isinstance(ours, str) else ours) if k in valid), None):
            return f" Did you mean '{meant}'?"
    if normal != key and normal in valid:
        return f" Did you mean '{normal}'?"
    return did_you_mean(normal, valid)


def _valid_keys(loc: tuple, data: Any = None) -> list[str]:
    model = _section_model(loc, data)
    return _field_order(model) if model else []


def _field_order(model: type[BaseModel]) -> list[str]:
    """A section's keys as an error lists them."""
    # Fields of a shared base (every adapter method's `init_from`, the layer methods' `layers_to_transform`, LoRA's
    # `trainable_token_indices`) come first in pydantic's order; a method's own keys, `method` first, read better
    # ahead of them, init_from last.
    shared = sorted((name for name in model.model_fields
                     if any(name in base.model_fields
                            for base in (LayerTargets, ExcludedTargets, TrainableTokenIndices, LayerReplication,
                                         Activation, TargetParameters, BlockDiagonalLora, Velora, Kasa))),
                    key=lambda name: name in AdapterSection.model_fields)
    return [name for name in model.model_fields if name not in shared] + shared


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


def _resolve(value: str, base: Path, kind: str) -> str:
    """Resolve a recipe path against the recipe's directory; leave hub ids alone."""
    expanded = Path(value).expanduser()
    candidate = expanded if expanded.is_absolute() else base / expanded
    looks_like_path = value.startswith(("/", "./", "../", "~")) or expanded.is_absolute()
    if kind == "data" and Path(value).suffix.lower() in DATA_EXTENSIONS:
        looks_like_path = True
    if candidate.exists() or looks_like_path or kind in ("output", "adapter"):
        return str(candidate.resolve())
    return value  # a hub id


_FIELD_NAMES = _all_fields(Recipe)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
                missing_adapters: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; raise PeftkitError with every problem found.

    Args:
        path: the YAML file.
        overrides: `KEY=VALUE` strings (`training.lr=2e-4`); VALUE is parsed as YAML.
        missing_adapters: where given, an adapter directory the recipe starts from (`adapter.fuse`,
            `source_adapter`) that is neither here nor a hub adapter that can be fetched is said here and stays its
            local path (`peftkit validate`: the recipe may be meant for another machine), instead of being an error.
            `adapter.init_from` is read either way.
    """
    path = Path(path)
    data, lines, empty = _read_yaml(path)
    overridden = set()
    for assignment in overrides:
        _apply_override(data, assignment)
        overridden.add(tuple(assignment.partition("=")[0].strip().split(".")))
    problems = [_empty_section_message(loc, path, lines, section) for loc in sorted(empty, key=lines.__getitem__)
                if _value_at(data, loc) is None and (section := _optional_section(loc, data))
                and not any(loc[:depth] in overridden for depth in range(1, len(loc) + 1))]
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        errors = _drop_misspelled(_most_specific([(_data_loc(err["loc"], data), err) for err in e.errors()]), data)
        problems += [format_validation_error(err, data, path, lines, overridden) for _, err in errors]
        problems = list(dict.fromkeys(problems))  # (the branches of a union given a hint say it once)
    if problems:  # in the file's order; --set and file-wide ones after
        at = re.compile(re.escape(str(path)) + r":(\d+)")
        raise _invalid(sorted(problems, key=lambda m: int(n[1]) if (n := at.match(m)) else math.inf)) from None
    base = path.resolve().parent

    def usable(value: str, kind: str, loc: tuple) -> str:
        where = _where(loc, path, lines, overridden)
        key = _dotted(loc[:3])  # adapter.fuse[1], data.eval.general
        if not value.strip():  # Path("") is ".": the recipe's own directory, silently
            raise PeftkitError(f"{where}: '{key}' is empty. Give a path (relative to the recipe's directory) or a "
                               "hub id.")
        try:
            resolved = _resolve(value, base, kind)
        except (OSError, RuntimeError, ValueError) as e:  # `~nosuchuser/x`, a name over 255 bytes, a NUL byte
            reason = getattr(e, "strerror", None) or str(e).rstrip(".")
            shown = value if len(value) <= 80 else f"{value[:77]}..."
            fix = ("a directory path that can be created" if kind == "output" else
                   "an existing path (relative to the recipe's directory) or a hub id")
            raise PeftkitError(f"{where}: '{key}' = {shown!r} is not a usable path ({reason}). Give {fix}.") from None
        if kind == "adapter" and not Path(resolved).exists():  # a hub adapter (`peftkit.hub`), or the missing path
            from peftkit.hub import hub_adapter

            try:
                return hub_adapter(value, tried=resolved) or resolved
            except PeftkitError as e:
                if missing_adapters is None or loc[1] == "init_from":
                    raise PeftkitError(f"{where}: {key}: {e}") from None
                missing_adapters.append(f"{where}: {key}: {e}")
                return resolved
        return resolved

    if isinstance(recipe.data.train, list):  # each dataset's path, where the recipe wrote it
        recipe.data.train = [usable(entry, "data", ("data", "train", i)) if isinstance(entry, str) else
                             entry.model_copy(update={"path": usable(entry.path, "data", ("data", "train", i, "path"))})
                             for i, entry in enumerate(recipe.data.train)]
    if isinstance(recipe.data.eval, dict):  # each set's path, where the recipe wrote it
        recipe.data.eval = {name: usable(entry, "data", ("data", "eval", name)) if isinstance(entry, str) else
                            entry.model_copy(update={"path": usable(entry.path, "data", ("data", "eval", name, "path"))})
                            for name, entry in recipe.data.eval.items()}
    for section, key, kind in (("model", "name_or_path", "model"), ("data", "train", "data"), ("data", "eval", "data"),
                               ("export", "output_dir", "output"), ("adapter", "init_from", "adapter"),
                               ("adapter", "source_adapter", "adapter")):  # the latter: multitask prompt tuning's
        value = getattr(getattr(recipe, section), key, None)
        if isinstance(value, str):  # (data.train's list: above)
            setattr(getattr(recipe, section), key, usable(value, kind, (section, key)))
    if isinstance(fuse := getattr(recipe.adapter, "fuse", None), list):  # AdapterFusion's adapter directories
        recipe.adapter.fuse = [usable(value, "adapter", ("adapter", "fuse", i)) for i, value in enumerate(fuse)]
        real = [os.path.realpath(value) for value in recipe.adapter.fuse]
        for j, value in enumerate(real):
            if (i := real.index(value)) < j:  # one adapter twice: its outputs weighed against themselves, silently
                raise PeftkitError(f"{_where(('adapter', 'fuse', j), path, lines, overridden)}: adapter.fuse[{j}] is "
                                   f"adapter.fuse[{i}] again ({value}); AdapterFusion weighs different adapters "
                                   "against each other. List each adapter directory once.")
    if recipe.data.chat_template is not None:  # a file's or directory's template read in: the run keeps its text
        from peftkit.data.chat_templates import resolved_template

        try:
            recipe.data.chat_template = resolved_template(recipe.data.chat_template, base)
        except PeftkitError as e:
            raise PeftkitError(f"{_where(('data', 'chat_template'), path, lines, overridden)}: data.chat_template: "
                               f"{e}") from None
    if recipe.adapter.init_from:
        from peftkit.init_from import init_from_config

        try:
            recipe.adapter = init_from_config(recipe.adapter)
        except PeftkitError as e:  # the adapter is the recipe's: say where the recipe names it
            raise PeftkitError(f"{_where(('adapter', 'init_from'), path, lines, overridden)}: {e}") from None
        _check_init_from_tokens(recipe, _where(("model", "add_tokens"), path, lines, overridden))
    return recipe


def _check_init_from_tokens(recipe: Recipe, where: str) -> None:
    """The tokens adapter.init_from's training added (peftkit.json added_tokens; a peft adapter's, its tokenizer's
    past the base's) must begin model.add_tokens, in their order: its trained rows are those ids' (other tokens would
    take them, silently, in another order). Tokens listed after them are new to this run: their rows start as a
    fresh run's (`new_tokens.start_state`). An adapter trained without new tokens holds no rows for them."""
    from peftkit.adapter_meta import read_meta
    from peftkit.modeling import load_config
    from peftkit.new_tokens import adapter_tokens, held_tokenizer

    path, tokens = recipe.adapter.init_from, recipe.model.add_tokens
    # peft's adapter (TRL's setup_chat_format) tells its added tokens by the tokenizer beside it: one past the base's
    # rows was trained on a resized base (a pad token added within a base's spare rows was not: it trains as before).
    theirs = held_tokenizer(path)  # (read once: a large tokenizer takes a fifth of a second)
    if not tokens and not read_meta(path).added_tokens and (
            theirs is None or len(theirs) <= load_config(recipe.model).get_text_config().vocab_size):
        return
    added = adapter_tokens(path, recipe.model, theirs)
    if tokens[:len(added)] == added and (added or not tokens):  # (none added, none asked: nothing to check)
        return
    if not added:
        raise PeftkitError(f"{where}: model.add_tokens {tokens}: adapter.init_from {path} was trained without new "
                           "tokens and holds no rows for them. Leave model.add_tokens out, or train a new adapter.")
    dropped = [token for token in added if token not in tokens]
    why = (f"which leaves out {', '.join(dropped)}, whose row{'s' * (len(dropped) > 1)} the adapter trained"
           if dropped else "which lists them in another order")
    raise PeftkitError(f"{where}: adapter.init_from {path} was trained with model.add_tokens: {added}, whose rows it "
                       f"holds by id, and this recipe's model.add_tokens is {tokens or 'empty'}, {why}. Set "
                       f"model.add_tokens: {added + [t for t in tokens if t not in added]} (the adapter's tokens "
                       "first, in its order; tokens after them are new, their rows trained from the start).")
