"""Super-Tuning (arXiv:2607.09287; peft's SUPERTUNING): each layer trains a sparse support of its own weight, the
(1 - sparsity) share of its entries picked by magnitude (the largest, or with `select_top: false` the smallest), the
rest frozen; with `r`, a LoRA beside it (the paper's "Supra" hybrid):

    W' = W + S + (lora_alpha / r) B A,   S[e] = v_k at the k-th picked flat entry e, 0 elsewhere.

The support is `torch.topk(|W|.flatten(), k)` of the base weight as it loads, k = int(out x in x (1 - sparsity)), saved
as `<path>.supertuning_indices` (k,) int32 (flat positions) beside `<path>.supertuning_values` (k,); with
`save_precomputed_indices: false` the file leaves the indices out and they are picked again on loading (the same
base gives the same support). Names, shapes, init and numerics as HF peft 0.21's `SupertuningLayer`: the forward
composes W + S in the weight's dtype and runs one linear with it (peft's: a base's forward hooks are bypassed), then
adds the LoRA's output, computed in fp32 and cast. A 4-bit/8-bit weight cannot be composed so, and is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, PeftConfigBase, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_quantized, linear_shape, not_a_linear
from peftkit.methods.target_filters import LORA_TARGETS, NoDefault
from peftkit.section import AdapterSection, TargetRegex

DEFAULTS = LORA_TARGETS
"""peft 0.21's defaults (TRANSFORMERS_MODELS_TO_SUPERTUNING_TARGET_MODULES_MAPPING: LoRA's)."""


class SupertuningConfig(AdapterSection):
    """Super-Tuning: a trained sparse support of each layer's weight, picked by magnitude, and optionally a LoRA."""

    method: Literal["supertuning"]
    sparsity: float = Field(0.99, ge=0.0, lt=1.0)
    """The share of each weight's entries left frozen: 0.99 trains 1 % of them (peft's default)."""
    select_top: bool = True
    """true: train the largest-magnitude entries (the paper's Super / Supra); false: the smallest (its -bottom)."""
    r: int | None = Field(None, gt=0)
    """The rank of a LoRA trained beside the support (the paper's Supra); null: the support alone."""
    lora_alpha: float | None = None
    """With `r`: the LoRA's scaling is lora_alpha / r; null: 2 r (peft's default)."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """With `r`: dropout on the LoRA's input."""
    init_weights: bool = True
    """true (peft's default): the values and the LoRA's B start at 0, the base model; false: N(0, 1) values and
    a Kaiming-uniform B (peft: for tests)."""
    save_precomputed_indices: bool = True
    """Save the support's indices with the adapter (false: picked again from the base weights on loading, as peft)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex | None = None
    """As LoRA's; null: peft's default for the architecture (q_proj, v_proj for Llama). nn.Linear layers only."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    @model_validator(mode="after")
    def _alpha_needs_r(self) -> SupertuningConfig:
        if self.lora_alpha is not None and self.r is None:
            raise ValueError("lora_alpha is set but r is null: the LoRA beside the support (Supra) needs a rank; set "
                             "adapter.r, or remove lora_alpha (peft refuses it too)")
        return self

    def scaling(self) -> float:
        return (self.lora_alpha if self.lora_alpha is not None else 2 * self.r) / self.r if self.r else 0.0


def support_size(numel: int, sparsity: float, path: str) -> int:
    """The trained entries of a weight of `numel` (peft's count), refused where none is left."""
    k = int(numel * (1 - sparsity))
    if k < 1:
        raise PeftkitError(f"adapter.sparsity: {sparsity} leaves no trainable entry of '{path}' ({numel} entries; "
                           "peft refuses it too); lower the sparsity.")
    return k


def support(weight: torch.Tensor, k: int, select_top: bool) -> torch.Tensor:
    """The flat int32 positions of the support: `torch.topk` of |W| (peft's, on the weight in its own dtype)."""
    return torch.topk(weight.detach().abs().flatten(), k=k, largest=select_top).indices.to(torch.int32)


@dataclass(frozen=True)
class SupertuningFacts:
    sparsity: float = 0.99
    select_top: bool = True
    scaling: float = 0.0
    """lora_alpha / r, or 0 without a LoRA."""


