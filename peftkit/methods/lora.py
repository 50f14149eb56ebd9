"""LoRA (Hu et al. 2021): y = W x + (alpha / r) * B A x, with W frozen and A (r x in), B (out x r) trained; with
`use_dora`, DoRA on top. Its settings (a recipe's and peft's adapter_config.json) and the method: which layers it
wraps and how, merges, the PEFT format. The layers are `peftkit.methods.lora_layers`'.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.alora import (UNMERGEABLE, Activation, PeftActivation, alora_conflict,
                                   install_invocation)
from peftkit.methods.bdlora import (BlockDiagonalLora, PeftBlockDiagonal, bdlora_conflict, block_side)
from peftkit.methods.base import REEXPORT, Method, targets_from_peft
from peftkit.methods.layer import AdapterLayer, is_conv1d, is_quantized, linear_shape
from peftkit.methods.dora import dora_merge
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, PeftExcludedTargets, PeftLayerTargets,
                                             filters_from_peft, regex_keys)
from peftkit.methods.factored_weight import aligned_rank
from peftkit.methods.param_lora import (ParamLora, PeftTargetParameters, TargetParameters, check_parameter_settings,
                                        note_fused_experts, without_holders, wrap_parameters)
from peftkit.methods.replication import LayerReplication, PeftLayerReplication
from peftkit.methods.token_rows import PeftTrainableTokens, TrainableTokenIndices
from peftkit.methods.kasa import Kasa, KasaTrainer, PeftKasa, kasa_conflict
from peftkit.methods.monteclora import PeftMonteclora
from peftkit.methods.velora import PeftVelora, Velora
from peftkit.methods import lora_layers
from peftkit.methods.lora_layers import (ALoraLinear, DoraEmbedding, DoraLinear, KasaLinear, LoraEmbedding, LoraFacts,
                                         LoraLinear, VeloraLinear, _LoraLayer, lora_delta, lora_scaling)
from peftkit.methods.lora_init import MOVES_BASE, for_original_base, initialize, shared_weight, without_niter
from peftkit.section import TargetRegex


class LoraConfig(LayerTargets, ExcludedTargets, TrainableTokenIndices, LayerReplication, Activation, TargetParameters,
                 BlockDiagonalLora, Velora, Kasa):
    """The adapter injected into the frozen base."""

    method: Literal["lora"] = "lora"
    r: int = Field(8, gt=0)
    """LoRA rank: higher = more capacity, more memory."""
    alpha: float = Field(16.0, gt=0)
    """Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex = "all-linear"
    """`all-linear` (every Linear/Conv1D except the output head), module-name suffixes, or {regex: ...}."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""
    use_dora: bool = False
    """DoRA: also train a magnitude per output feature (an embedding's: per dimension); each step adds the norms of
    W + s B A."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    """How A and B start: default (A kaiming-uniform, B 0), gaussian (A normal, B 0), pissa (the principal singular
    directions of W; the base keeps the rest) or olora (QR of W). pissa/olora change the base weights; the
    exported adapter is converted (rank 2r) to apply to the original base, as peft does."""
    pissa_niter: int | None = Field(None, gt=0)
    """init: pissa only: fast SVD (`torch.svd_lowrank`) with this many iterations instead of the exact SVD."""
    lora_fa: bool = False
    """LoRA-FA: A stays frozen at its init and only B trains (no gradient, optimizer state or saved input for A)."""
    rank_pattern: dict[str, Annotated[int, Field(gt=0)]] = Field(default_factory=dict)
    """Per-module ranks, {regex: rank}: a key matches the end of a module's path (`q_proj`, `layers\\.0\\..*v_proj`),
    the first that matches wins, and other modules keep `r` (peft's rank_pattern)."""
    alpha_pattern: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    """Per-module alphas, {regex: alpha}, matched as rank_pattern; other modules keep `alpha` (peft's alpha_pattern)."""
    lora_bias: bool = False
    """A trained bias in lora_B, starting at zero (peft's lora_bias; for LoRAs extracted from a full fine-tune, whose
    biases moved too): the update is s (B A x + b). A merge adds s b to the base's bias, so it needs one."""
    _trained_as: str | None = PrivateAttr(None)
    """Read from an adapter trained by a LoRA variant that is plain LoRA outside training (MonteCLoRA), which peftkit
    does not train: its name, for `adapter.init_from`'s refusal."""
    _residual_init: str | None = PrivateAttr(None)
    """Read from peft's unconverted PiSSA or OLoRA adapter (its init): it fits the residual base that init leaves,
    until `peftkit.methods.lora_init.on_original_base` converts it."""

    @property
    def scaling(self) -> float:
        """The scaling of a layer of rank `r`; merges read each layer's own rank from its tensors."""
        return lora_scaling(self.alpha, self.r, self.use_rslora)

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """The rank and alpha of the layer at module path `path`: rank_pattern's and alpha_pattern's, else r and
        alpha."""
        return _pattern_value(self.rank_pattern, path, self.r), _pattern_value(self.alpha_pattern, path, self.alpha)

    _pattern_keys = field_validator("rank_pattern", "alpha_pattern")(lambda pattern: regex_keys(pattern))

    @model_validator(mode="after")
    def _init_combinations(self) -> LoraConfig:
        if self.pissa_niter is not None and self.init != "pissa":
            raise ValueError(f"adapter.pissa_niter is for init: pissa (init is {self.init}); remove pissa_niter")
        if self.init != "default" and self.init_from:
            raise ValueError(f"adapter.init: {self.init} draws the step-0 weights, and adapter.init_from already gives "
                             "them; remove adapter.init")
        if self.lora_bias and (self.use_dora or self.init != "default"):
            what = "use_dora" if self.use_dora else f"init: {self.init}"
            raise ValueError(f"adapter.lora_bias with {what} is not supported (peft refuses it too); set lora_bias: "
                             f"false, or {'use_dora: false' if self.use_dora else 'init: default'}")
        if refusal := check_parameter_settings(self) or bdlora_conflict(self) or kasa_conflict(self):
            raise ValueError(refusal)
        if self.velora_config is not None and (other := next((key for key, on in (
                ("use_dora", self.use_dora), ("alora_invocation_tokens", self.alora_invocation_tokens),
                ("use_bdlora", self.use_bdlora), ("target_parameters", self.target_parameters)) if on), None)):
            raise ValueError(f"adapter.velora_config with {other} is not supported (peft refuses the combination); "
                             f"remove {other}, or velora_config")
        if self.alora_invocation_tokens and (self.use_dora or self.init in MOVES_BASE):
            what = "use_dora" if self.use_dora else f"init: {self.init}"
            why = ("peft refuses it too" if self.use_dora else
                   "it rewrites the base weights, so the tokens before the invocation would not keep the base's outputs")
            raise ValueError(f"adapter.alora_invocation_tokens (aLoRA) with {what} is not supported ({why}); remove "
                             f"{'use_dora' if self.use_dora else 'init'}, or alora_invocation_tokens")
        if self.init in MOVES_BASE and self.use_dora:
            raise ValueError(f"adapter.init: {self.init} with use_dora is not supported; use init: default or "
                             f"gaussian with DoRA{without_niter(self.pissa_niter)}, or set use_dora: false")
        return self


def _pattern_value(pattern: dict, path: str, default):
    """peft's get_pattern_key: the value of the first key of `pattern` whose regex matches the end of `path` (whole
    path components: `q_proj` matches `model.layers.0.self_attn.q_proj`, not `...xq_proj`), else `default`."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


BASE_KEEPING_INITS = ("gaussian", "orthogonal", "eva")
"""peft's init_lora_weights strings whose adapter fits the original base as saved."""
RANDOM_PISSA = (" (its fast SVD draws random numbers, so the residual cannot be computed again: peft's own loading "
                "gets another one)")


class PeftLoraConfig(PeftLayerTargets, PeftExcludedTargets, PeftTrainableTokens, PeftLayerReplication,
                     PeftActivation, PeftTargetParameters, PeftBlockDiagonal, PeftVelora, PeftKasa, PeftMonteclora):
    """The fields of a LORA adapter_config.json that peftkit reads (defaults: peft's LoraConfig)."""

    r: int = Field(gt=0)
    lora_alpha: float = Field(8.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    use_rslora: bool = False
    bias: str = "none"
    use_dora: bool = False
    init_lora_weights: bool | str = True
    lora_bias: bool = False
    rank_pattern: dict[str, Annotated[int, Field(gt=0)]] | None = None
    alpha_pattern: dict[str, Annotated[float, Field(gt=0)]] | None = None
    _pattern_keys = field_validator("rank_pattern", "alpha_pattern")(lambda pattern: regex_keys(pattern))


class Lora(Method):
    name = "lora"
    title = "LoRA"
    peft_type = "LORA"
    config = LoraConfig
    peft_config = PeftLoraConfig
    param_names = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
                   "lora_magnitude_vector", "lora_velora_embed", "lora_diag")
    # lora_A / lora_embedding_A are (r, in); lora_B / lora_embedding_B are (out, r).
    rank_dims = {"lora_A": 0, "lora_embedding_A": 0, "lora_B": 1, "lora_embedding_B": 1}
    # As peft's create_loraplus_optimizer (KaSA's lora_diag, 1-D, with B); DoRA's magnitude trains at `lr` (peft puts
    # 1-D tensors with B).
    loraplus_roles = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "B", "lora_diag": "B",
                      "lora_embedding_A": "embedding", "lora_embedding_B": "embedding"}

    @classmethod
    def recipe_conflict(cls, recipe: Any) -> str | None:
        cfg, q = recipe.adapter, recipe.quantization
        if cfg.alora_invocation_tokens and (refusal := alora_conflict(recipe)):
            return refusal
        if q is None or cfg.init not in MOVES_BASE:
            return None
        # Every layer a target names ends with it, so one that ends with a skip_modules entry (transformers keeps
        # suffix matches whole) is never quantized. Prefix and regex entries need the model's names, which a recipe
        # lacks: refused here (too strict, never wrong).
        kept = isinstance(cfg.target_modules, list) and all(any(t.endswith(s) for s in q.skip_modules)
                                                            for t in cfg.target_modules)
        if kept:  # only layers the quantization leaves in full precision
            return None
        # As at injection (`lora_init.initialize`), where the layers are known: here the recipe alone says so.
        return (f"adapter.init: {cfg.init} rewrites the base weights as W - s B A, and quantization.method {q.method} "
                "quantizes the layers it targets (every linear layer but quantization.skip_modules), so the residual "
                "would be re-quantized and the exported adapter would not reproduce the trained model; use init: "
                f"default or gaussian with a quantized base{without_niter(cfg.pissa_niter)}, or drop the quantization "
                "section")

    @classmethod
    def select_targets(cls, model: nn.Module, cfg: LoraConfig, every_entry: bool) -> list[str]:
        if cfg.target_modules == []:  # parameters only (target_parameters)
            return []
        if cfg.target_modules == "all-linear" and not cfg.target_parameters and every_entry:
            note_fused_experts(model)
        if cfg.target_parameters and isinstance(cfg.target_modules, list) and not every_entry:
            cfg = without_holders(model, cfg)
            if not cfg.target_modules:
                return []
        names = super().select_targets(model, cfg, every_entry)
        if cfg.init in MOVES_BASE:  # the residual would move every module sharing the weight
            for name in names:
                if other := shared_weight(model, model.get_submodule(name)):
                    raise PeftkitError(
                        f"adapter.init: {cfg.init} rewrites the base weight of '{name}' as W - s B A, and it is shared "
                        f"with '{other}' (tied): that would move both, which the exported adapter (a LoRA on "
                        f"'{name}') cannot give back. Leave '{name.rsplit('.', 1)[-1]}' out of adapter.target_modules, "
                        f"or use init: default{without_niter(cfg.pissa_niter)}.")
        return names

    @classmethod
    def wrap(cls, base: nn.Module, cfg: LoraConfig, path: str) -> _LoraLayer:
        if isinstance(base, nn.Embedding) and cfg.lora_fa:
            raise PeftkitError(
                f"adapter.lora_fa: '{path}' is an Embedding, whose LoRA A starts at zero: frozen there, the layer could "
                "never change. Leave embeddings out of adapter.target_modules (all-linear does), or set lora_fa: false."
            )
        if isinstance(base, nn.Embedding) and cfg.velora_config is not None:
            raise PeftkitError(f"adapter.velora_config: '{path}' is an Embedding, and VeLoRA trains linear layers only "
                               "(peft refuses it too); leave embeddings out of adapter.target_modules.")
        if isinstance(base, nn.Embedding) and cfg.kasa_config is not None:
            raise PeftkitError(f"adapter.kasa_config: '{path}' is an Embedding, and KaSA adapts linear layers only "
                               "(peft refuses it too); leave embeddings out of adapter.target_modules.")
        if isinstance(base, nn.Embedding) and cfg.use_bdlora:
            raise PeftkitError(f"adapter.use_bdlora: '{path}' is an Embedding, and BD-LoRA adapts linear layers only "
                               "(peft refuses it too); leave embeddings out of adapter.target_modules.")
        if isinstance(base, nn.Embedding) and cfg.alora_invocation_tokens:
            raise PeftkitError(f"adapter.alora_invocation_tokens: '{path}' is an Embedding, and aLoRA adapts linear "
                               "layers only (peft refuses it too); leave embeddings out of adapter.target_modules.")
        if isinstance(base, nn.Embedding) and cfg.lora_bias:
            raise PeftkitError(f"adapter.lora_bias: '{path}' is an Embedding, which has no bias (peft refuses it too); "
                               "leave embeddings out of adapter.target_modules, or set lora_bias: false.")
        if isinstance(base, nn.Embedding):
            layer = (DoraEmbedding if cfg.use_dora else LoraEmbedding)(base, *cfg.rank_and_alpha(path), cfg.dropout,
                                                                        cfg.use_rslora)
        elif cfg.use_dora:
            layer = DoraLinear(base, *cfg.rank_and_alpha(path), cfg.dropout, cfg.use_rslora)
        elif cfg.alora_invocation_tokens:
            layer = ALoraLinear(base, *cfg.rank_and_alpha(path), cfg.dropout, cfg.use_rslora, cfg.lora_bias)
        elif cfg.kasa_config is not None:
            if is_quantized(base) or is_conv1d(base):
                what = "a 4-bit/8-bit layer, whose weight cannot be truncated and stay" if is_quantized(base) else \
                    "a Conv1D, which peft's KaSA refuses"
                raise PeftkitError(f"adapter.kasa_config: '{path}' is {what}; KaSA adapts unquantized Linear layers. "
                                   "Drop kasa_config, or the quantization (or leave the layer out of the targets).")
            layer = KasaLinear(base, *cfg.rank_and_alpha(path), cfg.dropout, cfg.use_rslora)
            layer.setup_kasa(path)
        elif cfg.velora_config is not None:
            if is_quantized(base):
                raise PeftkitError(f"adapter.velora_config: '{path}' is a 4-bit/8-bit layer, which peft's VeLoRA does "
                                   "not take; drop velora_config, or the quantization.")
            layer = VeloraLinear(base, *cfg.rank_and_alpha(path), cfg.dropout, cfg.use_rslora, cfg.lora_bias)
            layer.setup_velora(cfg.velora_config)
        else:
            side = block_side(cfg.use_bdlora, path) if cfg.use_bdlora else None
            if side and (is_conv1d(base) or is_quantized(base)):
                raise PeftkitError(
                    f"adapter.use_bdlora: '{path}' is {'a Conv1D' if is_conv1d(base) else 'a 4-bit/8-bit'} layer, "
                    "where peft builds no block-diagonal factor (its "
                    f"{'BD-LoRA reads a Linear' if is_conv1d(base) else 'bitsandbytes layers build plain ones'}), so "
                    "neither could read the other's file; leave it out of the use_bdlora lists (with match_strict: "
                    "false), or train on an unquantized Linear base.")
            blocks = (side, cfg.use_bdlora.nblocks) if side else None
            layer = LoraLinear(base, *cfg.rank_and_alpha(path), cfg.dropout, cfg.use_rslora, cfg.lora_bias, blocks)
        initialize(layer, cfg.init, cfg.pissa_niter, path)
        if cfg.lora_fa:
            layer.lora_A.weight.requires_grad_(False)
        return layer

    @classmethod
    def wrap_parameters(cls, model: nn.Module, cfg: LoraConfig, wrapped: set[str], every_entry: bool) -> list[str]:
        return wrap_parameters(model, cfg, wrapped, every_entry) if cfg.target_parameters else []

    @classmethod
    def link_layers(cls, model: nn.Module, cfg: LoraConfig, layers: dict[str, AdapterLayer]) -> None:
        if cfg.alora_invocation_tokens:
            adapted = {path: layer for path, layer in layers.items() if isinstance(layer, ALoraLinear)}
            install_invocation(model, cfg.alora_invocation_tokens, adapted)

    @classmethod
    def merge_refusal(cls, cfg: Any = None) -> str | None:
        return UNMERGEABLE if getattr(cfg, "alora_invocation_tokens", None) else None

    @classmethod
    def layer_facts(cls, cfg: LoraConfig, path: str, fan_in_fan_out: bool) -> LoraFacts:
        side = block_side(cfg.use_bdlora, path) if cfg.use_bdlora else None
        n = cfg.use_bdlora.nblocks if side else 1
        return LoraFacts(cfg.rank_and_alpha(path)[1], cfg.use_rslora, fan_in_fan_out, cfg.use_dora,
                         blocks_a=n if side == "A" else 1, blocks_b=n if side == "B" else 1)

    @classmethod
    def kept_for_backward(cls, cfg: LoraConfig, layer: AdapterLayer) -> tuple[int, int]:
        if isinstance(layer, ParamLora):
            # Each routed token's input (A's gradient) and its r values (B's), for each of its experts; per layer, the
            # factors as grouped_mm takes them (contiguous, r padded to 16 bytes). Not W + s B A: it is never made whole
            # on transformers' own experts paths (`FactoredWeight`; peft's keeps the adapted stack whole). A bound:
            # CPU's one node a product (`lowrank.grouped_lora`) keeps the input and r values alone, no factors' copy.
            r = aligned_rank(layer.r, layer.param().element_size())
            return (layer.in_features + r) * layer.routed, layer.experts * (layer.in_features + layer.out_features) * r
        if isinstance(layer, (DoraLinear, DoraEmbedding)):
            # DoRA's gain multiplies the base output and the update, (tokens, out) each, kept for its gradient; per
            # layer, the gain and the norm (measured with `saved_activation_bytes`, tests/test_memory.py)
            out = layer.lora_B.weight.shape[0] if isinstance(layer, DoraLinear) else layer.lora_embedding_B.shape[0]
            return layer.r + 2 * out, 3 * out
        if isinstance(layer, VeloraLinear):  # A's input compressed to num_groups values a token, not kept whole
            return layer.r + layer.velora.num_groups, 0
        return layer.r, 0  # (rank_pattern: the layer's own)

    @classmethod
    def forward_scratch(cls, cfg: LoraConfig, layer: AdapterLayer) -> int:
        """DoRA's norm: a block of W + s B A and its square, and the block of W in fp32 (a linear layer's: an NF4
        weight dequantized whole, in its compute dtype and in fp32); with dropout, the fp32 weight W x_d needs."""
        if isinstance(layer, DoraEmbedding):
            return 3 * min(layer.base_layer.weight.numel(), lora_layers.NORM_ROWS * layer.base_layer.weight.shape[1])
        if not isinstance(layer, DoraLinear):
            return 0
        in_features, out_features = linear_shape(layer.base_layer)
        whole = in_features * out_features
        scratch = 3 * min(whole, max(lora_layers.NORM_ELEMENTS, in_features))
        if is_quantized(layer.base_layer):
            scratch += 2 * whole  # (the dequantized weight, which the norm's blocks are cut from)
        return scratch + (whole if cfg.dropout > 0 else 0)

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: LoraFacts) -> torch.Tensor:
        delta = lora_delta(parts, facts).to(weight.device)
        if not facts.use_dora:
            return weight + delta
        if "lora_magnitude_vector" not in parts:
            raise PeftkitError("A DoRA adapter (use_dora: true) without lora_magnitude_vector for a layer: the file "
                               "is incomplete; export the adapter again.")
        # An embedding's (num_embeddings, dim) weight is laid out as a Conv1D's (in, out) (DoraEmbedding).
        return dora_merge(weight, delta, parts["lora_magnitude_vector"].to(weight.device),
                          facts.fan_in_fan_out or "lora_embedding_A" in parts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: LoraFacts) -> torch.Tensor:
        if facts.use_dora:  # DoraLinear.unmerge keeps the norm the inverse needs
            raise PeftkitError("A DoRA merge is undone by its layer's unmerge(), which kept the weight norm.")
        return weight - lora_delta(parts, facts).to(weight.device)

    @staticmethod
    def merge_bias(bias: torch.Tensor, parts: dict[str, torch.Tensor], facts: LoraFacts) -> torch.Tensor | None:
        if "lora_B.bias" not in parts:
            return None
        b = parts["lora_B.bias"].float().to(bias.device)
        return bias + b * lora_scaling(facts.alpha, parts["lora_A.weight"].shape[0], facts.use_rslora)

    @staticmethod
    def unmerge_bias(bias: torch.Tensor, parts: dict[str, torch.Tensor], facts: LoraFacts) -> torch.Tensor | None:
        if "lora_B.bias" not in parts:
            return None
        b = parts["lora_B.bias"].float().to(bias.device)
        return bias - b * lora_scaling(facts.alpha, parts["lora_A.weight"].shape[0], facts.use_rslora)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: LoraFacts) -> tuple[int, int]:
        if "lora_A.weight" in parts:
            shape = (parts["lora_B.weight"].shape[0], parts["lora_A.weight"].shape[1] * facts.blocks_a)
            return shape[::-1] if facts.fan_in_fan_out else shape
        return parts["lora_embedding_A"].shape[1], parts["lora_embedding_B"].shape[0]

    @classmethod
    def to_peft(cls, cfg: LoraConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        return cls.peft_common(cfg, targets, base_name) | {
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "use_rslora": cfg.use_rslora,
            "use_dora": cfg.use_dora,
            "fan_in_fan_out": fan_in_fan_out,
            "bias": "none",
            "init_lora_weights": True,
            "rank_pattern": dict(cfg.rank_pattern),
            "alpha_pattern": dict(cfg.alpha_pattern),
            "trainable_token_indices": cfg.trainable_token_indices,
            "lora_bias": cfg.lora_bias,
            "layer_replication": cfg.layer_replication,
            "alora_invocation_tokens": cfg.alora_invocation_tokens,
            "target_parameters": cfg.target_parameters,
            "use_bdlora": cfg.use_bdlora.model_dump() if cfg.use_bdlora else None,
            "velora_config": cfg.velora_config.model_dump() if cfg.velora_config else None,
            "kasa_config": cfg.kasa_config.model_dump() if cfg.kasa_config else None,
        }

    @classmethod
    def from_peft(cls, peft: PeftLoraConfig, config_file: Path) -> LoraConfig:
        # These inits draw A and B only; the others (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ) also move the base weights:
        # PiSSA's and OLoRA's are computed again from the base when it is loaded (lora_init.on_original_base).
        init = peft.init_lora_weights if isinstance(peft.init_lora_weights, str) else ""
        moved = "olora" if init.lower() == "olora" else "pissa" if init == "pissa" else None  # as peft matches them
        if init and not moved and init.lower() not in BASE_KEEPING_INITS:
            raise PeftkitError(
                f"{config_file}: init_lora_weights is {init!r}: peft saved this adapter for the residual base its "
                f"init left, not for the original one{RANDOM_PISSA * init.startswith('pissa_niter_')}. Save it again "
                "with peft's save_pretrained(..., path_initial_model_for_weight_conversion=...), which converts it "
                "to a plain LoRA."
            )
        try:
            cfg = LoraConfig(r=peft.r, alpha=peft.lora_alpha, dropout=peft.lora_dropout,
                             target_modules=targets_from_peft(peft.target_modules, config_file),
                             use_rslora=peft.use_rslora, use_dora=peft.use_dora,
                             modules_to_save=peft.modules_to_save or [], rank_pattern=peft.rank_pattern or {},
                             alpha_pattern=peft.alpha_pattern or {}, **filters_from_peft(peft, config_file),
                             lora_bias=peft.lora_bias, **peft.token_settings(), **peft.replication_settings(),
                             **peft.activation_settings(), **peft.parameter_settings(),
                             **peft.bdlora_settings(), **peft.velora_settings(),
                             **peft.kasa_settings())
        except ValidationError as e:  # settings that contradict each other (peft refuses them too)
            raise PeftkitError(f"{config_file}: {e.errors()[0]['msg'].removeprefix('Value error, ')}. "
                               f"{REEXPORT}") from None
        cfg._residual_init = moved
        cfg._trained_as = "MonteCLoRA" if peft.monteclora_config is not None else None
        return cfg

    @classmethod
    def for_original_base(cls, layers: dict[str, AdapterLayer], state: dict[str, torch.Tensor],
                          config: dict) -> tuple[dict[str, torch.Tensor], dict]:
        return for_original_base(layers, state, config)

    @classmethod
    def trainer(cls, model: nn.Module, cfg: LoraConfig, total_steps: int):
        return KasaTrainer(model, cfg.kasa_config) if cfg.kasa_config is not None else None

    @classmethod
    def describe(cls, cfg: LoraConfig) -> str:
        extras = [*(["DoRA"] if cfg.use_dora else []), *([f"{cfg.init} init"] if cfg.init != "default" else []),
                  *(["LoRA-FA (A frozen)"] if cfg.lora_fa else []), *(["lora_bias"] if cfg.lora_bias else []),
                  *([f"rank_pattern {cfg.rank_pattern}"] if cfg.rank_pattern else []),
                  *([f"alpha_pattern {cfg.alpha_pattern}"] if cfg.alpha_pattern else []),
                  *([f"trainable tokens {cfg.trainable_token_indices}"] if cfg.trainable_token_indices else []),
                  *([f"layer_replication {cfg.layer_replication}"] if cfg.layer_replication else []),
                  *([f"aLoRA invocation {cfg.alora_invocation_tokens}"] if cfg.alora_invocation_tokens else []),
                  *([f"target_parameters {cfg.target_parameters}"] if cfg.target_parameters else []),
                  *(["BD-LoRA"] if cfg.use_bdlora else []), *(["VeLoRA"] if cfg.velora_config else []),
                  *(["KaSA"] if cfg.kasa_config else [])]
        return f"LoRA r={cfg.r}" + (f" with {', '.join(extras)}" if extras else "")

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # B (and an embedding's A) start at zero: randomising those makes the update nonzero, and A keeps
        # its kaiming init, as after training. DoRA's magnitude moves by a relative `std`.
        with torch.no_grad():
            for name, p in layer.adapter_params().items():
                if name.startswith(("lora_B", "lora_embedding_A")):
                    p.copy_(torch.randn(p.shape, generator=generator) * std)
                elif name == "lora_magnitude_vector":
                    p.mul_(1 + torch.randn(p.shape, generator=generator) * std)


_LoraLayer.method = ParamLora.method = Lora  # defined after the layers, which it builds
