"""PEANuT (peft's PEANUT): a weight-aware nonlinear update. Each layer's update is computed from its own frozen weight
by a small trained network: the weight's rows (one per input feature, W^T: in x out) go through A (out -> r), `depth`
encoder layers and `depth` decoder layers with residual connections (r -> r), each followed by the activation, and B
(r -> out):

    h_0 = act(W^T A^T),  h_i = act(h_{i-1} E_i^T),  g = h_depth;  g = act(g D_j^T) + h_{depth-j}  (j = 1 .. depth)
    W' = W + scaling (g B^T)^T

B starts at 0 (the base model) and A, the encoders and the decoders Kaiming-uniform, peft's draws in peft's order.
Names and shapes as HF peft 0.21's `PeanutLayer`: `<path>.peanut_A.weight` (r, out), `<path>.peanut_B.weight` (out, r),
`<path>.peanut_encoders.<i>.weight` and `<path>.peanut_decoders.<i>.weight` (r, r). The update is computed in fp32
from the weight each forward and x (in fp32) multiplied by it is added to the base output, cast once (peft's
numerics); merged, W + the update of the weight before the merge, which the layer keeps for the unmerge (peft's). A
4-bit/8-bit base's update is computed from its dequantized weight (peft's PEANuT cannot run on one).
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
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, KeptWeightLayer, dense_weight, linear_shape, not_a_linear
from peftkit.methods.target_filters import (LORA_TARGETS, ExcludedTargets, LayerTargets, NoDefault,
                                             PeftExcludedTargets, PeftLayerTargets, filters_from_peft)
from peftkit.section import TargetRegex

MAX_DEPTH = 32
"""The deepest encoder/decoder stack a recipe or file may have (its tensors' names are listed in `param_names`)."""


def _activation(name: str) -> str:
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"{name!r} is no activation transformers has; use one of {', '.join(sorted(ACT2FN))} "
                         "(peft's default: relu)")
    return name


class PeanutConfig(LayerTargets, ExcludedTargets):
    """PEANuT: each layer's update computed from its own weight by a small trained network."""

    method: Literal["peanut"]
    r: int = Field(32, gt=0)
    """Width of the network's hidden layers (peft's default 32)."""
    depth: int = Field(0, ge=0, le=MAX_DEPTH)
    """Encoder and decoder layers each, between A and B (0: A and B alone)."""
    act_fn: str = "relu"
    """The activation after every layer but B: a name of transformers' ACT2FN (relu, gelu, silu, ...)."""
    scaling: float = 1.0
    """The update is multiplied by it."""
    init_weights: bool = True
    """true: B starts at 0, the base model (peft's default); false: Kaiming-uniform, as A's (peft: for tests)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex | None = None
    """As LoRA's; null: peft's default for the architecture (q_proj, v_proj for Llama). nn.Linear (and 4-bit/8-bit)
    layers only."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    _act = field_validator("act_fn")(lambda name: _activation(name))


@dataclass(frozen=True)
class PeanutFacts:
    act_fn: str = "relu"
    scaling: float = 1.0


def peanut_delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: PeanutFacts) -> torch.Tensor:
    """The (out, in) fp32 update of the fp32 (out, in) `weight` (peft's `_compute_delta_weight`)."""
    from transformers.activations import ACT2FN

    act = ACT2FN[facts.act_fn]
    device = weight.device
    tensor = lambda name: parts[name].float().to(device)  # noqa: E731
    depth = sum(1 for name in parts if name.startswith("peanut_encoders."))
    h = act(weight.T.float() @ tensor("peanut_A.weight").T)
    residuals = []
    for i in range(depth):
        residuals.append(h)
        h = act(F.linear(h, tensor(f"peanut_encoders.{i}.weight")))
    for i in range(depth):
        h = act(F.linear(h, tensor(f"peanut_decoders.{i}.weight"))) + residuals[depth - 1 - i]
    return (F.linear(h, tensor("peanut_B.weight")) * facts.scaling).T


