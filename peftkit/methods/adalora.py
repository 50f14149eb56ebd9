"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv:2303.10512): LoRA in SVD form, y = W x + (alpha / (init_r + 1e-5)) * B diag(E) A x, whose ranks are
re-allocated by importance while training.

Shapes and names as HF peft (`tuners/adalora`): `lora_A` (r, in), the right singular vectors; `lora_E` (r, 1),
the singular values, starting at 0 (so training starts from the base model); `lora_B` (out, r), the left
singular vectors. The scaling divides by peft's `ranknum`, which is init_r for every layer, also after a
layer was cut to fewer triplets: a layer's facts are alpha and init_r, never its current rank.

While training, `peftkit.methods.adalora_trainer.AdaLoraTrainer` (the method's `trainer` hook) adds the
orthogonality regulariser to the loss and, after every optimizer step, scores each triplet (A row, E entry,
B column) and zeroes the E entries of the least important ones down to a shrinking budget. On export the
zeroed triplets are cut from the tensors and listed in `rank_pattern`, as peft's `save_pretrained` does, so
each layer loads with its own rank in peft and in peftkit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import REEXPORT, Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_conv1d, is_quantized, linear_shape
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, NoDefault, PeftExcludedTargets,
                                             PeftLayerTargets, filters_from_peft)
from peftkit.section import TargetRegex

# peft's per-architecture defaults (TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING, peft 0.21) for the
# architectures peftkit is tested on and their close relatives.
DEFAULTS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt_neox": ["query_key_value"],
}
E_KEY = ".lora_E"  # rank_pattern's keys: `<module path>.lora_E`, as peft writes them


class AdaLoraConfig(LayerTargets, ExcludedTargets):
    """AdaLoRA: SVD-form LoRA whose per-layer ranks shrink from init_r to an average of target_r while training.

    The schedule (peft's): `tinit` warm-up steps at full rank, then the total budget (target_r x layers) is
    approached on a cubic curve until `tfinal` steps before the end, the last `tfinal` steps keeping the final
    ranks. Its length, `total_step`, is the run's number of optimizer steps."""

    method: Literal["adalora"]
    init_r: int = Field(12, gt=0)
    """Rank every layer starts at."""
    target_r: int = Field(8, gt=0)
    """Average rank per layer at the end (the budget is target_r x the number of adapted layers)."""
    tinit: int = Field(0, ge=0)
    """Optimizer steps at full rank before pruning starts."""
    tfinal: int = Field(0, ge=0)
    """Optimizer steps at the end with the final ranks fixed."""
    deltaT: int = Field(1, gt=0)
    """Prune every deltaT optimizer steps."""
    beta1: float = Field(0.85, gt=0, lt=1)
    """EMA factor of the importance (sensitivity) scores."""
    beta2: float = Field(0.85, gt=0, lt=1)
    """EMA factor of their uncertainty."""
    orth_reg_weight: float = Field(0.5, ge=0)
    """Weight of the orthogonality regulariser (A A^T and B^T B towards I) added to the loss."""
    alpha: float = Field(8.0, gt=0)
    """Scaling numerator: the update is scaled by alpha / init_r (peft's lora_alpha, default 8)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex | None = None
    """Module-name suffixes, `all-linear` or {regex: ...}; null: peft's default for the architecture (q_proj,
    v_proj for Llama). Linear and Conv1D layers only."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""
    total_step: int | None = Field(None, gt=0)
    """Optimizer steps the schedule spans. null: the run's own count, which is what it must be (peftkit fills it
    in and writes it to adapter_config.json); a value here must equal it."""
    rank_pattern: dict[str, list[bool]] | None = None
    """The triplets each layer kept, by `<module path>.lora_E` (peft's field): written on export, read from an
    adapter (`init_from`). Not a training setting: leave it out of recipes."""

    @property
    def r(self) -> int:
        """The rank a layer starts at (the memory estimate's low-rank width)."""
        return self.init_r

    @field_validator("target_r")
    @classmethod
    def _below_init_r(cls, v: int, info: ValidationInfo) -> int:
        init_r = info.data.get("init_r")
        if init_r is not None and v >= init_r:
            raise ValueError(f"must be below init_r ({init_r}): AdaLoRA prunes from init_r down to an average of "
                             "target_r. Lower target_r or raise init_r (or use adapter.method: lora for a fixed rank)")
        return v

    @field_validator("rank_pattern")
    @classmethod
    def _full_masks(cls, v: dict[str, list[bool]] | None, info: ValidationInfo) -> dict[str, list[bool]] | None:
        init_r = info.data.get("init_r")
        for key, mask in (v or {}).items():
            if not key.endswith(E_KEY) or len(mask) != init_r:
                raise ValueError(f"entry {key!r} should be `<module path>.lora_E` with a list of init_r ({init_r}) "
                                 f"true/false values; it has {len(mask)}")
        return v


