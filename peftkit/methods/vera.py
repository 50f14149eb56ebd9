"""VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", arXiv:2310.11454): LoRA's
low-rank update with A and B frozen at random and shared by every adapted layer; each layer trains two
vectors only, d (r) and b (out):

    y = W x + b * (B[:out, :] (d * (A[:, :in] x))),  i.e.  W' = W + diag(b) B[:out, :] diag(d) A[:, :in].

One pair A (r x max_in), B (max_out x r) serves layers of every shape: it is sized for the largest adapted
layer and each layer slices its top-left corner. Both are drawn from a generator seeded with
`projection_prng_key` (kaiming-uniform, A first, as HF peft), so an adapter may leave them out of its file
(`save_projection: false`) and have them drawn again on loading. b starts at 0 (the base model), d at
`d_initial`. Names as HF peft: `<path>.vera_lambda_b`, `<path>.vera_lambda_d`, and `base_model.vera_A`,
`base_model.vera_B` for the shared pair (held once, in `SharedTensors`: frozen buffers, never trained).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_conv1d, linear_shape, refuse_embedding
from peftkit.methods.target_filters import LayerTargets, PeftLayerTargets, filters_from_peft
from peftkit.section import TargetRegex

SEED_RANGE = {"ge": -(2**63), "lt": 2**64}  # what torch.Generator.manual_seed takes


class VeraConfig(LayerTargets):
    """VeRA: two trained vectors per layer around a frozen random low-rank pair shared by all layers."""

    method: Literal["vera"]
    r: int = Field(256, gt=0)
    """Rank of the shared random projections. Costs no trainable parameters beyond one d entry per layer and
    rank, so VeRA uses far higher ranks than LoRA (peft's default 256; the paper 1024 on Llama)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: Linear and Conv1D layers (and 4-bit/8-bit ones); embeddings are refused."""
    projection_prng_key: int = Field(0, **SEED_RANGE)
    """Seed of the generator that draws the shared projections A and B."""
    d_initial: float = 0.1
    """Initial value of every d entry; small values (<= 0.1) are recommended (paper, Table 6c)."""

    @field_validator("d_initial")
    @classmethod
    def _d_initial_not_zero(cls, value: float) -> float:
        """b starts at 0 and d at d_initial; each one's gradient is a multiple of the other, so with both at 0
        neither ever moves: the run would train nothing and say nothing of it."""
        if value == 0:
            raise ValueError("0 leaves d and b (which starts at 0) with no gradient, so the adapter would never "
                             "train; use the default 0.1 (values up to 0.1 are recommended)")
        return value
    save_projection: bool = True
    """Save A and B in the adapter (+ 2 x r x max(in, out) numbers); false: drawn again from the key on loading,
    which relies on torch's generator giving the same numbers on every machine."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input (peft's vera_dropout)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-sqrt(6 / fan_in), sqrt(6 / fan_in)), fan_in = shape[1]: kaiming-uniform with gain sqrt(2), as peft."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, key: int, shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """The shared A (r, max in) and B (max out, r) for layers of (in, out) `shapes`, drawn in that order."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    vera_a = kaiming_uniform((r, max(i for i, _ in shapes)), generator)
    return {"vera_A": vera_a, "vera_B": kaiming_uniform((max(o for _, o in shapes), r), generator)}


@dataclass(frozen=True)
class VeraFacts:
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""


def vera_delta(parts: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
    """diag(b) B[:out, :] diag(d) A[:, :in] in fp32, (out, in); out is b's length."""
    a, b = parts["vera_A"].float(), parts["vera_B"].float()
    lambda_b, lambda_d = parts["vera_lambda_b"].float(), parts["vera_lambda_d"].float()
    out_features = len(lambda_b)
    if a.shape[1] < in_features or b.shape[0] < out_features or len({a.shape[0], len(lambda_d), b.shape[1]}) != 1:
        raise PeftkitError(
            f"VeRA's shared projections vera_A {tuple(a.shape)} and vera_B {tuple(b.shape)} do not fit a layer of "
            f"{in_features} inputs, {out_features} outputs and rank {len(lambda_d)}. Export the adapter again."
        )
    return (lambda_b[:, None] * b[:out_features]) @ (lambda_d[:, None] * a[:, :in_features])


class VeraLinear(AdapterLayer):
    """VeRA around nn.Linear, transformers' Conv1D or a bitsandbytes linear layer; `shared` holds A and B."""

    def __init__(self, base_layer: nn.Module, r: int, d_initial: float, dropout: float) -> None:
        super().__init__(base_layer)
        self.in_features, out_features = linear_shape(base_layer)
        self.facts = VeraFacts(is_conv1d(base_layer))
        device = base_layer.weight.device
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features, device=device, dtype=torch.float32))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=device, dtype=torch.float32))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        lambda_b, lambda_d = self.vera_lambda_b, self.vera_lambda_d
        a = self.shared.vera_A[:, : self.in_features]
        b = self.shared.vera_B[: len(lambda_b)]
        update = lambda_b * F.linear(lambda_d * F.linear(self.vera_dropout(x.to(lambda_d.dtype)), a), b)
        return (result + update).to(result.dtype)


