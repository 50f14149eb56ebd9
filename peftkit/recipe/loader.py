"""`load_recipe`: YAML + --set overrides -> a validated Recipe, or one error listing every problem with its
key, file and line and how to fix it; relative paths resolved against the recipe's directory.

    reader.py      the YAML, with each key's line
    overrides.py   --set KEY=VALUE
    keys.py        the sections and keys at a key path, suggestions for a wrong key
    messages.py    pydantic's errors in our words, at file:line
    resolution.py  what follows validation: paths, AdapterFusion's adapters, data.chat_template, adapter.init_from
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from pydantic import ValidationError

from peftkit.recipe.messages import (_data_loc, _drop_misspelled, _empty_section_message, _most_specific,
                                     _optional_section, _value_at, _where, format_validation_error)
from peftkit.recipe.overrides import _apply_override
from peftkit.recipe.reader import _invalid, _read_yaml
from peftkit.recipe.resolution import resolve_recipe
from peftkit.recipe.schema import Recipe

__all__ = ["format_validation_error", "load_recipe", "located"]


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
    overridden = _overridden(overrides)
    for assignment in overrides:
        _apply_override(data, assignment)
    recipe = _validated(data, path, lines, empty, overridden)
    return resolve_recipe(recipe, path, lines, overridden, missing_adapters)


def _overridden(overrides: list[str] | tuple[str, ...]) -> set[tuple]:
    """The key paths the --sets `overrides` give."""
    return {tuple(assignment.partition("=")[0].strip().split(".")) for assignment in overrides}


_KEY_FIRST = re.compile(r"([a-z_]+(?:\.[a-z_][a-z_0-9]*|\[\d+\])+)")
"""A recipe key a message starts with: `adapter.r`, `data.train[1].format`."""


def located(path: str | Path, overrides: list[str] | tuple[str, ...], message: str) -> str:
    """`message` (an error of train's checks of the recipe `path`, `peftkit validate`'s model checks) with where the
    key it starts with was given in front, as the recipe's own errors have it: `recipe.yaml:7: ` (or `recipe.yaml
    (--set adapter.r): `); unchanged where it starts with no key the file or a --set writes (a default's)."""
    key = _KEY_FIRST.match(message)
    if key is None:
        return message
    loc = tuple(int(part[1:-1]) if part.startswith("[") else part
                for part in re.findall(r"[a-z_][a-z_0-9]*|\[\d+\]", key[1]))
    path = Path(path)
    lines, overridden = _read_yaml(path)[1], _overridden(overrides)
    if loc[0] not in Recipe.model_fields or not any(loc[:depth] in overridden or (depth > 1 and loc[:depth] in lines)
                                                    for depth in range(len(loc), 0, -1)):
        return message
    return f"{_where(loc, path, lines, overridden)}: {message}"


def _validated(data: dict, path: Path, lines: dict[tuple, int], empty: set[tuple], overridden: set[tuple]) -> Recipe:
    """The Recipe of `data` (the file's, with the --sets `overridden` applied), or PeftkitError listing every
    problem: optional sections left empty (`empty`), then pydantic's errors in our words."""
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
    return recipe
