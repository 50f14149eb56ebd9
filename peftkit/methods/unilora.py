"""Uni-LoRA (Li et al. 2025, "Uni-LoRA: One Vector is All You Need", arXiv:2506.00799): every entry of every adapted
layer's LoRA factors is one entry of a single trained vector theta_d (`theta_d_length` numbers for the whole model),
times a fixed scale:

    A[k, j] = theta_d[idx_A[k, j]] * s_A[k, j]    (r x in)
    B[p, k] = theta_d[idx_B[p, k]] * s_B[p, k]    (out x r)
    y = W x + B A x  (no scaling)

The indices are peft 0.21's balanced assignment of the flattened factors of all the layers, in model order (each layer's
A then its B), to theta_d's entries: each entry taken floor(D / d) or ceil(D / d) times, shuffled by numpy's generator
seeded with `proj_seed`; each scale is 1 / sqrt(how often its entry is taken). They follow from the settings and the
layers' shapes alone, so peft's file leaves them out unless `save_indices` (then `<path>.unilora_indices_A`/`_B`, int64,
and `<path>.unilora_scales_A`/`_B`, in the base weight's dtype, as peft computes with them); theta_d is saved once as
`base_model.unilora_theta_d` (`SharedTensors`, `shared_trained`). Initialised as peft: theta_d U(-bound, bound) (or
N(0, 1) with init_weights false) from torch's generator, then each layer's two throw-away randint draws peft makes: one
seed gives peft's theta_d, and the generator ends where peft's does. Not the base model at init (peft's neither).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import REEXPORT, Method, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_conv1d, linear_shape, refuse_embedding
from peftkit.methods.supertuning import DEFAULTS as LORA_DEFAULTS
from peftkit.methods.target_filters import LayerTargets, NoDefault, PeftLayerTargets, filters_from_peft
from peftkit.section import TargetRegex

THETA = "unilora_theta_d"
INDEX_NAMES = ("unilora_indices_A", "unilora_indices_B")
SCALE_NAMES = ("unilora_scales_A", "unilora_scales_B")
DEFAULTS = LORA_DEFAULTS | {"gpt2": ["c_attn"]}
"""peft 0.21's TRANSFORMERS_MODELS_TO_UNILORA_TARGET_MODULES_MAPPING (LoRA's) for the architectures peftkit is tested on
and their close relatives."""


class UniLoraConfig(LayerTargets):
    """Uni-LoRA: LoRA factors whose every entry is a scaled entry of one trained vector shared by all layers."""

    method: Literal["unilora"]
    r: int = Field(4, gt=0)
    """Rank of the update B A (peft's default 4)."""
    theta_d_length: int = Field(256, gt=0)
    """Length of the one trained vector theta_d: the adapter's trainable parameters, whatever the model."""
    proj_seed: int = Field(42, ge=0)
    """Seed of numpy's generator that assigns theta_d's entries to the factors' entries (fixed, not trained)."""
    unilora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    init_theta_d_bound: float = Field(0.02, gt=0)
    """theta_d starts at U(-bound, bound) (not 0, which would leave it without gradient)."""
    init_weights: bool = True
    """false (debugging, as peft): theta_d starts at N(0, 1) instead."""
    save_indices: bool = False
    """Also export each layer's indices and scales (peft's save_indices): a larger file, which does not depend on how
    they are generated."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex | None = None
    """Module-name suffixes, `all-linear` or {regex: ...}; null: peft's default for the architecture (q_proj, v_proj
    for Llama). Linear, GPT-2's Conv1D and 4-bit/8-bit layers."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""


