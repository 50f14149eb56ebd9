"""Which of the modules `target_modules` names an adapter adapts: peft's `layers_to_transform` / `layers_pattern`
and `exclude_modules`, one rule each for every method whose peft config has the field (peft's
`check_target_module_exists`).

`LayerTargets` and `ExcludedTargets` are the recipe side (a method's config subclasses those it has), the `Peft...`
classes the adapter_config.json side, and `narrow` the rules themselves, applied by `Method.select_targets`. A
recipe's per-module settings (`rank_pattern`, `alpha_pattern`, `n_frequency_pattern`) must each match an adapted
module (`check_patterns`).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from peftkit.errors import PeftkitError, PeftkitWarning, did_you_mean
from peftkit.methods.base import PeftConfigBase, targets_from_peft
from peftkit.methods.layer import suffix_match
from peftkit.section import AdapterSection, TargetRegex

LayerIndices = list[Annotated[int, Field(ge=0)]] | Annotated[int, Field(ge=0)] | None


LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"], "bloom": ["query_key_value"], "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
}
"""peft 0.21's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, which its newer methods copy as their defaults
(Super-Tuning's, PEANuT's), for the architectures peftkit is tested on and their close relatives."""


class NoDefault(PeftkitError):
    """A method's setting left to the architecture (`Method.resolve`: AdaLoRA's, IA3's, LN tuning's target_modules) on
    a model type it has no default for. Its example is a Llama's names; `inject_adapters`, which has the model, says
    the model's own layers instead (`for_model`): a Llama's q_proj was suggested to a BERT."""

    def __init__(self, key: str, title: str, model_type: str | None, defaults, ask: str, example: str,
                 layers: str = "linear") -> None:
        self.head = (f"adapter.{key}: {title} has no default for model type {model_type!r} (it has for "
                     f"{', '.join(defaults)}); {ask}")
        self.layers = layers  # which of the model's layers to name: "linear" or "normalisation"
        super().__init__(f"{self.head}, e.g. {example}.")

    def for_model(self, names: list[str]) -> PeftkitError:
        """This error with the model's own layer names (of `self.layers`) in place of the example."""
        return PeftkitError(f"{self.head}: this model's {self.layers} layers are named {', '.join(names) or '(none)'}.")


def regex_keys(pattern: dict | list | str | None) -> dict | list | str | None:
    """A rank_pattern's or alpha_pattern's keys, and layers_pattern's names, must be regular expressions."""
    for key in [pattern] if isinstance(pattern, str) else pattern or ():
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"{key!r} is not a regular expression ({e})") from None
    return pattern


class LayerTargets(AdapterSection):
    """The `adapter` keys that pick layers among the targets."""

    layers_to_transform: LayerIndices = None
    """Adapt the target modules of these layers only: the layer's index is the number after `layers_pattern` in a
    module's path, or the first number after a dot in it (peft's)."""
    layers_pattern: list[str] | str | None = None
    """With layers_to_transform: the name before a layer's index (`layers`, `h`), where the first number would not
    do."""

    _layers_pattern_regex = field_validator("layers_pattern")(lambda pattern: regex_keys(pattern))

    @model_validator(mode="after")
    def _layers_need_targets(self) -> LayerTargets:
        targets = getattr(self, "target_modules", None)
        if self.layers_to_transform is not None and (isinstance(targets, TargetRegex) or targets == "all-linear"):
            shown = f"{{regex: {targets.regex!r}}}" if isinstance(targets, TargetRegex) else repr(targets)
            raise ValueError("adapter.layers_to_transform picks among the modules of a list of target_modules; with "
                             f"target_modules {shown} give the layers in a regex instead (e.g. "
                             r"{regex: '.*layers\.(0|1)\..*(q_proj|v_proj)'}), or list the module names")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("adapter.layers_pattern names where layers_to_transform's indices are read; set "
                             "layers_to_transform too, or remove layers_pattern")
        return self


class ExcludedTargets(AdapterSection):
    """The `adapter` key that leaves modules out of the targets."""

    exclude_modules: list[str] | TargetRegex | None = None
    """Modules left out of the targets (peft's exclude_modules): names matching a module's path or its end after a
    dot, or {regex: ...} matched against the full path. Each must name some module of the model."""


