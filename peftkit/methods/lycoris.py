"""What the LyCORIS methods (LoHa in `loha.py`, LoKr in `lokr.py`) share: their common recipe keys, their
PEFT config fields, the host layer with the two LyCORIS dropouts, and every `Method` hook but the update's
shape. Each method adds only how its factors are laid out and multiplied into a delta weight.

Both build the full delta weight W_d (out, in) in fp32 from their factors and add W_d x to the base output,
as peft does: W_d has the size of the base weight, so a training step keeps one fp32 (out, in) tensor per
adapted layer for the backward pass (LoRA keeps r numbers per token instead). What W_d's own gradient needs is
small: LoKr's Kronecker product keeps its factors, and LoHa's Hadamard product is one autograd node that keeps
its four factors and recomputes its two (out, in) products in backward. The merge adds the same W_d to the
weight: `delta` is the one math of forward, in-place merge, state-dict merge and `peftkit merge`.

The two dropouts (peft's semantics, training only):
- `module_dropout`: each forward, each layer skips its update with probability p;
- `rank_dropout`: despite its name, drops whole *output rows* of W_d with probability p (a fresh mask each
  forward), the kept rows rescaled by 1 / (fraction kept) for LoHa and for LoKr with `rank_dropout_scale`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_conv1d, linear_shape
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, PeftExcludedTargets, PeftLayerTargets,
                                             filters_from_peft)
from peftkit.section import TargetRegex


class LycorisConfig(LayerTargets, ExcludedTargets):
    """The keys LoHa and LoKr share (defaults: peft's, except `target_modules`, all-linear as LoRA's)."""

    r: int = Field(8, gt=0)
    """Rank of the low-rank factors: higher = more capacity, more memory."""
    alpha: float = Field(8.0, gt=0)
    """Scaling numerator: the update is scaled by alpha / r."""
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Training only: the probability of dropping each output row of the update, per forward."""
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Training only: the probability of skipping a layer's whole update, per forward."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """`all-linear` (every Linear except the output head), module-name suffixes, or {regex: ...}. Linear layers
    only: peft's LoHa and LoKr adapt no Conv1D (GPT-2) or Embedding layer."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""


@dataclass(frozen=True)
class LycorisFacts:
    """Per-layer facts of a LoHa/LoKr merge: the scaling alpha / r. The layout is read from the tensors."""

    r: int
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def rank_dropout_mask(rows: int, p: float, rescale: bool, device: torch.device) -> torch.Tensor:
    """(rows, 1): 0 for a dropped output row (probability p), else 1, or 1 / (fraction kept) with `rescale`.
    All rows dropped gives zeros (peft divides 0 by 0 there, a NaN update). Drawn on `device`, like nn.Dropout's
    masks: a CPU draw copied to a GPU would wait for the stream at every layer."""
    keep = (torch.rand(rows, device=device) > p).float()
    if rescale:
        keep = keep / keep.mean().clamp_min(1 / rows)
    return keep[:, None]


class LycorisLayer(AdapterLayer):
    """LoHa/LoKr around nn.Linear or a bitsandbytes linear layer; subclasses create the factors (PEFT's names
    and shapes, fp32) in `__init__` and set `method`."""

    method: ClassVar[type[LycorisMethod]]

    def __init__(self, base_layer: nn.Module, cfg: LycorisConfig, rescale_rank_dropout: bool) -> None:
        super().__init__(base_layer)
        self.facts = LycorisFacts(cfg.r, cfg.alpha)
        self.rank_dropout, self.module_dropout = cfg.rank_dropout, cfg.module_dropout
        self.rescale_rank_dropout = rescale_rank_dropout

    def factor(self, name: str, rows: int, cols: int) -> nn.Parameter:
        """A new fp32 factor `name` (its PEFT key suffix) of shape (rows, cols), to be drawn on `draw_device` (the
        method's `wrap` moves it beside the base weight)."""
        p = nn.Parameter(torch.empty(rows, cols, device=draw_device(self.base_layer.weight.device), dtype=torch.float32))
        self.register_parameter(name, p)
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or (self.training and self.module_dropout and torch.rand(1).item() <= self.module_dropout):
            return result
        delta = self.method.delta(self.adapter_params(), self.facts)  # fp32 (out, in)
        if self.training and self.rank_dropout:
            delta = delta * rank_dropout_mask(delta.shape[0], self.rank_dropout, self.rescale_rank_dropout, delta.device)
        return (result + F.linear(x.to(delta.dtype), delta)).to(result.dtype)  # summed in fp32, rounded once (peft)


class PeftLycorisConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of a LOHA/LOKR adapter_config.json that peftkit reads (defaults: peft's). peft's
    `use_effective_conv2d` changes only convolution layers, which peftkit does not adapt: ignored."""

    r: int = Field(8, gt=0)
    alpha: float = Field(8.0, gt=0)
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    rank_pattern: dict | None = None
    alpha_pattern: dict | None = None


class LycorisMethod(Method):
    """The hooks LoHa and LoKr share; each defines `layer`, `delta`, `update_shape` and its extra keys."""

    layer: ClassVar[type[LycorisLayer]]

    @staticmethod
    def delta(parts: dict[str, torch.Tensor], facts: LycorisFacts) -> torch.Tensor:
        """The scaled update, fp32 (out, in), from the layer's tensors by PEFT name; keeps their gradients."""
        raise NotImplementedError

    @classmethod
    def skips_parameters(cls, cfg: LycorisConfig) -> bool:
        return cfg.module_dropout > 0

    @classmethod
    def wrap(cls, base: nn.Module, cfg: LycorisConfig, path: str) -> LycorisLayer:
        if not isinstance(base, nn.Linear):  # bitsandbytes' 4-bit and 8-bit layers are nn.Linear too
            kind = "a GPT-2 style Conv1D" if is_conv1d(base) else f"an {type(base).__name__}"
            raise PeftkitError(
                f"adapter.target_modules: '{path}' is {kind} layer; {cls.title} adapts nn.Linear layers only, as "
                f"peft's {cls.peft_type} does (peft could not load the adapter otherwise). Target Linear layers, or "
                "use adapter.method: lora, which adapts Conv1D and Embedding layers too."
            )
        layer = cls.layer(base, cfg)
        for p in layer.adapter_params().values():  # drawn on the CPU: one seed, one adapter on any device
            p.data = p.data.to(base.weight.device)
        return layer

    @classmethod
    def layer_facts(cls, cfg: LycorisConfig, path: str, fan_in_fan_out: bool) -> LycorisFacts:
        if fan_in_fan_out:
            raise PeftkitError(f"The adapter targets '{path}', a GPT-2 style Conv1D layer; {cls.title} adapts "
                               "nn.Linear layers only. It was made for another base model.")
        return LycorisFacts(cfg.r, cfg.alpha)

    @classmethod
    def merge_weight(cls, weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: LycorisFacts) -> torch.Tensor:
        return weight + cls.delta(parts, facts).to(weight.device)

    @classmethod
    def unmerge_weight(cls, weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: LycorisFacts) -> torch.Tensor:
        return weight - cls.delta(parts, facts).to(weight.device)

    @classmethod
    def extra_peft(cls, cfg: Any) -> dict:
        """The method's own adapter_config.json fields, beside the shared ones."""
        return {}

    @classmethod
    def extra_keys(cls, peft: Any) -> dict:
        """The method's own recipe keys, read from its PEFT config."""
        return {}

    @classmethod
    def to_peft(cls, cfg: LycorisConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r,
            "alpha": cfg.alpha,
            "rank_dropout": cfg.rank_dropout,
            "module_dropout": cfg.module_dropout,
            "init_weights": True,
            "use_effective_conv2d": False,
            "rank_pattern": {},
            "alpha_pattern": {},
        } | cls.extra_peft(cfg)

    @classmethod
    def from_peft(cls, peft: PeftLycorisConfig, config_file: Path) -> LycorisConfig:
        refuse_unsupported(peft, config_file, ("rank_pattern", "alpha_pattern"),
                           f"peftkit's {cls.title}")
        return cls.config(method=cls.name, r=peft.r, alpha=peft.alpha, rank_dropout=peft.rank_dropout,
                          module_dropout=peft.module_dropout,
                          target_modules=targets_from_peft(peft.target_modules, config_file),
                          modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file),
                          **cls.extra_keys(peft))

    @classmethod
    def kept_for_backward(cls, cfg: LycorisConfig, layer: AdapterLayer) -> tuple[int, int]:
        # The update is built as a full (out, in) fp32 matrix every forward and kept for backward (x @ delta^T).
        in_features, out_features = linear_shape(layer.base_layer)
        return 0, in_features * out_features

    @classmethod
    def describe(cls, cfg: LycorisConfig) -> str:
        return f"{cls.title} r={cfg.r}"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # The update multiplies factors pairwise and then the pairs (a Hadamard or Kronecker product): factors
        # of size sqrt(std) make it of order std (times sqrt(r) per low-rank product), as LoRA's randomized B A.
        with torch.no_grad():
            for p in layer.adapter_params().values():
                p.copy_(torch.randn(p.shape, generator=generator) * std ** 0.5)
