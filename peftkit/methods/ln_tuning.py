"""LN tuning (Zhao et al. 2023, "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning",
arXiv:2312.11420): train the normalisation layers (LayerNorm, RMSNorm) and nothing else. Each target keeps its
frozen weights and computes with a trained copy of them: `y = norm(x; w', b')`, w' and b' starting at the base's
own values (the base model). On Llama that is 2 x 4096 numbers per block, the fewest of any method here.

Merged, the copy *replaces* the weights (W' = w'), so the merge needs no fact but the tensors; an in-place merge
keeps the base's values aside to unmerge. Names as HF peft's LN_TUNING (a deep copy of the module under
`ln_tuning_layers`): `<path>.ln_tuning_layers.weight` and, for a norm with a shift, `.bias`. peft's copy is in the
base's dtype; here the trained copy is fp32 and is cast to the base's dtype for the forward, so a bf16 base computes
what peft computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.func import functional_call

from peftkit.errors import PeftkitError, did_you_mean
from peftkit.methods.base import Method, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, suffix_match
from peftkit.methods.target_filters import (ExcludedTargets, NoDefault, PeftExcludedTargets, filters_from_peft,
                                             narrow)
from peftkit.section import TargetRegex

# peft's per-architecture defaults (TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING, peft 0.21) for the
# architectures with normalisation layers only (peft's llava entry also names linear layers, which it copies whole).
DEFAULTS: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "gptj": ["ln_1", "ln_f"],
    "t5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
}


class LnTuningConfig(ExcludedTargets):
    """LN tuning: trained copies of the normalisation layers' weights, nothing else."""

    method: Literal["ln_tuning"]
    target_modules: list[str] | TargetRegex | None = None
    """Normalisation layers by name suffix or {regex: ...}; null: peft's default for the architecture
    (input_layernorm, post_attention_layernorm, norm for Llama)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    @field_validator("target_modules", mode="before")
    @classmethod
    def _no_all_linear(cls, value: object) -> object:
        if value == "all-linear":
            raise ValueError("is 'all-linear', which names linear layers; LN tuning trains normalisation layers: list "
                             "them (e.g. [input_layernorm, post_attention_layernorm, norm]), or null for peft's "
                             "default for the architecture")
        return value


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer with a learned scale (LayerNorm, RMSNorm, Gemma's): a `...Norm` class whose only
    parameters are a 1-D `weight` and, maybe, a `bias`."""
    params = dict(module.named_parameters())
    return ("norm" in type(module).__name__.lower() and isinstance(params.get("weight"), nn.Parameter)
            and params["weight"].dim() == 1 and set(params) <= {"weight", "bias"})