def generate_index(count: int, length: int, seed: int) -> torch.Tensor:
    """peft's balanced assignment of `count` factor entries to `length` theta_d entries (UniLoraModel.generate_index):
    each entry count // length times, `count % length` distinct ones once more, shuffled by numpy's generator."""
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(length), count // length)
    if count % length:
        data = np.concatenate([data, rng.choice(length, size=count % length, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long)


def factors(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) in fp32 from the shared theta_d and the layer's indices and scales."""
    theta = parts[THETA].float()
    a = theta[parts["unilora_indices_A"].long()] * parts["unilora_scales_A"].float()
    b = theta[parts["unilora_indices_B"].long()] * parts["unilora_scales_B"].float()
    return a, b


@dataclass(frozen=True)
class UniLoraFacts:
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""


class UniLoraLinear(AdapterLayer):
    """Uni-LoRA around nn.Linear, transformers' Conv1D or a bitsandbytes linear layer; `shared` holds theta_d. Its
    indices and scales are buffers, set for all the layers at once (`UniLora.shared_from_layers`)."""

    def __init__(self, base_layer: nn.Module, cfg: UniLoraConfig) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        self.facts = UniLoraFacts(is_conv1d(base_layer))
        self.saves_indices = cfg.save_indices
        device = base_layer.weight.device
        for name, shape in zip(INDEX_NAMES, ((cfg.r, in_features), (out_features, cfg.r))):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.long, device=device), persistent=False)
        dtype = base_layer.weight.dtype if base_layer.weight.dtype.is_floating_point else torch.float32
        for name, shape in zip(SCALE_NAMES, ((cfg.r, in_features), (out_features, cfg.r))):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.unilora_dropout = nn.Dropout(cfg.unilora_dropout) if cfg.unilora_dropout > 0 else nn.Identity()

    def buffers_by_name(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in INDEX_NAMES + SCALE_NAMES}

    def adapter_params(self) -> dict[str, torch.Tensor]:
        """No trained tensor of its own (theta_d is shared); the indices and scales where the file keeps them."""
        return super().adapter_params() | (self.buffers_by_name() if self.saves_indices else {})

    def parts(self) -> dict[str, torch.Tensor]:
        """The tensors a merge takes: the indices and scales too, saved or not."""
        return super().parts() | self.buffers_by_name()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        theta = self.shared.unilora_theta_d
        # peft's order of operations: the factors in theta's dtype (times scales in the weight's), x cast to it, the
        # base output plus the update, cast once to the input's dtype
        a = theta[self.unilora_indices_A] * self.unilora_scales_A
        b = theta[self.unilora_indices_B] * self.unilora_scales_B
        update = F.linear(F.linear(self.unilora_dropout(x.to(theta.dtype)), a), b)
        return (result + update).to(x.dtype)


class PeftUniLoraConfig(PeftLayerTargets):
    """The fields of a UNILORA adapter_config.json that peftkit reads (defaults: peft 0.21's UniLoraConfig)."""

    r: int = Field(4, gt=0)
    theta_d_length: int = Field(256, gt=0)
    proj_seed: int = Field(42, ge=0)
    unilora_dropout: float = Field(0.0, ge=0.0, le=1.0)
    init_theta_d_bound: float = Field(0.02, gt=0)
    init_weights: bool = True
    save_indices: bool = False
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


