"""Cartridge (Eyuboglu et al. 2025, "Cartridges: Lightweight and general-purpose long context representations via
self-study", arXiv:2506.06266; peft's CARTRIDGE): a trained key/value prefix in every attention layer, as prefix tuning
without its projection, whose first `num_frozen_tokens` rows never train (the paper freezes the first as an attention
sink, for stable training). The table is peft's: (n, num_layers x 2 x kv_dim), saved whole as `prompt_embeddings`
(frozen rows first), its rows drawn from N(0, 1) (the frozen ones first, then the rest, as peft's two tensors). It
enters every layer's cache as prefix tuning's does (`peftkit.methods.prefix_tuning`), in a fresh forward and in
`generate` alike. peft initialises it from a text's keys and values with a separate step
(`initialize_kv_prefix_from_text`); such an adapter loads here as any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.prefix_tuning import PrefixTuning, check_key_value_layers, kv_dims
from peftkit.methods.virtual import VirtualConfig, VirtualPeftConfig, VirtualTokens, install


class CartridgeConfig(VirtualConfig):
    """Cartridge: a trained key/value prefix at every layer, its first rows frozen."""

    method: Literal["cartridge"]
    num_frozen_tokens: int = Field(1, ge=0)
    """The first rows of the prefix that never train (peft's default 1: an attention sink); at most num_virtual_tokens
    (all of them: nothing trains, which train refuses)."""

    @model_validator(mode="after")
    def _frozen_within(self) -> CartridgeConfig:
        if self.num_frozen_tokens > self.num_virtual_tokens:
            raise ValueError(f"num_frozen_tokens ({self.num_frozen_tokens}) is more than num_virtual_tokens "
                             f"({self.num_virtual_tokens}); freeze at most that many (peft refuses it too)")
        return self


class CartridgePeftConfig(VirtualPeftConfig):
    num_frozen_tokens: int = Field(1, ge=0)


class Cartridge(PrefixTuning):
    name: ClassVar[str] = "cartridge"
    title: ClassVar[str] = "Cartridge"
    peft_type: ClassVar[str] = "CARTRIDGE"
    config: ClassVar[type] = CartridgeConfig
    peft_config: ClassVar[type] = CartridgePeftConfig
    saved_beyond_trained: ClassVar[str] = "its first num_frozen_tokens rows, frozen, are saved with the trained ones"

    @classmethod
    def install(cls, model: nn.Module, cfg: CartridgeConfig) -> VirtualTokens:
        layers, heads, head_dim = kv_dims(model.config)  # an attention-free model is refused there (Mamba)
        check_key_value_layers(model)
        width, frozen = layers * 2 * heads * head_dim, cfg.num_frozen_tokens
        # peft's draws: the frozen rows' tensor first, then the trained rows'
        kept = torch.empty(frozen, width).normal_() if frozen else None
        table = torch.empty(cfg.num_virtual_tokens - frozen, width).normal_()
        return install(model, VirtualTokens(cls, table, frozen=kept))

    @classmethod
    def check_run(cls, model: nn.Module, cfg: CartridgeConfig) -> None:
        super().check_run(model, cfg)
        if cfg.num_frozen_tokens == cfg.num_virtual_tokens:
            raise PeftkitError(f"adapter.num_frozen_tokens: all {cfg.num_virtual_tokens} virtual tokens are frozen, so "
                               "nothing would train; freeze fewer (peft's default 1), or give more num_virtual_tokens.")

    @classmethod
    def model_facts(cls, cfg: CartridgeConfig, model_config) -> dict:
        layers, heads, head_dim = kv_dims(model_config)
        return {"token_dim": heads * head_dim, "num_attention_heads": heads, "num_layers": layers}

    @classmethod
    def trained_params(cls, cfg: CartridgeConfig, facts: dict) -> int | None:
        kv, layers = facts.get("token_dim"), facts.get("num_layers")
        if not (isinstance(kv, int) and isinstance(layers, int)):
            return None
        return (cfg.num_virtual_tokens - cfg.num_frozen_tokens) * layers * 2 * kv  # (the frozen rows are saved too)

    @classmethod
    def to_peft(cls, cfg: CartridgeConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {"num_frozen_tokens": cfg.num_frozen_tokens}

    @classmethod
    def from_peft(cls, peft: CartridgePeftConfig, config_file: Path) -> Any:
        cls.check_peft(peft, config_file)
        return CartridgeConfig(method="cartridge", num_virtual_tokens=peft.num_virtual_tokens,
                               num_frozen_tokens=peft.num_frozen_tokens)

    @classmethod
    def describe(cls, cfg: CartridgeConfig) -> str:
        return f"{cls.title}, {cfg.num_virtual_tokens} virtual tokens ({cfg.num_frozen_tokens} frozen)"
