"""ShadowPEFT (peft 0.21's ShadowConfig/SHADOW): a small trainable "shadow" network rides the frozen decoder's layer
loop. A shadow backbone (by default `shadow_model: mirror`: the base's own decoder class built from its config with
fewer, maybe narrower, layers, fed the base's frozen input embeddings) gives an initial shadow state s0 (b, n, d); then
at each targeted decoder block l, with h the block's input and s the shadow state before it:

    h'   = h + alpha W_up Dropout(W_down (h - s))        the discrepancy, injected through a rank-r bottleneck
    o    = block(h')                                      the frozen block
    s    = (1 - g) s + g T(o),  g = sigmoid(G(o))         a gated residual update of the shadow state

T and G are two-layer MLPs (d -> update_hidden_size -> d, GELU). W_up starts at zero, so step 0 is the base model.
Only the shadow parts train; the update depends on the input at every layer, so nothing folds into a weight
(`mergeable = False`, as peft's). Training adds peft's auxiliary loss, auxiliary_loss_weight x the cross-entropy of
the base's output head on s0 (`ShadowTrainer`), which makes the shadow network a model of its own.

peftkit's shape: the targeted blocks' `ShadowLayer`s hold their own parts in ModuleDicts keyed `default`, as peft
names them; the backbone (and a projection to the base's width, where the shadow is narrower) lives in one `ShadowTrunk`
that every layer holds as its `shared` module (saved once, as `base_model.shadow_backbone.default.<name>`, peft's key).
A forward pre-hook on the decoder (the module holding the blocks) takes its inputs; the first targeted block computes s0
from them with the mask and positions the decoder made for its blocks, and the blocks hand the state on through the
trunk, first to last. Generation with a KV cache keeps the backbone's own cache beside the base's
(`ShadowTrunk.seed`): peft 0.21.2's ShadowCache is never used under transformers 5 (its hook reads `past_key_values`,
which transformers now passes as `cache`), so each new token's s0 is the backbone's output for that token alone and
peft's cached generation differs from its own cache-free decoding (tests/test_shadow.py).
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, MethodTrainer, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, SharedTensors
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, PeftExcludedTargets, PeftLayerTargets,
                                             filters_from_peft, narrow)
from peftkit.section import TargetRegex

MIRRORED = ("llama", "mistral", "qwen2")
"""The architectures whose decoder the mirror backbone copies here (a `layers` list of blocks, `embed_tokens`, a
block that returns its hidden states): the Llama family. Llama and Qwen2 in the tests; Mistral (a sliding window)
checked by hand against peft (logits bit for bit)."""
KEY = "default"
"""peft keeps its adapter name inside ShadowPEFT's keys (`shadow_down.default.weight`); its files always say default."""
PARTS = ("shadow_down", "shadow_up", "shadow_update_transform", "shadow_update_gate")


