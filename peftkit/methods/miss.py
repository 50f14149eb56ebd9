"""MiSS, matrix shard sharing (Kang and Yin 2024, "Balancing LoRA Performance and Efficiency with Simple Shard
Sharing", arXiv:2409.15371; peft's MISS, formerly Bone): one small trained block is shared by every shard of a layer's
weight. peft's three variants, picked by `init_weights`:

- balance (`true`, the default; `false` is the same with a random start): `miss_block` D is (r, out). The layer's
  inputs, zero-padded to a multiple of r, are cut into r-wide shards and summed, and D maps that sum to the outputs:
  y = W x + b + D^T (sum_k x_k). Merged, every r-wide column shard of W gets D^T: W'[o, j] = W[o, j] + D[j mod r, o].
- mini: D is (r, mini_r), repeated across the outputs (out / mini_r times): fewer numbers, the same update form.
- bat: D is (out / r, r, r), one r x r block per row shard i; each r x r block W_ij of W becomes
  W_ij + W_ij D_i + D_i (a nonlinear, weight-dependent update), computed on the whole weight every forward, as peft.

Every variant starts at D = 0, the base model (init_weights false draws D kaiming-uniform, as peft, from torch's
generator: the same numbers for a seed). Names and shapes as HF peft 0.21: `<path>.miss_block`. Unmerged: balance and
mini subtract, bat solves (W' - D_i) (I + D_i)^-1, as peft.
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
from peftkit.methods.layer import AdapterLayer, is_quantized, linear_shape, not_a_linear
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, PeftExcludedTargets, PeftLayerTargets,
                                             filters_from_peft)
from peftkit.section import TargetRegex

Variant = Literal["balance", "bat", "mini"]


class MissConfig(LayerTargets, ExcludedTargets):
    """MiSS: one trained block shared by every shard of each target layer's weight."""

    method: Literal["miss"]
    r: int = Field(64, ge=1)
    """Shard width along the inputs (peft's default 64): the balance variant trains r x out numbers per layer. At
    most each target's input size."""
    miss_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the layer's input in the update's path (balance and mini; peft's bat applies none)."""
    mini_r: int = Field(1, ge=1)
    """init_weights: mini only: the outputs the block holds, repeated across each layer's outputs (which it must
    divide)."""
    init_weights: bool | Literal["bat", "mini"] = True
    """true: balance, from zeros (the base model); false: balance from a kaiming-uniform draw; bat: r x r blocks,
    W_ij + W_ij D_i + D_i; mini: balance with an (r, mini_r) block."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: `all-linear`, module-name suffixes, or {regex: ...}. nn.Linear and 4-bit/8-bit layers only."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    @field_validator("init_weights", mode="before")
    @classmethod
    def _one_of_the_variants(cls, value: object) -> object:
        """One message for a value that is none of them (pydantic's union said it twice, once per member)."""
        if isinstance(value, bool) or value in ("bat", "mini"):
            return value
        raise ValueError("must be true (balance), false (balance from a random start), bat or mini: peft's MiSS "
                         "variants")

    @property
    def variant(self) -> Variant:
        return self.init_weights if self.init_weights in ("bat", "mini") else "balance"


@dataclass(frozen=True)
class MissFacts:
    """What a merge needs beyond `miss_block`: the variant (r and mini_r come from the tensor's shape)."""

    variant: Variant = "balance"


def check_layer(cfg: MissConfig, path: str, in_features: int, out_features: int) -> None:
    """peft's checks of a layer, as recipe errors naming the key, the layer and the fix (peft raises them too)."""
    if cfg.r > in_features:
        raise PeftkitError(f"adapter.r: {cfg.r} is more than the {in_features} inputs of '{path}'; MiSS cuts a "
                           "layer's inputs into r-wide shards, so r can be at most its input size (peft refuses it "
                           "too). Lower r, or leave this layer out of target_modules.")
    if cfg.variant == "bat" and (in_features % cfg.r or out_features % cfg.r):
        raise PeftkitError(f"adapter.r: {cfg.r} does not divide the {out_features} x {in_features} weight of "
                           f"'{path}', which init_weights: bat cuts into r x r blocks (peft refuses it too). Choose "
                           "an r that divides every target's input and output sizes, or use init_weights: true.")
    if cfg.variant == "mini" and out_features % cfg.mini_r:
        raise PeftkitError(f"adapter.mini_r: {cfg.mini_r} does not divide the {out_features} outputs of '{path}', "
                           "across which init_weights: mini repeats its (r, mini_r) block (peft refuses it too). "
                           "Choose a mini_r that divides every target's output size.")


def unsupported(path: str, kind: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is {kind}; MiSS adapts nn.Linear (and 4-bit/8-bit) layers only, as peft "
        "0.21's MiSS, which could not load the adapter otherwise. Target Linear layers, or use LoRA for this model.")


def shared_columns(block: torch.Tensor, out_features: int, variant: Variant) -> torch.Tensor:
    """The balance/mini block as (r, out): mini's (r, mini_r) repeated across the outputs."""
    if block.dim() != 2 or out_features % block.shape[1] or (variant == "balance" and block.shape[1] != out_features):
        raise PeftkitError(f"The adapter does not fit this model: its MiSS block {tuple(block.shape)} does not "
                           f"cover a layer of {out_features} outputs. It was trained on a different base model.")
    return block.repeat(1, out_features // block.shape[1])


def shard_update(block: torch.Tensor, weight: torch.Tensor, variant: Variant) -> torch.Tensor:
    """balance/mini: the (out, in) update, entry (o, j) = D[j mod r, o]."""
    out_features, in_features = weight.shape
    columns = shared_columns(block, out_features, variant)
    if columns.shape[0] > in_features:
        raise PeftkitError(f"The adapter does not fit this model: its MiSS block has r {columns.shape[0]} for a "
                           f"layer of {in_features} inputs. It was trained on a different base model.")
    return columns.T.repeat(1, math.ceil(in_features / columns.shape[0]))[:, :in_features]


def bat_blocks(weight: torch.Tensor, r: int) -> torch.Tensor:
    """(out, in) as peft's (in / r, out / r, r, r) blocks: [j, i] is the block of row shard i, column shard j."""
    out_features, in_features = weight.shape
    if in_features % r or out_features % r:
        raise PeftkitError(f"The adapter does not fit this model: its MiSS bat blocks are {r} x {r}, which do not "
                           f"tile a {out_features} x {in_features} weight. It was trained on a different base model.")
    return weight.reshape(out_features // r, r, in_features // r, r).permute(2, 0, 1, 3)


def bat_weight(weight: torch.Tensor, block: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """W with each block W_ij replaced by W_ij + W_ij D_i + D_i; with `inverse`, by (W_ij - D_i) (I + D_i)^-1."""
    blocks = bat_blocks(weight, block.shape[-1])
    if inverse:
        eye = torch.eye(block.shape[-1], device=block.device, dtype=block.dtype)
        result = (blocks - block) @ torch.linalg.inv(eye + block)
    else:
        result = blocks + (blocks @ block + block)
    return result.permute(1, 2, 0, 3).reshape(weight.shape)


def base_weight(base: nn.Module) -> torch.Tensor:
    """The fp32 (out, in) weight the base layer computes with (dequantized for a bitsandbytes layer)."""
    if is_quantized(base):
        from peftkit.merge import dequantize_weight  # peftkit.merge imports the method registry

        return dequantize_weight(base)
    return base.weight.float()


class MissLinear(AdapterLayer):
    """MiSS around nn.Linear or a bitsandbytes linear layer."""

    def __init__(self, base_layer: nn.Module, cfg: MissConfig) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        self.facts = MissFacts(cfg.variant)
        shape = {"balance": (cfg.r, out_features), "mini": (cfg.r, cfg.mini_r),
                 "bat": (out_features // cfg.r, cfg.r, cfg.r)}[cfg.variant]
        block = torch.zeros(shape, device=draw_device(base_layer.weight.device))
        if cfg.init_weights is False:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))  # peft's draw, from torch's global generator
        self.miss_block = nn.Parameter(block.to(base_layer.weight.device))  # PEFT's key `miss_block`
        self.dropout = nn.Dropout(cfg.miss_dropout) if cfg.miss_dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.facts.variant == "bat":  # the whole weight, updated, in fp32 (as peft)
            weight = bat_weight(base_weight(self.base_layer), self.miss_block)
            bias = self.base_layer.bias
            return F.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)
        result = self.base_layer(x)
        columns = shared_columns(self.miss_block, result.shape[-1], self.facts.variant)
        r = columns.shape[0]
        # peft's order: pad the inputs to whole shards, cast, drop out, sum the shards.
        shards = self.dropout(F.pad(x, (0, -x.shape[-1] % r)).to(columns.dtype))
        update = shards.reshape(*shards.shape[:-1], -1, r).sum(-2) @ columns
        return (result + update).to(result.dtype)


class PeftMissConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of a MISS adapter_config.json that peftkit reads (defaults: peft 0.21's MissConfig)."""

    r: int = Field(64, ge=1)
    miss_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    mini_r: int = Field(1, ge=1)
    init_weights: bool | Literal["bat", "mini"] = True
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


class Miss(Method):
    name = "miss"
    title = "MiSS"
    peft_type = "MISS"
    config = MissConfig
    peft_config = PeftMissConfig
    param_names = ("miss_block",)

    @classmethod
    def wrap(cls, base: nn.Module, cfg: MissConfig, path: str) -> MissLinear:
        if kind := not_a_linear(base):
            raise unsupported(path, kind)
        check_layer(cfg, path, *linear_shape(base))
        return MissLinear(base, cfg)

    @classmethod
    def layer_facts(cls, cfg: MissConfig, path: str, fan_in_fan_out: bool) -> MissFacts:
        if fan_in_fan_out:
            raise unsupported(path, "GPT-2's Conv1D")
        return MissFacts(cfg.variant)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: MissFacts) -> torch.Tensor:
        block = parts["miss_block"].float().to(weight.device)
        if facts.variant == "bat":
            return bat_weight(weight, block)
        return weight + shard_update(block, weight, facts.variant)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: MissFacts) -> torch.Tensor:
        block = parts["miss_block"].float().to(weight.device)
        if facts.variant == "bat":
            return bat_weight(weight, block, inverse=True)
        return weight - shard_update(block, weight, facts.variant)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: MissFacts) -> tuple[int | None, ...]:
        block = parts["miss_block"]
        if facts.variant == "bat":
            return block.shape[0] * block.shape[-1], None
        return (block.shape[1] if facts.variant == "balance" else None), None  # (mini: checked by the merge)

    @classmethod
    def to_peft(cls, cfg: MissConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r,
            "miss_dropout": cfg.miss_dropout,
            "mini_r": cfg.mini_r,
            "init_weights": cfg.init_weights,
            "bias": "none",
        }

    @classmethod
    def from_peft(cls, peft: PeftMissConfig, config_file: Path) -> MissConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        return MissConfig(method="miss", r=peft.r, miss_dropout=peft.miss_dropout, mini_r=peft.mini_r,
                          init_weights=peft.init_weights,
                          target_modules=targets_from_peft(peft.target_modules, config_file),
                          modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: MissConfig, layer: AdapterLayer) -> tuple[int, int]:
        in_features, out_features = linear_shape(layer.base_layer)
        if cfg.variant == "bat":  # the fp32 input, and the weight's blocks and the updated weight, per layer
            return in_features, 2 * in_features * out_features
        # The summed shards (r per token), and dropout's mask over the padded input.
        return cfg.r + (in_features + cfg.r if cfg.miss_dropout else 0), 0

    @classmethod
    def forward_scratch(cls, cfg: MissConfig, layer: AdapterLayer) -> int:
        in_features, out_features = linear_shape(layer.base_layer)
        return 3 * in_features * out_features if cfg.variant == "bat" else 0  # base, W_ij D_i, updated

    @classmethod
    def describe(cls, cfg: MissConfig) -> str:
        return f"MiSS r={cfg.r}" + {"balance": "", "bat": ", bat", "mini": f", mini_r={cfg.mini_r}"}[cfg.variant]


MissLinear.method = Miss