class SupertuningLinear(AdapterLayer):
    """Super-Tuning around nn.Linear: one linear with W + S, plus the LoRA's output where it has one."""

    def __init__(self, base_layer: nn.Module, cfg: SupertuningConfig, path: str) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        weight = base_layer.weight
        k = support_size(weight.numel(), cfg.sparsity, path)
        self.facts = SupertuningFacts(cfg.sparsity, cfg.select_top, cfg.scaling())
        self.saves_indices = cfg.save_precomputed_indices
        # (not picked on the meta device: the memory estimate)
        indices = (torch.zeros(k, dtype=torch.int32, device=weight.device) if weight.device.type == "meta"
                   else support(weight, k, cfg.select_top))
        self.register_buffer("supertuning_indices", indices, persistent=False)
        where = draw_device(weight.device)
        # peft's draws, in its order, from torch's generator: the values, then the LoRA's modules and their init
        values = torch.zeros(k, device=where) if cfg.init_weights else torch.randn(k, device=where)
        self.supertuning_values = nn.Parameter(values.to(weight.device))
        if cfg.r:
            self.supertuning_lora_A = nn.Linear(in_features, cfg.r, bias=False, device=where)
            self.supertuning_lora_B = nn.Linear(cfg.r, out_features, bias=False, device=where)
            nn.init.kaiming_uniform_(self.supertuning_lora_A.weight, a=math.sqrt(5))
            if cfg.init_weights:
                nn.init.zeros_(self.supertuning_lora_B.weight)
            else:
                nn.init.kaiming_uniform_(self.supertuning_lora_B.weight, a=math.sqrt(5))
            self.supertuning_lora_A.to(weight.device)
            self.supertuning_lora_B.to(weight.device)
            self.supertuning_lora_dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout else nn.Identity()

    def adapter_params(self) -> dict[str, torch.Tensor]:
        """The trained tensors, and the support's indices where the file keeps them (a buffer: no gradient, no
        optimizer state, not counted as a parameter)."""
        return super().adapter_params() | ({"supertuning_indices": self.supertuning_indices}
                                           if self.saves_indices else {})

    def parts(self) -> dict[str, torch.Tensor]:
        """The tensors a merge takes: the support's indices too, where the file leaves them out (picked from the
        weight as it loaded; an in-place unmerge takes them from a merged one)."""
        return super().parts() | {"supertuning_indices": self.supertuning_indices}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        weight = self.base_layer.weight
        composed = weight.reshape(-1).scatter_add(0, self.supertuning_indices.long(),
                                                  self.supertuning_values.to(weight.dtype))
        result = F.linear(x, composed.reshape_as(weight), self.base_layer.bias)
        if hasattr(self, "supertuning_lora_A"):
            lora_a = self.supertuning_lora_A
            update = self.supertuning_lora_B(lora_a(self.supertuning_lora_dropout(x).to(lora_a.weight.dtype)))
            result = result + (self.facts.scaling * update).to(result.dtype)
        return result


class PeftSupertuningConfig(PeftConfigBase):
    """The fields of a SUPERTUNING adapter_config.json that peftkit reads (defaults: peft 0.21's)."""

    sparsity: float = Field(0.99, ge=0.0, lt=1.0)
    select_top: bool = True
    r: int | None = Field(None, gt=0)
    lora_alpha: float | None = None
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_weights: bool = True
    save_precomputed_indices: bool = True


def unsupported(path: str, kind: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is {kind}; Super-Tuning composes each layer's weight with its trained "
        "entries, as peft 0.21's, which adapts nn.Linear layers of an unquantized model only. Target Linear layers "
        "of a plain (or bf16) base, or use LoRA (QLoRA) for this model.")


