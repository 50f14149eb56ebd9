"""`--set KEY=VALUE`: an override of a recipe's key, VALUE read as YAML, checked against the sections' keys before
it is applied (an unknown key, a key of another section, a key under a value)."""

from __future__ import annotations

import yaml

from peftkit.errors import PeftkitError
from peftkit.methods import METHODS
from peftkit.recipe.keys import (_field_order, _home_sections, _method_without, _plain_value, _section_model,
                                 _suggest, _synonym_home)
from peftkit.recipe.reader import _parse_yaml, _YamlProblem

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
            value = _plain_value(raw) if depth == len(parts) else None
            if depth <= 2 and (moved := _synonym_home(parts[depth - 1], tuple(parts[: depth - 1]), data, value)) \
                    and moved[1] not in valid:  # (as a recipe file's: `messages._key_message`)
                raise PeftkitError(f"--set {key}: unknown key '{parts[depth - 1]}' in {where}: it is {moved[0]}'s "
                                   f"'{moved[1]}' here; use --set {'.'.join([*moved, *parts[depth:]])}={raw}.")
            if depth <= 2 and (homes := _home_sections(parts[depth - 1], tuple(parts[: depth - 1]), data,
                                                       value)):
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