class NormCopy(nn.Module):
    """The trained copy of a norm's weights (peft's `ln_tuning_layers`): fp32 clones of `weight` and `bias`."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        for name, p in base_layer.named_parameters():
            setattr(self, name, nn.Parameter(p.detach().float().clone()))


class LnTuningLayer(AdapterLayer):
    """A normalisation layer computing with the trained copy of its weights: the base's own forward (functional_call),
    so any norm (LayerNorm, RMSNorm, Gemma's 1 + w) works unchanged."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.facts = None
        self.ln_tuning_layers = NormCopy(base_layer)
        self._unmerged: dict[str, torch.Tensor] | None = None

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base_layer(*args, **kwargs)
        dtypes = {n: p.dtype for n, p in self.base_layer.named_parameters()}
        weights = {n: p.to(dtypes[n]) for n, p in self.ln_tuning_layers.named_parameters()}
        return functional_call(self.base_layer, weights, args, kwargs)

    def merge(self) -> None:
        """Write the trained values into the base weights, keeping the base's own to unmerge."""
        if not self.merged:
            self._unmerged = {n: p.detach().clone() for n, p in self.base_layer.named_parameters()}
        super().merge()

    def unmerge(self) -> None:
        """Put the base's own values back (exactly: they were kept)."""
        if not self.merged:
            return
        with torch.no_grad():
            for name, p in self.base_layer.named_parameters():
                p.copy_(self._unmerged[name])
        self._unmerged, self.merged = None, False


class PeftLnTuningConfig(PeftExcludedTargets):
    """The fields of an LN_TUNING adapter_config.json that peftkit reads (peft's LNTuningConfig has no others)."""


class LnTuning(Method):
    name = "ln_tuning"
    title = "LN tuning"
    peft_type = "LN_TUNING"
    config = LnTuningConfig
    peft_config = PeftLnTuningConfig
    param_names = ("ln_tuning_layers.weight", "ln_tuning_layers.bias")

    @classmethod
    def resolve(cls, cfg: LnTuningConfig, model_type: str | None) -> LnTuningConfig:
        if cfg.target_modules is not None:
            return cfg
        if model_type not in DEFAULTS:
            raise NoDefault("target_modules", "LN tuning", model_type, DEFAULTS, "name the normalisation layers",
                            "target_modules: [input_layernorm, post_attention_layernorm, norm] for a Llama-like model",
                            "normalisation")
        return cfg.model_copy(update={"target_modules": DEFAULTS[model_type]})

    @classmethod
    def select_targets(cls, model: nn.Module, cfg: LnTuningConfig, every_entry: bool) -> list[str]:
        """The normalisation layers `target_modules` names (peft copies any module it is given; peftkit only norms,
        whose copies it can train and merge): anything else named is refused, and so is a list entry naming nothing
        (`every_entry`)."""
        from peftkit.adapters import regex_targets  # (peftkit.adapters imports this module)

        modules = {n: m for n, m in model.named_modules() if n}
        norms = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in modules.items() if is_norm(m)))
        targets = cfg.target_modules
        if isinstance(targets, TargetRegex):
            names = regex_targets(targets, modules)
        else:
            names = [n for n in modules if any(suffix_match(n, t) for t in targets)]
            for entry in targets if every_entry else ():
                if not any(suffix_match(n, entry) for n in names):
                    raise PeftkitError(f"adapter.target_modules entry {entry!r} names no module of this model; its "
                                       f"normalisation layers are named {', '.join(norms) or '(none)'}."
                                       f"{did_you_mean(entry, norms)}")
        names = [n for n in names if not isinstance(modules[n], AdapterLayer)]
        if not names:
            raise PeftkitError(f"adapter.target_modules {targets!r} matches no module of this model; its "
                               f"normalisation layers are named {', '.join(norms) or '(none)'}.")
        if bad := [n for n in names if not is_norm(modules[n])]:
            raise PeftkitError(
                f"adapter.target_modules matches '{bad[0]}', a {type(modules[bad[0]]).__name__}: LN tuning trains "
                f"normalisation layers (LayerNorm, RMSNorm) only. Name those: {', '.join(norms) or '(none)'}.")
        return narrow(names, cfg)

    @classmethod
    def wrap(cls, base: nn.Module, cfg: LnTuningConfig, path: str) -> LnTuningLayer:
        return LnTuningLayer(base)

    @classmethod
    def layer_facts(cls, cfg: LnTuningConfig, path: str, fan_in_fan_out: bool) -> None:
        return None

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: None) -> torch.Tensor:
        return parts["ln_tuning_layers.weight"].float().to(weight.device)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: None) -> torch.Tensor:
        raise PeftkitError("An LN tuning merge replaces the norm's weights: the base's values are not in the adapter. "
                           "Reload the base model instead.")

    @staticmethod
    def merge_bias(bias: torch.Tensor, parts: dict[str, torch.Tensor], facts: None) -> torch.Tensor | None:
        shift = parts.get("ln_tuning_layers.bias")
        return None if shift is None else shift.float().to(bias.device)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: None) -> tuple[int | None, ...]:
        return tuple(parts["ln_tuning_layers.weight"].shape)

    @classmethod
    def to_peft(cls, cfg: LnTuningConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name)

    @classmethod
    def from_peft(cls, peft: PeftLnTuningConfig, config_file: Path) -> LnTuningConfig:
        refuse_unsupported(peft, config_file, ())
        if peft.target_modules == "all-linear":
            raise PeftkitError(f"{config_file}: target_modules is 'all-linear'; LN tuning trains normalisation "
                               "layers, and peftkit does not copy linear layers whole.")
        return LnTuningConfig(method="ln_tuning", target_modules=targets_from_peft(peft.target_modules, config_file),
                              modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: LnTuningConfig, layer: AdapterLayer) -> tuple[int, int]:
        # The normalised input, for the scale's gradient: one value per feature and token (an upper bound).
        return int(layer.ln_tuning_layers.weight.numel()), 0

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # Around the base's values (the identity), with both signs of change.
        with torch.no_grad():
            for p in layer.adapter_params().values():
                p.add_(torch.randn(p.shape, generator=generator) * std)


LnTuningLayer.method = LnTuning