class UniLora(Method):
    name = "unilora"
    title = "Uni-LoRA"
    peft_type = "UNILORA"
    config = UniLoraConfig
    peft_config = PeftUniLoraConfig
    param_names = INDEX_NAMES + SCALE_NAMES
    untrained_names = INDEX_NAMES + SCALE_NAMES
    integer_names = INDEX_NAMES
    rank_dims = {"unilora_indices_A": 0, "unilora_indices_B": 1, "unilora_scales_A": 0, "unilora_scales_B": 1}
    shared_names = (THETA,)
    shared_trained = (THETA,)

    @classmethod
    def resolve(cls, cfg: UniLoraConfig, model_type: str | None) -> UniLoraConfig:
        if cfg.target_modules is not None:
            return cfg
        if model_type not in DEFAULTS:
            raise NoDefault("target_modules", "Uni-LoRA", model_type, DEFAULTS, "name the modules",
                            "target_modules: [q_proj, v_proj] for a Llama-like model")
        return cfg.model_copy(update={"target_modules": DEFAULTS[model_type]})

    @classmethod
    def wrap(cls, base: nn.Module, cfg: UniLoraConfig, path: str) -> UniLoraLinear:
        refuse_embedding(base, path, "Uni-LoRA")
        return UniLoraLinear(base, cfg)

    @classmethod
    def shared_tensors(cls, cfg: UniLoraConfig, shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        return {}  # theta_d is drawn at injection (`shared_from_layers`) and always saved: a merge never draws it

    @classmethod
    def shared_from_layers(cls, cfg: UniLoraConfig, layers: list[AdapterLayer]) -> dict[str, torch.Tensor]:
        """theta_d, drawn as peft draws it before its layers, then the layers' randint draws peft makes and
        overwrites (the generator ends where peft's does); and every layer's indices and scales set."""
        meta = layers[0].base_layer.weight.device.type == "meta"
        length = cfg.theta_d_length
        if meta:  # (the memory estimate: nothing to draw)
            return {THETA: torch.zeros(length, device="meta")}
        theta = (torch.empty(length).uniform_(-cfg.init_theta_d_bound, cfg.init_theta_d_bound) if cfg.init_weights
                 else torch.randn(length))
        for layer in layers:
            torch.randint(0, length, tuple(layer.unilora_indices_A.shape), dtype=torch.long)
            torch.randint(0, length, tuple(layer.unilora_indices_B.shape), dtype=torch.long)
        set_indices(cfg, layers)
        return {THETA: theta}

    @classmethod
    def layer_facts(cls, cfg: UniLoraConfig, path: str, fan_in_fan_out: bool) -> UniLoraFacts:
        return UniLoraFacts(fan_in_fan_out)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: UniLoraFacts) -> torch.Tensor:
        return weight + _delta(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: UniLoraFacts) -> torch.Tensor:
        return weight - _delta(weight, parts, facts)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: UniLoraFacts) -> tuple[int | None, ...]:
        out_in = (parts["unilora_indices_B"].shape[0], parts["unilora_indices_A"].shape[1])
        return out_in[::-1] if facts.fan_in_fan_out else out_in

    @classmethod
    def to_peft(cls, cfg: UniLoraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r, "proj_seed": cfg.proj_seed, "theta_d_length": cfg.theta_d_length,
            "unilora_dropout": cfg.unilora_dropout, "fan_in_fan_out": fan_in_fan_out, "bias": "none",
            "init_theta_d_bound": cfg.init_theta_d_bound, "init_weights": cfg.init_weights,
            "save_indices": cfg.save_indices,
        }

    @classmethod
    def from_peft(cls, peft: PeftUniLoraConfig, config_file: Path) -> UniLoraConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        if peft.unilora_dropout >= 1:
            raise PeftkitError(f"{config_file}: unilora_dropout {peft.unilora_dropout} drops every input. {REEXPORT}")
        return UniLoraConfig(
            method="unilora", r=peft.r, theta_d_length=peft.theta_d_length, proj_seed=peft.proj_seed,
            unilora_dropout=peft.unilora_dropout, init_theta_d_bound=peft.init_theta_d_bound,
            init_weights=peft.init_weights, save_indices=peft.save_indices,
            target_modules=targets_from_peft(peft.target_modules, config_file) if peft.target_modules else None,
            modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def from_peft_file(cls, state: dict[str, torch.Tensor], peft: PeftUniLoraConfig, file: Path
                       ) -> dict[str, torch.Tensor]:
        """Refuse saved indices outside theta_d (the forward would index past it)."""
        for key, tensor in state.items():
            if key.endswith(INDEX_NAMES) and tensor.numel() and (tensor.min() < 0 or tensor.max() >= peft.theta_d_length):
                raise PeftkitError(f"{file}: {key} holds indices up to {int(tensor.max())}, outside theta_d's "
                                   f"{peft.theta_d_length} entries (theta_d_length). {REEXPORT}")
        return state

    @classmethod
    def to_peft_file(cls, state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        return state  # (the layers' indices and scales are in `state` only with save_indices: adapter_params)

    @classmethod
    def kept_for_backward(cls, cfg: UniLoraConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token the rank-r intermediate and the layer's input (its fp32 copy; with dropout, the dropped copy and
        # its mask); per layer the gathered theta_d entries and the scaled factors, A and B (2 r (in + out)), and
        # the scales the product keeps (their own buffers, counted once more as an upper bound).
        in_features, out_features = linear_shape(layer.base_layer)
        mask = in_features if cfg.unilora_dropout else 0
        return cfg.r + in_features + mask, 3 * cfg.r * (in_features + out_features)

    @classmethod
    def describe(cls, cfg: UniLoraConfig) -> str:
        return f"Uni-LoRA r={cfg.r}, theta_d of {cfg.theta_d_length}"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # theta_d at the scale of a trained vector (its U(+-0.02) start leaves the update near 0); the indices and
        # scales are fixed by the settings, and stay.
        with torch.no_grad():
            theta = layer.shared.unilora_theta_d
            theta.copy_(torch.randn(theta.shape, generator=generator).to(theta.device) * std * 3)


def set_indices(cfg: UniLoraConfig, layers: list[AdapterLayer]) -> None:
    """Each layer's indices (its slice of peft's assignment: A's entries, then B's, layer after layer) and scales
    (1 / sqrt of how often each theta_d entry is taken, over all the layers), as peft's
    `_assign_unilora_indices_and_scales`."""
    sizes = [n for layer in layers for n in (layer.unilora_indices_A.numel(), layer.unilora_indices_B.numel())]
    indices = generate_index(sum(sizes), cfg.theta_d_length, cfg.proj_seed)
    counts = torch.bincount(indices, minlength=cfg.theta_d_length)
    inv_sqrt = torch.zeros(cfg.theta_d_length, dtype=torch.float32)
    inv_sqrt[counts > 0] = counts[counts > 0].float().rsqrt()
    chunks = iter(indices.split(sizes))
    for layer in layers:
        for index_name, scale_name in zip(INDEX_NAMES, SCALE_NAMES):
            index = getattr(layer, index_name)
            chunk = next(chunks).view(index.shape)
            index.copy_(chunk)
            scale = getattr(layer, scale_name)
            scale.copy_(inv_sqrt[chunk].to(scale.dtype))


def _delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: UniLoraFacts) -> torch.Tensor:
    """Uni-LoRA's update B A in the base weight's layout ((in, out) for Conv1D), on its device."""
    a, b = factors({k: t.to(weight.device) for k, t in parts.items()})
    delta = b @ a
    return delta.T if facts.fan_in_fan_out else delta


UniLoraLinear.method = UniLora