class ShadowConfig(LayerTargets, ExcludedTargets):
    """ShadowPEFT: a small shadow network beside the frozen decoder, injected into every targeted block."""

    method: Literal["shadow"]
    r: int = Field(8, gt=0)
    """Rank of the injection bottleneck W_down (r x d), W_up (d x r)."""
    shadow_alpha: float = 0.1
    """Strength of the injected correction."""
    shadow_dropout: float = Field(0.2, ge=0, lt=1)
    """Dropout on the discrepancy h - s before the bottleneck."""
    init_weights: bool = True
    """true: W_up starts at 0 (the base model at step 0); false: kaiming-uniform, as peft (debugging)."""
    shadow_model: str = "mirror"
    """`mirror`: the base's decoder class built from its config with the shadow_* sizes below; else a local directory
    of a transformers model (its embeddings frozen), as peft's AutoModel.from_pretrained; in a recipe, relative to
    its directory (`peftkit.recipe.resolution`)."""
    shadow_num_hidden_layers: int | None = Field(None, gt=0)
    """Blocks of the mirror backbone (null: 1)."""
    shadow_hidden_size: int | None = Field(None, gt=0)
    """Width of the mirror backbone (null: the base's); another width adds a trained projection to the base's."""
    shadow_num_attention_heads: int | None = Field(None, gt=0)
    """Attention heads of the mirror backbone (null: the base's)."""
    shadow_intermediate_size: int | None = Field(None, gt=0)
    """MLP width of the mirror backbone (null: the base's)."""
    share_embeddings: bool = True
    """Feed the mirror backbone the base's frozen input embeddings (it then has none of its own); only where the
    widths match."""
    update_hidden_size: int | None = Field(None, gt=0)
    """Hidden width of the update MLPs T and G (null: r)."""
    auxiliary_loss_weight: float = Field(0.05, ge=0)
    """Weight of the shadow's own next-token loss (the base's output head on s0) added in training; 0: none."""
    target_modules: list[str] | TargetRegex | None = None
    """The decoder blocks to inject into, contiguous (names as `model.layers.0`, or {regex: ...}); null: every block."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""

    @model_validator(mode="after")
    def _sizes_are_the_mirror_s(self) -> ShadowConfig:
        sizes = [k for k in ("shadow_num_hidden_layers", "shadow_hidden_size", "shadow_num_attention_heads",
                             "shadow_intermediate_size") if getattr(self, k) is not None]
        if self.shadow_model != "mirror" and sizes:
            raise ValueError(f"adapter.{sizes[0]}: a shadow_model directory defines its own architecture; remove "
                             f"{', '.join(sizes)} (they size the mirror backbone only)")
        return self


class PeftShadowConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of a SHADOW adapter_config.json (defaults: peft 0.21's ShadowConfig)."""

    r: int = Field(8, gt=0)
    shadow_alpha: float = 0.1
    shadow_dropout: float = Field(0.2, ge=0, lt=1)
    init_weights: bool = True
    shadow_model: str = "mirror"
    shadow_num_hidden_layers: int | None = Field(None, gt=0)
    shadow_hidden_size: int | None = Field(None, gt=0)
    shadow_num_attention_heads: int | None = Field(None, gt=0)
    shadow_intermediate_size: int | None = Field(None, gt=0)
    share_embeddings: bool = True
    update_hidden_size: int | None = Field(None, gt=0)
    auxiliary_loss_weight: float = Field(0.05, ge=0)