class PeftLayerTargets(PeftConfigBase):
    """adapter_config.json's layer selection (peft's defaults)."""

    layers_to_transform: LayerIndices = None
    layers_pattern: list[str] | str | None = None
    _layers_pattern_regex = field_validator("layers_pattern")(lambda pattern: regex_keys(pattern))

    def layer_settings(self, config_file: Path) -> dict[str, Any]:
        """The recipe's layers_to_transform / layers_pattern for this file, read as peft reads it: layers_pattern
        counts only with layers_to_transform, and both are passed over with a regex or `all-linear` target_modules
        (peft matches the regex alone, and all-linear becomes the full path of every linear layer, which it matches
        before any layer index; LoRA's and AdaLoRA's configs refuse both pairs)."""
        if self.layers_to_transform is None:
            return {}
        if isinstance(self.target_modules, str):
            kind = "'all-linear'" if self.target_modules == "all-linear" else "a regex"
            warnings.warn(f"{config_file}: layers_to_transform {self.layers_to_transform} is not applied, because "
                          f"target_modules is {kind}, which peft matches alone; the adapter loads as peft loads it",
                          PeftkitWarning, stacklevel=2)
            return {}
        return {"layers_to_transform": self.layers_to_transform, "layers_pattern": self.layers_pattern}


class PeftExcludedTargets(PeftConfigBase):
    """adapter_config.json's exclude_modules (a string is a regex, as target_modules')."""

    exclude_modules: list[str] | str | None = None

    def exclude_settings(self, config_file: Path) -> dict[str, Any]:
        """The recipe's exclude_modules for this file (none for an empty list, as peft)."""
        if not self.exclude_modules:
            return {}
        if self.exclude_modules == "all-linear":  # (no keyword here: a regex like any other string)
            return {"exclude_modules": TargetRegex(regex="all-linear")}
        return {"exclude_modules": targets_from_peft(self.exclude_modules, config_file, key="exclude_modules")}


def layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    """The index of the layer that module `path` is in, as peft reads it for layers_to_transform: the number after
    one of `layers_pattern` (`layers`: `model.layers.3.mlp` -> 3), else the first number after a dot (None: none)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", path))), None)
    return int(match["idx"]) if match else None


def narrow(names: list[str], cfg: Any) -> list[str]:
    """The target modules `names` (full paths, in order) that cfg's exclude_modules and layers_to_transform keep."""
    return _pick_layers(_drop_excluded(names, cfg), cfg)


def check_excluded(modules: list[str], cfg: Any) -> None:
    """A recipe's exclude_modules entry that names no module of the model (full paths `modules`) is a typo: refused
    with the names there are (peft only warns). One naming a module that is no target (`lm_head` beside all-linear)
    is no mistake, and passes, as in peft."""
    from peftkit.adapters import regex_targets  # (peftkit.adapters imports the methods)

    excluded = getattr(cfg, "exclude_modules", None)
    for entry in [excluded] if isinstance(excluded, TargetRegex) else excluded or ():
        if isinstance(entry, TargetRegex):
            if not regex_targets(entry, modules, key="exclude_modules"):
                raise PeftkitError(f"adapter.exclude_modules {{regex: {entry.regex!r}}} matches no module of this "
                                   "model (it is matched against the full path, as target_modules' regex); fix it "
                                   "or remove it.")
        elif not any(suffix_match(n, entry) for n in modules):
            kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in modules if n))
            raise PeftkitError(f"adapter.exclude_modules entry {entry!r} names no module of this model; fix it or "
                               f"remove it.{did_you_mean(entry, kinds)}")


_UNSET = object()
PATTERNS = (("rank_pattern", "r", "rank_and_alpha", lambda cfg, path: cfg.rank_and_alpha(path)[0]),
            ("alpha_pattern", "alpha", "rank_and_alpha", lambda cfg, path: cfg.rank_and_alpha(path)[1]),
            ("n_frequency_pattern", "n_frequency", "frequencies", lambda cfg, path: cfg.frequencies(path)),
            ("block_size_pattern", "block_size", "block_sizes", lambda cfg, path: cfg.block_sizes(path)),
            ("rank_pattern", "r", "rank_and_lambda", lambda cfg, path: cfg.rank_and_lambda(path)[0]),
            ("lambda_pattern", "delora_lambda", "rank_and_lambda", lambda cfg, path: cfg.rank_and_lambda(path)[1]))
