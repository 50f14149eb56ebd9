"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"; without the
projection, P-tuning v2, Liu et al. 2022): n trainable key/value vectors in front of every attention layer's keys and
values. Each layer attends to its prefix as to n earlier tokens; the real tokens' positions start at n.

The prefix is one table (n, num_layers x 2 x kv_dim), kv_dim = key/value heads x head dim (grouped-query attention:
the key/value heads, as peft). With `projection: true` a two-layer tanh MLP maps a (n, kv_dim) table to it (the
paper's reparameterisation, for stabler training); peft, and peftkit's export, save only the MLP's output.
Row t of layer l's key is columns [2l kv_dim, (2l + 1) kv_dim) of row t, its value the next kv_dim, each split into
heads of head_dim (peft's `get_prompt`). The prefix enters through transformers' `Cache.update`, so any model whose
attention reads a `Cache` takes it, in a fresh forward and in `generate` alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.virtual import (VirtualConfig, VirtualMethod, VirtualPeftConfig, VirtualTokens, install, model_dims,
                                     text_config)


class PrefixTuningConfig(VirtualConfig):
    """Prefix tuning: trainable key/value prefixes at every layer."""

    method: Literal["prefix_tuning"]
    projection: bool = False
    """false: the prefixes themselves train (P-tuning v2); true: an MLP computes them from a smaller table."""
    encoder_hidden_size: int | None = Field(None, gt=0)
    """Hidden width of the projection MLP; null: kv_dim (peft's default). Only read with projection: true."""


class PrefixTuningPeftConfig(VirtualPeftConfig):
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None


def kv_dims(model_config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) as peft's `_prepare_prompt_learning_config` reads them."""
    dims = model_dims(model_config)
    text = text_config(model_config)
    heads = getattr(text, "num_key_value_heads", None) or dims["num_attention_heads"]
    if getattr(text, "model_type", None) == "falcon" and not text.new_decoder_architecture:  # what its cache holds
        heads = 1 if text.multi_query else text.num_kv_heads  # Falcon-7B: multi-query, one key/value head
    head_dim = getattr(text, "head_dim", None) or dims["token_dim"] // dims["num_attention_heads"]
    return dims["num_layers"], heads, head_dim


def check_key_value_layers(model: nn.Module) -> None:
    """Refuse a model whose cache holds other than keys and values alone for some layer (`DynamicCache`'s layer for
    each: Jamba's, Qwen3-Next's or LFM2's state-space, linear-attention or convolution layers, Falcon-H1's layers
    holding both, Gemma 3n's layers reading another's keys): the first forward with the prefix failed there with
    transformers' error (peft's too)."""
    from transformers import DynamicCache
    from transformers import cache_utils

    recurrent = getattr(cache_utils, "LinearAttentionCacheLayerMixin", ())  # transformers 5's hybrid models
    layers = DynamicCache(config=model.config).layers
    other = [i for i, layer in enumerate(layers)
             if not isinstance(layer, cache_utils.DynamicLayer) or isinstance(layer, recurrent)]
    if other:
        kinds = ", ".join(sorted({type(layers[i]).__name__ for i in other}))
        raise PeftkitError(
            f"adapter.method prefix_tuning: prefix tuning puts key/value prefixes in every layer's attention cache, and "
            f"the cache of layer{'s' if len(other) > 1 else ''} {', '.join(map(str, other))} of this "
            f"{text_config(model.config).model_type} model holds other than keys and values alone ({kinds}: the state "
            "of a state-space, linear-attention or convolution layer, or another layer's keys); peft's prefix tuning "
            "fails on it too. Use prompt_tuning or p_tuning, whose virtual tokens go in front of the input, or lora.")


class PrefixTuning(VirtualMethod):
    name: ClassVar[str] = "prefix_tuning"
    title: ClassVar[str] = "Prefix tuning"
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    config: ClassVar[type] = PrefixTuningConfig
    peft_config: ClassVar[type] = PrefixTuningPeftConfig

    @classmethod
    def recipe_conflict(cls, recipe: Any) -> str | None:
        long_context = recipe.model.long_context
        if long_context is not None and long_context.s2_attention:  # the keys outnumber the queries: full attention
            return ("model.long_context.s2_attention: prefix tuning puts its prefix in every layer's keys and values, "
                    "outside the groups shifted sparse attention forms, so training would run plain full attention; "
                    "remove model.long_context, or use a method it trains with (lora, prompt_tuning, llama_adapter)")
        return super().recipe_conflict(recipe)

    @classmethod
    def install(cls, model: nn.Module, cfg: PrefixTuningConfig) -> VirtualTokens:
        layers, heads, head_dim = kv_dims(model.config)  # an attention-free model is refused there (Mamba)
        check_key_value_layers(model)
        kv, n = heads * head_dim, cfg.num_virtual_tokens
        if not cfg.projection:
            return install(model, VirtualTokens(cls, torch.randn(n, layers * 2 * kv)))
        hidden = cfg.encoder_hidden_size or kv
        encoder = nn.Sequential(nn.Linear(kv, hidden), nn.Tanh(), nn.Linear(hidden, layers * 2 * kv))
        return install(model, VirtualTokens(cls, torch.randn(n, kv), encoder))

    @classmethod
    def prefixes(cls, virtual: VirtualTokens, model: nn.Module, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (key, value), (batch, kv heads, n, head dim), in the model's dtype."""
        layers, heads, head_dim = kv_dims(model.config)
        n = virtual.num_virtual_tokens
        dtype = model.get_input_embeddings().weight.dtype
        table = virtual.prompt().to(dtype).view(n, layers * 2, heads, head_dim).permute(1, 2, 0, 3)
        table = table.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (layers x 2, batch, heads, n, head dim)
        return [(table[2 * layer], table[2 * layer + 1]) for layer in range(layers)]

    @classmethod
    def prefilled_cache(cls, virtual: VirtualTokens, model: nn.Module, batch: int, cache=None):
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config) if cache is None else cache
        for layer, (key, value) in enumerate(cls.prefixes(virtual, model, batch)):
            cache.update(key, value, layer)
        return cache

    @classmethod
    def add_virtual_tokens(cls, virtual: VirtualTokens, model: nn.Module, kwargs: dict, batch: int) -> None:
        given = kwargs.pop("past_key_values", None) or kwargs.get("cache")  # an empty one: filled in place
        kwargs["cache"] = cls.prefilled_cache(virtual, model, batch, given)

    @classmethod
    def check_run(cls, model: nn.Module, cfg: Any) -> None:
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.2x's name
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing:
            raise PeftkitError("training.gradient_checkpointing: prefix tuning's key/value prefixes sit in the "
                               "attention cache, which recomputing a layer in the backward pass would append to "
                               "twice (peft refuses it too). Set training.gradient_checkpointing: false.")

    @classmethod
    def model_facts(cls, cfg: PrefixTuningConfig, model_config) -> dict:
        layers, heads, head_dim = kv_dims(model_config)
        return {"token_dim": heads * head_dim, "num_attention_heads": heads, "num_layers": layers,
                "encoder_hidden_size": cfg.encoder_hidden_size or heads * head_dim}

    @classmethod
    def trained_params(cls, cfg: PrefixTuningConfig, facts: dict) -> int | None:
        kv, layers = facts.get("token_dim"), facts.get("num_layers")
        if not cfg.projection or not (isinstance(kv, int) and isinstance(layers, int)):
            return None  # without the projection the saved table is what trained
        hidden, out = cfg.encoder_hidden_size or kv, layers * 2 * kv
        return cfg.num_virtual_tokens * kv + (kv + 1) * hidden + (hidden + 1) * out  # the table and the tanh MLP

    @classmethod
    def to_peft(cls, cfg: PrefixTuningConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {"prefix_projection": cfg.projection, "init_weights": None,
                                                           "encoder_hidden_size": cfg.encoder_hidden_size}

    @classmethod
    def from_peft(cls, peft: PrefixTuningPeftConfig, config_file: Path) -> PrefixTuningConfig:
        cls.check_peft(peft, config_file)
        return PrefixTuningConfig(method="prefix_tuning", num_virtual_tokens=peft.num_virtual_tokens,
                                  projection=peft.prefix_projection, encoder_hidden_size=peft.encoder_hidden_size)
