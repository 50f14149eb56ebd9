"""WaveFT (wavelet fine-tuning, Bilican et al. 2025, "Exploring Sparsity for Parameter Efficient Fine Tuning Using
Wavelets", arXiv:2505.12532; peft 0.21.2's WaveFTConfig/WAVEFT): each layer trains `n_frequency` wavelet
coefficients c at fixed random entries of its (out x in) coefficient matrix; the update is one level of its inverse
2-D discrete wavelet transform, scaled:

    W' = W + scaling * IDWT2(S),  S[j_k, l_k] = c_k, 0 elsewhere   (use_idwt: false: W + scaling * S)

The entries are the first n_frequency of `torch.randperm(out * in)` drawn from a generator seeded with
`random_loc_seed` (entry e: row e // in, column e % in), as peft (and FourierFT) draw them: never saved. A wavelet of
filter length L shrinks its input by L - 2 rows and columns (peft's WAVELET_REDUCTIONS), so S is first placed in the
middle of a zero matrix that much larger (made even: four equal quadrants, cA cH / cV cD), and the middle (out x in)
of the transform is kept. The filters are PyWavelets' (`pip install "peftkit[waveft]"`), imported when a layer needs
them; the transform is one `conv_transpose2d`, as peft's port of PyTorch-Wavelet-Toolbox computes it (the same bits).

peft 0.21.2's own filter table is PyWavelets' for db1-db10, sym2-sym10 and coif1-coif3; its coif4 is not a wavelet
(not orthonormal) and its coif5 has 48 taps for 30 (its reconstruction is too small for the layer), and it has none
past db10, sym10, coif5, which its config accepts: peftkit computes every family of that table with PyWavelets'.
Names as peft: `<path>.waveft_spectrum`, (n_frequency,). The update is computed in fp32 and added to the base output
before one cast, as peft does.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.fourierft import check_fits, locations
from peftkit.methods.layer import AdapterLayer, is_conv1d, linear_shape, refuse_embedding
from peftkit.methods.target_filters import (LORA_TARGETS, ExcludedTargets, LayerTargets, NoDefault,
                                             PeftExcludedTargets, PeftLayerTargets, filters_from_peft, regex_keys)
from peftkit.methods.vera import SEED_RANGE
from peftkit.section import TargetRegex

FAMILIES = (tuple(f"db{i}" for i in range(1, 39)) + tuple(f"sym{i}" for i in range(2, 21))
            + tuple(f"coif{i}" for i in range(1, 18)))
"""peft 0.21.2's wavelet families (its WAVELET_REDUCTIONS): Daubechies, symlets, coiflets (db1 is Haar's)."""
PEFT_COMPUTES = (tuple(f"db{i}" for i in range(1, 11)) + tuple(f"sym{i}" for i in range(2, 11))
                 + ("coif1", "coif2", "coif3"))
"""The families whose filters peft 0.21.2's own table holds as PyWavelets' (the others: `peft_differs`)."""
DEFAULTS = LORA_TARGETS | {"gpt2": ["mlp.c_proj"]}
"""peft 0.21's TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING for the architectures peftkit is tested on."""


