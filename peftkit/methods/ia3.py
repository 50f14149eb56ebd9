"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", T-Few): learned vectors that *scale* instead of add. On keys and values the layer's output is
scaled, y = l * (W x + b); on feed-forward layers its input, y = W (l * x) + b. The vectors start at 1 (the
base model) and hold one number per feature: ~0.01% of a 7B model's parameters.

Merged, the output scaling multiplies W's rows (and the bias), the input scaling W's columns. Names and
shapes as HF peft: `<path>.ia3_l`, (out, 1) for an output scaling and (1, in) for a feed-forward input
scaling — so a saved vector's shape says which it is, and a merge needs no other per-layer fact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, PrivateAttr
from torch import nn

from peftkit.errors import PeftkitError, did_you_mean
from peftkit.methods.base import Method, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_conv1d, linear_shape, suffix_match
from peftkit.methods.target_filters import (ExcludedTargets, NoDefault, PeftExcludedTargets, filters_from_peft,
                                             narrow)
from peftkit.section import TargetRegex

# peft's per-architecture defaults (TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING, peft 0.21)
# for the architectures peftkit is tested on and their close relatives: (targets, feed-forward modules).
DEFAULTS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
}


class IA3Config(ExcludedTargets):
    """(IA)^3: learned scaling vectors on keys, values and feed-forward inputs."""

    method: Literal["ia3"]
    target_modules: Literal["all-linear"] | list[str] | TargetRegex | None = None
    """Module-name suffixes, `all-linear` or {regex: ...}; null: peft's default for the architecture
    (k_proj, v_proj, down_proj for Llama)."""
    feedforward_modules: list[str] | TargetRegex | None = None
    """The targets whose *input* is scaled (the feed-forward output projections): module-name suffixes or
    {regex: ...}; null: peft's default for the architecture (down_proj for Llama). Every other target has its
    output scaled."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""
    _feedforward_given: bool = PrivateAttr(True)
    """False where `IA3.resolve` filled feedforward_modules with the architecture's default."""


def is_feedforward(path: str, feedforward: list[str] | TargetRegex | None) -> bool:
    """Whether the target at `path` has its input scaled: named by suffix, or matched in full by the regex."""
    if isinstance(feedforward, TargetRegex):
        return re.fullmatch(feedforward.regex, path) is not None
    return any(suffix_match(path, f) for f in feedforward or [])


@dataclass(frozen=True)
class IA3Facts:
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""