class Supertuning(Method):
    name = "supertuning"
    title = "Super-Tuning"
    peft_type = "SUPERTUNING"
    config = SupertuningConfig
    peft_config = PeftSupertuningConfig
    param_names = ("supertuning_values", "supertuning_indices", "supertuning_lora_A.weight",
                   "supertuning_lora_B.weight")
    untrained_names = ("supertuning_indices",)
    integer_names = ("supertuning_indices",)
    rank_dims = {"supertuning_lora_A.weight": 0, "supertuning_lora_B.weight": 1}

    @classmethod
    def resolve(cls, cfg: SupertuningConfig, model_type: str | None) -> SupertuningConfig:
        if cfg.target_modules is not None:
            return cfg
        if model_type not in DEFAULTS:
            raise NoDefault("target_modules", "Super-Tuning", model_type, DEFAULTS, "name the modules",
                            "target_modules: [q_proj, v_proj] for a Llama-like model")
        return cfg.model_copy(update={"target_modules": DEFAULTS[model_type]})

    @classmethod
    def wrap(cls, base: nn.Module, cfg: SupertuningConfig, path: str) -> SupertuningLinear:
        if kind := not_a_linear(base) or ("a 4-bit/8-bit (bitsandbytes) layer" if is_quantized(base) else None):
            raise unsupported(path, kind)
        return SupertuningLinear(base, cfg, path)

    @classmethod
    def layer_facts(cls, cfg: SupertuningConfig, path: str, fan_in_fan_out: bool) -> SupertuningFacts:
        if fan_in_fan_out:
            raise unsupported(path, "GPT-2's Conv1D")
        return SupertuningFacts(cfg.sparsity, cfg.select_top, cfg.scaling())

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: SupertuningFacts) -> torch.Tensor:
        return weight + _delta(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: SupertuningFacts) -> torch.Tensor:
        return weight - _delta(weight, parts, facts)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: SupertuningFacts) -> tuple[int | None, ...]:
        a, b = parts.get("supertuning_lora_A.weight"), parts.get("supertuning_lora_B.weight")
        return (None, None) if a is None or b is None else (b.shape[0], a.shape[1])

    @classmethod
    def to_peft(cls, cfg: SupertuningConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "sparsity": cfg.sparsity, "select_top": cfg.select_top, "r": cfg.r,
            "lora_alpha": None if cfg.r is None else cfg.scaling() * cfg.r, "lora_dropout": cfg.lora_dropout,
            "init_weights": cfg.init_weights, "save_precomputed_indices": cfg.save_precomputed_indices}

    @classmethod
    def from_peft(cls, peft: PeftSupertuningConfig, config_file: Path) -> SupertuningConfig:
        refuse_unsupported(peft, config_file, ())
        return SupertuningConfig(
            method="supertuning", sparsity=peft.sparsity, select_top=peft.select_top, r=peft.r,
            lora_alpha=peft.lora_alpha if peft.r is not None else None, lora_dropout=peft.lora_dropout,
            init_weights=peft.init_weights, save_precomputed_indices=peft.save_precomputed_indices,
            target_modules=targets_from_peft(peft.target_modules, config_file),
            modules_to_save=peft.modules_to_save or [])

    @classmethod
    def kept_for_backward(cls, cfg: SupertuningConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token the input (the composed weight's gradient) and, with a LoRA, its rank-r intermediate; per layer
        # the composed (out x in) weight (the input's gradient) and the support's int64 positions (scatter_add's).
        in_features, out_features = linear_shape(layer.base_layer)
        return in_features + (cfg.r or 0), in_features * out_features + 2 * len(layer.supertuning_indices)

    @classmethod
    def forward_scratch(cls, cfg: SupertuningConfig, layer: AdapterLayer) -> int:
        in_features, out_features = linear_shape(layer.base_layer)
        return in_features * out_features  # the composed weight's gradient, in backward

    @classmethod
    def describe(cls, cfg: SupertuningConfig) -> str:
        support_kind = "largest" if cfg.select_top else "smallest"
        return f"Super-Tuning, {100 * (1 - cfg.sparsity):.3g}% of entries ({support_kind})" + (
            f" + LoRA r={cfg.r}" if cfg.r else "")

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        with torch.no_grad():  # the trained tensors only: the support is where it is
            for p in layer.adapter_params().values():
                if p.is_floating_point():
                    p.copy_(torch.randn(p.shape, generator=generator) * std)


def _delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: SupertuningFacts) -> torch.Tensor:
    """The dense fp32 update S (+ the LoRA's) on the weight's device; the support picked from `weight` where the file
    left the indices out (save_precomputed_indices: false), refused where they fall outside it (another base's)."""
    values = parts["supertuning_values"].float().to(weight.device)
    indices = parts.get("supertuning_indices")
    indices = support(weight, len(values), facts.select_top) if indices is None else indices.long()
    if len(indices) != len(values) or (indices.numel() and (indices.min() < 0 or indices.max() >= weight.numel())):
        raise PeftkitError(f"The adapter's supertuning_indices ({len(indices)}, up to {int(indices.max())}) do not fit "
                           f"a weight of {tuple(weight.shape)}: it was trained on a different base model.")
    delta = torch.zeros(weight.numel(), device=weight.device).scatter_add(0, indices.long().to(weight.device), values)
    delta = delta.reshape(weight.shape)
    if "supertuning_lora_A.weight" in parts:
        a, b = (parts[f"supertuning_lora_{n}.weight"].float().to(weight.device) for n in "AB")
        delta = delta + facts.scaling * (b @ a)
    return delta


SupertuningLinear.method = Supertuning
