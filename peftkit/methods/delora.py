"""DeLoRA, decoupled low-rank adaptation (Bini et al. 2025, "Decoupling Angles and Strength in Low-rank Adaptation",
arXiv:2503.18225; peft's DELORA): a rank-r update whose rank-one terms are each normalised, so a trained boundary
lambda bounds its size, scaled per input column by the base weight's column norms:

    W' = W + (lambda / r) B diag(1 / (|A_i| |B^i|)) A diag(|W_:,j|),

A (r, in), B (out, r), |A_i| the norm of A's row i and |B^i| of B's column i (each at least 1e-4, as peft), |W_:,j| the
norm of the base weight's column j, taken once when the layer is made and saved with the adapter (`delora_w_norm`, a
frozen tensor; the norms of the dequantized weight for a 4-bit/8-bit base). lambda (`delora_lambda`, one number per
layer) trains with A and B. peft starts A kaiming-uniform and B at zero (the base model), or B kaiming-uniform too
(`init_weights: false`), from torch's generator: the same numbers for a seed. Names and shapes as HF peft 0.21:
`<path>.delora_A` (r, in), `.delora_B` (out, r), `.delora_lambda` (1,), `.delora_w_norm` (in,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import REEXPORT, Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_quantized, linear_shape, not_a_linear
from peftkit.methods.lora import _pattern_value
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, PeftExcludedTargets, PeftLayerTargets,
                                             filters_from_peft, regex_keys)
from peftkit.section import TargetRegex

NORM_FLOOR = 1e-4
"""peft's floor under the norms of A's rows and B's columns (B starts at zero)."""


class DeloraConfig(LayerTargets, ExcludedTargets):
    """DeLoRA: a normalised rank-r update, bounded by a trained lambda, scaled by the base weight's column norms."""

    method: Literal["delora"]
    r: int = Field(8, ge=1)
    """Rank of the update (peft's default): r x (in + out) + 1 trained numbers per layer."""
    delora_lambda: float = 15
    """The boundary's start (peft's default 15): the update's rank-one terms each have norm lambda / r times the
    column norms; lambda trains."""
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the layer's input in the update's path (peft's name; it drops inputs, not whole modules)."""
    rank_pattern: dict[str, Annotated[int, Field(gt=0)]] = Field(default_factory=dict)
    """Per-module ranks, {regex: rank}, matched as LoRA's rank_pattern (peft's); other modules keep `r`."""
    lambda_pattern: dict[str, float] = Field(default_factory=dict)
    """Per-module lambdas, {regex: lambda}, matched as rank_pattern; other modules keep `delora_lambda`."""
    init_weights: bool = True
    """true: A kaiming-uniform, B zero (the base model); false: B kaiming-uniform too (a random first update)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: `all-linear`, module-name suffixes, or {regex: ...}. nn.Linear and 4-bit/8-bit layers only."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    _pattern_keys = field_validator("rank_pattern", "lambda_pattern")(lambda pattern: regex_keys(pattern))

    def rank_and_lambda(self, path: str) -> tuple[int, float]:
        """The rank and lambda of the layer at module path `path`, as peft reads rank_pattern and lambda_pattern."""
        return (_pattern_value(self.rank_pattern, path, self.r),
                _pattern_value(self.lambda_pattern, path, self.delora_lambda))


@dataclass(frozen=True)
class DeloraFacts:
    """A merge needs nothing beyond the layer's tensors (r is A's rows; lambda and the norms are saved)."""


def delora_delta(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 (out, in) update, as peft's `_compute_delta`: B diag(lambda / r / (|A_i| |B^i|)) A, columns scaled by
    the saved base column norms."""
    a, b = parts["delora_A"].float(), parts["delora_B"].float()
    lam, w_norm = parts["delora_lambda"].float(), parts["delora_w_norm"].float()
    if a.shape[0] != b.shape[1] or w_norm.shape[0] != a.shape[1]:
        raise PeftkitError(f"The adapter's DeLoRA tensors do not fit together (A {tuple(a.shape)}, B "
                           f"{tuple(b.shape)}, w_norm {tuple(w_norm.shape)}). {REEXPORT}")
    scale = lam / a.shape[0] / (a.norm(dim=1).clamp(min=NORM_FLOOR) * b.norm(dim=0).clamp(min=NORM_FLOOR))
    return (b @ torch.diag_embed(scale) @ a) * w_norm.unsqueeze(0)


def column_norms(base: nn.Module) -> torch.Tensor:
    """|W_:,j| of the weight the base layer computes with, as fp32 (dequantized for a bitsandbytes layer, whose packed
    bytes peft 0.21's DeLoRA takes the norm of, and fails); ones on the meta device, as peft. Taken in the weight's own
    dtype, as peft: a bf16 base's norms are rounded to bf16, so a run starts from peft's numbers."""
    weight = base.weight
    if weight.device.type == "meta":
        return torch.ones(linear_shape(base)[0], device=weight.device)
    if is_quantized(base):
        from peftkit.merge import dequantize_weight  # peftkit.merge imports the method registry

        return dequantize_weight(base).norm(dim=0)
    return torch.norm(weight.detach(), dim=0).float()


def unsupported(path: str, kind: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is {kind}; DeLoRA adapts nn.Linear (and 4-bit/8-bit) layers only, as peft "
        "0.21's DeLoRA, which could not load the adapter otherwise. Target Linear layers, or use LoRA for this model.")


