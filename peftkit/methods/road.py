"""RoAd, 2D rotary adaptation (Liao et al. 2024, arXiv:2409.00119): each layer's output y = W x + b is split into
groups of `group_size` features, and feature i of a group's first half is paired with feature i of its second half;
each pair is rotated by its own trained angle and scaled by its own trained scale,

    y'_i = a_i cos(t_i) y_i - a_i sin(t_i) y_j,   y'_j = a_j cos(t_j) y_j + a_j sin(t_j) y_i    (j = i + group/2),

a block-diagonal matrix R of 2 x 2 blocks applied to the output: y' = R (W x + b). Merged, W' = R W and b' = R b;
unmerged, each 2 x 2 block is inverted (R need not be orthogonal: the scales). `variant` says how many numbers a pair
has: road_1 one angle and one scale per pair (out / 2 of each), road_2 one per feature (out), road_4 separate ones for
the cosine and the sine (2 out). The angles start at 0 and the scales at 1: the base model.

Names, shapes and numerics as HF peft 0.21's `RoadLayer`: `<path>.road_theta` and `<path>.road_alpha`, 1-D, in peft's
order (road_1: each group's out / 2 numbers used for both halves; road_4: per group the cosine's group_size numbers,
then the sine's). peft computes in the adapter's dtype (fp32) and casts back once, as here. peft's RoAd adapts
nn.Linear (and bitsandbytes) layers only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, PeftConfigBase, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, linear_shape, not_a_linear
from peftkit.section import AdapterSection, TargetRegex

Variant = Literal["road_1", "road_2", "road_4"]
SIZE = {"road_1": 0.5, "road_2": 1, "road_4": 2}
"""Numbers of road_theta (and of road_alpha) per output feature, by variant."""


def _even_group(value: int) -> int:
    if value <= 0 or value % 2:
        raise ValueError(f"{value} does not split into two halves; give an even group size (peft's default: 64)")
    return value


class RoadConfig(AdapterSection):
    """RoAd: a trained 2D rotation and scale of each pair of a target layer's output features."""

    method: Literal["road"]
    variant: Variant = "road_1"
    """road_1: one angle and scale per pair of outputs (out trained numbers a layer); road_2: per output (2 out);
    road_4: separate angles and scales for the cosine and the sine (4 out)."""
    group_size: int = 64
    """Outputs are paired within groups of this size (feature i with i + group_size / 2); even, and it must divide
    every target's output size. It does not change what trains, only the layout (peft: 64 suits vLLM's kernels)."""
    init_weights: bool = True
    """true: angles 0 and scales 1, the base model; false (debugging, as peft): angles ~ N(0, 0.5^2), scales ~
    N(1, 0.5^2)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: `all-linear`, module-name suffixes, or {regex: ...}. nn.Linear and 4-bit/8-bit layers only."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    _group = field_validator("group_size")(lambda value: _even_group(value))


@dataclass(frozen=True)
class RoadFacts:
    variant: str = "road_1"
    group_size: int = 64


def columns(theta: torch.Tensor, alpha: torch.Tensor, facts: RoadFacts) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, s), one per output feature: y' = c * y + s * rotate_half(y), from peft's layout of the parameters."""
    half = facts.group_size // 2
    if facts.variant == "road_1":  # each group's numbers serve both its halves
        theta = theta.reshape(-1, half).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, half).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if facts.variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    theta, alpha = theta.reshape(-1, 2, facts.group_size), alpha.reshape(-1, 2, facts.group_size)
    return (alpha[:, 0] * theta[:, 0].cos()).flatten(), (alpha[:, 1] * theta[:, 1].sin()).flatten()