class WaveFtConfig(LayerTargets, ExcludedTargets):
    """WaveFT: trained wavelet coefficients at random entries; the update is their inverse 2-D DWT."""

    method: Literal["waveft"]
    n_frequency: int = Field(2592, gt=0)
    """Coefficients trained per layer (peft's default): the layer's trainable parameters, at most out x in."""
    scaling: float = 25.0
    """Scale of the update, as LoRA's alpha (peft's default: the paper's for SDXL personalization)."""
    wavelet_family: str = "db1"
    """The wavelet of the inverse transform: db1-db38 (db1 is Haar's), sym2-sym20, coif1-coif17 (peft's list). Longer
    filters cost more time."""
    use_idwt: bool = True
    """false: the coefficients themselves are the (sparse) update, no transform (faster; the paper found it worse)."""
    random_loc_seed: int = Field(777, **SEED_RANGE)
    """Seed of the generator drawing the entries (the same entries for every layer of one shape)."""
    n_frequency_pattern: dict[str, Annotated[int, Field(gt=0)]] = Field(default_factory=dict)
    """Per-module n_frequency, {name: n}: a key (a regex) matches a module whose path is it or ends with `.` + it
    (peft's get_pattern_key); the first that matches wins."""
    proportional_parameters: bool = False
    """true: the layers share n_frequency x (number of layers) coefficients in proportion to their out x in (at least 1
    each; over n_frequency_pattern), as peft's."""
    init_weights: bool = True
    """true (peft's default): the coefficients start at 0, the base model; false: at N(0, 0.01^2)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex | None = None
    """As LoRA's: Linear and Conv1D layers (and 4-bit/8-bit ones); null: peft's default for the architecture (q_proj,
    v_proj for a Llama, mlp.c_proj for GPT-2)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    _pattern_keys = field_validator("n_frequency_pattern")(lambda pattern: regex_keys(pattern))

    @field_validator("wavelet_family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value not in FAMILIES:
            raise ValueError(f"{value!r} is not one of peft's wavelet families: db1 to db38 (db1 is the Haar wavelet), "
                             "sym2 to sym20, coif1 to coif17")
        if value not in PEFT_COMPUTES:
            warnings.warn(PeftkitWarning(peft_differs(value)), stacklevel=2)
        return value

    @field_validator("scaling")
    @classmethod
    def _scaling_not_zero(cls, value: float) -> float:
        """0 scales the update, and with it every coefficient's gradient, to nothing."""
        if value == 0:
            raise ValueError("0 scales the update and its gradients to nothing, so the adapter would never train; "
                             "use the default 25")
        return value

    def frequencies(self, path: str) -> int:
        """n_frequency of the layer at module path `path`, as peft reads n_frequency_pattern."""
        key = next((k for k in self.n_frequency_pattern if re.match(rf"(.*\.)?({k})$", path)), path)
        return self.n_frequency_pattern.get(key, self.n_frequency)


def peft_differs(family: str) -> str:
    """What peft 0.21.2 makes of a WaveFT adapter of `family`, one it computes otherwise than PyWavelets' filters."""
    if family == "coif4":
        what = ("computes another update from the same coefficients: its coif4 filter is not PyWavelets' (nor "
                "orthonormal), so an adapter moved between peft and peftkit changes its numbers")
    else:
        what = ("cannot compute it: its forward fails on such an adapter (its table stops at db10, sym10 and coif5, "
                "and its coif5 has 48 taps for 30)")
    return (f"adapter.wavelet_family {family!r}: peftkit computes it with PyWavelets' filters, but peft 0.21.2 {what}. "
            "For an adapter peft uses as peftkit does, choose db1-db10, sym2-sym10 or coif1-coif3.")


@lru_cache(maxsize=None)
def reconstruction_filters(family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """PyWavelets' (rec_lo, rec_hi) of `family`, imported only here (an optional extra)."""
    try:
        import pywt
    except ImportError:
        raise PeftkitError(f"adapter.wavelet_family {family!r}: WaveFT's inverse wavelet transform takes its filters "
                           'from PyWavelets, which is not installed. pip install "peftkit[waveft]" (or set '
                           "adapter.use_idwt: false, which needs no wavelet).") from None
    wavelet = pywt.Wavelet(family)
    return tuple(wavelet.rec_lo), tuple(wavelet.rec_hi)


Filters = tuple[tuple[float, ...], tuple[float, ...]]
"""A wavelet's reconstruction filters (rec_lo, rec_hi), as `reconstruction_filters` gives them."""


def idwt2(bands: torch.Tensor, filters: Filters) -> torch.Tensor:
    """One level of the inverse 2-D DWT of `bands` (2h, 2w), whose quadrants are cA (top left), cH (top right), cV
    and cD: (2h - L + 2, 2w - L + 2) for `filters` of length L, differentiable. PyWavelets' idwt2 of (cA, (cH, cV,
    cD)) and peft's waverec2d (its one conv_transpose2d: the same bits)."""
    lo, hi = (torch.tensor(f, dtype=bands.dtype, device=bands.device) for f in filters)
    # Each band upsampled by 2 and filtered by an outer product (filter down the rows) x (filter along the columns):
    # lo x lo for cA, hi x lo for cH, lo x hi for cV, hi x hi for cD; the four summed (conv_transpose2d's one output
    # channel).
    kernels = torch.stack([lo[:, None] * lo, hi[:, None] * lo, lo[:, None] * hi, hi[:, None] * hi]).unsqueeze(1)
    h, w = bands.shape[0] // 2, bands.shape[1] // 2
    quadrants = torch.stack([bands[:h, :w], bands[:h, w:], bands[h:, :w], bands[h:, w:]]).unsqueeze(0)
    full = F.conv_transpose2d(quadrants, kernels, stride=2)[0, 0]  # (2h + L - 2, 2w + L - 2)
    tail = len(lo) - 2  # the filter's overhang on each side, cut as PyWavelets' idwt2 cuts it
    return full[tail:full.shape[0] - tail, tail:full.shape[1] - tail]


@dataclass(frozen=True)
class WaveFacts:
    scaling: float
    random_loc_seed: int
    wavelet_family: str
    use_idwt: bool
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""


def padded_shape(shape: tuple[int, int], family: str, filters: Filters | None = None) -> tuple[int, int]:
    """The coefficient matrix whose transform covers an (out x in) layer: L - 2 rows and columns more, made even
    (L: the length of `filters`, by default `family`'s)."""
    grow = len((filters or reconstruction_filters(family))[0]) - 2
    return tuple(n + grow + (n + grow) % 2 for n in shape)


def wave_delta(spectrum: torch.Tensor, where: torch.Tensor, shape: tuple[int, int], facts: WaveFacts,
               filters: Filters | None = None) -> torch.Tensor:
    """scaling * IDWT2(S) in fp32, (out, in), S holding `spectrum` at `where` (rows, columns) in the middle of the
    padded matrix, the transform's middle (out x in) kept; scaling * S itself without use_idwt. `filters`: the
    wavelet's, read by a layer once (a forward that reads PyWavelets breaks torch.compile's graph); by default
    `reconstruction_filters` of the facts' family."""
    if not facts.use_idwt:
        dense = torch.zeros(shape, device=spectrum.device)
        dense[where[0], where[1]] = spectrum.float()
        return dense * facts.scaling
    filters = filters or reconstruction_filters(facts.wavelet_family)
    rows, cols = padded_shape(shape, facts.wavelet_family, filters)
    dense = torch.zeros(rows, cols, device=spectrum.device)
    dense[where[0] + (rows - shape[0]) // 2, where[1] + (cols - shape[1]) // 2] = spectrum.float()
    delta = idwt2(dense, filters) * facts.scaling  # (out or out + 1, in or in + 1)
    top, left = (delta.shape[0] - shape[0]) // 2, (delta.shape[1] - shape[1]) // 2
    return delta[top:top + shape[0], left:left + shape[1]]


class WaveFtLinear(AdapterLayer):
    """WaveFT around nn.Linear, transformers' Conv1D or a bitsandbytes linear layer."""

    def __init__(self, base_layer: nn.Module, n: int, cfg: WaveFtConfig, init_weights: bool) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        self.shape = (out_features, in_features)
        self.facts = WaveFacts(cfg.scaling, cfg.random_loc_seed, cfg.wavelet_family, cfg.use_idwt,
                               is_conv1d(base_layer))
        # Read now: PyWavelets missing is said here (validate too), not at the first forward, and no forward calls
        # into PyWavelets, which torch.compile cannot trace (a graph break in every layer: 16 in 2 steps of a 1-layer
        # Llama with q and v adapted, measured).
        self.filters = reconstruction_filters(cfg.wavelet_family) if cfg.use_idwt else None
        self.set_spectrum(n, init_weights)

    def set_spectrum(self, n: int, init_weights: bool) -> None:
        """n coefficients at their entries, drawn as peft's update_layer: 0, or N(0, 0.01^2) from torch's global
        generator on the CPU (init_weights false), then moved beside the base."""
        check_fits(*self.shape, n)
        device = self.base_layer.weight.device
        spectrum = (torch.zeros(n, device=draw_device(device)) if init_weights
                    else torch.randn(n, device=draw_device(device)) * 0.01)
        self.waveft_spectrum = nn.Parameter(spectrum.to(device))
        # The entries, drawn again from the seed (never saved); not drawn for the meta device (memory estimate).
        where = (torch.empty(2, n, dtype=torch.long, device=device) if device.type == "meta"
                 else locations(*self.shape, n, self.facts.random_loc_seed).to(device))
        self.register_buffer("waveft_indices", where, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        delta = wave_delta(self.waveft_spectrum, self.waveft_indices, self.shape, self.facts, self.filters)
        return (result + F.linear(x.to(delta.dtype), delta)).to(result.dtype)


def proportional_frequencies(cfg: WaveFtConfig, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """peft's `_calculate_proportional_parameters`: n_frequency x len(shapes) coefficients shared in proportion to
    each layer's out x in (Python's round, at least 1), for the layers of (out, in) `shapes` by path."""
    total = sum(out * inp for out, inp in shapes.values())
    budget = cfg.n_frequency * len(shapes)
    return {path: max(1, round(out * inp / total * budget)) for path, (out, inp) in shapes.items()}


class PeftWaveFtConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of a WAVEFT adapter_config.json that peftkit reads (defaults: peft's WaveFTConfig)."""

    n_frequency: int = Field(2592, gt=0)
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int | None = Field(777, **SEED_RANGE)
    n_frequency_pattern: dict[str, Annotated[int, Field(gt=0)]] | None = None
    proportional_parameters: bool = False
    init_weights: bool = True
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"

    _known_family = field_validator("wavelet_family")(WaveFtConfig._known_family.__func__)
    _pattern_keys = field_validator("n_frequency_pattern")(lambda pattern: regex_keys(pattern))


class WaveFt(Method):
    name = "waveft"
    title = "WaveFT"
    peft_type = "WAVEFT"
    config = WaveFtConfig
    peft_config = PeftWaveFtConfig
    param_names = ("waveft_spectrum",)

    @classmethod
    def resolve(cls, cfg: WaveFtConfig, model_type: str | None) -> WaveFtConfig:
        if cfg.target_modules is not None:
            return cfg
        if model_type not in DEFAULTS:
            raise NoDefault("target_modules", "WaveFT", model_type, DEFAULTS, "name the modules",
                            "target_modules: [q_proj, v_proj] for a Llama-like model")
        return cfg.model_copy(update={"target_modules": DEFAULTS[model_type]})

    @classmethod
    def wrap(cls, base: nn.Module, cfg: WaveFtConfig, path: str) -> WaveFtLinear:
        refuse_embedding(base, path, "WaveFT")
        if cfg.proportional_parameters:  # n_frequency zeros (a layer alone's share) until link_layers sees them all
            return WaveFtLinear(base, cfg.n_frequency, cfg, init_weights=True)
        return WaveFtLinear(base, cfg.frequencies(path), cfg, cfg.init_weights)

    @classmethod
    def link_layers(cls, model: nn.Module, cfg: WaveFtConfig, layers: dict[str, AdapterLayer]) -> None:
        """proportional_parameters: each layer's share of the coefficients, drawn layer after layer as peft's."""
        if cfg.proportional_parameters:
            shares = proportional_frequencies(cfg, {path: layer.shape for path, layer in layers.items()})
            for path, layer in layers.items():
                layer.set_spectrum(shares[path], cfg.init_weights)

    @classmethod
    def layer_facts(cls, cfg: WaveFtConfig, path: str, fan_in_fan_out: bool) -> WaveFacts:
        return WaveFacts(cfg.scaling, cfg.random_loc_seed, cfg.wavelet_family, cfg.use_idwt, fan_in_fan_out)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: WaveFacts) -> torch.Tensor:
        return weight + _delta(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: WaveFacts) -> torch.Tensor:
        return weight - _delta(weight, parts, facts)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: WaveFacts) -> tuple[int | None, ...]:
        return (None, None)  # any layer of at least n_frequency entries: the entries are drawn for its shape

    @classmethod
    def to_peft(cls, cfg: WaveFtConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "n_frequency": cfg.n_frequency, "scaling": cfg.scaling, "wavelet_family": cfg.wavelet_family,
            "use_idwt": cfg.use_idwt, "random_loc_seed": cfg.random_loc_seed, "fan_in_fan_out": fan_in_fan_out,
            "bias": "none", "n_frequency_pattern": dict(cfg.n_frequency_pattern),
            "proportional_parameters": cfg.proportional_parameters, "init_weights": cfg.init_weights,
        }

    @classmethod
    def from_peft(cls, peft: PeftWaveFtConfig, config_file: Path) -> WaveFtConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        if peft.random_loc_seed is None:
            raise PeftkitError(f"{config_file}: random_loc_seed is null, so the coefficients' entries cannot be drawn "
                               "(peft cannot either). Set the seed the adapter was trained with.")
        return WaveFtConfig(
            method="waveft", n_frequency=peft.n_frequency, scaling=peft.scaling, wavelet_family=peft.wavelet_family,
            use_idwt=peft.use_idwt, random_loc_seed=peft.random_loc_seed,
            n_frequency_pattern=peft.n_frequency_pattern or {}, proportional_parameters=peft.proportional_parameters,
            init_weights=True,  # (the file holds what it trained to)
            target_modules=targets_from_peft(peft.target_modules, config_file) if peft.target_modules else None,
            modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: WaveFtConfig, layer: AdapterLayer) -> tuple[int, int]:
        # The layer's input in fp32 (the update's gradient); per layer the padded coefficients (as the transform's
        # four stacked quadrants) and the dense (out x in) update: an upper bound.
        in_features, out_features = linear_shape(layer.base_layer)
        rows, cols = padded_shape((out_features, in_features), cfg.wavelet_family) if cfg.use_idwt else (0, 0)
        return in_features, rows * cols + out_features * in_features

    @classmethod
    def forward_scratch(cls, cfg: WaveFtConfig, layer: AdapterLayer) -> int:
        # the padded coefficients, their quadrants stacked, the transform's full output, the scaled update
        in_features, out_features = linear_shape(layer.base_layer)
        rows, cols = padded_shape((out_features, in_features), cfg.wavelet_family) if cfg.use_idwt else (0, 0)
        return 3 * rows * cols + 2 * out_features * in_features

    @classmethod
    def describe(cls, cfg: WaveFtConfig) -> str:
        return f"WaveFT n_frequency={cfg.n_frequency} {cfg.wavelet_family if cfg.use_idwt else 'no IDWT'}"


def _delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: WaveFacts) -> torch.Tensor:
    """WaveFT's update in the base weight's layout ((in, out) for Conv1D), on its device."""
    out_in = tuple(weight.shape[::-1]) if facts.fan_in_fan_out else tuple(weight.shape)
    spectrum = parts["waveft_spectrum"].float().to(weight.device)
    where = locations(*out_in, len(spectrum), facts.random_loc_seed).to(weight.device)
    delta = wave_delta(spectrum, where, out_in, facts)
    return delta.T if facts.fan_in_fan_out else delta


WaveFtLinear.method = WaveFt