def decoder_of(model: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) of the decoder whose `layers` list holds the blocks (a Llama's `model`), for the architectures
    the mirror supports (`MIRRORED`); any other is refused."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for path, module in model.named_modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "embed_tokens") and \
                model_type in MIRRORED:
            return path, module
    raise PeftkitError(f"adapter.method shadow: model type {model_type!r} has no decoder of Llama's shape (a `layers` "
                       f"list beside `embed_tokens`); ShadowPEFT here supports {', '.join(MIRRORED)}. Use another "
                       "method (lora, bottleneck) for this model.")


def _mirror(decoder: nn.Module, cfg: ShadowConfig) -> nn.Module:
    """peft's mirror backbone: the decoder's class built from a copy of its config with the shadow_* sizes."""
    config = copy.deepcopy(decoder.config)
    config.num_hidden_layers = cfg.shadow_num_hidden_layers or 1
    for key, value in (("hidden_size", cfg.shadow_hidden_size), ("intermediate_size", cfg.shadow_intermediate_size),
                       ("num_attention_heads", cfg.shadow_num_attention_heads)):
        if value is not None:
            setattr(config, key, value)
    if getattr(config, "layer_types", None) is not None:  # (Qwen2's per-layer list, sized for the base)
        types = list(config.layer_types) or ["full_attention"]
        config.layer_types = (types + types[-1:] * config.num_hidden_layers)[:config.num_hidden_layers]
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(config.max_window_layers, config.num_hidden_layers)
    return type(decoder)(config)


def _pretrained(directory: str, device: torch.device) -> nn.Module:
    """A shadow backbone from a local directory (peft's AutoModel.from_pretrained), its embeddings frozen. On the
    meta device (the memory estimate) its architecture alone, from its config: transformers refuses to load weights
    there."""
    import json

    from transformers import AutoConfig, AutoModel

    raw = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8")) \
        if (Path(directory) / "config.json").is_file() else {}
    if raw.get("model_type") == "causal_lm_with_hidden_projection":
        raise PeftkitError(f"adapter.shadow_model: {directory} is a projected shadow checkpoint "
                           "(causal_lm_with_hidden_projection), which peftkit does not read; use a plain transformers "
                           "model directory, or shadow_model: mirror.")
    if device.type == "meta":
        backbone = AutoModel.from_config(AutoConfig.from_pretrained(directory))
    else:
        backbone = AutoModel.from_pretrained(directory)
    for embedding in (backbone.get_input_embeddings(), backbone.get_output_embeddings()):
        if isinstance(embedding, nn.Module):
            embedding.requires_grad_(False)
    return backbone


class ShadowTrunk(SharedTensors):
    """The model-level shadow network (backbone, projection) every ShadowLayer holds as `shared`, and the state the
    blocks hand on during a forward. Saved under peft's names: `shadow_backbone.default.<its state dict's keys>`."""

    def __init__(self, backbone: nn.Module, projection: nn.Module, share: bool, mirror: bool) -> None:
        super().__init__({}, saved=True)
        self.shadow_backbone = nn.ModuleDict({KEY: backbone})
        self.shadow_projection = nn.ModuleDict({KEY: projection})
        self.share, self.mirror = share, mirror
        self.inputs: dict | None = None  # the decoder's inputs, from its pre-hook to the first block
        self.state: torch.Tensor | None = None  # s before the next block, during a forward
        self.seed_state: torch.Tensor | None = None  # s0 of the last forward: the auxiliary loss reads it

    def tensors(self) -> dict[str, torch.Tensor]:
        # (the state dict: a rotary embedding's non-persistent buffers are left out, as peft's file leaves them)
        return self.state_dict(keep_vars=True)

    def take_inputs(self, decoder: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the decoder: what s0 is computed from once the first targeted block runs (the ids or
        embeddings, the 2-D mask); the state of an earlier forward is dropped."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if self.share and embeds is None:
            embeds = decoder.embed_tokens(ids)
        self.inputs = {"ids": None if embeds is not None else ids, "embeds": embeds,
                       "mask": kwargs.get("attention_mask")}
        self.state = self.seed_state = None

    def seed(self, block_kwargs: dict, layer_idx: int) -> None:
        """s0 as peft computes it, the backbone on the base's input embeddings (or the ids, with embeddings of its
        own), at the decoder's positions. A mirror backbone takes the mask the decoder made for its blocks (its config
        is the base's: it would make the same one, and read the padding on the host a second time); a pretrained one
        makes its own from the 2-D mask. With a KV cache, the backbone's own rides beside the base's (an attribute of
        it), a token at a time as it; `layer_idx` is the first targeted block's, whose length the base cache says
        (the blocks before it have stored this step's tokens already)."""
        inputs, self.inputs = self.inputs, None
        base_cache = block_kwargs.get("cache", block_kwargs.get("past_key_values"))
        shadow_cache = self._shadow_cache(base_cache, layer_idx) if base_cache is not None else None
        position_ids = block_kwargs.get("position_ids")
        out = self.shadow_backbone[KEY](
            input_ids=inputs["ids"], inputs_embeds=inputs["embeds"],
            attention_mask=block_kwargs.get("attention_mask") if self.mirror else inputs["mask"],
            cache=shadow_cache, use_cache=shadow_cache is not None, return_dict=True,
            **({"position_ids": position_ids} if position_ids is not None else {}))
        self.state = self.seed_state = self.shadow_projection[KEY](out.last_hidden_state)

    def _shadow_cache(self, base_cache: Any, layer_idx: int) -> Any:
        from transformers import DynamicCache

        shadow = getattr(base_cache, "peftkit_shadow_cache", None)
        seen = base_cache.get_seq_length(layer_idx)
        if shadow is None:
            if seen:
                raise PeftkitError(f"A KV cache of {seen} tokens came without the shadow network's own: ShadowPEFT "
                                   "needs the cache its model filled (generate from the prompt, or without a cache).")
            shadow = DynamicCache(config=self.shadow_backbone[KEY].config)
            base_cache.peftkit_shadow_cache = shadow
        elif shadow.get_seq_length() != seen:
            raise PeftkitError(f"The shadow network's KV cache holds {shadow.get_seq_length()} tokens, the base's "
                               f"{seen}: the cache was cropped or reordered, which ShadowPEFT's does not follow.")
        return shadow


class ShadowLayer(AdapterLayer):
    """ShadowPEFT around one decoder block: injects the shadow state into its input, then advances the state from its
    output (the trunk carries it to the next block)."""

    def __init__(self, base_layer: nn.Module, hidden_size: int) -> None:
        super().__init__(base_layer)
        self.facts = None
        self.hidden_size = hidden_size
        self.first = self.last = False  # the first targeted block seeds the state, the last ends it

    @property
    def weight(self) -> torch.Tensor:
        return next(self.base_layer.parameters())

    def build(self, cfg: ShadowConfig) -> None:
        """peft's modules, drawn in peft's order (called for each block in model order, after the backbone)."""
        d, r, width = self.hidden_size, cfg.r, cfg.update_hidden_size or cfg.r
        device = self.weight.device
        where = draw_device(device)
        down, up = nn.Linear(d, r, bias=False, device=where), nn.Linear(r, d, bias=False, device=where)
        if cfg.init_weights:
            nn.init.zeros_(up.weight)
        mlps = [nn.Sequential(nn.Linear(d, width, device=where), nn.GELU(), nn.Linear(width, d, device=where))
                for _ in range(2)]
        for name, module in zip(PARTS, (down, up, *mlps), strict=True):
            setattr(self, name, nn.ModuleDict({KEY: module.to(device)}))
        self.shadow_dropout = nn.ModuleDict({KEY: nn.Dropout(cfg.shadow_dropout) if cfg.shadow_dropout else
                                             nn.Identity()})
        self.shadow_alpha = cfg.shadow_alpha

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        trunk = self.shared
        if self.first and trunk.inputs is not None:
            trunk.seed(kwargs, self.base_layer.self_attn.layer_idx)
        shadow = trunk.state
        if shadow is None:  # (the decoder's hook did not run: a block called on its own)
            return self.base_layer(hidden, *args, **kwargs)
        if shadow.shape[:-1] != hidden.shape[:-1]:
            raise PeftkitError(f"The shadow state has {tuple(shadow.shape[:-1])} positions, the block's input "
                               f"{tuple(hidden.shape[:-1])}: ShadowPEFT's blocks must be called through the decoder.")
        out = self.base_layer(self._inject(hidden, shadow), *args, **kwargs)
        output = out if isinstance(out, torch.Tensor) else out[0]
        trunk.state = None if self.last else self._update(output, shadow)
        return out

    def _inject(self, hidden: torch.Tensor, shadow: torch.Tensor) -> torch.Tensor:
        # peft's casts: the discrepancy in the adapter's dtype, the correction back in the hidden states'
        down = self.shadow_down[KEY]
        delta = self.shadow_dropout[KEY]((hidden - shadow).to(down.weight.dtype))
        delta = self.shadow_up[KEY](down(delta))
        return hidden + (self.shadow_alpha * delta).to(hidden.dtype)

    def _update(self, output: torch.Tensor, shadow: torch.Tensor) -> torch.Tensor:
        transform = self.shadow_update_transform[KEY]
        hidden = output.to(transform[0].weight.dtype)
        gate = torch.sigmoid(self.shadow_update_gate[KEY](hidden))
        return ((1.0 - gate) * shadow.to(hidden.dtype) + gate * transform(hidden)).to(shadow.dtype)


class ShadowTrainer(MethodTrainer):
    """Adds peft's auxiliary loss to each micro-batch: weight x the next-token cross-entropy of the base's output
    head on s0, over the batch's labelled positions."""

    def __init__(self, model: nn.Module, weight: float) -> None:
        self.model, self.weight = model, weight

    def batch_loss(self, batch: dict, labelled: int | None) -> torch.Tensor | None:
        from peftkit.loss import next_token_loss_sum

        trunk = next(m for m in self.model.modules() if isinstance(m, ShadowTrunk))
        if trunk.seed_state is None:
            return None
        logits = self.model.get_output_embeddings()(trunk.seed_state)
        return self.weight * next_token_loss_sum(logits, batch["labels"], labelled)[0]


def _pick_blocks(names: list[str], blocks: list[str], cfg: ShadowConfig) -> list[str]:
    """The blocks `names` that cfg's layers_to_transform keeps: a block's index is its own, the last part of its path
    (`model.layers.3`), where peft's layer index (the number before a further dot) finds none; a full path given in
    target_modules whatever its index, as LoRA's. layers_pattern, where given, must name the blocks' list."""
    wanted, pattern = cfg.layers_to_transform, cfg.layers_pattern
    if wanted in (None, []) or not names:
        return names
    wanted = wanted if isinstance(wanted, list) else [wanted]
    listed = blocks[0].rsplit(".", 2)[-2]  # (`layers`)
    if pattern and not any(re.fullmatch(p, listed) for p in ([pattern] if isinstance(pattern, str) else pattern)):
        raise PeftkitError(f"adapter.layers_pattern {pattern!r} does not name the decoder's list of blocks, "
                           f"'{listed}'; set layers_pattern: {listed}, or remove it.")
    given = cfg.target_modules if isinstance(cfg.target_modules, list) else []
    kept = [n for n in names if n in given or blocks.index(n) in wanted]
    if not kept:
        raise PeftkitError(f"adapter.layers_to_transform {cfg.layers_to_transform} keeps none of the targeted blocks "
                           f"(numbered {blocks.index(names[0])} to {blocks.index(names[-1])}); give indices among those.")
    return kept


class Shadow(Method):
    name = "shadow"
    title = "ShadowPEFT"
    peft_type = "SHADOW"
    config = ShadowConfig
    peft_config = PeftShadowConfig
    param_names = tuple(f"{part}.{KEY}.{leaf}" for part in PARTS for leaf in (
        ("weight",) if part in ("shadow_down", "shadow_up") else ("0.weight", "0.bias", "2.weight", "2.bias")))
    rank_dims = {"shadow_down": 0, "shadow_up": 1, "shadow_down.default": 0, "shadow_up.default": 1}  # (inspect: whole)
    mergeable = False
    alone = ("its shadow network runs beside the whole decoder (one per model), not beside a layer that named adapters "
             "route")
    fsdp_refusal = ("its backbone is one module every targeted block reaches (the trunk), which FSDP cannot shard once "
                    "per decoder layer (not run here)")

    @classmethod
    def skips_parameters(cls, cfg: ShadowConfig) -> bool:
        """True: the last targeted block's update MLPs feed nothing (the state ends there; peft's are unused too), so
        torch DDP must look for unused parameters (else its second forward fails, measured on 2 processes)."""
        return True

    @classmethod
    def frozen_in_file(cls, peft: PeftShadowConfig, shapes: dict[str, tuple[int, ...]]) -> int:
        """A pretrained backbone's frozen embeddings (shadow_model a directory), which the file saves as peft's: the
        backbone's frozen parameters, found by building it from its config on the meta device."""
        if peft.shadow_model == "mirror" or not Path(peft.shadow_model).is_dir():
            return 0
        meta = torch.device("meta")
        with meta:
            backbone = _pretrained(peft.shadow_model, meta)
        frozen = {f"base_model.shadow_backbone.{KEY}.{n}" for n, p in backbone.named_parameters() if not p.requires_grad}
        return sum(math.prod(shape) for key, shape in shapes.items() if key in frozen)

    @classmethod
    def merge_refusal(cls, cfg=None) -> str:
        return ("ShadowPEFT adapters (method: shadow) cannot be merged into a plain model: the shadow state injected "
                "into each block depends on the input, so nothing folds into a weight (peft's ShadowPEFT cannot merge "
                "either). Keep the adapter separate: set export.merged: false (or skip `peftkit merge`) and use it "
                "with `peftkit eval/generate --adapter DIR`.")

    @classmethod
    def recipe_conflict(cls, recipe: Any) -> str | None:
        if recipe.classification:
            return ("adapter.method: shadow trains causal language models here; peft's ShadowPEFT classifier keeps a "
                    "shadow head of its own beside the classifier, which peftkit does not write. Use model.task: "
                    "causal_lm, or another method (lora) for a classifier")
        return super().recipe_conflict(recipe)

    @classmethod
    def select_targets(cls, model: nn.Module, cfg: ShadowConfig, every_entry: bool) -> list[str]:
        """The decoder blocks target_modules names (null: all), which exclude_modules and layers_to_transform narrow,
        in order; they must be consecutive, as the state rides the decoder's loop from the first to the last."""
        from peftkit.adapters import regex_targets  # (peftkit.adapters imports this module)
        from peftkit.methods.layer import suffix_match

        path, decoder = decoder_of(model)
        blocks = [f"{path}.layers.{i}" if path else f"layers.{i}" for i in range(len(decoder.layers))]
        targets = cfg.target_modules
        if targets is None:
            names = blocks
        else:
            modules = [n for n, _ in model.named_modules()]
            names = regex_targets(targets, modules) if isinstance(targets, TargetRegex) else [
                n for n in modules if any(suffix_match(n, t) for t in targets)]
            if other := [n for n in names if n not in blocks]:
                raise PeftkitError(f"adapter.target_modules: '{other[0]}' is no decoder block; ShadowPEFT wraps whole "
                                   f"blocks ({blocks[0]} ... {blocks[-1]}). Name blocks, or null for all of them.")
        names = _pick_blocks(narrow(names, cfg.model_copy(update={"layers_to_transform": None})), blocks, cfg)
        if not names:
            raise PeftkitError("adapter.target_modules names no decoder block of this model; name blocks (e.g. "
                               f"{blocks[0]}), or null for all of them.")
        indices = [blocks.index(n) for n in names]
        if indices != list(range(indices[0], indices[0] + len(indices))):
            raise PeftkitError(f"adapter.target_modules: the blocks {', '.join(map(str, indices))} are not "
                               "consecutive; ShadowPEFT's state rides the decoder from its first block to its last, "
                               "so target a run of consecutive blocks.")
        return names

    @classmethod
    def wrap(cls, base: nn.Module, cfg: ShadowConfig, path: str) -> ShadowLayer:
        return ShadowLayer(base, int(base.hidden_size))

    @classmethod
    def link_layers(cls, model: nn.Module, cfg: ShadowConfig, layers: dict[str, AdapterLayer]) -> None:
        """Build the trunk, then each block's parts, in peft's order of draws; hook the decoder."""
        _, decoder = decoder_of(model)
        embedding = decoder.embed_tokens.weight
        where = draw_device(embedding.device)
        with torch.device(where):
            backbone = _mirror(decoder, cfg) if cfg.shadow_model == "mirror" else _pretrained(cfg.shadow_model, where)
        d, width = int(decoder.config.hidden_size), int(backbone.config.hidden_size)
        projection = nn.Linear(width, d, bias=False) if width != d else nn.Identity()
        share = cfg.share_embeddings and cfg.shadow_model == "mirror" and width == d
        if share:
            del backbone.embed_tokens
        mirror = cfg.shadow_model == "mirror"
        trunk = ShadowTrunk(backbone, projection, share, mirror).to(embedding.device, embedding.dtype)
        ordered = list(layers.values())
        for layer in ordered:
            layer.build(cfg)
            layer.shared = trunk
        ordered[0].first = ordered[-1].last = True
        decoder.register_forward_pre_hook(trunk.take_inputs, with_kwargs=True)

    @classmethod
    def layer_facts(cls, cfg: ShadowConfig, path: str, fan_in_fan_out: bool) -> None:
        return None

    @classmethod
    def to_peft(cls, cfg: ShadowConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r, "shadow_alpha": cfg.shadow_alpha, "shadow_dropout": cfg.shadow_dropout,
            "init_weights": cfg.init_weights, "shadow_model": cfg.shadow_model,
            "shadow_num_hidden_layers": cfg.shadow_num_hidden_layers, "shadow_hidden_size": cfg.shadow_hidden_size,
            "shadow_num_attention_heads": cfg.shadow_num_attention_heads,
            "shadow_intermediate_size": cfg.shadow_intermediate_size, "share_embeddings": cfg.share_embeddings,
            "update_hidden_size": cfg.update_hidden_size, "auxiliary_loss_weight": cfg.auxiliary_loss_weight,
        }

    @classmethod
    def from_peft(cls, peft: PeftShadowConfig, config_file: Path) -> ShadowConfig:
        refuse_unsupported(peft, config_file, ())
        if peft.task_type not in (None, "CAUSAL_LM"):
            raise PeftkitError(f"{config_file}: task_type {peft.task_type!r}; peftkit reads causal-LM ShadowPEFT "
                               "adapters only (peft's sequence classifier keeps a shadow head of its own).")
        if peft.shadow_model != "mirror" and not Path(peft.shadow_model).is_dir():
            raise PeftkitError(f"{config_file}: shadow_model {peft.shadow_model!r} is neither 'mirror' nor a local "
                               "directory; peftkit downloads no shadow model (and reads no Diffusers one). Download "
                               "it and set shadow_model to its directory.")
        settings = {k: getattr(peft, k) for k in PeftShadowConfig.model_fields if k in ShadowConfig.model_fields
                    and k not in ("target_modules", "modules_to_save", "exclude_modules", "layers_to_transform",
                                  "layers_pattern")}
        targets = peft.target_modules
        if isinstance(targets, list):
            targets = [re.sub(r"^base_model\.model\.", "", t) for t in targets]
        return ShadowConfig(method="shadow", **settings,
                            target_modules=targets_from_peft(targets, config_file) if targets else None,
                            modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def trainer(cls, model: nn.Module, cfg: ShadowConfig, total_steps: int) -> ShadowTrainer | None:
        return ShadowTrainer(model, cfg.auxiliary_loss_weight) if cfg.auxiliary_loss_weight > 0 else None

    @classmethod
    def kept_for_backward(cls, cfg: ShadowConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token, upper bound: the discrepancy, its dropout mask and dropped copy (3 d), the bottleneck (r), the
        # correction (d); the update's input, both MLPs' hidden layers before and after GELU (4 u), the gate, the
        # candidate and the new state (3 d). The backbone's own activations are a decoder's few layers more.
        from peftkit.activations import HIDDEN_PER_LAYER, MLP_PER_LAYER

        d, width = layer.hidden_size, cfg.update_hidden_size or cfg.r
        per_token = 8 * d + cfg.r + 4 * width
        if layer.first:  # the backbone, a decoder of its own (trained in full), its final norm and projection: once
            shadow = layer.shared.shadow_backbone[KEY].config
            h, i = int(shadow.hidden_size), int(shadow.intermediate_size)
            per_token += shadow.num_hidden_layers * (HIDDEN_PER_LAYER * h + MLP_PER_LAYER * i) + 2 * h + d
        return per_token, 0

    @classmethod
    def describe(cls, cfg: ShadowConfig) -> str:
        depth = cfg.shadow_num_hidden_layers or 1
        shadow = f"a {depth}-layer mirror" if cfg.shadow_model == "mirror" else cfg.shadow_model
        return f"{cls.title} r={cfg.r}, {shadow} shadow"


ShadowLayer.method = Shadow