def rotate_half(y: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group of the last dimension: (-second half, first half)."""
    grouped = y.reshape(*y.shape[:-1], -1, 2, group_size // 2)
    return torch.stack((-grouped[..., 1, :], grouped[..., 0, :]), dim=-2).reshape(y.shape)


def swap_halves(v: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group of the last dimension: (second half, first half)."""
    return v.reshape(*v.shape[:-1], -1, 2, group_size // 2).flip(-2).reshape(v.shape)


def rotate(y: torch.Tensor, parts: dict[str, torch.Tensor], facts: RoadFacts, inverse: bool = False) -> torch.Tensor:
    """R y over the last dimension of fp32 `y` (R^-1 y with `inverse`: each pair's 2 x 2 block [[c_i, -s_i], [s_j,
    c_j]] inverted, [[c_j, s_i], [-s_j, c_i]] / (c_i c_j + s_i s_j))."""
    theta, alpha = (parts[n].float().to(y.device) for n in ("road_theta", "road_alpha"))
    if len(theta) != SIZE[facts.variant] * y.shape[-1]:
        raise PeftkitError(f"The adapter does not fit this model: its RoAd angles ({len(theta)}, {facts.variant}) are "
                           f"not those of a layer with {y.shape[-1]} outputs. It was trained on a different base model.")
    c, s = columns(theta, alpha, facts)
    if not inverse:
        return y * c + rotate_half(y, facts.group_size) * s
    c_other = swap_halves(c, facts.group_size)
    det = c * c_other + s * swap_halves(s, facts.group_size)
    return (y * c_other - rotate_half(y, facts.group_size) * s) / det


def refuse_layer(path: str, base: nn.Module, group_size: int) -> None:
    """What RoAd cannot adapt: a layer other than nn.Linear (peft's RoAd has none), or one whose outputs the groups do
    not divide (peft refuses it too)."""
    if kind := not_a_linear(base):
        raise PeftkitError(f"adapter.target_modules: '{path}' is {kind}; RoAd rotates the outputs of nn.Linear (and "
                           "4-bit/8-bit) layers only, as peft 0.21's RoAd, which could not load the adapter otherwise. "
                           "Target Linear layers, or use LoRA for this model.")
    out_features = linear_shape(base)[1]
    if out_features % group_size:
        raise PeftkitError(f"adapter.group_size: {group_size} does not divide the {out_features} outputs of '{path}' "
                           "(peft refuses it too); give a group size that divides every target's outputs (an even "
                           "divisor of the hidden size), or leave this layer out of target_modules.")


class RoadLinear(AdapterLayer):
    """RoAd around nn.Linear or a bitsandbytes linear layer: the base layer runs, then its output is rotated."""

    def __init__(self, base_layer: nn.Module, cfg: RoadConfig) -> None:
        super().__init__(base_layer)
        self.facts = RoadFacts(cfg.variant, cfg.group_size)
        size = int(linear_shape(base_layer)[1] * SIZE[cfg.variant])
        device = base_layer.weight.device
        where = draw_device(device)
        theta, alpha = torch.zeros(size, device=where), torch.ones(size, device=where)
        if not cfg.init_weights:  # peft's draws, in its order, from torch's global generator
            nn.init.normal_(theta, mean=0.0, std=0.5)
            nn.init.normal_(alpha, mean=1.0, std=0.5)
        self.road_theta = nn.Parameter(theta.to(device))  # PEFT's keys `road_theta`, `road_alpha`
        self.road_alpha = nn.Parameter(alpha.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        parts = {"road_theta": self.road_theta, "road_alpha": self.road_alpha}
        return rotate(result.to(self.road_theta.dtype), parts, self.facts).to(result.dtype)


class PeftRoadConfig(PeftConfigBase):
    """The fields of a ROAD adapter_config.json that peftkit reads (defaults: peft 0.21's RoadConfig)."""

    variant: Variant = "road_1"
    group_size: int = 64
    init_weights: bool = True

    _group = field_validator("group_size")(lambda value: _even_group(value))


class Road(Method):
    name = "road"
    title = "RoAd"
    peft_type = "ROAD"
    config = RoadConfig
    peft_config = PeftRoadConfig
    param_names = ("road_theta", "road_alpha")

    @classmethod
    def wrap(cls, base: nn.Module, cfg: RoadConfig, path: str) -> RoadLinear:
        refuse_layer(path, base, cfg.group_size)
        return RoadLinear(base, cfg)

    @classmethod
    def layer_facts(cls, cfg: RoadConfig, path: str, fan_in_fan_out: bool) -> RoadFacts:
        if fan_in_fan_out:
            raise PeftkitError(f"'{path}' is GPT-2's Conv1D; RoAd adapts nn.Linear layers only, as peft's.")
        return RoadFacts(cfg.variant, cfg.group_size)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: RoadFacts) -> torch.Tensor:
        return rotate(weight.T, parts, facts).T  # R W: each input's column of outputs rotated

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: RoadFacts) -> torch.Tensor:
        return rotate(weight.T, parts, facts, inverse=True).T

    @staticmethod
    def merge_bias(bias: torch.Tensor, parts: dict[str, torch.Tensor], facts: RoadFacts) -> torch.Tensor:
        return rotate(bias, parts, facts)

    @staticmethod
    def unmerge_bias(bias: torch.Tensor, parts: dict[str, torch.Tensor], facts: RoadFacts) -> torch.Tensor:
        return rotate(bias, parts, facts, inverse=True)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: RoadFacts) -> tuple[int | None, ...]:
        return int(len(parts["road_theta"]) / SIZE[facts.variant]), None

    @classmethod
    def to_peft(cls, cfg: RoadConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "variant": cfg.variant, "group_size": cfg.group_size, "init_weights": cfg.init_weights}

    @classmethod
    def from_peft(cls, peft: PeftRoadConfig, config_file: Path) -> RoadConfig:
        refuse_unsupported(peft, config_file, ())
        return RoadConfig(method="road", variant=peft.variant, group_size=peft.group_size,
                          init_weights=peft.init_weights,
                          target_modules=targets_from_peft(peft.target_modules, config_file),
                          modules_to_save=peft.modules_to_save or [])

    @classmethod
    def kept_for_backward(cls, cfg: RoadConfig, layer: AdapterLayer) -> tuple[int, int]:
        # The output in fp32 and its rotated half, per token (the angles' and scales' gradients); the cosines, sines
        # and their products with the scales, per layer.
        out_features = linear_shape(layer.base_layer)[1]
        return 2 * out_features, 8 * out_features

    @classmethod
    def describe(cls, cfg: RoadConfig) -> str:
        return f"RoAd {cfg.variant}, groups of {cfg.group_size}"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        """Angles of order `std` and scales near 1 (scales near 0 would make R singular: no unmerge)."""
        with torch.no_grad():
            layer.road_theta.copy_(torch.randn(layer.road_theta.shape, generator=generator) * std * 3)
            layer.road_alpha.copy_(1 + torch.randn(layer.road_alpha.shape, generator=generator) * std)


RoadLinear.method = Road