"""The per-module settings a recipe may give (LoRA's, FourierFT's, DeLoRA's): the key, the setting the others keep, the
config's method that reads them, and how it reads the value of the module at a path (`cfg` with that key alone in
the pattern). A config without that method has no such setting under the key (AdaLoRA's rank_pattern is the saved
pruning masks, refused by its trainer in its own words)."""


def check_patterns(cfg: Any, paths: list[str]) -> None:
    """A recipe's rank_pattern, alpha_pattern or n_frequency_pattern key that matches none of the adapted `paths` is a
    typo, refused: those modules would keep r (alpha, n_frequency) without a word, as peft passes over it. Read by the
    method's own matching (`cfg` with only that key, its value a marker)."""
    for key, setting, reader, value in PATTERNS:
        if not hasattr(type(cfg), reader):
            continue
        for entry in getattr(cfg, key, None) or {}:
            probe = cfg.model_copy(update={key: {entry: _UNSET}})
            if not any(value(probe, path) is _UNSET for path in paths):
                kinds = list(dict.fromkeys(path.rsplit(".", 1)[-1] for path in paths))
                raise PeftkitError(
                    f"adapter.{key}: {entry!r} matches none of the {len(paths)} adapted modules, so it would change "
                    f"nothing (every module keeps adapter.{setting}). A key matches the end of a module's path after "
                    f"a dot ({', '.join(kinds[:8])}), or a regex over it.{did_you_mean(entry, kinds)}")


def _drop_excluded(names: list[str], cfg: Any) -> list[str]:
    """`names` without those exclude_modules names; leaving out every target is refused (as peft)."""
    from peftkit.adapters import regex_targets  # (peftkit.adapters imports the methods)

    excluded = getattr(cfg, "exclude_modules", None)
    if not excluded:
        return names
    if isinstance(excluded, TargetRegex):
        dropped = set(regex_targets(excluded, names, key="exclude_modules"))
    else:
        dropped = {n for n in names if any(suffix_match(n, e) for e in excluded)}
    kept = [n for n in names if n not in dropped]
    if not kept:
        raise PeftkitError(f"adapter.exclude_modules leaves out all {len(names)} target modules, so nothing would be "
                           "adapted; exclude fewer modules, or target others")
    return kept


def _pick_layers(names: list[str], cfg: Any) -> list[str]:
    """`names` in the layers cfg's layers_to_transform keeps: all of them without one (or with an empty list, as
    peft); a full path given in target_modules whatever its layer (peft matches it first). Refuses indices that keep
    nothing."""
    wanted, pattern = getattr(cfg, "layers_to_transform", None), getattr(cfg, "layers_pattern", None)
    if wanted in (None, []):
        return names
    wanted = wanted if isinstance(wanted, list) else [wanted]
    given = cfg.target_modules if isinstance(cfg.target_modules, list) else []
    kept = [n for n in names if n in given or layer_index(n, pattern) in wanted]
    if not kept:
        found = sorted({i for n in names if (i := layer_index(n, pattern)) is not None})
        after = f" after {pattern!r}" if pattern else ""
        raise PeftkitError(
            f"adapter.layers_to_transform {cfg.layers_to_transform} leaves none of the {len(names)} target "
            "modules: " + (f"their layers are numbered {found[0]} to {found[-1]}. Give indices among those."
                           if found else f"no layer index was found in their paths (e.g. '{names[0]}'){after}. "
                           "Give the layers_pattern of this model."))
    return kept


def filters_from_peft(peft: PeftConfigBase, config_file: Path) -> dict[str, Any]:
    """The recipe keys of those filters that the method of adapter_config.json `peft` has, read from it."""
    return ((peft.layer_settings(config_file) if isinstance(peft, PeftLayerTargets) else {})
            | (peft.exclude_settings(config_file) if isinstance(peft, PeftExcludedTargets) else {}))
