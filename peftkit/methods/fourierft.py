"""FourierFT (Gao et al. 2024, "Parameter-Efficient Fine-Tuning with Discrete Fourier Transform",
arXiv:2405.03003): each layer trains `n_frequency` spectral coefficients c at fixed random entries (j_k, l_k) of an
(out x in) spectrum; the update is the real part of its inverse 2-D DFT, scaled:

    W' = W + scaling * Re(IDFT2(S)),  S[j_k, l_k] = c_k, 0 elsewhere,
    i.e. dW[p, q] = scaling / (out in) * sum_k c_k cos(2 pi (p j_k / out + q l_k / in)).

The entries are the first n_frequency of `torch.randperm(out * in)` drawn from a generator seeded with
`random_loc_seed` (entry i: row i // in, column i % in), as HF peft draws them: they are never saved, a merge draws
them again from the seed and the weight's shape. peft starts c at N(0, 1) (its default `init_weights: false`, so the
adapter does not start as the base model), or at 0. Names as HF peft: `<path>.fourierft_spectrum`, (n_frequency,).
The update is computed in fp32 and added to the base output before one cast, as peft does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_conv1d, linear_shape, refuse_embedding
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, PeftExcludedTargets, PeftLayerTargets,
                                             filters_from_peft)
from peftkit.methods.vera import SEED_RANGE
from peftkit.section import TargetRegex


class FourierFtConfig(LayerTargets, ExcludedTargets):
    """FourierFT: trained spectral coefficients at random frequencies; the update is their inverse DFT."""

    method: Literal["fourierft"]
    n_frequency: int = Field(1000, gt=0)
    """Coefficients trained per layer (peft's default): the layer's trainable parameters, at most out x in. The paper
    uses 1000 on RoBERTa (about LoRA r=8's quality at 1/16 of its parameters)."""
    scaling: float = 150.0
    """Scale of the update, as LoRA's alpha (peft's default; the paper: 100-150 on RoBERTa, 300 on LLaMA)."""

    @field_validator("scaling")
    @classmethod
    def _scaling_not_zero(cls, value: float) -> float:
        """0 scales the update, and with it every coefficient's gradient, to nothing: the run would train nothing
        and say nothing of it."""
        if value == 0:
            raise ValueError("0 scales the update and its gradients to nothing, so the adapter would never train; "
                             "use the default 150 (the paper: 100-150 on RoBERTa, 300 on LLaMA)")
        return value
    random_loc_seed: int = Field(777, **SEED_RANGE)
    """Seed of the generator drawing the frequencies (the same entries for every layer of one shape)."""
    n_frequency_pattern: dict[str, Annotated[int, Field(gt=0)]] = Field(default_factory=dict)
    """Per-module n_frequency, {name: n}: a key matches a module whose path ends with `.` + key (a regex), or equals
    its path (peft's n_frequency_pattern); the first that matches wins."""
    init_weights: bool = False
    """false (peft's default): the coefficients start at N(0, 1), a small update; true: at 0, the base model."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: Linear and Conv1D layers (and 4-bit/8-bit ones); embeddings are refused."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    def frequencies(self, path: str) -> int:
        """n_frequency of the layer at module path `path`, as peft reads n_frequency_pattern."""
        key = next((k for k in self.n_frequency_pattern if re.match(rf".*\.{k}$", path)), path)
        return self.n_frequency_pattern.get(key, self.n_frequency)


def check_fits(out_features: int, in_features: int, n: int) -> None:
    """Refuse more coefficients than an (out x in) layer has entries; checked as a layer is built, so validate's and
    the memory estimate's meta-device layers say it too (it was said by train only, once the weights had loaded)."""
    if n > out_features * in_features:
        raise PeftkitError(f"adapter.n_frequency: {n} coefficients do not fit a layer of {out_features} x "
                           f"{in_features} = {out_features * in_features} entries (peft refuses it too); use fewer.")


@lru_cache(maxsize=64)
def locations(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """(2, n) int64 CPU: the rows and columns of the n spectral entries of an (out x in) layer, as peft draws them
    (cached: every layer of one shape has the same, and a permutation of 4096 x 11008 takes a while)."""
    check_fits(out_features, in_features, n)
    order = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([order // in_features, order % in_features])


def fourier_delta(spectrum: torch.Tensor, where: torch.Tensor, shape: tuple[int, int], scaling: float) -> torch.Tensor:
    """scaling * Re(IDFT2(S)) in fp32, (out, in): S holds `spectrum` at `where` (rows, columns), 0 elsewhere."""
    dense = torch.zeros(shape, device=spectrum.device)
    dense[where[0], where[1]] = spectrum.float()
    return torch.fft.ifft2(dense).real * scaling


@dataclass(frozen=True)
class FourierFacts:
    scaling: float
    random_loc_seed: int
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""


class FourierFtLinear(AdapterLayer):
    """FourierFT around nn.Linear, transformers' Conv1D or a bitsandbytes linear layer."""

    def __init__(self, base_layer: nn.Module, n: int, cfg: FourierFtConfig) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        check_fits(out_features, in_features, n)
        self.shape = (out_features, in_features)
        self.facts = FourierFacts(cfg.scaling, cfg.random_loc_seed, is_conv1d(base_layer))
        device = base_layer.weight.device
        # Drawn on the CPU from torch's global generator, then moved beside the base (as peft: one seed, one adapter).
        where = draw_device(device)
        spectrum = torch.randn(n, device=where)  # (drawn with init_weights too, as peft: the next layers' draws)
        if cfg.init_weights:
            spectrum.zero_()
        self.fourierft_spectrum = nn.Parameter(spectrum.to(device))
        # The frequencies, drawn again from the seed (never saved); not drawn for the meta device (memory estimate).
        frequencies = (torch.empty(2, n, dtype=torch.long, device=device) if device.type == "meta"
                       else locations(out_features, in_features, n, cfg.random_loc_seed).to(device))
        self.register_buffer("fourierft_indices", frequencies, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        delta = fourier_delta(self.fourierft_spectrum, self.fourierft_indices, self.shape, self.facts.scaling)
        return (result + F.linear(x.to(delta.dtype), delta)).to(result.dtype)


class PeftFourierFtConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of a FOURIERFT adapter_config.json that peftkit reads (defaults: peft's FourierFTConfig)."""

    n_frequency: int = Field(1000, gt=0)
    scaling: float = 150.0
    random_loc_seed: int | None = Field(777, **SEED_RANGE)
    n_frequency_pattern: dict[str, Annotated[int, Field(gt=0)]] | None = None
    init_weights: bool = False
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


class FourierFt(Method):
    name = "fourierft"
    title = "FourierFT"
    peft_type = "FOURIERFT"
    config = FourierFtConfig
    peft_config = PeftFourierFtConfig
    param_names = ("fourierft_spectrum",)

    @classmethod
    def wrap(cls, base: nn.Module, cfg: FourierFtConfig, path: str) -> FourierFtLinear:
        refuse_embedding(base, path, "FourierFT")
        return FourierFtLinear(base, cfg.frequencies(path), cfg)

    @classmethod
    def layer_facts(cls, cfg: FourierFtConfig, path: str, fan_in_fan_out: bool) -> FourierFacts:
        return FourierFacts(cfg.scaling, cfg.random_loc_seed, fan_in_fan_out)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: FourierFacts) -> torch.Tensor:
        return weight + _delta(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: FourierFacts) -> torch.Tensor:
        return weight - _delta(weight, parts, facts)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: FourierFacts) -> tuple[int | None, ...]:
        return (None, None)  # any layer of at least n_frequency entries: the frequencies are drawn for its shape

    @classmethod
    def to_peft(cls, cfg: FourierFtConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "n_frequency": cfg.n_frequency,
            "scaling": cfg.scaling,
            "random_loc_seed": cfg.random_loc_seed,
            "n_frequency_pattern": dict(cfg.n_frequency_pattern),
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "init_weights": cfg.init_weights,
        }

    @classmethod
    def from_peft(cls, peft: PeftFourierFtConfig, config_file: Path) -> FourierFtConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        if peft.random_loc_seed is None:
            raise PeftkitError(f"{config_file}: random_loc_seed is null, so the frequencies cannot be drawn (peft "
                               "cannot either). Set the seed the adapter was trained with.")
        return FourierFtConfig(
            method="fourierft", n_frequency=peft.n_frequency, scaling=peft.scaling,
            random_loc_seed=peft.random_loc_seed, n_frequency_pattern=peft.n_frequency_pattern or {},
            init_weights=peft.init_weights, target_modules=targets_from_peft(peft.target_modules, config_file),
            modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: FourierFtConfig, layer: AdapterLayer) -> tuple[int, int]:
        # The layer's input in fp32 (the update's gradient), and the dense (out x in) update and its complex
        # spectrum, per layer: an upper bound.
        in_features, out_features = linear_shape(layer.base_layer)
        return in_features, 3 * in_features * out_features

    @classmethod
    def forward_scratch(cls, cfg: FourierFtConfig, layer: AdapterLayer) -> int:
        in_features, out_features = linear_shape(layer.base_layer)
        return 4 * in_features * out_features  # the dense spectrum, its complex inverse (2 values each), the update

    @classmethod
    def describe(cls, cfg: FourierFtConfig) -> str:
        return f"FourierFT n_frequency={cfg.n_frequency}"


def _delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: FourierFacts) -> torch.Tensor:
    """FourierFT's update in the base weight's layout ((in, out) for Conv1D), on its device."""
    out_in = tuple(weight.shape[::-1]) if facts.fan_in_fan_out else tuple(weight.shape)
    spectrum = parts["fourierft_spectrum"].float().to(weight.device)
    where = locations(*out_in, len(spectrum), facts.random_loc_seed).to(weight.device)
    delta = fourier_delta(spectrum, where, out_in, facts.scaling)
    return delta.T if facts.fan_in_fan_out else delta


FourierFtLinear.method = FourierFt
