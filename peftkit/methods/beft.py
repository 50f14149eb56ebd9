"""BEFT, bias-efficient fine-tuning (Huang et al. 2025, arXiv:2509.15974): a trained bias vector added to the output
of each target layer, y = W x + b + d, the value projections by default (peft's per-architecture mapping). One number
per output feature: a 7B Llama's v_proj layers hold 131,072 of them.

Merged, d goes into the base layer's bias, b' = b + d; a layer without a bias (Llama's attention projections) has
nowhere to put it, so such an adapter cannot be merged (peft refuses too) and is refused before training with
export.merged. Names and shapes as HF peft 0.21's `BeftLayer`: `<path>.beft_bias`, (1, out). peft adds it to the base
output in fp32 and casts back once, as here; its BEFT adapts nn.Linear layers (bitsandbytes' included) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, PeftConfigBase, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, linear_shape, not_a_linear
from peftkit.methods.target_filters import NoDefault
from peftkit.section import AdapterSection, TargetRegex

DEFAULTS: dict[str, list[str]] = {
    model_type: ["v_proj"] for model_type in ("opt", "gptj", "gpt_neo", "bart", "llama", "llama4", "mistral", "mixtral",
                                              "phi", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3")
} | {"t5": ["v"], "mt5": ["v"], "roberta": ["value"], "bert": ["value"], "deberta-v2": ["value_proj"]}
"""peft 0.21's TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING: the value projections."""


class BeftConfig(AdapterSection):
    """BEFT: a trained bias added to each target layer's output."""

    method: Literal["beft"]
    target_modules: Literal["all-linear"] | list[str] | TargetRegex | None = None
    """Module-name suffixes, `all-linear` or {regex: ...}; null: peft's default for the architecture (the value
    projections, v_proj for Llama). nn.Linear and 4-bit/8-bit layers only."""
    init_weights: bool = True
    """true: the biases start at 0, the base model; false (debugging, as peft): drawn from N(0, 1)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""


@dataclass(frozen=True)
class BeftFacts:
    pass


class BeftLinear(AdapterLayer):
    """BEFT around nn.Linear or a bitsandbytes linear layer: the base layer runs, then the trained bias is added."""

    def __init__(self, base_layer: nn.Module, cfg: BeftConfig) -> None:
        super().__init__(base_layer)
        self.facts = BeftFacts()
        device = base_layer.weight.device
        # peft draws the vector whatever init_weights (zeroing it after): the same draws from torch's generator
        bias = torch.randn((1, linear_shape(base_layer)[1]), device=draw_device(device))
        if cfg.init_weights:
            bias.zero_()
        self.beft_bias = nn.Parameter(bias.to(device))  # PEFT's key `beft_bias`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        return (result + self.beft_bias.flatten()).to(result.dtype)


class PeftBeftConfig(PeftConfigBase):
    """The fields of a BEFT adapter_config.json that peftkit reads (defaults: peft 0.21's BeftConfig)."""

    init_weights: bool = True


class Beft(Method):
    name = "beft"
    title = "BEFT"
    peft_type = "BEFT"
    config = BeftConfig
    peft_config = PeftBeftConfig
    param_names = ("beft_bias",)
    needs_bias = True

    @classmethod
    def resolve(cls, cfg: BeftConfig, model_type: str | None) -> BeftConfig:
        if cfg.target_modules is not None:
            return cfg
        if model_type not in DEFAULTS:
            raise NoDefault("target_modules", "BEFT", model_type, DEFAULTS, "name the modules to add a bias to",
                            "target_modules: [v_proj] for a Llama-like model")
        return cfg.model_copy(update={"target_modules": DEFAULTS[model_type]})

    @classmethod
    def wrap(cls, base: nn.Module, cfg: BeftConfig, path: str) -> BeftLinear:
        if kind := not_a_linear(base):
            raise PeftkitError(f"adapter.target_modules: '{path}' is {kind}; BEFT adds a bias to nn.Linear (and "
                               "4-bit/8-bit) layers only, as peft 0.21's BEFT, which could not load the adapter "
                               "otherwise. Target Linear layers, or use LoRA for this model.")
        return BeftLinear(base, cfg)

    @classmethod
    def layer_facts(cls, cfg: BeftConfig, path: str, fan_in_fan_out: bool) -> BeftFacts:
        if fan_in_fan_out:
            raise PeftkitError(f"'{path}' is GPT-2's Conv1D; BEFT adapts nn.Linear layers only, as peft's.")
        return BeftFacts()

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: BeftFacts) -> torch.Tensor:
        return weight.clone()

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: BeftFacts) -> torch.Tensor:
        return weight.clone()

    @staticmethod
    def merge_bias(bias: torch.Tensor, parts: dict[str, torch.Tensor], facts: BeftFacts) -> torch.Tensor:
        return bias + parts["beft_bias"].float().flatten().to(bias.device)

    @staticmethod
    def unmerge_bias(bias: torch.Tensor, parts: dict[str, torch.Tensor], facts: BeftFacts) -> torch.Tensor:
        return bias - parts["beft_bias"].float().flatten().to(bias.device)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: BeftFacts) -> tuple[int | None, ...]:
        return parts["beft_bias"].shape[-1], None

    @classmethod
    def to_peft(cls, cfg: BeftConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {"init_weights": cfg.init_weights}

    @classmethod
    def from_peft(cls, peft: PeftBeftConfig, config_file: Path) -> BeftConfig:
        refuse_unsupported(peft, config_file, ())
        return BeftConfig(method="beft", init_weights=peft.init_weights,
                          target_modules=targets_from_peft(peft.target_modules, config_file),
                          modules_to_save=peft.modules_to_save or [])

    @classmethod
    def kept_for_backward(cls, cfg: BeftConfig, layer: AdapterLayer) -> tuple[int, int]:
        return 0, 0  # (an addition: its gradient is the output's, summed)


BeftLinear.method = Beft
