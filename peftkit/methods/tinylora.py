"""TinyLoRA (Morris et al. 2026, "Learning to Reason in 13 Parameters", arXiv:2602.04118): LoRA-XS's frozen SVD
factors of each target's weight around an r x r matrix that is itself a tiny trained vector v (u numbers) times
fixed random tensors P (u, r, r):

    W = U S V^T,  A = sqrt(S_r) V_r^T (r, in),  B = U_r sqrt(S_r) (out, r),  R = sum_i v_i P_i,  W' = W + B R A.

A and B come from the base weight (computed in fp32 and rounded through its dtype, as HF peft; saved in the file),
P from a generator seeded with `projection_seed` plus the layer's index among the targets (saved unless
`save_projection: false`). v is shared by groups of consecutive layers (`weight_tying`: 0 a v per layer, 1 one v for
all). Embeddings too: a token's row of B R A added to its lookup. Names as HF peft: `<path>.tinylora_A`,
`<path>.tinylora_B`, `<path>.tinylora_P` and one `base_model.tinylora_v.<group>` per group; in the model each layer
holds its group's v as `<path>.tinylora_v` (one parameter object per group), which `to_peft_file` and `layer_state`
convert, since a group follows from the layers' order, which only the model knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, from_conv1d, is_conv1d, is_quantized, linear_shape
from peftkit.methods.target_filters import LayerTargets, PeftLayerTargets, filters_from_peft
from peftkit.methods.vera import SEED_RANGE
from peftkit.section import TargetRegex

PEFT_PREFIX, SHARED_PREFIX = "base_model.model.", "base_model."
V_KEY = "tinylora_v"


class TinyLoraConfig(LayerTargets):
    """TinyLoRA: each target's frozen SVD factors around R = sum_i v_i P_i, v a few trained numbers."""

    method: Literal["tinylora"]
    r: int = Field(2, gt=0)
    """Rank of the frozen SVD factors (the paper's 2); a layer narrower than r takes its own smaller side."""
    u: int = Field(64, gt=0)
    """Trained numbers per group (v's length); 1 to 13 for the paper's extreme settings."""
    weight_tying: float = Field(0.0, ge=0.0, le=1.0)
    """Share of v across consecutive targets: 0, a v per layer; 1, one v for all; between, round(n (1 - t)) groups."""
    projection_seed: int = Field(42, **SEED_RANGE)
    """Seed of the random P of the first target; the i-th target's is seed + i."""
    save_projection: bool = True
    """Save each layer's P in the adapter; false: drawn again from the seed on loading."""
    init_v_bound: float = 0.02
    """Bound of init_weights "uniform": v ~ U(-bound, bound)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: Linear and Conv1D layers (4-bit/8-bit Linear ones: the SVD of their dequantized weight), and
    embeddings named here."""
    tinylora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the update's input (a Linear's input, an embedding's rank-r row), training only."""
    init_weights: bool | Literal["uniform"] = True
    """true: v = 0, the base model; "uniform": v ~ U(-init_v_bound, init_v_bound), drawn as peft draws it."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    @field_validator("init_weights")
    @classmethod
    def _defined_init(cls, value: bool | str) -> bool | str:
        """peft's false leaves v as whatever memory torch.empty returns: no defined start to train from."""
        if value is False:
            raise ValueError("false leaves v uninitialised in peft (torch.empty: whatever the memory held), no "
                             "defined start; use true (v = 0, the base model) or uniform")
        return value


@dataclass(frozen=True)
class TinyLoraFacts:
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""


def svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the (out, in) `weight`, as peft's: the SVD in fp32, U_r, S_r, V_r rounded to the weight's dtype and
    combined there, sqrt(S_r) V_r (r, in) and U_r sqrt(S_r) (out, r); returned in fp32."""
    u_, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    rank, dtype = min(r, *weight.shape), weight.dtype
    sqrt_s = torch.sqrt(s[:rank].to(dtype))
    a = (sqrt_s.unsqueeze(1) * vh[:rank].to(dtype)).contiguous()
    b = (u_[:, :rank].to(dtype) * sqrt_s.unsqueeze(0)).contiguous()
    return a.float(), b.float()


def projection(u: int, r: int, seed: int) -> torch.Tensor:
    """P (u, r, r) ~ N(0, 1/r), drawn from a generator seeded with `seed` (the layer's), as peft."""
    return torch.normal(mean=0.0, std=1.0 / (r**0.5), size=(u, r, r), generator=torch.Generator().manual_seed(seed))


def tinylora_delta(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """B R A in fp32, R = sum_i v_i P_i: (out, in) for a Linear, (num_embeddings, dim) for an embedding."""
    a, b, p, v = (parts[f"tinylora_{n}"].float() for n in "ABPv")
    if p.shape != (len(v), a.shape[0], a.shape[0]) or b.shape[1] != a.shape[0]:
        raise PeftkitError(f"TinyLoRA's tensors do not fit together: tinylora_A {tuple(a.shape)}, tinylora_B "
                           f"{tuple(b.shape)}, tinylora_P {tuple(p.shape)}, tinylora_v {tuple(v.shape)}. Export the "
                           "adapter again.")
    return b @ torch.einsum("i,ijk->jk", v, p) @ a


def _frozen(tensor: torch.Tensor, device: torch.device) -> nn.Parameter:
    return nn.Parameter(tensor.to(device), requires_grad=False)


class TinyLoraLayer(AdapterLayer):
    """TinyLoRA around nn.Linear, transformers' Conv1D or nn.Embedding: base output + the update, in fp32."""

    def __init__(self, base_layer: nn.Module, cfg: TinyLoraConfig) -> None:
        super().__init__(base_layer)
        embedding = isinstance(base_layer, nn.Embedding)
        self.facts = TinyLoraFacts(is_conv1d(base_layer))
        weight = base_layer.weight.detach()
        if is_quantized(base_layer):  # the weight it computes with (fp32)
            from peftkit.merge_weights import dequantize_weight  # (peftkit.merge_weights imports the methods)

            weight = dequantize_weight(base_layer) if weight.device.type != "meta" else torch.empty(
                linear_shape(base_layer)[::-1], device="meta")
        a, b = svd_factors(weight.T if self.facts.fan_in_fan_out else weight, cfg.r)
        device = weight.device
        self.tinylora_A, self.tinylora_B = _frozen(a, device), _frozen(b, device)
        self.tinylora_P = _frozen(projection(cfg.u, a.shape[0], cfg.projection_seed), device)
        self.tinylora_v = nn.Parameter(torch.zeros(cfg.u, device=device))  # (drawn by group: Tinylora.link_layers)
        dropout = nn.Dropout(cfg.tinylora_dropout) if cfg.tinylora_dropout > 0 else nn.Identity()
        self.tinylora_dropout = dropout
        self.embedding = embedding
        self.weight_tying = cfg.weight_tying  # (its group: `TinyLora.layer_state`)

    def r_matrix(self) -> torch.Tensor:
        return torch.einsum("i,ijk->jk", self.tinylora_v, self.tinylora_P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a, b, r = self.tinylora_A, self.tinylora_B, self.r_matrix()
        if self.embedding:  # a token's row of B R A, scaled as the lookup (Gemma's: peft leaves it unscaled)
            update = self.tinylora_dropout(F.embedding(x, b)) @ r @ a
            scale = getattr(self.base_layer, "embed_scale", None)
            if isinstance(scale, (int, float)) or (isinstance(scale, torch.Tensor) and scale.numel() == 1):
                update = update * torch.as_tensor(scale).to(update.dtype)
        else:
            update = F.linear(F.linear(F.linear(self.tinylora_dropout(x).to(a.dtype), a), r), b)
        return (result + update).to(result.dtype)


def group_of(index: int, count: int, weight_tying: float) -> int:
    """The v group of the `index`-th of `count` targets, as peft's TinyLoraModel assigns it."""
    groups = max(1, round(count * (1.0 - weight_tying)))
    return min(index // max(1, count // groups), groups - 1)


class PeftTinyLoraConfig(PeftLayerTargets):
    """The fields of a TINYLORA adapter_config.json that peftkit reads (defaults: peft's TinyLoraConfig)."""

    r: int = Field(2, gt=0)
    u: int = Field(64, gt=0)
    weight_tying: float = Field(0.0, ge=0.0, le=1.0)
    projection_seed: int = Field(42, **SEED_RANGE)
    save_projection: bool = True
    init_v_bound: float = 0.02
    tinylora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    init_weights: bool | Literal["uniform"] = True
    fan_in_fan_out: bool = False  # (read from the layers: Conv1D's are (in, out) whatever it says, as peft)
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


class TinyLora(Method):
    name = "tinylora"
    title = "TinyLoRA"
    peft_type = "TINYLORA"
    config = TinyLoraConfig
    peft_config = PeftTinyLoraConfig
    param_names = ("tinylora_A", "tinylora_B", "tinylora_P", V_KEY)
    untrained_names = ("tinylora_A", "tinylora_B", "tinylora_P")
    rank_dims = {"tinylora_A": 0, "tinylora_B": 1, "tinylora_P": 1}

    @classmethod
    def wrap(cls, base: nn.Module, cfg: TinyLoraConfig, path: str) -> TinyLoraLayer:
        if is_quantized(base) and from_conv1d(base):
            raise PeftkitError(
                f"adapter.target_modules: '{path}' is GPT-2's Conv1D, quantized (a merge writes it back as a Conv1D); "
                "TinyLoRA adapts it unquantized only. Remove the quantization section, or leave it out of "
                "adapter.target_modules.")
        return TinyLoraLayer(base, cfg)

    @classmethod
    def link_layers(cls, model: nn.Module, cfg: TinyLoraConfig, layers: dict[str, AdapterLayer]) -> None:
        """Each layer's P from projection_seed + its index among the targets, and one v per group of consecutive
        targets, drawn group after group from torch's generator for "uniform" (peft's order and dtype: the base
        weight's, then fp32)."""
        shared: dict[int, nn.Parameter] = {}
        for index, layer in enumerate(layers.values()):
            device = layer.tinylora_v.device
            layer.tinylora_P.data = projection(cfg.u, layer.tinylora_A.shape[0], cfg.projection_seed + index).to(device)
            group = group_of(index, len(layers), cfg.weight_tying)
            if group not in shared:
                v = torch.zeros(cfg.u, dtype=layer.base_layer.weight.dtype)
                if cfg.init_weights == "uniform":
                    nn.init.uniform_(v, -cfg.init_v_bound, cfg.init_v_bound)
                shared[group] = nn.Parameter(v.float().to(device))
            layer.tinylora_v = shared[group]

    @classmethod
    def shared_across_layers(cls, cfg: TinyLoraConfig) -> str | None:
        # (FSDP2: fully_shard of the second decoder layer failed, 'shared with a parameter already managed by another
        # FSDP group', by hand on the CPU; without tying it shards and trains)
        if cfg.weight_tying == 0:
            return None
        return (f"trains one v (tinylora_v) per group of consecutive targets (adapter.weight_tying: {cfg.weight_tying:g}), "
                "which spans decoder layers (weight_tying: 0 gives each layer its own)")

    @classmethod
    def to_peft_file(cls, state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        """Each layer's v as peft's one `base_model.tinylora_v.<group>` (the layers in the model's order, as
        `adapter_state_dict` gives them); P left out without save_projection."""
        paths = [k[: -len(V_KEY) - 1] for k in state if k.endswith(f".{V_KEY}")]
        out = {k: t for k, t in state.items() if not k.endswith(f".{V_KEY}")
               and (config.get("save_projection", True) or not k.endswith(".tinylora_P"))}
        for index, path in enumerate(paths):
            out.setdefault(f"{SHARED_PREFIX}{V_KEY}.{group_of(index, len(paths), config['weight_tying'])}",
                           state[f"{path}.{V_KEY}"])
        return out

    @classmethod
    def layer_state(cls, layers: dict[str, AdapterLayer], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's file as the model's layers hold it: each layer's group's `base_model.tinylora_v.<group>` under the
        layer, the layers in the model's order; P kept from the injection when the file leaves it out."""
        vs = {k: t for k, t in state.items() if k.startswith(f"{SHARED_PREFIX}{V_KEY}.")}
        if not vs:
            return state  # (the model's own form: a checkpoint)
        out = {k: t for k, t in state.items() if k not in vs}
        for index, (path, layer) in enumerate(layers.items()):
            key = f"{SHARED_PREFIX}{V_KEY}.{group_of(index, len(layers), layer.weight_tying)}"
            if key not in vs:
                raise PeftkitError(f"The adapter holds no {key}, the v of the group of '{path}' (weight_tying "
                                   f"{layer.weight_tying} over {len(layers)} targets): the file is damaged, or its "
                                   "adapter_config.json is another adapter's. Export the adapter again.")
            out[f"{PEFT_PREFIX}{path}.{V_KEY}"] = vs[key]
            out.setdefault(f"{PEFT_PREFIX}{path}.tinylora_P", layer.tinylora_P.detach())
        return out

    @classmethod
    def layer_facts(cls, cfg: TinyLoraConfig, path: str, fan_in_fan_out: bool) -> TinyLoraFacts:
        return TinyLoraFacts(fan_in_fan_out)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: TinyLoraFacts) -> torch.Tensor:
        return weight + _delta(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: TinyLoraFacts) -> torch.Tensor:
        return weight - _delta(weight, parts, facts)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: TinyLoraFacts) -> tuple[int | None, ...]:
        shape = (parts["tinylora_B"].shape[0], parts["tinylora_A"].shape[1])
        return shape[::-1] if facts.fan_in_fan_out else shape

    @classmethod
    def to_peft(cls, cfg: TinyLoraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r, "u": cfg.u, "weight_tying": cfg.weight_tying, "projection_seed": cfg.projection_seed,
            "save_projection": cfg.save_projection, "init_v_bound": cfg.init_v_bound,
            "tinylora_dropout": cfg.tinylora_dropout, "fan_in_fan_out": fan_in_fan_out, "bias": "none",
            "init_weights": cfg.init_weights,
        }

    @classmethod
    def from_peft(cls, peft: PeftTinyLoraConfig, config_file: Path) -> TinyLoraConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        return TinyLoraConfig(
            method="tinylora", r=peft.r, u=peft.u, weight_tying=peft.weight_tying,
            projection_seed=peft.projection_seed, save_projection=peft.save_projection,
            init_v_bound=peft.init_v_bound, tinylora_dropout=peft.tinylora_dropout,
            init_weights=peft.init_weights or True,  # (false: v was whatever; the file holds what it trained to)
            target_modules=targets_from_peft(peft.target_modules, config_file),
            modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: TinyLoraConfig, layer: AdapterLayer) -> tuple[int, int]:
        # A x and R A x (r each) per token; with dropout its input and mask (in each, or r for an embedding).
        width = cfg.r if layer.embedding else layer.tinylora_A.shape[1]
        return 2 * cfg.r + (2 * width if cfg.tinylora_dropout > 0 else 0), 0

    @classmethod
    def describe(cls, cfg: TinyLoraConfig) -> str:
        return f"TinyLoRA r={cfg.r} u={cfg.u}"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # v starts at 0: a nonzero v makes the update nonzero (a tied v is drawn again by each of its layers).
        with torch.no_grad():
            layer.tinylora_v.copy_(torch.randn(layer.tinylora_v.shape, generator=generator) * std)


def _delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: TinyLoraFacts) -> torch.Tensor:
    """TinyLoRA's update in the base weight's layout ((in, out) for Conv1D), on its device."""
    delta = tinylora_delta(parts).to(weight.device)
    return delta.T if facts.fan_in_fan_out else delta


TinyLoraLayer.method = TinyLora
