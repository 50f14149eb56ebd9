"""C3A (Chen et al. 2024, "Parameter-Efficient Fine-Tuning via Circular Convolution", arXiv:2407.19342): each
layer's update is block-circulant. The (out x in) update is cut into (b x b) blocks, block (i, j) the circulant
matrix of a trained vector k_ij of b numbers, and scaled by 1 / in:

    W' = W + C / in,  C[i b + s, j b + t] = k_ij[(t - s) mod b],
    i.e. y_i = sum_j k_ij (*) x_j / in, (*) the circular cross-correlation (y_s = sum_u k_u x_{s + u}).

The forward computes it with real FFTs, out/b x in/b x b numbers per layer (`block_size` b must divide both sizes of
every target), in fp32, and adds the update's output, cast to the base output's dtype, to it (as peft). Names and
shapes as HF peft 0.21's C3A: `<path>.c3a_kernel`, (out / b, in / b, b), kept in fp32 whatever the base's dtype.
peft's default start is a xavier-uniform draw (not the base model); `init_weights: true` starts at 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, linear_shape, not_a_linear
from peftkit.methods.target_filters import LayerTargets, PeftLayerTargets, filters_from_peft
from peftkit.section import TargetRegex

Init = bool | Literal["gaussian", "kaiming_uniform", "xavier_uniform"]


class C3aConfig(LayerTargets):
    """C3A: a block-circulant update, one trained vector per (block_size x block_size) block."""

    method: Literal["c3a"]
    block_size: int = Field(256, gt=0)
    """Size of the circulant blocks (peft's default): it must divide the input and output sizes of every target.
    A layer trains out x in / block_size numbers: a larger block, fewer parameters."""
    block_size_pattern: dict[str, Annotated[int, Field(gt=0)]] = Field(default_factory=dict)
    """Per-module block_size, {name: b}: a key matches a module whose path ends with `.` + key (a regex), or equals
    its path (peft's block_size_pattern); the first that matches wins."""
    init_weights: Init = "xavier_uniform"
    """The kernels' start (peft's): xavier_uniform (or false), U(-a, a) with a = sqrt(6 / (in + out)); kaiming_uniform,
    a = sqrt(1 / in); gaussian, N(0, 1); true, 0 (the base model)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: nn.Linear layers (and 4-bit/8-bit ones); Conv1D and embeddings are refused (as peft's)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    def block_sizes(self, path: str) -> int:
        """block_size of the layer at module path `path`, as peft reads block_size_pattern."""
        key = next((k for k in self.block_size_pattern if re.match(rf".*\.{k}$", path)), path)
        return self.block_size_pattern.get(key, self.block_size)


def check_blocks(path: str, in_features: int, out_features: int, block: int) -> None:
    """Refuse a block size that does not divide both sizes of the layer at `path` (peft refuses it too); checked as
    the layer is built, so validate and the memory estimate say it before any weight loads."""
    if in_features % block or out_features % block:
        common = math.gcd(in_features, out_features)
        raise PeftkitError(
            f"adapter.block_size: {block} does not divide both sizes of '{path}' ({in_features} inputs, "
            f"{out_features} outputs); C3A's circulant blocks must tile every target (peft refuses it too). Use a "
            f"divisor of both, at most {common} here (a common divisor of all targets' sizes), or give this layer "
            "its own in adapter.block_size_pattern.")


def circular_blocks(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(..., in) -> (..., out): output block i = sum_j k_ij (*) x_j (circular cross-correlation), with real FFTs
    (fp32: torch's FFT takes no bf16). Unscaled."""
    m, n, b = kernel.shape
    spectrum = torch.fft.rfft(x.reshape(*x.shape[:-1], n, b))
    mixed = torch.einsum("...nk,mnk->...mk", spectrum, torch.fft.rfft(kernel).conj())
    return torch.fft.irfft(mixed, n=b).reshape(*x.shape[:-1], m * b)


def circulant_delta(kernel: torch.Tensor) -> torch.Tensor:
    """The dense (out, in) update C / in of an (m, n, b) kernel, in fp32: block (i, j) entry (s, t) is
    k_ij[(t - s) mod b]."""
    m, n, b = kernel.shape
    steps = torch.arange(b, device=kernel.device)
    blocks = kernel.float()[:, :, (steps[None, :] - steps[:, None]) % b]  # (m, n, b, b)
    return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b) / (n * b)


def initial_kernel(shape: tuple[int, int, int], in_features: int, out_features: int, init: Init,
                   device: torch.device) -> torch.Tensor:
    """peft's start, drawn on `device` from torch's global generator (the same numbers as peft's for a seed)."""
    kernel = torch.zeros(shape, device=device)
    if init is True:
        return kernel
    if init == "gaussian":
        return kernel.normal_()
    bound = math.sqrt(1 / in_features) if init == "kaiming_uniform" else math.sqrt(6 / (in_features + out_features))
    return kernel.uniform_(-bound, bound)


@dataclass(frozen=True)
class C3aFacts:
    """C3A's merge needs the kernel alone (its scale is 1 / in, read from the weight)."""


class C3aLinear(AdapterLayer):
    """C3A around nn.Linear or a bitsandbytes linear layer: base output + the circulant update's, in fp32."""

    def __init__(self, base_layer: nn.Module, block: int, cfg: C3aConfig, path: str) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        check_blocks(path, in_features, out_features, block)
        self.facts = C3aFacts()
        device = base_layer.weight.device
        shape = (out_features // block, in_features // block, block)
        kernel = initial_kernel(shape, in_features, out_features, cfg.init_weights, draw_device(device))
        self.c3a_kernel = nn.Parameter(kernel.to(device))  # fp32 whatever the base's dtype, as peft's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        update = circular_blocks(x.float(), self.c3a_kernel.float()) / x.shape[-1]
        return result + update.to(result.dtype)


class PeftC3aConfig(PeftLayerTargets):
    """The fields of a C3A adapter_config.json that peftkit reads (defaults: peft's C3AConfig)."""

    block_size: int = Field(256, gt=0)
    block_size_pattern: dict[str, Annotated[int, Field(gt=0)]] | None = None
    init_weights: Init | None = "xavier_uniform"
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


def unsupported(path: str, kind: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is {kind}; C3A adapts nn.Linear (and 4-bit/8-bit) layers only, as peft "
        "0.21's C3A, which could not load the adapter otherwise. Target Linear layers (all-linear does, but on GPT-2's "
        "Conv1D), or use adapter.method: lora for this model.")


class C3a(Method):
    name = "c3a"
    title = "C3A"
    peft_type = "C3A"
    config = C3aConfig
    peft_config = PeftC3aConfig
    param_names = ("c3a_kernel",)

    @classmethod
    def wrap(cls, base: nn.Module, cfg: C3aConfig, path: str) -> C3aLinear:
        if kind := not_a_linear(base):
            raise unsupported(path, kind)
        return C3aLinear(base, cfg.block_sizes(path), cfg, path)

    @classmethod
    def layer_facts(cls, cfg: C3aConfig, path: str, fan_in_fan_out: bool) -> C3aFacts:
        if fan_in_fan_out:
            raise unsupported(path, "GPT-2's Conv1D")
        return C3aFacts()

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: C3aFacts) -> torch.Tensor:
        return weight + circulant_delta(parts["c3a_kernel"].to(weight.device))

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: C3aFacts) -> torch.Tensor:
        return weight - circulant_delta(parts["c3a_kernel"].to(weight.device))

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: C3aFacts) -> tuple[int | None, ...]:
        m, n, b = parts["c3a_kernel"].shape
        return m * b, n * b

    @classmethod
    def to_peft(cls, cfg: C3aConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "block_size": cfg.block_size,
            "block_size_pattern": dict(cfg.block_size_pattern),
            "init_weights": cfg.init_weights,
            "bias": "none",
        }

    @classmethod
    def from_peft(cls, peft: PeftC3aConfig, config_file: Path) -> C3aConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        return C3aConfig(
            method="c3a", block_size=peft.block_size, block_size_pattern=peft.block_size_pattern or {},
            init_weights="xavier_uniform" if peft.init_weights is None else peft.init_weights,
            target_modules=targets_from_peft(peft.target_modules, config_file),
            modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: C3aConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token: the input in fp32, its spectrum (in + 2 in / b values) and the mixed one (out + 2 out / b); per
        # layer: the kernel's spectrum (its size + 2 (out / b) (in / b)).
        in_features, out_features = linear_shape(layer.base_layer)
        m, n, b = layer.c3a_kernel.shape
        return 2 * in_features + out_features + 2 * (m + n), 2 * (m * n * b + 2 * m * n)

    @classmethod
    def describe(cls, cfg: C3aConfig) -> str:
        return f"C3A block_size={cfg.block_size}"


C3aLinear.method = C3a
