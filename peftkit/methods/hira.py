"""HiRA, Hadamard high-rank adaptation (Huang et al. 2025, ICLR, "HiRA: Parameter-Efficient Hadamard High-Rank
Adaptation for Large Language Models", openreview.net/pdf?id=TwJrTz9cRS): the update is the frozen weight multiplied
entry by entry by a rank-r product,

    W' = W + W * (B A),   A (r, in), B (out, r),

so a rank-r pair moves every entry of W in proportion to it (the update's rank is not bounded by r). The forward adds
(W * (B A)) x to the base output; merged, W (1 + B A) entry by entry; peft unmerges by restoring the weight it kept
aside (the division by 1 + B A is not exact, nor defined where it is 0), as the in-place layer here does.

Names, shapes and init as HF peft 0.21's `HiraLayer`: `<path>.hira_A` (r, in) and `<path>.hira_B` (out, r) on Linear
and GPT-2's Conv1D (whose weight is (in, out): the product is transposed), `<path>.hira_embedding_A` (r, num_embeddings)
and `<path>.hira_embedding_B` (dim, r) on an embedding (its table (num, dim) times (B A)^T). peft draws A and B from
N(0, 1) first, then (init_weights true) A kaiming-uniform and B 0, the base model; "gaussian": A ~ N(0, 1/r^2), B 0;
an embedding's A 0 and B N(0, 1). The same draws in the same order here: one seed, peft's numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import warnings
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, KeptWeightLayer, is_conv1d, is_quantized, linear_shape
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, PeftExcludedTargets, PeftLayerTargets,
                                             filters_from_peft)
from peftkit.section import TargetRegex

Init = bool | Literal["gaussian"]


class HiraConfig(LayerTargets, ExcludedTargets):
    """HiRA: a rank-r product multiplying each target's frozen weight entry by entry."""

    method: Literal["hira"]
    r: int = Field(32, ge=1)
    """Rank of the product B A: r x (in + out) trained numbers a layer (peft's default 32)."""
    hira_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the input of the update (training only), as peft's."""
    init_weights: Init = True
    """true: A kaiming-uniform and B 0, the base model; "gaussian": A ~ N(0, 1/r^2), B 0; false (debugging, as peft): A
    and B ~ N(0, 1), far from the base."""
    rank_pattern: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    """peft's per-module r, which peft 0.21's HiRA ignores (every layer gets r, and peft cannot load an adapter with
    other ranks): refused unless empty."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: Linear and Conv1D layers (and 4-bit/8-bit ones), and embeddings named here."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    @field_validator("rank_pattern")
    @classmethod
    def _no_rank_pattern(cls, pattern: dict) -> dict:
        if pattern:
            raise ValueError("peft 0.21's HiRA ignores it (its layers are built with r whatever the pattern says), so "
                             "peft could not load an adapter with other ranks; remove rank_pattern, or give every "
                             "layer the same r")
        return pattern


@dataclass(frozen=True)
class HiraFacts:
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""


def product(parts: dict[str, torch.Tensor], facts: HiraFacts) -> torch.Tensor:
    """B A in the base weight's layout (fp32): (out, in) for Linear, (in, out) for Conv1D, (num, dim) for an embedding.
    Computed as peft does, (A^T B^T)^T."""
    embedding = "hira_embedding_A" in parts
    a, b = (parts[f"hira_{'embedding_' if embedding else ''}{n}"].float() for n in "AB")
    transposed = torch.mm(a.T, b.T)  # (in, out): peft's _prod_AB
    return transposed if embedding or facts.fan_in_fan_out else transposed.T


def _hadamard(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: HiraFacts) -> torch.Tensor:
    delta = product(parts, facts).to(weight.device)
    if delta.shape != weight.shape:
        raise PeftkitError(f"The adapter does not fit this model: its HiRA product is {tuple(delta.shape)} for a "
                           f"weight of {tuple(weight.shape)}. It was trained on a different base model.")
    return weight * delta


def _draw(rows: int, columns: int, device: torch.device) -> torch.Tensor:
    """N(0, 1) on the CPU from torch's global generator, as peft's torch.randn (meta stays meta)."""
    return torch.randn(rows, columns, device=draw_device(device))


class HiraLayer(KeptWeightLayer):
    """What HiRA's Linear and embedding layers share: the in-place merge keeps the weight before it, and the unmerge
    puts it back (peft's way: W (1 + B A) divided back is not exact, nor defined where 1 + B A is 0)."""


class HiraLinear(HiraLayer):
    """HiRA around nn.Linear, transformers' Conv1D or a bitsandbytes linear layer (dequantized for the update)."""

    def __init__(self, base_layer: nn.Module, r: int, cfg: HiraConfig) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        self.facts = HiraFacts(is_conv1d(base_layer))
        device = base_layer.weight.device
        a, b = _draw(r, in_features, device), _draw(out_features, r, device)
        if cfg.init_weights is True:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        elif cfg.init_weights == "gaussian":
            nn.init.normal_(a, std=1 / r)
        if cfg.init_weights is not False:
            b.zero_()
        self.hira_A = nn.Parameter(a.to(device))  # PEFT's keys `hira_A`, `hira_B`
        self.hira_B = nn.Parameter(b.to(device))
        self.dropout = nn.Dropout(cfg.hira_dropout) if cfg.hira_dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        if is_quantized(self.base_layer):
            from peftkit.merge_weights import dequantize_weight  # (peftkit.merge_weights imports the methods)

            weight = dequantize_weight(self.base_layer)
        else:
            weight = self.base_layer.weight.T if self.facts.fan_in_fan_out else self.base_layer.weight
        scaled = weight * torch.mm(self.hira_A.T, self.hira_B.T).T  # W * (B A), (out, in), fp32 as peft's
        return (result + F.linear(self.dropout(x.to(self.hira_A.dtype)), scaled)).to(result.dtype)


class HiraEmbedding(HiraLayer):
    """HiRA around nn.Embedding: the token's row of W * (B A)^T is added to its lookup (scaled as the lookup, for
    Gemma's embedding, so that the merged table gives the same: peft's forward leaves that update unscaled)."""

    def __init__(self, base_layer: nn.Embedding, r: int, cfg: HiraConfig) -> None:
        super().__init__(base_layer)
        self.facts = HiraFacts()
        device = base_layer.weight.device
        a, b = _draw(r, base_layer.num_embeddings, device), _draw(base_layer.embedding_dim, r, device)
        if cfg.init_weights is not False:  # (true and "gaussian" alike, as peft's)
            a.zero_()
            nn.init.normal_(b)
        self.hira_embedding_A = nn.Parameter(a.to(device))
        self.hira_embedding_B = nn.Parameter(b.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        weight = self.base_layer.weight * torch.mm(self.hira_embedding_B, self.hira_embedding_A).T
        update = F.embedding(x, weight)
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, (int, float)) or (isinstance(scale, torch.Tensor) and scale.numel() == 1):
            update = update * torch.as_tensor(scale).to(update.dtype)
        return (result + update).to(result.dtype)


class PeftHiraConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of a HIRA adapter_config.json that peftkit reads (defaults: peft 0.21's HiraConfig)."""

    r: int = Field(32, ge=1)
    hira_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_weights: Init | None = True
    rank_pattern: dict[str, Annotated[int, Field(ge=1)]] | None = None
    fan_in_fan_out: bool = False  # (read from the layers: Conv1D's are (in, out) whatever it says, as peft)


class Hira(Method):
    name = "hira"
    title = "HiRA"
    peft_type = "HIRA"
    config = HiraConfig
    peft_config = PeftHiraConfig
    param_names = ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B")
    rank_dims = {"hira_A": 0, "hira_B": 1, "hira_embedding_A": 0, "hira_embedding_B": 1}

    @classmethod
    def wrap(cls, base: nn.Module, cfg: HiraConfig, path: str) -> HiraLayer:
        if isinstance(base, nn.Embedding):
            return HiraEmbedding(base, cfg.r, cfg)
        return HiraLinear(base, cfg.r, cfg)

    @classmethod
    def layer_facts(cls, cfg: HiraConfig, path: str, fan_in_fan_out: bool) -> HiraFacts:
        return HiraFacts(fan_in_fan_out)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: HiraFacts) -> torch.Tensor:
        return weight + _hadamard(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: HiraFacts) -> torch.Tensor:
        return weight / (1 + product(parts, facts).to(weight.device))  # (the layers restore the kept weight instead)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: HiraFacts) -> tuple[int | None, ...]:
        return tuple(product(parts, facts).shape)

    @classmethod
    def to_peft(cls, cfg: HiraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r,
            "hira_dropout": cfg.hira_dropout,
            "fan_in_fan_out": fan_in_fan_out,
            "init_weights": cfg.init_weights,
            "rank_pattern": dict(cfg.rank_pattern),
        }

    @classmethod
    def from_peft(cls, peft: PeftHiraConfig, config_file: Path) -> HiraConfig:
        refuse_unsupported(peft, config_file, ())
        if peft.rank_pattern:
            warnings.warn(f"{config_file}: rank_pattern {peft.rank_pattern} is not applied: peft 0.21's HiRA builds "
                          f"every layer with r {peft.r} whatever it says, and the adapter loads as peft loads it",
                          PeftkitWarning, stacklevel=2)
        return HiraConfig(method="hira", r=peft.r, hira_dropout=peft.hira_dropout,
                          init_weights=bool(peft.init_weights) if peft.init_weights != "gaussian" else "gaussian",
                          target_modules=targets_from_peft(peft.target_modules, config_file),
                          modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: HiraConfig, layer: AdapterLayer) -> tuple[int, int]:
        # The input (fp32, after dropout) per token; the (out x in) product, its Hadamard product with W and W in
        # fp32 (a dequantized one), per layer.
        if isinstance(layer, HiraEmbedding):
            return 0, 3 * layer.base_layer.weight.numel()
        in_features, out_features = linear_shape(layer.base_layer)
        return in_features, 3 * in_features * out_features

    @classmethod
    def forward_scratch(cls, cfg: HiraConfig, layer: AdapterLayer) -> int:
        return 3 * layer.base_layer.weight.numel() * (2 if is_quantized(layer.base_layer) else 1)

    @classmethod
    def describe(cls, cfg: HiraConfig) -> str:
        return f"HiRA r={cfg.r}"


HiraLinear.method = Hira
HiraEmbedding.method = Hira