class PeanutLinear(KeptWeightLayer):
    """PEANuT around nn.Linear or a bitsandbytes linear layer: base output + x times the update of the weight. The
    in-place merge keeps the weight before it for the unmerge (the update is a nonlinear function of it: peft keeps it
    too)."""

    def __init__(self, base_layer: nn.Module, cfg: PeanutConfig) -> None:
        super().__init__(base_layer)
        out_features = linear_shape(base_layer)[1]
        self.facts = PeanutFacts(cfg.act_fn, cfg.scaling)
        device = base_layer.weight.device
        where = draw_device(device)
        # peft's modules, built in its order (their constructors draw from torch's generator too), then its init
        self.peanut_A = nn.Linear(out_features, cfg.r, bias=False, device=where)
        self.peanut_encoders = nn.ModuleList(nn.Linear(cfg.r, cfg.r, bias=False, device=where) for _ in range(cfg.depth))
        self.peanut_decoders = nn.ModuleList(nn.Linear(cfg.r, cfg.r, bias=False, device=where) for _ in range(cfg.depth))
        self.peanut_B = nn.Linear(cfg.r, out_features, bias=False, device=where)
        for layer in (self.peanut_A, *self.peanut_encoders, *self.peanut_decoders):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
        if cfg.init_weights:
            nn.init.zeros_(self.peanut_B.weight)
        else:
            nn.init.kaiming_uniform_(self.peanut_B.weight, a=math.sqrt(5))
        for module in (self.peanut_A, self.peanut_encoders, self.peanut_decoders, self.peanut_B):
            module.to(device)

    def delta(self) -> torch.Tensor:
        """The update of the base weight as it is now (dequantized, for a 4-bit/8-bit base), with its graph."""
        parts = {n: p for n, p in self.adapter_params().items()}
        return peanut_delta(dense_weight(self.base_layer), parts, self.facts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        delta = self.delta()
        return result + F.linear(x.to(delta.dtype), delta).to(result.dtype)


class PeftPeanutConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of a PEANUT adapter_config.json that peftkit reads (defaults: peft 0.21's PeanutConfig)."""

    r: int = Field(32, gt=0)
    depth: int = Field(0, ge=0, le=MAX_DEPTH)
    act_fn: str = "relu"
    scaling: float = 1.0
    init_weights: bool = True

    _act = field_validator("act_fn")(lambda name: _activation(name))


def unsupported(path: str, kind: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is {kind}; PEANuT adapts nn.Linear (and 4-bit/8-bit) layers only, as peft "
        "0.21's PEANuT, which could not load the adapter otherwise. Target Linear layers, or use LoRA for this model.")


class Peanut(Method):
    name = "peanut"
    title = "PEANuT"
    peft_type = "PEANUT"
    config = PeanutConfig
    peft_config = PeftPeanutConfig
    param_names = ("peanut_A.weight", "peanut_B.weight",
                   *(f"peanut_{kind}.{i}.weight" for kind in ("encoders", "decoders") for i in range(MAX_DEPTH)))
    rank_dims = {"peanut_A.weight": 0, "peanut_B.weight": 1}

    @classmethod
    def resolve(cls, cfg: PeanutConfig, model_type: str | None) -> PeanutConfig:
        if cfg.target_modules is not None:
            return cfg
        if model_type not in LORA_TARGETS:
            raise NoDefault("target_modules", "PEANuT", model_type, LORA_TARGETS, "name the modules",
                            "target_modules: [q_proj, v_proj] for a Llama-like model")
        return cfg.model_copy(update={"target_modules": LORA_TARGETS[model_type]})

    @classmethod
    def wrap(cls, base: nn.Module, cfg: PeanutConfig, path: str) -> PeanutLinear:
        if kind := not_a_linear(base):
            raise unsupported(path, kind)
        return PeanutLinear(base, cfg)

    @classmethod
    def layer_facts(cls, cfg: PeanutConfig, path: str, fan_in_fan_out: bool) -> PeanutFacts:
        if fan_in_fan_out:
            raise unsupported(path, "GPT-2's Conv1D")
        return PeanutFacts(cfg.act_fn, cfg.scaling)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: PeanutFacts) -> torch.Tensor:
        return weight + peanut_delta(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: PeanutFacts) -> torch.Tensor:
        raise PeftkitError("A PEANuT merge cannot be undone from the merged weight alone (its update is a nonlinear "
                           "function of the weight before it): unmerge the layer that merged it, which kept it.")

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: PeanutFacts) -> tuple[int | None, ...]:
        return parts["peanut_B.weight"].shape[0], None

    @classmethod
    def to_peft(cls, cfg: PeanutConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r, "depth": cfg.depth, "act_fn": cfg.act_fn, "scaling": cfg.scaling,
            "init_weights": cfg.init_weights}

    @classmethod
    def from_peft(cls, peft: PeftPeanutConfig, config_file: Path) -> PeanutConfig:
        refuse_unsupported(peft, config_file, ())
        return PeanutConfig(method="peanut", r=peft.r, depth=peft.depth, act_fn=peft.act_fn, scaling=peft.scaling,
                            init_weights=peft.init_weights,
                            target_modules=targets_from_peft(peft.target_modules, config_file),
                            modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: PeanutConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token the input in fp32 (the update's gradient); per layer the update (out x in) and the network's
        # activations over the weight's in rows: A's output, each encoder's and decoder's (before and after the
        # activation), B's input.
        in_features, out_features = linear_shape(layer.base_layer)
        return in_features, out_features * in_features * 2 + in_features * cfg.r * (4 * cfg.depth + 3)

    @classmethod
    def forward_scratch(cls, cfg: PeanutConfig, layer: AdapterLayer) -> int:
        in_features, out_features = linear_shape(layer.base_layer)
        return in_features * out_features  # the dequantized or fp32 copy of the weight

    @classmethod
    def describe(cls, cfg: PeanutConfig) -> str:
        return f"PEANuT r={cfg.r}, depth {cfg.depth}"


PeanutLinear.method = Peanut