@dataclass(frozen=True)
class AdaLoraFacts:
    alpha: float
    init_r: int
    """peft's `ranknum`: the scaling divides by it, whatever rank the layer was cut to."""
    fan_in_fan_out: bool = False
    """The base weight is stored (in, out) (transformers' Conv1D)."""

    @property
    def scaling(self) -> float:
        return self.alpha / (self.init_r + 1e-5)


def adalora_delta(parts: dict[str, torch.Tensor], facts: AdaLoraFacts) -> torch.Tensor:
    """scaling * B diag(E) A in fp32, in the base weight's layout: (out, in), (in, out) for Conv1D."""
    a, e, b = parts["lora_A"].float(), parts["lora_E"].float(), parts["lora_B"].float()
    delta = (b @ (a * e)) * facts.scaling
    return delta.T if facts.fan_in_fan_out else delta


class AdaLoraLinear(AdapterLayer):
    """AdaLoRA around nn.Linear, transformers' Conv1D or a bitsandbytes linear layer."""

    def __init__(self, base_layer: nn.Module, r: int, facts: AdaLoraFacts, dropout: float = 0.0) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        self.facts = facts
        device = base_layer.weight.device
        where = draw_device(device)  # drawn on the CPU, then moved: one seed, one adapter on any device
        # peft's init: E = 0 (the update starts at zero), A and B ~ N(0, 0.02).
        self.lora_A = nn.Parameter((torch.randn(r, in_features, device=where) * 0.02).to(device))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device))
        self.lora_B = nn.Parameter((torch.randn(out_features, r, device=where) * 0.02).to(device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        a = self.lora_A
        product = self.lora_dropout(x.to(a.dtype)) @ (a * self.lora_E).T @ self.lora_B.T
        if is_quantized(self.base_layer):  # as peft's 4-bit/8-bit layers: the product rounded, then scaled
            # peft's fp32 ranknum + 1e-5, a 1-element tensor (so the division promotes to fp32), made by a fill on
            # the device: torch.tensor of a Python list copies from the host, a sync per layer on CUDA.
            ranknum = torch.full((1,), float(self.facts.init_r), device=product.device) + 1e-5
            return (result + product.to(result.dtype) * self.facts.alpha / ranknum).to(result.dtype)
        return (result + product * self.facts.scaling).to(result.dtype)  # summed in fp32, rounded once (peft)


class PeftAdaLoraConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of an ADALORA adapter_config.json that peftkit reads (defaults: peft's AdaLoraConfig)."""

    init_r: int = Field(12, gt=0)
    target_r: int = Field(8, gt=0)
    tinit: int = Field(0, ge=0)
    tfinal: int = Field(0, ge=0)
    deltaT: int = Field(1, gt=0)
    beta1: float = Field(0.85, gt=0, lt=1)
    beta2: float = Field(0.85, gt=0, lt=1)
    orth_reg_weight: float = Field(0.5, ge=0)
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    lora_alpha: float = Field(8.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Features peftkit does not implement: a value here is refused rather than silently ignored.
    bias: str = "none"
    alpha_pattern: dict | None = None


def cut_to_pattern(state: dict[str, torch.Tensor], rank_pattern: dict[str, list[bool]], prefix: str) -> dict[str, torch.Tensor]:
    """`state` (PEFT keys, `prefix` + path) with each layer of `rank_pattern` cut to its kept triplets: rows of
    A and E, columns of B (peft's `resize_state_dict_by_rank_pattern`). Layers already cut are left alone."""
    state = dict(state)
    for key, mask in rank_pattern.items():
        module, keep = prefix + key[: -len(E_KEY)], torch.tensor(mask, dtype=torch.bool)
        if state[f"{module}.lora_E"].shape[0] == sum(mask):
            continue
        state[f"{module}.lora_A"] = state[f"{module}.lora_A"][keep].contiguous()
        state[f"{module}.lora_E"] = state[f"{module}.lora_E"][keep].contiguous()
        state[f"{module}.lora_B"] = state[f"{module}.lora_B"][:, keep].contiguous()
    return state


class AdaLora(Method):
    name = "adalora"
    title = "AdaLoRA"
    peft_type = "ADALORA"
    config = AdaLoraConfig
    peft_config = PeftAdaLoraConfig
    param_names = ("lora_A", "lora_B", "lora_E")
    rank_dims = {"lora_A": 0, "lora_B": 1, "lora_E": 0}
    trainer_reshapes = True

    @classmethod
    def resolve(cls, cfg: AdaLoraConfig, model_type: str | None) -> AdaLoraConfig:
        if cfg.target_modules is not None:
            return cfg
        if model_type not in DEFAULTS:
            raise NoDefault("target_modules", "AdaLoRA", model_type, DEFAULTS, "name the modules",
                            "target_modules: [q_proj, v_proj]")
        return cfg.model_copy(update={"target_modules": DEFAULTS[model_type]})

    @classmethod
    def wrap(cls, base: nn.Module, cfg: AdaLoraConfig, path: str) -> AdaLoraLinear:
        if isinstance(base, nn.Embedding):
            raise PeftkitError(f"adapter.target_modules: '{path}' is an Embedding; AdaLoRA (as in peft) adapts Linear "
                               "and Conv1D layers only. Leave embeddings out of target_modules (all-linear does).")
        mask = (cfg.rank_pattern or {}).get(path + E_KEY)
        r = cfg.init_r if mask is None else sum(mask)
        return AdaLoraLinear(base, r, cls.layer_facts(cfg, path, is_conv1d(base)), cfg.dropout)

    @classmethod
    def layer_facts(cls, cfg: AdaLoraConfig, path: str, fan_in_fan_out: bool) -> AdaLoraFacts:
        return AdaLoraFacts(cfg.alpha, cfg.init_r, fan_in_fan_out)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: AdaLoraFacts) -> torch.Tensor:
        return weight + adalora_delta(parts, facts).to(weight.device)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: AdaLoraFacts) -> torch.Tensor:
        return weight - adalora_delta(parts, facts).to(weight.device)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: AdaLoraFacts) -> tuple[int, int]:
        shape = (parts["lora_B"].shape[0], parts["lora_A"].shape[1])
        return shape[::-1] if facts.fan_in_fan_out else shape

    @classmethod
    def to_peft(cls, cfg: AdaLoraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        # peft refuses a config without total_step > tinit + tfinal even to load an adapter for inference; an
        # adapter not trained by a peftkit run (no schedule of its own) gets the smallest valid value.
        return cls.peft_common(cfg, targets, base_name) | {
            "init_r": cfg.init_r,
            "target_r": cfg.target_r,
            "tinit": cfg.tinit,
            "tfinal": cfg.tfinal,
            "deltaT": cfg.deltaT,
            "beta1": cfg.beta1,
            "beta2": cfg.beta2,
            "orth_reg_weight": cfg.orth_reg_weight,
            "total_step": cfg.total_step or cfg.tinit + cfg.tfinal + 1,
            "rank_pattern": cfg.rank_pattern,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "init_lora_weights": True,
        }

    @classmethod
    def from_peft(cls, peft: PeftAdaLoraConfig, config_file: Path) -> AdaLoraConfig:
        refuse_unsupported(peft, config_file, ("alpha_pattern",))
        # Keys with the adapter name (`...lora_E.default`) are how peft keeps them in memory; files drop it.
        pattern = {re.sub(r"\.lora_E\.[^.]+$", E_KEY, k): v for k, v in (peft.rank_pattern or {}).items()} or None
        # total_step is left out: it was the length of the run that made the adapter; a run starting from it
        # (init_from) has its own.
        fields = {k: getattr(peft, k) for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                                                 "orth_reg_weight")}
        try:
            return AdaLoraConfig(method="adalora", **fields, alpha=peft.lora_alpha, dropout=peft.lora_dropout,
                                 target_modules=targets_from_peft(peft.target_modules, config_file),
                                 modules_to_save=peft.modules_to_save or [], rank_pattern=pattern,
                                 **filters_from_peft(peft, config_file))
        except ValidationError as e:
            err = e.errors()[0]
            raise PeftkitError(f'{config_file}: "{err["loc"][0]}" {err["msg"].removeprefix("Value error, ")}. '
                               f"{REEXPORT}") from None

    @classmethod
    def describe(cls, cfg: AdaLoraConfig) -> str:
        return f"AdaLoRA r={cfg.init_r}->{cfg.target_r}"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # As after training: A's rows and B's columns near unit length (the orthogonality regulariser pulls
        # them there), singular values E of both signs and order 10 * std.
        with torch.no_grad():
            a, e, b = layer.lora_A, layer.lora_E, layer.lora_B
            a.copy_(torch.randn(a.shape, generator=generator) / a.shape[1] ** 0.5)
            b.copy_(torch.randn(b.shape, generator=generator) / b.shape[0] ** 0.5)
            e.copy_(torch.randn(e.shape, generator=generator) * 10 * std)

    @classmethod
    def trainer(cls, model: nn.Module, cfg: AdaLoraConfig, total_steps: int):
        from peftkit.methods.adalora_trainer import AdaLoraTrainer

        return AdaLoraTrainer(model, cfg, total_steps)


AdaLoraLinear.method = AdaLora
