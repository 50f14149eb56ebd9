"""LoKr (LyCORIS, Yeh et al. 2023, arXiv:2309.14859; KronA, Edalati et al. 2022, arXiv:2212.10650): the update
is a Kronecker product,

    W' = W + (alpha / r) * kron(w1, w2),    w1 (a, c), w2 (b, d), out = a b, in = c d,

each factor either a full matrix (`lokr_w1`, `lokr_w2`) or a rank-r product (`lokr_w1_a @ lokr_w1_b`, ...).
Names, shapes and the choice between them as HF peft (`LoKrLayer.update_layer`, peft 0.21): out and in are
split by `factorization` (below); w2 is low-rank when r < max(b, d) / 2, and w1 when also `decompose_both`
and r < max(a, c) / 2. So one adapter can mix layouts across layers (and peft's choice depends on settings
peftkit may not share): a merge reads each layer's layout from which tensors it has, never from a setting.

As in peft, w1 (or w1_a) starts at zero and the rest kaiming-uniform: training starts from the base model.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator
from torch import nn

from peftkit.methods.layer import linear_shape
from peftkit.methods.lycoris import (
    LycorisConfig,
    LycorisFacts,
    LycorisLayer,
    LycorisMethod,
    PeftLycorisConfig,
)


def _valid_factor(v: int) -> int:
    if v == 0 or v < -1:
        raise ValueError("must be -1 (split near the square root) or a positive integer")
    return v


DecomposeFactor = Annotated[int, AfterValidator(_valid_factor)]


class LokrConfig(LycorisConfig):
    """LoKr: a Kronecker product of two (possibly low-rank) factors."""

    method: Literal["lokr"]
    decompose_factor: DecomposeFactor = -1
    """How out and in features are split into (a, b) and (c, d): -1 = the divisor pair nearest the square root
    (4096 -> 64 x 64); f > 0 = (f, n / f) when f divides n, else the pair nearest the root with a <= f."""
    decompose_both: bool = False
    """Also factor w1 into rank r (when r < max(a, c) / 2); w2 is factored whenever r < max(b, d) / 2."""
    rank_dropout_scale: bool = False
    """Rescale the rows kept by `rank_dropout` by 1 / (fraction kept), as LoHa always does (peft's default: no)."""



def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """The split of `dimension` into (m, n), m * n = dimension, that peft's LoKr makes: (factor, dimension /
    factor) when `factor` divides it; otherwise the divisor pair closest to the square root whose smaller member
    is at most `factor` (any, for -1), smaller first. 4096 -> (64, 64); 11008 -> (86, 128); 127 -> (1, 127)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    for d in range(2, dimension + 1):
        if m >= n or d > limit:
            break
        if dimension % d == 0:
            m, n = d, dimension // d
    return min(m, n), max(m, n)


def _factor(parts: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """`name` (lokr_w1 / lokr_w2) as saved, or the product of its low-rank pair: whichever the layer has."""
    if name in parts:
        return parts[name].float()
    return parts[f"{name}_a"].float() @ parts[f"{name}_b"].float()


class LokrLinear(LycorisLayer):
    def __init__(self, base_layer: nn.Module, cfg: LokrConfig) -> None:
        super().__init__(base_layer, cfg, rescale_rank_dropout=cfg.rank_dropout_scale)
        in_features, out_features = linear_shape(base_layer)
        (a, b), (c, d) = factorization(out_features, cfg.decompose_factor), factorization(in_features, cfg.decompose_factor)
        low_rank = {"lokr_w1": cfg.decompose_both and cfg.r < max(a, c) / 2, "lokr_w2": cfg.r < max(b, d) / 2}
        for name, (rows, cols) in (("lokr_w1", (a, c)), ("lokr_w2", (b, d))):
            if low_rank[name]:
                self.factor(f"{name}_a", rows, cfg.r)
                self.factor(f"{name}_b", cfg.r, cols)
            else:
                self.factor(name, rows, cols)
        for p in self.adapter_params().values():
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        nn.init.zeros_(self.lokr_w1_a if low_rank["lokr_w1"] else self.lokr_w1)  # the update starts at 0


class PeftLokrConfig(PeftLycorisConfig):
    decompose_both: bool = False
    decompose_factor: DecomposeFactor = -1
    rank_dropout_scale: bool = False


class Lokr(LycorisMethod):
    name = "lokr"
    title = "LoKr"
    peft_type = "LOKR"
    config = LokrConfig
    peft_config = PeftLokrConfig
    layer = LokrLinear
    param_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    rank_dims = {"lokr_w1_a": 1, "lokr_w1_b": 0, "lokr_w2_a": 1, "lokr_w2_b": 0}

    @staticmethod
    def delta(parts: dict[str, torch.Tensor], facts: LycorisFacts) -> torch.Tensor:
        return torch.kron(_factor(parts, "lokr_w1"), _factor(parts, "lokr_w2")) * facts.scaling

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: LycorisFacts) -> tuple[int, int]:
        (a, c), (b, d) = (_shape(parts, "lokr_w1"), _shape(parts, "lokr_w2"))
        return a * b, c * d

    @classmethod
    def extra_peft(cls, cfg: LokrConfig) -> dict:
        return {"decompose_both": cfg.decompose_both, "decompose_factor": cfg.decompose_factor,
                "rank_dropout_scale": cfg.rank_dropout_scale}

    @classmethod
    def extra_keys(cls, peft: PeftLokrConfig) -> dict:
        return cls.extra_peft(peft)  # the recipe keys have peft's names

    @classmethod
    def describe(cls, cfg: LokrConfig) -> str:
        return f"LoKr r={cfg.r}" + (f", decompose_factor={cfg.decompose_factor}" if cfg.decompose_factor != -1 else "")


def _shape(parts: dict[str, torch.Tensor], name: str) -> tuple[int, int]:
    if name in parts:
        return tuple(parts[name].shape)
    return parts[f"{name}_a"].shape[0], parts[f"{name}_b"].shape[1]


LokrLinear.method = Lokr
