"""VB-LoRA (Li et al. 2024, "VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks", arXiv:2405.15179):
LoRA's update B A, each of whose rows of `vector_length` numbers is a mixture of the top-k of `num_vectors` vectors of
one trained bank shared by every adapted layer, weighed by the softmax of that row's top-k logits:

    A[k, j L:(j+1) L] = sum_{top-k i of logits_A[k, j]} softmax(logits_A[k, j])_i bank[i]    (r x in)
    B[p L:(p+1) L, k] = sum_{top-k i of logits_B[p, k]} softmax(logits_B[p, k])_i bank[i]    (out x r)
    y = W x + B A x  (no scaling)

Each layer trains its logits, A (r, in / L, N) and B (out / L, r, N); the bank (N, L) trains once for all the layers
(`SharedTensors`, `shared_trained`). Names as peft's: `<path>.vblora_logits_A`, `<path>.vblora_logits_B` and
`base_model.vblora_vector_bank`; with `save_only_topk_weights` the file holds each logits' top-k indices and the first
k - 1 softmax weights instead (`<path>.vblora_logits_A_topk_indices`, `..._topk_weights`), as peft writes them, which
load back as logits of log-weights and -inf elsewhere (the same update; not for training further, as peft says).
Initialised as peft: per layer, in model order, a bank drawn U(-bound, bound) (peft draws one per layer and keeps the
last), then the layer's logits N(0, init_logits_std^2), all from torch's generator: the same numbers for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_conv1d, linear_shape, refuse_embedding
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, PeftExcludedTargets, PeftLayerTargets,
                                             filters_from_peft)
from peftkit.section import TargetRegex

BANK = "vblora_vector_bank"


class VbLoraConfig(LayerTargets, ExcludedTargets):
    """VB-LoRA: LoRA factors whose rows are top-k mixtures of one trained vector bank shared by all layers."""

    method: Literal["vblora"]
    r: int = Field(4, gt=0)
    """Rank of the update B A (peft's default 4)."""
    num_vectors: int = Field(256, gt=0)
    """Vectors in the shared bank (more for a larger model)."""
    vector_length: int = Field(256, gt=0)
    """Length of each bank vector: it must divide every target's in and out features (refused naming the layer)."""
    topk: int = Field(2, gt=0)
    """Bank vectors mixed into each row (the paper: 2 is best); at most num_vectors."""
    vblora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    save_only_topk_weights: bool = False
    """Export each logits' top-k indices and weights only (a much smaller file, as peft's): enough to evaluate and
    merge, not to train further."""
    init_vector_bank_bound: float = Field(0.02, gt=0)
    """The bank starts at U(-bound, bound): not 0, which would leave every logit without gradient."""
    init_logits_std: float = Field(0.1, ge=0)
    """The logits start at N(0, std^2)."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """As LoRA's: Linear and Conv1D layers (and 4-bit/8-bit ones) whose sizes vector_length divides."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    @model_validator(mode="after")
    def _topk_fits_the_bank(self) -> VbLoraConfig:
        if self.topk > self.num_vectors:
            raise ValueError(f"topk {self.topk} is more than the bank's num_vectors {self.num_vectors}: each row mixes "
                             "topk of the bank's vectors; use a topk of at most num_vectors (the paper: 2)")
        return self


def mixtures(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """(..., L): each row of `logits` (..., N) as the softmax-weighted sum of its top-k bank vectors (peft's)."""
    top, indices = logits.topk(topk, dim=-1)
    return (F.softmax(top, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)


def factors(parts: dict[str, torch.Tensor], topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) in fp32 from the layer's logits and the shared bank, as peft builds them."""
    bank = parts[BANK].float()
    logits_a, logits_b = parts["vblora_logits_A"].float(), parts["vblora_logits_B"].float()
    if logits_a.shape[-1] != len(bank) or logits_b.shape[-1] != len(bank) or logits_a.shape[0] != logits_b.shape[1]:
        raise PeftkitError(f"VB-LoRA's logits vblora_logits_A {tuple(logits_a.shape)}, vblora_logits_B "
                           f"{tuple(logits_b.shape)} do not fit the shared {BANK} {tuple(bank.shape)}. Export the "
                           "adapter again.")
    a = mixtures(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
    b = mixtures(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
    return a, b


@dataclass(frozen=True)
class VbLoraFacts:
    topk: int
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""


def check_divides(length: int, in_features: int, out_features: int, path: str) -> None:
    """Refuse a layer whose sizes the bank's vectors do not tile (peft refuses it too)."""
    if in_features % length or out_features % length:
        raise PeftkitError(f"adapter.vector_length: {length} does not divide the sizes of '{path}' ({in_features} in, "
                           f"{out_features} out), whose A and B rows are made of bank vectors. Use a vector_length that "
                           "divides every target's sizes (a common divisor), or leave that layer out of "
                           "adapter.target_modules.")


class VbLoraLinear(AdapterLayer):
    """VB-LoRA around nn.Linear, transformers' Conv1D or a bitsandbytes linear layer; `shared` holds the bank."""

    def __init__(self, base_layer: nn.Module, cfg: VbLoraConfig, path: str) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        check_divides(cfg.vector_length, in_features, out_features, path)
        self.facts = VbLoraFacts(cfg.topk, is_conv1d(base_layer))
        device = base_layer.weight.device
        where = draw_device(device)
        # peft draws a bank before each layer's logits (keeping the last: `shared_from_layers`), all from torch's
        # generator on the CPU, then moved beside the base: one seed, peft's numbers.
        bound = cfg.init_vector_bank_bound
        self.drawn_bank = torch.empty(cfg.num_vectors, cfg.vector_length, device=where).uniform_(-bound, bound)
        shape_a = (cfg.r, in_features // cfg.vector_length, cfg.num_vectors)
        shape_b = (out_features // cfg.vector_length, cfg.r, cfg.num_vectors)
        std = cfg.init_logits_std
        self.vblora_logits_A = nn.Parameter(torch.empty(shape_a, device=where).normal_(0, std).to(device))
        self.vblora_logits_B = nn.Parameter(torch.empty(shape_b, device=where).normal_(0, std).to(device))
        self.vblora_dropout = nn.Dropout(cfg.vblora_dropout) if cfg.vblora_dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        bank, topk = self.shared.vblora_vector_bank, self.facts.topk
        a = mixtures(self.vblora_logits_A, bank, topk).reshape(self.vblora_logits_A.shape[0], -1)
        b = mixtures(self.vblora_logits_B, bank, topk).transpose(1, 2).reshape(-1, self.vblora_logits_B.shape[1])
        update = F.linear(F.linear(self.vblora_dropout(x.to(bank.dtype)), a), b)
        return (result + update).to(result.dtype)


class PeftVbLoraConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of a VBLORA adapter_config.json that peftkit reads (defaults: peft's VBLoRAConfig)."""

    r: int = Field(4, gt=0)
    num_vectors: int = Field(256, gt=0)
    vector_length: int = Field(256, gt=0)
    topk: int = Field(2, gt=0)
    vblora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    save_only_topk_weights: bool = False
    init_vector_bank_bound: float = Field(0.02, gt=0)
    init_logits_std: float = Field(0.1, ge=0)
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"


def _indices_dtype(num_vectors: int) -> torch.dtype:
    """peft's dtype of the saved top-k indices."""
    return (torch.uint8 if num_vectors < 2**8 else torch.int16 if num_vectors < 2**15 else torch.int32
            if num_vectors < 2**31 else torch.int64)


class VbLora(Method):
    name = "vblora"
    title = "VB-LoRA"
    peft_type = "VBLORA"
    config = VbLoraConfig
    peft_config = PeftVbLoraConfig
    param_names = ("vblora_logits_A", "vblora_logits_B")
    rank_dims = {"vblora_logits_A": 0, "vblora_logits_B": 1}
    shared_names = (BANK,)
    shared_trained = (BANK,)

    @classmethod
    def wrap(cls, base: nn.Module, cfg: VbLoraConfig, path: str) -> VbLoraLinear:
        refuse_embedding(base, path, "VB-LoRA")
        return VbLoraLinear(base, cfg, path)

    @classmethod
    def shared_tensors(cls, cfg: VbLoraConfig, shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        return {}  # drawn by the layers (`shared_from_layers`), and always saved: a merge never draws it

    @classmethod
    def shared_from_layers(cls, cfg: VbLoraConfig, layers: list[AdapterLayer]) -> dict[str, torch.Tensor]:
        bank = layers[-1].drawn_bank
        for layer in layers:
            del layer.drawn_bank
        return {BANK: bank}

    @classmethod
    def layer_facts(cls, cfg: VbLoraConfig, path: str, fan_in_fan_out: bool) -> VbLoraFacts:
        return VbLoraFacts(cfg.topk, fan_in_fan_out)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: VbLoraFacts) -> torch.Tensor:
        return weight + _delta(weight, parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: VbLoraFacts) -> torch.Tensor:
        return weight - _delta(weight, parts, facts)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: VbLoraFacts) -> tuple[int | None, ...]:
        length = parts[BANK].shape[1] if BANK in parts else None
        if length is None:
            return (None, None)
        out_in = (parts["vblora_logits_B"].shape[0] * length, parts["vblora_logits_A"].shape[1] * length)
        return out_in[::-1] if facts.fan_in_fan_out else out_in

    @classmethod
    def to_peft(cls, cfg: VbLoraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r, "num_vectors": cfg.num_vectors, "vector_length": cfg.vector_length, "topk": cfg.topk,
            "vblora_dropout": cfg.vblora_dropout, "save_only_topk_weights": cfg.save_only_topk_weights,
            "init_vector_bank_bound": cfg.init_vector_bank_bound, "init_logits_std": cfg.init_logits_std,
            "fan_in_fan_out": fan_in_fan_out, "bias": "none",
        }

    @classmethod
    def from_peft(cls, peft: PeftVbLoraConfig, config_file: Path) -> VbLoraConfig:
        refuse_unsupported(peft, config_file, ())  # (its bias)
        if peft.topk > peft.num_vectors:
            raise PeftkitError(f"{config_file}: topk {peft.topk} is more than num_vectors {peft.num_vectors} (peft "
                               "cannot run it either). Fix the file, or export the adapter again.")
        return VbLoraConfig(
            method="vblora", r=peft.r, num_vectors=peft.num_vectors, vector_length=peft.vector_length, topk=peft.topk,
            vblora_dropout=peft.vblora_dropout, save_only_topk_weights=peft.save_only_topk_weights,
            init_vector_bank_bound=peft.init_vector_bank_bound, init_logits_std=peft.init_logits_std,
            target_modules=targets_from_peft(peft.target_modules, config_file),
            modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def to_peft_file(cls, state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        if not config.get("save_only_topk_weights"):
            return state
        out, topk = {}, config["topk"]
        for key, tensor in state.items():
            if not key.endswith(cls.param_names):
                out[key] = tensor
                continue
            logits, indices = tensor.topk(topk)  # peft's: the indices and the first k - 1 softmax weights
            out[f"{key}_topk_indices"] = indices.to(_indices_dtype(config["num_vectors"]))
            out[f"{key}_topk_weights"] = torch.softmax(logits, dim=-1)[..., :-1].contiguous()
        return out

    @classmethod
    def from_peft_file(cls, state: dict[str, torch.Tensor], peft: PeftVbLoraConfig, file: Path
                       ) -> dict[str, torch.Tensor]:
        out = {k: t for k, t in state.items() if not k.endswith(("_topk_indices", "_topk_weights"))}
        for key in [k for k in state if k.endswith("_topk_indices")]:
            logits = key.removesuffix("_topk_indices")
            weights = state.get(f"{logits}_topk_weights")
            if weights is None or state[key].shape[-1] != peft.topk or weights.shape[-1] != peft.topk - 1:
                raise PeftkitError(f"{file}: {key} and {logits}_topk_weights are not peft's top-{peft.topk} indices "
                                   "and weights (save_only_topk_weights). Export the adapter again.")
            weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
            full = torch.full((*weights.shape[:-1], peft.num_vectors), float("-inf"), dtype=weights.dtype)
            out[logits] = full.scatter(-1, state[key].long(), torch.log(weights))  # (peft's reading, as peft)
        return out

    @classmethod
    def kept_for_backward(cls, cfg: VbLoraConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token the rank-r intermediate and the layer's input (its fp32 copy; with vblora_dropout, the dropped
        # copy and dropout's mask, counted as `in` values); per layer A and B, and the gathered top-k bank vectors
        # of each (k x their size) for the mixtures' backward.
        in_features, out_features = linear_shape(layer.base_layer)
        mask = in_features if cfg.vblora_dropout else 0
        return cfg.r + in_features + mask, (cfg.topk + 1) * cfg.r * (in_features + out_features)

    @classmethod
    def describe(cls, cfg: VbLoraConfig) -> str:
        return f"VB-LoRA r={cfg.r}, {cfg.num_vectors} x {cfg.vector_length} bank, top-{cfg.topk}"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # Logits far apart (a clear top-k); the shared bank at the scale of trained vectors (its U(+-0.02) start would
        # leave the update near 0), drawn again by each layer from the same generator.
        with torch.no_grad():
            for p in layer.adapter_params().values():
                p.copy_(torch.randn(p.shape, generator=generator) * std * 10)
            bank = layer.shared.vblora_vector_bank
            bank.copy_(torch.randn(bank.shape, generator=generator).to(bank.device) * std)


def _delta(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: VbLoraFacts) -> torch.Tensor:
    """VB-LoRA's update B A in the base weight's layout ((in, out) for Conv1D), on its device."""
    a, b = factors({k: t.to(weight.device) for k, t in parts.items()}, facts.topk)
    delta = b @ a
    return delta.T if facts.fan_in_fan_out else delta


VbLoraLinear.method = VbLora
