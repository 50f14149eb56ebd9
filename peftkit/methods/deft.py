"""DeFT, decompositional efficient fine-tuning (peft's DEFT; with `para`, PaRa, Chen et al. 2024, "PaRa: Personalizing
Text-to-Image Diffusion via Parameter Rank Reduction", arXiv:2406.05641): each layer learns a rank-r direction P (out, r)
whose subspace is taken out of the frozen weight's outputs, and an injection R (r, in) put in its place:

    W' = (I - Q right^T) W + s Q R,   relu (default): Q = P, right = relu(P);   qr: Q = right = qr(P) (orthonormal),

s = alpha / r (1 without alpha). The update W' - W = Q (s R - right^T W) depends on the base weight: the forward takes
it from the base output (its bias-free product W x) rather than from W, so a 4-bit/8-bit base runs unchanged, and the
merge reads the weight it folds into (a 4-bit base's dequantized one with `peftkit merge`). peft starts R at
right^T W / s (the update is 0: the base model) and P at N(0, 0.02^2), both from torch's generator, P first: the same
numbers here for a seed (R's init reads the base weight: a 4-bit/8-bit base's dequantized one; peft has no
bitsandbytes DeFT). `para: true` has no R (the update is -Q right^T W: subspace removal alone, never the base model).

Names and shapes as HF peft 0.21.2's `DeftLayer`: `<path>.deft_P` (out, r) and `<path>.deft_R` (r, in), r capped at the
layer's outputs (peft's min(r, out)). The in-place unmerge keeps right^T W from before the merge, as peft does (I - Q
right^T is not invertible for qr), and takes out exactly the update it put in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, dense_weight, from_conv1d, is_conv1d, is_quantized, linear_shape
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, PeftExcludedTargets, PeftLayerTargets,
                                             filters_from_peft)
from peftkit.section import TargetRegex

Decomposition = Literal["relu", "qr"]


class DeftConfig(LayerTargets, ExcludedTargets):
    """DeFT: a rank-r subspace of each target's outputs replaced by a trained injection."""

    method: Literal["deft"]
    r: int = Field(8, ge=1)
    """Rank of P and R (peft's default 8), capped at each layer's outputs: r x (out + in) trained numbers a layer
    (r x out with para)."""
    decomposition_method: Decomposition = "relu"
    """How the projector comes from P: relu, P relu(P)^T (not orthogonal); qr, Q Q^T with Q = qr(P) (orthogonal)."""
    init_scale: float = Field(1.0, gt=0)
    """With init_weights false: R starts at N(0, (0.02 init_scale)^2)."""
    alpha: int | float | None = Field(None, gt=0)
    """The injection is scaled by alpha / r; null: by 1 (peft's default). The removal is not scaled."""
    para: bool = False
    """PaRa: subspace removal alone, -Q right^T W, no R (P trains alone; never the base model at the start)."""
    deft_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the injection's input (training only), as peft's; the removal reads the base output."""
    init_weights: bool = True
    """true: R = right^T W / s, the base model (peft's default); false: R ~ N(0, (0.02 init_scale)^2), a subspace of W
    replaced from the start."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: Linear and GPT-2's Conv1D layers (and 4-bit/8-bit ones); embeddings are refused (as peft's)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""


@dataclass(frozen=True)
class DeftFacts:
    decomposition: str = "relu"
    alpha: float | None = None
    """The injection's scale is alpha / r (the layer's r: P's columns); None: 1."""
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""


def project(p: torch.Tensor, decomposition: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, right), fp32, with the projector Q right^T (peft's `_project`)."""
    p = p.float()
    if decomposition == "qr":
        q = torch.linalg.qr(p)[0]
        return q, q
    return p, torch.relu(p)


def scaling(parts: dict[str, torch.Tensor], facts: DeftFacts) -> float:
    return facts.alpha / parts["deft_P"].shape[1] if facts.alpha else 1.0


def deft_delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: DeftFacts,
               factor: torch.Tensor | None = None) -> torch.Tensor:
    """The update W' - W (fp32, in the base weight's layout) for the base weight `weight`: Q (s R - right^T W), -Q
    right^T W without R. `factor`: right^T W taken before (the in-place unmerge's)."""
    logical = weight.float().T if facts.fan_in_fan_out else weight.float()
    q, right = project(parts["deft_P"].to(weight.device), facts.decomposition)
    if q.shape[0] != logical.shape[0] or ("deft_R" in parts and parts["deft_R"].shape[1] != logical.shape[1]):
        shape = (q.shape[0], parts["deft_R"].shape[1] if "deft_R" in parts else None)
        raise PeftkitError(f"The adapter does not fit this model: its DeFT update is {shape} (out, in) for a weight of "
                           f"{tuple(logical.shape)}. It was trained on a different base model.")
    factor = right.T @ logical if factor is None else factor.to(q.device)
    if "deft_R" in parts:
        delta = q @ (parts["deft_R"].to(weight.device).float() * scaling(parts, facts) - factor)
    else:
        delta = -(q @ factor)
    return delta.T if facts.fan_in_fan_out else delta


class DeftLinear(AdapterLayer):
    """DeFT around nn.Linear, transformers' Conv1D or a bitsandbytes linear layer."""

    def __init__(self, base_layer: nn.Module, cfg: DeftConfig) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        r = min(cfg.r, out_features)
        self.facts = DeftFacts(cfg.decomposition_method, cfg.alpha, is_conv1d(base_layer))
        device = base_layer.weight.device
        p = torch.empty(out_features, r, device=draw_device(device)).normal_(std=0.02)
        self.deft_P = nn.Parameter(p.to(device))
        self._factor: torch.Tensor | None = None  # right^T W before an in-place merge
        self.dropout = nn.Dropout(cfg.deft_dropout) if cfg.deft_dropout else nn.Identity()
        if cfg.para:
            return
        if not cfg.init_weights:
            r_init = torch.empty(r, in_features, device=draw_device(device)).normal_(std=0.02 * cfg.init_scale)
        elif device.type == "meta":
            r_init = torch.empty(r, in_features, device=device)
        else:  # right^T W / s on the weight's device, as peft: the update starts at 0
            right = project(self.deft_P.detach(), cfg.decomposition_method)[1]
            r_init = right.T @ dense_weight(base_layer, self.facts.fan_in_fan_out)
            r_init = r_init / scaling({"deft_P": p}, self.facts)
        self.deft_R = nn.Parameter(r_init.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """peft's computation, in fp32 from the base output: y - (W x) right Q^T + (s R x) Q^T, cast to x's dtype."""
        result = self.base_layer(x)
        if self.merged:
            return result
        out = result.float()
        bias = getattr(self.base_layer, "bias", None)
        product = out if bias is None else out - bias.float()
        q, right = project(self.deft_P, self.facts.decomposition)
        out = out - (product @ right) @ q.T
        if hasattr(self, "deft_R"):
            injection = self.deft_R.float() * scaling({"deft_P": self.deft_P}, self.facts)
            out = out + F.linear(self.dropout(x.float()), injection) @ q.T
        return out.to(x.dtype)

    def merge(self) -> None:
        """Merge through the shared path, keeping right^T W of the weight before it for an exact unmerge (peft's)."""
        if self.merged or is_quantized(self.base_layer):
            super().merge()  # (refuses a quantized base)
            return
        factor = project(self.deft_P.detach(), self.facts.decomposition)[1].T @ dense_weight(
            self.base_layer, self.facts.fan_in_fan_out)
        super().merge()
        self._factor = factor

    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        delta = deft_delta(weight.data, self.parts(), self.facts, factor=self._factor)
        weight.data.copy_((weight.data.float() - delta).to(weight.dtype))
        self._factor = None
        self.merged = False


class PeftDeftConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of a DEFT adapter_config.json that peftkit reads (defaults: peft 0.21.2's DeftConfig)."""

    r: int = Field(8, ge=1)
    decomposition_method: Decomposition = "relu"
    init_scale: float = 1.0
    alpha: int | float | None = None
    para: bool = False
    deft_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_weights: bool | None = True
    fan_in_fan_out: bool = False  # (read from the layers: Conv1D's are (in, out) whatever it says, as peft)
    # A feature peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


def unsupported(path: str, kind: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is {kind}; DeFT adapts nn.Linear and GPT-2's Conv1D (and 4-bit/8-bit) "
        "layers only, as peft 0.21's DeFT, which could not load the adapter otherwise. Leave it out of target_modules "
        "(all-linear does), or train it whole in adapter.modules_to_save.")


class Deft(Method):
    name = "deft"
    title = "DeFT"
    peft_type = "DEFT"
    config = DeftConfig
    peft_config = PeftDeftConfig
    param_names = ("deft_P", "deft_R")
    rank_dims = {"deft_P": 1, "deft_R": 0}

    @classmethod
    def wrap(cls, base: nn.Module, cfg: DeftConfig, path: str) -> DeftLinear:
        if not (isinstance(base, nn.Linear) or from_conv1d(base)):
            raise unsupported(path, f"an {type(base).__name__}")
        return DeftLinear(base, cfg)

    @classmethod
    def layer_facts(cls, cfg: DeftConfig, path: str, fan_in_fan_out: bool) -> DeftFacts:
        return DeftFacts(cfg.decomposition_method, cfg.alpha, fan_in_fan_out)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: DeftFacts) -> torch.Tensor:
        return weight + deft_delta(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: DeftFacts) -> torch.Tensor:
        raise PeftkitError("A DeFT merge cannot be undone from the merged weight alone (I - Q right^T is not "
                           "invertible with qr): unmerge the layer that merged it, which kept what it needs.")

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: DeftFacts) -> tuple[int | None, ...]:
        shape = (parts["deft_P"].shape[0], parts["deft_R"].shape[1] if "deft_R" in parts else None)
        return shape[::-1] if facts.fan_in_fan_out else shape

    @classmethod
    def to_peft(cls, cfg: DeftConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r,
            "decomposition_method": cfg.decomposition_method,
            "init_scale": cfg.init_scale,
            "alpha": cfg.alpha,
            "para": cfg.para,
            "fan_in_fan_out": fan_in_fan_out,
            "deft_dropout": cfg.deft_dropout,
            "init_weights": cfg.init_weights,
            "bias": "none",
        }

    @classmethod
    def from_peft(cls, peft: PeftDeftConfig, config_file: Path) -> DeftConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        return DeftConfig(method="deft", r=peft.r, decomposition_method=peft.decomposition_method,
                          init_scale=peft.init_scale if peft.init_scale > 0 else 1.0,
                          alpha=peft.alpha or None,  # (peft scales by 1 for a falsy alpha, 0 too)
                          para=peft.para, deft_dropout=peft.deft_dropout, init_weights=peft.init_weights is not False,
                          target_modules=targets_from_peft(peft.target_modules, config_file),
                          modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: DeftConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token: the base output and the input in fp32, the two rank-r products; with dropout, its mask and the
        # dropped input. Per layer: P's projection (relu(P), or qr's Q and R), the scaled R and Q^T.
        in_features, out_features = linear_shape(layer.base_layer)
        r = layer.deft_P.shape[1]
        dropout = 2 * in_features if cfg.deft_dropout else 0
        return in_features + out_features + 2 * r + dropout, 4 * out_features * r + r * in_features + r * r

    @classmethod
    def describe(cls, cfg: DeftConfig) -> str:
        return f"DeFT r={cfg.r}" + (" (PaRa)" if cfg.para else "")


DeftLinear.method = Deft
