"""`Section`, the base of every recipe section model, and `TargetRegex`.

They live outside `peftkit.recipe` because the adapter methods' configs (`peftkit/methods/*.py`) are recipe
sections too, and `peftkit.recipe.schema` imports them to build the `adapter` section: a method file
importing `peftkit.recipe` would import itself in a circle.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class Section(BaseModel):
    # allow_inf_nan=False: `lr: .inf` would pass `gt=0` and only fail as a NaN loss at step 1.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic's lax mode reads `true` as 1, so `max_steps: yes` would train one step. Strict mode is
        not the fix: PyYAML reads `lr: 2e-4` (no dot) as a string, which lax mode rightly converts."""
        annotation = cls.model_fields[info.field_name].annotation
        members = getattr(annotation, "__args__", (annotation,))  # `int | None` -> (int, NoneType)
        kind = next((word for number, word in _NUMBER_KINDS.items() if number in members), None)
        if isinstance(value, bool) and kind:
            raise ValueError(f"must be {kind}, not a boolean (YAML reads true/false, yes/no and on/off as booleans)")
        return value


_NUMBER_KINDS = {float: "a number", int: "an integer"}  # float first: a float field also takes `lr: 1`


class TargetRegex(Section):
    regex: str
    """Python regular expression matched against the full module path (`re.fullmatch`)."""

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"is not a valid regular expression ({e})") from None
        return v


def none_saved(value: list[str], why: str) -> list[str]:
    """A method's `modules_to_save`, which it does not support: empty, or a ValueError saying `why`."""
    if value:
        raise ValueError(why)
    return value


class AdapterSection(Section):
    """What every method's `adapter` section shares (each method's config subclasses it)."""

    @field_validator("target_modules", check_fields=False)
    @classmethod
    def _targets_not_empty(cls, v: Any, info: ValidationInfo) -> Any:
        """An empty `target_modules` list would adapt nothing (every method's config has the field), unless LoRA's
        target_parameters (validated before it) adapts parameters; `[all-linear]` would adapt nothing either (it
        is read as a module name no module has) and failed only after the model loaded."""
        if isinstance(v, list) and not v and not info.data.get("target_parameters"):
            defaults = ", or null for the defaults" if cls.model_fields["target_modules"].default is None else ""
            raise ValueError(f"is an empty list; name at least one module, or use 'all-linear'{defaults}")
        if isinstance(v, list) and "all-linear" in v:
            if "'all-linear'" not in str(cls.model_fields["target_modules"].annotation):  # trainable_tokens
                raise ValueError("lists 'all-linear', which is no module name (and this method has no all-linear); "
                                 "list the modules by name")
            others = ", or list module names only" if len(v) > 1 else ""
            raise ValueError("lists 'all-linear', which is a value of its own, not a module name; write "
                             f"`target_modules: all-linear` (not in a list){others}")
        return v

    init_from: str | None = None
    """A PEFT-format adapter directory (peftkit's or peft's, any method peftkit reads) to start training from:
    its weights are the step-0 weights, and the method and its settings come from its adapter_config.json.
    Method keys set beside it must match the adapter's (leave them out)."""