def _vector(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """(the scaling vector in fp32, flat; whether it scales the input), read from the saved shape."""
    l = parts["ia3_l"].float()
    return l.flatten(), l.shape[0] == 1 and l.dim() == 2 and l.shape[1] != 1


def ia3_scale(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: IA3Facts, inverse: bool = False) -> torch.Tensor:
    """W with its columns (feed-forward: the input features) or rows (the output features) scaled by l (or
    divided, to unmerge), in the base weight's layout: (out, in), or (in, out) for Conv1D."""
    l, feedforward = _vector(parts)
    l = 1 / l if inverse else l
    in_dim = 0 if facts.fan_in_fan_out else 1
    dim = in_dim if feedforward else 1 - in_dim
    shape = [1, 1]
    shape[dim] = -1
    return weight * l.to(weight.device).reshape(shape)


class IA3Linear(AdapterLayer):
    """(IA)^3 around nn.Linear, transformers' Conv1D or a bitsandbytes linear layer."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        self.is_feedforward = is_feedforward
        self.facts = IA3Facts(is_conv1d(base_layer))
        shape = (1, in_features) if is_feedforward else (out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base_layer.weight.device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        l = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer((x.to(l.dtype) * l).to(x.dtype))
        result = self.base_layer(x)
        return (result.to(l.dtype) * l).to(result.dtype)


class PeftIA3Config(PeftExcludedTargets):
    """The fields of an IA3 adapter_config.json that peftkit reads (defaults: peft's IA3Config)."""

    feedforward_modules: list[str] | str | None = None
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    layers_to_transform: list[int] | int | None = None


class IA3(Method):
    name = "ia3"
    title = "IA3"
    peft_type = "IA3"
    config = IA3Config
    peft_config = PeftIA3Config
    param_names = ("ia3_l",)

    @classmethod
    def resolve(cls, cfg: IA3Config, model_type: str | None) -> IA3Config:
        if cfg.target_modules is not None and cfg.feedforward_modules is not None:
            return cfg
        if model_type not in DEFAULTS:
            missing = "target_modules" if cfg.target_modules is None else "feedforward_modules"
            raise NoDefault(missing, "IA3", model_type, DEFAULTS, "name the modules (target_modules, and in "
                            "feedforward_modules those of them that are feed-forward layers)", "target_modules: "
                            "[k_proj, v_proj, down_proj] and feedforward_modules: [down_proj] for a Llama-like model")
        targets, feedforward = DEFAULTS[model_type]
        resolved = cfg.model_copy(update={"target_modules": cfg.target_modules if cfg.target_modules is not None
                                          else targets,
                                          "feedforward_modules": cfg.feedforward_modules if cfg.feedforward_modules
                                          is not None else feedforward})
        resolved._feedforward_given = cfg.feedforward_modules is not None
        return resolved

    @classmethod
    def select_targets(cls, model: nn.Module, cfg: IA3Config, every_entry: bool) -> list[str]:
        """The targets; a feedforward_modules entry the user gave must name one of them (peft: "should be a subset
        of target_modules"), or the setting would be dropped and the module meant would have its output scaled.
        Checked before exclude_modules leaves some targets out (peft's subset is of target_modules too)."""
        from peftkit.adapters import find_targets  # (peftkit.adapters imports this module)

        names = find_targets(model, cfg.target_modules, every_entry)
        if cfg._feedforward_given:
            given = cfg.feedforward_modules
            for entry in [given] if isinstance(given, TargetRegex) else given:
                if not any(is_feedforward(n, entry if isinstance(entry, TargetRegex) else [entry]) for n in names):
                    shown = f"{{regex: {entry.regex!r}}}" if isinstance(entry, TargetRegex) else repr(entry)
                    kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
                    raise PeftkitError(
                        f"adapter.feedforward_modules entry {shown} names none of the modules IA3 adapts (the "
                        f"target_modules: {', '.join(kinds)}). IA3 scales the input of the targets it names, so each "
                        "entry must name a target: add the module to target_modules too, or fix the name."
                        + (did_you_mean(entry, kinds) if isinstance(entry, str) else ""))
        return narrow(names, cfg)

    @classmethod
    def wrap(cls, base: nn.Module, cfg: IA3Config, path: str) -> IA3Linear:
        if isinstance(base, nn.Embedding):
            raise PeftkitError(f"adapter.target_modules: IA3 scales linear layers; '{path}' is an embedding.")
        return IA3Linear(base, is_feedforward(path, cfg.feedforward_modules))

    @classmethod
    def layer_facts(cls, cfg: IA3Config, path: str, fan_in_fan_out: bool) -> IA3Facts:
        return IA3Facts(fan_in_fan_out)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: IA3Facts) -> torch.Tensor:
        return ia3_scale(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: IA3Facts) -> torch.Tensor:
        if (parts["ia3_l"] == 0).any():
            raise PeftkitError("Cannot unmerge an IA3 layer with a scaling of exactly 0: the merge erased those "
                               "weights. Reload the base model instead.")
        return ia3_scale(weight, parts, facts, inverse=True)

    @staticmethod
    def merge_bias(bias: torch.Tensor, parts: dict[str, torch.Tensor], facts: IA3Facts) -> torch.Tensor | None:
        l, feedforward = _vector(parts)
        # A scaled input leaves the bias (added after the matmul) alone; a scaled output scales it too.
        return None if feedforward else bias * l.to(bias.device)

    @staticmethod
    def unmerge_bias(bias: torch.Tensor, parts: dict[str, torch.Tensor], facts: IA3Facts) -> torch.Tensor | None:
        l, feedforward = _vector(parts)
        return None if feedforward else bias / l.to(bias.device)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: IA3Facts) -> tuple[int | None, ...]:
        l, feedforward = _vector(parts)
        in_out = (len(l), None) if feedforward else (None, len(l))
        return in_out if facts.fan_in_fan_out else in_out[::-1]

    @classmethod
    def to_peft(cls, cfg: IA3Config, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        feedforward = [t for t in targets if is_feedforward(t, cfg.feedforward_modules)]
        return cls.peft_common(cfg, targets, base_name) | {
            "feedforward_modules": sorted(feedforward),
            "fan_in_fan_out": fan_in_fan_out,
            "init_ia3_weights": True,
        }

    @classmethod
    def from_peft(cls, peft: PeftIA3Config, config_file: Path) -> IA3Config:
        refuse_unsupported(peft, config_file, ("layers_to_transform",))
        feedforward = peft.feedforward_modules
        if isinstance(feedforward, str):  # peft: a string is a regex matched in full against the module path
            feedforward = targets_from_peft(feedforward, config_file, key="feedforward_modules")
        return IA3Config(method="ia3", target_modules=targets_from_peft(peft.target_modules, config_file),
                         feedforward_modules=feedforward, modules_to_save=peft.modules_to_save or [],
                         **filters_from_peft(peft, config_file))

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # Around 1 (the identity), with both signs of change.
        with torch.no_grad():
            layer.ia3_l.copy_(1 + torch.randn(layer.ia3_l.shape, generator=generator) * std * 5)


IA3Linear.method = IA3
