"""LoRA's `layer_replication` (peft's): the base's decoder layers stacked again, sharing their weights, into a deeper
model whose every layer gets its own LoRA (model growth as in SOLAR's depth up-scaling, trained with adapters).

`[[0, 4], [2, 5]]` turns layers 0..4 into 0, 1, 2, 3, 2, 3, 4: the ranges [start, end) in order. A copy shares every
weight of its original (no memory beyond the adapters), takes its new index (`layer_idx`, for the KV cache) and keeps
its original's attention type; the config says the new count (`num_hidden_layers`, and `layer_types` where the
architecture has them, which peft leaves as they were). Keys and `target_modules` name the new layers, as peft's. A
merge gives a plain model of the new depth, each copy with its own LoRA folded in.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

from pydantic import Field, field_validator
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import PeftConfigBase
from peftkit.section import AdapterSection

LayerMap = list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=2, max_length=2)]] | None


def _check_map(value: LayerMap) -> LayerMap:
    for start, end in value or ():
        if start >= end:
            raise ValueError(f"range [{start}, {end}] is empty: each is [start, end) with start < end, e.g. [0, 4]")
    if value is not None and not value:
        raise ValueError("is empty; give the ranges of layers to stack, e.g. [[0, 4], [2, 5]], or leave the key out")
    return value


class LayerReplication(AdapterSection):
    """The `adapter` key that stacks the base's layers again."""

    layer_replication: LayerMap = None
    """Ranges [start, end) of the base's decoder layers to stack, in order, into a deeper model whose copies share the
    weights (`[[0, 4], [2, 5]]`: layers 0, 1, 2, 3, 2, 3, 4); each layer of it gets its own LoRA."""

    _map = field_validator("layer_replication")(lambda value: _check_map(value))


class PeftLayerReplication(PeftConfigBase):
    """adapter_config.json's layer_replication."""

    layer_replication: LayerMap = None
    _map = field_validator("layer_replication")(lambda value: _check_map(value))

    def replication_settings(self) -> dict[str, Any]:
        return {"layer_replication": self.layer_replication} if self.layer_replication else {}


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """(the module holding the decoder layers, the attribute's name), found where peft looks: `layers` below the
    `.model` chain, or `h`."""
    inner = model
    while hasattr(inner, "model") and isinstance(inner.model, nn.Module):
        inner = inner.model
    for attr in ("layers", "h"):
        if isinstance(getattr(inner, attr, None), nn.ModuleList):
            return inner, attr
    raise PeftkitError(f"adapter.layer_replication: no list of decoder layers found in this {type(model).__name__} "
                       "(`layers` or `h` below its chain of `.model`, where peft looks; peft refuses it too); leave "
                       "layer_replication out for this model.")


def _shared_copy(layer: nn.Module) -> nn.Module:
    """A copy of `layer` holding the very same parameters and buffers (nothing is copied but the modules)."""
    memo = {id(t): t for t in [*layer.parameters(), *layer.buffers()]}
    return copy.deepcopy(layer, memo)


def replicate_layers(model: nn.Module, layer_map: list[list[int]]) -> None:
    """Stack the decoder layers of `model` as `layer_map` (adapter.layer_replication) says, in place."""
    owner, attr = _decoder_layers(model)
    layers = getattr(owner, attr)
    if past := [pair for pair in layer_map if pair[1] > len(layers)]:
        raise PeftkitError(f"adapter.layer_replication: range {past[0]} reaches past the model's {len(layers)} "
                           f"layers (numbered 0 to {len(layers) - 1}; a range is [start, end), end at most "
                           f"{len(layers)}).")
    originals = [i for start, end in layer_map for i in range(start, end)]
    for i in {i for i in originals if originals.count(i) > 1}:  # (AdapterLayer.merge refuses to fold into them)
        for p in layers[i].parameters():
            p.stacked_copies = originals.count(i)
        for module in layers[i].modules():  # and on their modules, which copy.deepcopy keeps it on (a Parameter's
            if module._parameters:  # deepcopy drops it, the sharing kept: an in-place merge then folded every copy's)
                module.stacked_copies = originals.count(i)
    stacked = []
    for new_index, i in enumerate(originals):
        stacked.append(_shared_copy(layers[i]))
        for module in stacked[-1].modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    setattr(owner, attr, nn.ModuleList(stacked))
    configs = {id(c): c for c in (model.config, getattr(owner, "config", model.config))}.values()
    for config in configs:
        if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == len(layers):
            config.layer_types = [config.layer_types[i] for i in originals]
        for name in ("num_hidden_layers", "n_layer"):
            if hasattr(config, name):
                setattr(config, name, len(originals))