class DeloraLinear(AdapterLayer):
    """DeLoRA around nn.Linear or a bitsandbytes linear layer."""

    def __init__(self, base_layer: nn.Module, r: int, delora_lambda: float, cfg: DeloraConfig) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        self.facts = DeloraFacts()
        device = base_layer.weight.device
        where = draw_device(device)
        a, b = torch.empty(r, in_features, device=where), torch.empty(out_features, r, device=where)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's draws, in its order, from torch's global generator
        if cfg.init_weights:
            b.zero_()
        else:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.delora_A = nn.Parameter(a.to(device))  # PEFT's keys
        self.delora_B = nn.Parameter(b.to(device))
        self.delora_lambda = nn.Parameter(torch.full((1,), float(delora_lambda), device=device))
        # A frozen tensor saved with the adapter (peft's persistent buffer): no gradient, no optimizer state.
        self.delora_w_norm = nn.Parameter(column_norms(base_layer), requires_grad=False)
        self.dropout = nn.Dropout(cfg.module_dropout) if cfg.module_dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a, b = self.delora_A, self.delora_B
        # peft's order of operations: (x w_norm) A^T, times lambda / r / (|A_i| |B^i|), then B^T.
        h = F.linear(self.dropout(x).to(a.dtype) * self.delora_w_norm, a)
        scale = (self.delora_lambda / a.shape[0]) / (a.norm(dim=1).clamp(min=NORM_FLOOR)
                                                     * b.norm(dim=0).clamp(min=NORM_FLOOR))
        # peft rounds the update to the base output's dtype before the sum (its in-place add into zeros_like).
        return result + F.linear(h * scale, b).to(result.dtype)


class PeftDeloraConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of a DELORA adapter_config.json that peftkit reads (defaults: peft 0.21's DeloraConfig)."""

    r: int = Field(8, ge=1)
    delora_lambda: float = 15
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    rank_pattern: dict[str, Annotated[int, Field(gt=0)]] | None = None
    lambda_pattern: dict[str, float] | None = None
    init_weights: bool = True
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"

    _pattern_keys = field_validator("rank_pattern", "lambda_pattern")(lambda pattern: regex_keys(pattern))


def _as_written(value: float) -> float | int:
    """peft's DeloraConfig types lambda as int (15); a whole number is written so."""
    return int(value) if float(value).is_integer() else value


class Delora(Method):
    name = "delora"
    title = "DeLoRA"
    peft_type = "DELORA"
    config = DeloraConfig
    peft_config = PeftDeloraConfig
    param_names = ("delora_A", "delora_B", "delora_lambda", "delora_w_norm")
    rank_dims = {"delora_A": 0, "delora_B": 1}
    untrained_names = ("delora_w_norm",)

    @classmethod
    def wrap(cls, base: nn.Module, cfg: DeloraConfig, path: str) -> DeloraLinear:
        if kind := not_a_linear(base):
            raise unsupported(path, kind)
        return DeloraLinear(base, *cfg.rank_and_lambda(path), cfg)

    @classmethod
    def layer_facts(cls, cfg: DeloraConfig, path: str, fan_in_fan_out: bool) -> DeloraFacts:
        if fan_in_fan_out:
            raise unsupported(path, "GPT-2's Conv1D")
        return DeloraFacts()

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: DeloraFacts) -> torch.Tensor:
        return weight + delora_delta(parts).to(weight.device)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: DeloraFacts) -> torch.Tensor:
        return weight - delora_delta(parts).to(weight.device)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: DeloraFacts) -> tuple[int | None, ...]:
        return parts["delora_B"].shape[0], parts["delora_A"].shape[1]

    @classmethod
    def to_peft(cls, cfg: DeloraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r,
            "delora_lambda": _as_written(cfg.delora_lambda),
            "module_dropout": cfg.module_dropout,
            "rank_pattern": dict(cfg.rank_pattern),
            "lambda_pattern": {k: _as_written(v) for k, v in cfg.lambda_pattern.items()},
            "init_weights": cfg.init_weights,
            "bias": "none",
        }

    @classmethod
    def from_peft(cls, peft: PeftDeloraConfig, config_file: Path) -> DeloraConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        return DeloraConfig(method="delora", r=peft.r, delora_lambda=peft.delora_lambda,
                            module_dropout=peft.module_dropout, rank_pattern=peft.rank_pattern or {},
                            lambda_pattern=peft.lambda_pattern or {}, init_weights=peft.init_weights,
                            target_modules=targets_from_peft(peft.target_modules, config_file),
                            modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: DeloraConfig, layer: AdapterLayer) -> tuple[int, int]:
        # The scaled input (A's gradient), x A^T and its scaled copy (r each) per token, and dropout's mask.
        in_features = linear_shape(layer.base_layer)[0]
        r = layer.delora_A.shape[0]
        return in_features + 2 * r + (in_features if cfg.module_dropout else 0), 0

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        """A and B drawn, lambda drawn in [1, 2) (a drawn around zero would scale the update to nothing); the
        column norms stay the base's, as they are saved."""
        with torch.no_grad():
            layer.delora_A.copy_(torch.randn(layer.delora_A.shape, generator=generator) * std)
            layer.delora_B.copy_(torch.randn(layer.delora_B.shape, generator=generator) * std)
            layer.delora_lambda.copy_(1 + torch.rand(1, generator=generator))

    @classmethod
    def describe(cls, cfg: DeloraConfig) -> str:
        return f"DeLoRA r={cfg.r}, lambda={_as_written(cfg.delora_lambda)}"


DeloraLinear.method = Delora
