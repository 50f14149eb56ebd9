"""SHiRA (Bhardwaj et al. 2024, "Sparse High Rank Adapters", arXiv:2406.13175): each layer trains a sparse update,
K = r (out + in) entries of its (out x in) weight (as many numbers as LoRA of rank r, at any rank), the rest frozen:

    W' = W + S,  S[rows_k, cols_k] = w_k, 0 elsewhere.

The entries are peft 0.21's random mask: the first K of `torch.randperm(out * in)` from a generator seeded with
`random_seed` (torch's default seed when null, so one mask per layer shape either way), sorted, entry e at row
e // in, column e % in. Unlike FourierFT's, they are saved: `<path>.shira_indices` (2, K) int32 beside
`<path>.shira_weight` (K,), as HF peft names them, so an adapter of any mask (peft's custom `mask_fn`) loads with its
own. peft starts the values at 0 (`init_weights: true`, the base model) or N(0, 1). The forward adds x S^T, computed
in fp32 from a dense S, to the base output before one cast (peft's forward computes with W + S: other roundings in
16 bits), so a 4-bit/8-bit base runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import PeftConfigBase, Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, linear_shape, not_a_linear
from peftkit.section import AdapterSection, TargetRegex


class ShiraConfig(AdapterSection):
    """SHiRA: a sparse update, r (out + in) trained entries of each layer's weight at random places."""

    method: Literal["shira"]
    r: int = Field(32, gt=0)
    """Sets the trained entries per layer, r (out + in): LoRA r's parameter count, at full rank (peft's default)."""
    mask_type: Literal["random"] = "random"
    """Where the entries are: `random`, peft's random mask (its only built-in one)."""
    random_seed: int | None = Field(None, ge=0, lt=2**63)
    """Seed of the mask's generator; null (peft's default): torch's default seed, the same mask as peft's either way."""
    init_weights: bool = True
    """true (peft's default): the values start at 0, the base model; false: N(0, 1) (peft: for tests only)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: nn.Linear layers (and 4-bit/8-bit ones); Conv1D and embeddings are refused (as peft's)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""


def count(out_features: int, in_features: int, r: int) -> int:
    """The trained entries of an (out x in) layer, refused past its size (peft refuses it too)."""
    k = r * (out_features + in_features)
    if k > out_features * in_features:
        raise PeftkitError(f"adapter.r: {r} gives {r} x ({out_features} + {in_features}) = {k} entries, more than a "
                           f"layer of {out_features} x {in_features} = {out_features * in_features} has (peft refuses "
                           "it too); use a smaller r.")
    return k


@lru_cache(maxsize=64)
def random_mask(out_features: int, in_features: int, k: int, seed: int | None) -> torch.Tensor:
    """(2, k) int32 CPU: rows and columns of peft's random mask, in row-major order (cached: one per layer shape)."""
    generator = torch.Generator() if seed is None else torch.Generator().manual_seed(seed)
    entries = torch.randperm(out_features * in_features, generator=generator)[:k].sort().values
    return torch.stack([entries // in_features, entries % in_features]).to(torch.int32)


def sparse_delta(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense fp32 update S of `shape`: `values` at `indices` (rows, columns), 0 elsewhere."""
    where = indices.long().to(values.device)
    return torch.zeros(shape, device=values.device).index_put((where[0], where[1]), values.float())


@dataclass(frozen=True)
class ShiraFacts:
    """SHiRA's merge needs its two tensors alone (peft's scaling is 1 while training and saved)."""


class ShiraLinear(AdapterLayer):
    """SHiRA around nn.Linear or a bitsandbytes linear layer: base output + x S^T, in fp32."""

    def __init__(self, base_layer: nn.Module, cfg: ShiraConfig) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        k = count(out_features, in_features, cfg.r)
        self.shape = (out_features, in_features)
        self.facts = ShiraFacts()
        device = base_layer.weight.device
        values = torch.zeros(k) if cfg.init_weights else torch.randn(k, device=draw_device(device))
        self.shira_weight = nn.Parameter(values.to(device))
        # Saved with the adapter (`adapter_params`), never trained; not drawn for the meta device (memory estimate).
        # A copy of the cached mask: loading a file writes its own indices into each layer's.
        indices = (torch.zeros(2, k, dtype=torch.int32, device=device) if device.type == "meta"
                   else random_mask(out_features, in_features, k, cfg.random_seed).to(device, copy=True))
        self.register_buffer("shira_indices", indices, persistent=False)

    def adapter_params(self) -> dict[str, torch.Tensor]:
        """The trained values, and the indices the file keeps beside them (a buffer: no gradient, no optimizer
        state, not counted as a parameter)."""
        return {"shira_weight": self.shira_weight, "shira_indices": self.shira_indices}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        delta = sparse_delta(self.shira_weight, self.shira_indices, self.shape)
        return (result + F.linear(x.to(delta.dtype), delta)).to(result.dtype)


class PeftShiraConfig(PeftConfigBase):
    """The fields of a SHIRA adapter_config.json that peftkit reads (defaults: peft's ShiraConfig)."""

    r: int = Field(32, gt=0)
    mask_type: str = "random"
    """Any: the file holds the indices (a custom mask_fn's too)."""
    random_seed: int | None = Field(None, ge=0, lt=2**63)
    init_weights: bool = True
    fan_in_fan_out: bool = False


def unsupported(path: str, kind: str) -> PeftkitError:
    return PeftkitError(
        f"adapter.target_modules: '{path}' is {kind}; SHiRA adapts nn.Linear (and 4-bit/8-bit) layers only, as peft "
        "0.21's SHiRA, which could not load the adapter otherwise. Target Linear layers (all-linear does, but on "
        "GPT-2's Conv1D), or use adapter.method: lora for this model.")


class Shira(Method):
    name = "shira"
    title = "SHiRA"
    peft_type = "SHIRA"
    config = ShiraConfig
    peft_config = PeftShiraConfig
    param_names = ("shira_weight", "shira_indices")
    untrained_names = ("shira_indices",)
    integer_names = ("shira_indices",)

    @classmethod
    def wrap(cls, base: nn.Module, cfg: ShiraConfig, path: str) -> ShiraLinear:
        if kind := not_a_linear(base):
            raise unsupported(path, kind)
        return ShiraLinear(base, cfg)

    @classmethod
    def layer_facts(cls, cfg: ShiraConfig, path: str, fan_in_fan_out: bool) -> ShiraFacts:
        if fan_in_fan_out:
            raise unsupported(path, "GPT-2's Conv1D")
        return ShiraFacts()

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: ShiraFacts) -> torch.Tensor:
        return weight + _delta(weight, parts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: ShiraFacts) -> torch.Tensor:
        return weight - _delta(weight, parts)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: ShiraFacts) -> tuple[int | None, ...]:
        return None, None  # any layer its indices fall in (checked by the merge)

    @classmethod
    def to_peft(cls, cfg: ShiraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r,
            "mask_type": cfg.mask_type,
            "random_seed": cfg.random_seed,
            "fan_in_fan_out": False,
            "init_weights": cfg.init_weights,
        }

    @classmethod
    def from_peft(cls, peft: PeftShiraConfig, config_file: Path) -> ShiraConfig:
        refuse_unsupported(peft, config_file, ())
        return ShiraConfig(method="shira", r=peft.r, random_seed=peft.random_seed, init_weights=peft.init_weights,
                           target_modules=targets_from_peft(peft.target_modules, config_file),
                           modules_to_save=peft.modules_to_save or [])

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        with torch.no_grad():  # the values only: the indices are where they are
            layer.shira_weight.copy_(torch.randn(layer.shira_weight.shape, generator=generator) * std)

    @classmethod
    def kept_for_backward(cls, cfg: ShiraConfig, layer: AdapterLayer) -> tuple[int, int]:
        # The layer's input in fp32 (the update's gradient), and the dense (out x in) update: an upper bound.
        in_features, out_features = linear_shape(layer.base_layer)
        return in_features, in_features * out_features

    @classmethod
    def forward_scratch(cls, cfg: ShiraConfig, layer: AdapterLayer) -> int:
        in_features, out_features = linear_shape(layer.base_layer)
        return in_features * out_features  # the dense update

    @classmethod
    def describe(cls, cfg: ShiraConfig) -> str:
        return f"SHiRA r={cfg.r}"


def _delta(weight: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense update on the weight's device, refusing indices outside it (another base's adapter)."""
    indices = parts["shira_indices"].long()
    if len(indices) != 2 or (indices.numel() and (indices.min() < 0 or (indices.max(dim=1).values >= torch.tensor(
            weight.shape, device=indices.device)).any())):
        raise PeftkitError(f"The adapter's shira_indices ({tuple(indices.shape)}, up to {indices.max(dim=1).values.tolist()}) "
                           f"do not fit a weight of {tuple(weight.shape)}: it was trained on a different base model.")
    return sparse_delta(parts["shira_weight"].to(weight.device), indices.to(weight.device), tuple(weight.shape))


ShiraLinear.method = Shira
