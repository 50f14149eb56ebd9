"""GraLoRA, granular low-rank adaptation (Jung et al. 2025, "GraLoRA: Granular Low-Rank Adaptation for
Parameter-Efficient Fine-Tuning", arXiv:2505.20355; peft's GRALORA): the weight is cut into k x k blocks (the inputs
and the outputs each into k equal parts) and every block gets a rank-r/k update of its own, from LoRA r's number of
parameters:

    W' = W + s [B_mn A_nm]_{m, n},   s = alpha / (r + hybrid_r),

block (m, n) (outputs of part m, inputs of part n) the product of A_n's columns m r/k .. (m + 1) r/k - 1 (input part
n's (in / k, r) factor) and B_m's rows n r/k .. (n + 1) r/k - 1 (output part m's (r, out / k) factor), i.e.
delta[m out/k + o, n in/k + i] = s sum_t B[m, n r/k + t, o] A[n, i, m r/k + t]. With hybrid_r > 0 a plain LoRA of rank
hybrid_r is added beside it, at the same scale s.

Names, shapes and init as HF peft 0.21's `GraloraLayer`: `<path>.gralora_A` (k, in / k, r), `<path>.gralora_B` (k, r,
out / k), and with hybrid_r `<path>.gralora_A_general.weight` (hybrid_r, in) and `<path>.gralora_B_general.weight` (out,
hybrid_r). peft draws each part's A (kaiming-uniform) then its B (zeros, or kaiming-uniform with init_weights false),
then the hybrid pair as two nn.Linear (each drawn as it is made) redrawn; the same draws in the same order here, so one
seed gives peft's numbers. Linear, GPT-2's Conv1D (its (in, out) weight takes the transposed update) and 4-bit/8-bit
layers (the update reads the input only; peft has no bitsandbytes GraLoRA).
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
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, from_conv1d, is_conv1d, linear_shape
from peftkit.methods.target_filters import LayerTargets, PeftLayerTargets, filters_from_peft
from peftkit.section import TargetRegex


class GraloraConfig(LayerTargets):
    """GraLoRA: k x k blocks of each target's weight, each with a rank-r/k update of its own."""

    method: Literal["gralora"]
    r: int = Field(32, ge=1)
    """Rank of the whole update's factors (peft's default 32): r x (in + out) trained numbers a layer, as LoRA r; each
    of the k x k blocks has rank r / k, so r must be a multiple of gralora_k."""
    hybrid_r: int = Field(0, ge=0)
    """Rank of a plain LoRA beside the blocks (hybrid GraLoRA), hybrid_r x (in + out) numbers more; 0: none."""
    alpha: int | float = 64
    """The update's scale is alpha / (r + hybrid_r) (peft's default 64)."""
    gralora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the input of the update (training only), as peft's."""
    gralora_k: int = Field(2, ge=1)
    """The number of parts the inputs and the outputs are each cut into (k x k blocks): it must divide r and both sizes
    of every target (peft's default 2; its advice: 4 from r 64 on)."""
    init_weights: bool = True
    """true: A kaiming-uniform, B 0 (the base model); false (debugging, as peft): B kaiming-uniform too."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: Linear and GPT-2's Conv1D layers (and 4-bit/8-bit ones); embeddings are refused (as peft's)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    @model_validator(mode="after")
    def _k_divides_r(self) -> GraloraConfig:
        if self.r % self.gralora_k:
            raise ValueError(f"adapter.gralora_k: {self.gralora_k} does not divide r {self.r}; each of the k x k "
                             "blocks has rank r / k (peft refuses it too): make r a multiple of gralora_k")
        return self


@dataclass(frozen=True)
class GraloraFacts:
    scaling: float
    """alpha / (r + hybrid_r)."""
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""


def block_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The unscaled (out, in) update of gralora_A (k, in / k, r) and gralora_B (k, r, out / k), in fp32: block (m, n)
    = B_m[n r/k : (n + 1) r/k]^T A_n[:, m r/k : (m + 1) r/k]^T."""
    k, part_in, r = a.shape
    part_out = b.shape[2]
    a4 = a.float().reshape(k, part_in, k, r // k)  # [n, i, m, t]
    b4 = b.float().reshape(k, k, r // k, part_out)  # [m, n, t, o]
    return torch.einsum("nimt,mnto->moni", a4, b4).reshape(k * part_out, k * part_in)


def gralora_delta(parts: dict[str, torch.Tensor], facts: GraloraFacts) -> torch.Tensor:
    """The scaled update in the base weight's layout (fp32), the hybrid LoRA's added."""
    delta = block_delta(parts["gralora_A"], parts["gralora_B"])
    if "gralora_A_general.weight" in parts:
        delta = delta + parts["gralora_B_general.weight"].float() @ parts["gralora_A_general.weight"].float()
    delta = delta * facts.scaling
    return delta.T if facts.fan_in_fan_out else delta


def check_parts(path: str, in_features: int, out_features: int, k: int) -> None:
    """Refuse a gralora_k that does not divide both sizes of the layer at `path` (peft refuses it too)."""
    if in_features % k or out_features % k:
        raise PeftkitError(
            f"adapter.gralora_k: {k} does not divide both sizes of '{path}' ({in_features} inputs, {out_features} "
            f"outputs); GraLoRA cuts each into {k} equal parts (peft refuses it too). Use a k dividing every target's "
            f"sizes (and r), at most {math.gcd(in_features, out_features)} here, or leave this module out of "
            "adapter.target_modules.")


def _kaiming(rows: int, columns: int, device: torch.device) -> torch.Tensor:
    """peft's draw (nn.Linear's default too): kaiming-uniform with a = sqrt(5), from torch's global generator."""
    tensor = torch.empty(rows, columns, device=draw_device(device))
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
    return tensor


def _factor(tensor: torch.Tensor) -> nn.Module:
    """A module holding one `weight`, as peft's bias-free nn.Linear of the hybrid pair (its key `<name>.weight`)."""
    module = nn.Module()
    module.weight = nn.Parameter(tensor)
    return module


class GraloraLinear(AdapterLayer):
    """GraLoRA around nn.Linear, transformers' Conv1D or a bitsandbytes linear layer: base output + s (blocks x)."""

    def __init__(self, base_layer: nn.Module, cfg: GraloraConfig, path: str) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        k, r = cfg.gralora_k, cfg.r
        check_parts(path, in_features, out_features, k)
        self.facts = GraloraFacts(cfg.alpha / (r + cfg.hybrid_r), is_conv1d(base_layer))
        device = base_layer.weight.device
        a_parts, b_parts = [], []
        for _ in range(k):  # peft's order: each part's A, then its B
            a_parts.append(_kaiming(r, in_features // k, device))
            b_parts.append(_kaiming(out_features // k, r, device) if not cfg.init_weights
                           else torch.zeros(out_features // k, r, device=draw_device(device)))
        self.gralora_A = nn.Parameter(torch.stack(a_parts).transpose(1, 2).contiguous().to(device))
        self.gralora_B = nn.Parameter(torch.stack(b_parts).transpose(1, 2).contiguous().to(device))
        if cfg.hybrid_r:
            _kaiming(cfg.hybrid_r, in_features, device), _kaiming(out_features, cfg.hybrid_r, device)  # (nn.Linear's)
            general_a = _kaiming(cfg.hybrid_r, in_features, device)
            general_b = (_kaiming(out_features, cfg.hybrid_r, device) if not cfg.init_weights
                         else torch.zeros(out_features, cfg.hybrid_r, device=draw_device(device)))
            self.gralora_A_general = _factor(general_a.to(device))
            self.gralora_B_general = _factor(general_b.to(device))
        self.dropout = nn.Dropout(cfg.gralora_dropout) if cfg.gralora_dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """peft's computation: the blocks' update in the adapter's dtype (fp32), cast to the base output's dtype,
        scaled and added; then the hybrid LoRA's the same way (its own dropout draw, as peft's)."""
        result = self.base_layer(x)
        if self.merged:
            return result
        a, b = self.gralora_A, self.gralora_B
        k, part_in, r = a.shape
        lead = x.shape[:-1]
        inner = torch.einsum("...ni,nir->...nr", self.dropout(x.to(a.dtype)).reshape(*lead, k, part_in), a)
        mixed = inner.reshape(*lead, k, k, r // k).transpose(-3, -2).reshape(*lead, k, r)
        update = torch.einsum("...jr,jro->...jo", mixed, b).reshape(*lead, -1)
        result = result + self.facts.scaling * update.to(result.dtype)
        if hasattr(self, "gralora_A_general"):
            hybrid = F.linear(F.linear(self.dropout(x.to(a.dtype)), self.gralora_A_general.weight),
                              self.gralora_B_general.weight)
            result = result + self.facts.scaling * hybrid.to(result.dtype)
        return result.to(x.dtype)


class PeftGraloraConfig(PeftLayerTargets):
    """The fields of a GRALORA adapter_config.json that peftkit reads (defaults: peft 0.21's GraloraConfig)."""

    r: int = Field(32, ge=1)
    hybrid_r: int = Field(0, ge=0)
    alpha: int | float = 64
    gralora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    gralora_k: int = Field(2, ge=1)
    init_weights: bool | None = True
    fan_in_fan_out: bool = False  # (read from the layers: Conv1D's are (in, out) whatever it says, as peft)
    # A feature peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


def unsupported(path: str, kind: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is {kind}; GraLoRA adapts nn.Linear and GPT-2's Conv1D (and 4-bit/8-bit) "
        "layers only, as peft 0.21's GraLoRA, which could not load the adapter otherwise. Leave it out of "
        "target_modules (all-linear does), or train it whole in adapter.modules_to_save.")


class Gralora(Method):
    name = "gralora"
    title = "GraLoRA"
    peft_type = "GRALORA"
    config = GraloraConfig
    peft_config = PeftGraloraConfig
    param_names = ("gralora_A", "gralora_B", "gralora_A_general.weight", "gralora_B_general.weight")
    rank_dims = {"gralora_A": 2, "gralora_B": 1}

    @classmethod
    def wrap(cls, base: nn.Module, cfg: GraloraConfig, path: str) -> GraloraLinear:
        if not (isinstance(base, nn.Linear) or from_conv1d(base)):
            raise unsupported(path, f"an {type(base).__name__}")
        return GraloraLinear(base, cfg, path)

    @classmethod
    def layer_facts(cls, cfg: GraloraConfig, path: str, fan_in_fan_out: bool) -> GraloraFacts:
        return GraloraFacts(cfg.alpha / (cfg.r + cfg.hybrid_r), fan_in_fan_out)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: GraloraFacts) -> torch.Tensor:
        return weight + _fitted(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: GraloraFacts) -> torch.Tensor:
        return weight - _fitted(weight, parts, facts)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: GraloraFacts) -> tuple[int | None, ...]:
        k, part_in, _ = parts["gralora_A"].shape
        shape = (k * parts["gralora_B"].shape[2], k * part_in)
        return shape[::-1] if facts.fan_in_fan_out else shape

    @classmethod
    def to_peft(cls, cfg: GraloraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r,
            "hybrid_r": cfg.hybrid_r,
            "alpha": cfg.alpha,
            "gralora_dropout": cfg.gralora_dropout,
            "gralora_k": cfg.gralora_k,
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "init_weights": cfg.init_weights,
        }

    @classmethod
    def from_peft(cls, peft: PeftGraloraConfig, config_file: Path) -> GraloraConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        return GraloraConfig(method="gralora", r=peft.r, hybrid_r=peft.hybrid_r, alpha=peft.alpha,
                             gralora_dropout=peft.gralora_dropout, gralora_k=peft.gralora_k,
                             init_weights=peft.init_weights is not False,
                             target_modules=targets_from_peft(peft.target_modules, config_file),
                             modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: GraloraConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token: the input in the adapter's dtype (a copy under a bf16 base), the blocks' rank-r intermediate
        # and the hybrid one; with dropout, its mask and dropped copy, twice (the hybrid draws its own).
        in_features, _ = linear_shape(layer.base_layer)
        dropout = 4 * in_features if cfg.gralora_dropout else 0
        return in_features + cfg.r + cfg.hybrid_r + dropout, 0

    @classmethod
    def describe(cls, cfg: GraloraConfig) -> str:
        return f"GraLoRA r={cfg.r} k={cfg.gralora_k}" + (f" hybrid_r={cfg.hybrid_r}" if cfg.hybrid_r else "")


def _fitted(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: GraloraFacts) -> torch.Tensor:
    delta = gralora_delta(parts, facts).to(weight.device)
    if delta.shape != weight.shape:
        raise PeftkitError(f"The adapter does not fit this model: its GraLoRA update is {tuple(delta.shape)} for a "
                           f"weight of {tuple(weight.shape)}. It was trained on a different base model.")
    return delta


GraloraLinear.method = Gralora