class PeftVeraConfig(PeftLayerTargets):
    """The fields of a VERA adapter_config.json that peftkit reads (defaults: peft's VeraConfig)."""

    r: int = Field(256, gt=0)
    projection_prng_key: int = Field(0, **SEED_RANGE)
    save_projection: bool = True
    vera_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    d_initial: float = 0.1
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


class Vera(Method):
    name = "vera"
    title = "VeRA"
    peft_type = "VERA"
    config = VeraConfig
    peft_config = PeftVeraConfig
    param_names = ("vera_lambda_b", "vera_lambda_d")
    # d is (r,); the shared A is (r, max in), B (max out, r).
    rank_dims = {"vera_lambda_d": 0, "vera_A": 0, "vera_B": 1}
    shared_names = ("vera_A", "vera_B")

    @classmethod
    def wrap(cls, base: nn.Module, cfg: VeraConfig, path: str) -> VeraLinear:
        refuse_embedding(base, path, "VeRA")
        return VeraLinear(base, cfg.r, cfg.d_initial, cfg.dropout)

    @classmethod
    def shared_tensors(cls, cfg: VeraConfig, shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        return projections(cfg.r, cfg.projection_prng_key, shapes)

    @classmethod
    def saves_shared(cls, cfg: VeraConfig) -> bool:
        return cfg.save_projection

    @classmethod
    def layer_facts(cls, cfg: VeraConfig, path: str, fan_in_fan_out: bool) -> VeraFacts:
        return VeraFacts(fan_in_fan_out)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: VeraFacts) -> torch.Tensor:
        return weight + _delta(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: VeraFacts) -> torch.Tensor:
        return weight - _delta(weight, parts, facts)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: VeraFacts) -> tuple[int | None, ...]:
        out_in = (len(parts["vera_lambda_b"]), None)  # any input size up to vera_A's: the layer slices A
        return out_in[::-1] if facts.fan_in_fan_out else out_in

    @classmethod
    def to_peft(cls, cfg: VeraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        # The exact module paths (peft_common) also make peft size the shared projections from the same layers.
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r,
            "projection_prng_key": cfg.projection_prng_key,
            "save_projection": cfg.save_projection,
            "vera_dropout": cfg.dropout,
            "d_initial": cfg.d_initial,
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "init_weights": True,
        }

    @classmethod
    def from_peft(cls, peft: PeftVeraConfig, config_file: Path) -> VeraConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        return VeraConfig(method="vera", r=peft.r, target_modules=targets_from_peft(peft.target_modules, config_file),
                          projection_prng_key=peft.projection_prng_key, d_initial=peft.d_initial,
                          save_projection=peft.save_projection, dropout=peft.vera_dropout,
                          modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: VeraConfig, layer: AdapterLayer) -> tuple[int, int]:
        # A x (r values) and, for b's gradient, B d A x (out values), per token: an upper bound (measured about
        # half of it on the tiny Llama).
        return cfg.r + linear_shape(layer.base_layer)[1], 0

    @classmethod
    def describe(cls, cfg: VeraConfig) -> str:
        return f"VeRA r={cfg.r}"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # b starts at 0: a nonzero b makes the update nonzero; d moves by a relative `std`. Trained b grow
        # large (the random pair is fixed), hence the factor.
        with torch.no_grad():
            layer.vera_lambda_b.copy_(torch.randn(layer.vera_lambda_b.shape, generator=generator) * std * 10)
            layer.vera_lambda_d.mul_(1 + torch.randn(layer.vera_lambda_d.shape, generator=generator) * std)


def _delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: VeraFacts) -> torch.Tensor:
    """VeRA's update in the base weight's layout ((in, out) for Conv1D), on its device."""
    in_features = weight.shape[0] if facts.fan_in_fan_out else weight.shape[1]
    delta = vera_delta(parts, in_features).to(weight.device)
    return delta.T if facts.fan_in_fan_out else delta


VeraLinear.method = Vera
