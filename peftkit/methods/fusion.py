"""AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
arXiv:2005.00247): an attention-weighted combination of several trained adapters, which stay frozen; only the
fusion parameters train.

Where it fuses (a *site*), and what it fuses there:
- **Bottleneck adapters** (`peftkit.methods.bottleneck`) sit after whole sub-layers (attention, MLP): one site per
  sub-layer that any of them adapts (per block, per placement), as AdapterHub's `adapters` does. The adapters'
  outputs delta_i are their additions s * up(act(down(source))); the query is what they read: the sub-layer's
  output (serial) or its input (parallel). All of them must share the placement.
- **Weight-update adapters** (LoRA with DoRA, IA3, LoHa, LoKr, AdaLoRA, OFT; mixed freely) wrap single linear
  layers: one site per layer any of them wraps. delta_i(x) = layer_i(x) - W(x), the change adapter i makes to
  the layer's output when it runs alone (computed in fp32 from the two outputs, so an additive method and a
  multiplicative one, IA3's scaling or OFT's rotation, are treated alike); the query is the base output W(x).
  The base runs once per site: the fused layers get its output back for the same input (`_BaseOutput`).
  AdapterHub has no fusion for LoRA; this per-layer choice is ours.

At each site, with y the sub-layer's (or layer's) output and d its width, as AdapterHub's `BertFusion` with its
default ("dynamic") settings:

    q = W_q query + b_q,  k_i = W_k delta_i + b_k,  v_i = W_v delta_i,
    p = softmax_i(q . k_i / T),  out = y + sum_i p_i v_i

W_q, W_k ~ N(0, 0.02) with zero biases, W_v = I exactly (AdapterHub adds 1e-6 off the diagonal; we do not: with
W_v = I and uniform attention the site outputs y + the mean of the deltas, which tests check). No 1/sqrt(d) on the
scores (AdapterHub has none). A site only one adapter adapts has no W_q, W_k (softmax over one output is 1): it
outputs y + W_v delta. `value: false` drops W_v (AdapterHub's "static" fusion). `regularization` adds
lambda * sum ||I - W_v||_F^2 over the sites to each step's loss (AdapterHub's, lambda = 0.01). `temperature: true`
anneals T from 50 by 50/1000 per optimizer step down to 1 (AdapterHub per forward call, evaluations included); an
evaluation and the exported adapter use T = 1. `dropout` acts on the scores, as AdapterHub's. Computed in fp32
and cast back. 3 d^2 + 2 d parameters per site (2 d^2 + 2 d without W_v): fuse adapters of few layers on a wide
model.

The fused adapters run as at inference (their dropout off) and are never trained. All of them must be of one base
(the recipe's model, at the commit they record; one revision, quantization and RoPE scaling among them); peftkit
refuses VeRA (its projections are shared model-wide under one name), the prompt family, Llama-Adapter,
`modules_to_save` and bottleneck `train_norms`.

Saved format (peft has no AdapterFusion, so it is peftkit's own, with PEFT's file names; peft refuses the unknown
peft_type, peftkit reads it): `adapter_model.safetensors` holds, under `base_model.model.<site>.`, the fusion's
`fusion_query.weight/.bias`, `fusion_key.weight/.bias` (where 2 or more adapters meet), `fusion_value.weight` (with
`value`), and a **copy** of every fused
adapter's tensors at that site as `fused.<i>.<its own key suffix>` (`fused.0.lora_A.weight`, i its position in
`fuse`); `adapter_config.json` (peft_type `ADAPTER_FUSION`) holds the fusion settings, `target_modules` (the sites)
and `fused`: per adapter its source directory (for the record; a hub adapter's as `user/name@COMMIT`, the commit
read) and its whole adapter_config.json. Copies, not
references: the fusion was trained against exactly those adapter weights, so a source directory retrained, moved or
deleted later would silently change (or break) the fused model; a fusion directory reloads on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, PrivateAttr, field_validator
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import REEXPORT, Method, MethodTrainer, PeftConfigBase, draw_device
from peftkit.methods.layer import AdapterLayer, linear_shape
from peftkit.methods.blocks import first_output, with_first_output
from peftkit.section import AdapterSection

WEIGHT_UPDATE = ("lora", "ia3", "loha", "lokr", "adalora", "oft")
"""Methods fused per wrapped layer."""
PARAM_NAMES = ("fusion_query.weight", "fusion_query.bias", "fusion_key.weight", "fusion_key.bias",
               "fusion_value.weight")
START_TEMPERATURE = 50.0  # AdapterHub's T with `temperature`, lowered by START / 1000 per step down to 1


@dataclass
class Fused:
    """One fused adapter: where it came from, its method and settings, its adapter_config.json as saved, and (read
    from its directory for training; None when a fusion export is reloaded) its PEFT-keyed tensors."""

    source: str
    method: type[Method]
    cfg: Any
    config: dict
    state: dict[str, torch.Tensor] | None = None
    base: tuple[str | None, str | None] = (None, None)
    quant: Any = None


class FusionConfig(AdapterSection):
    """AdapterFusion: an attention-weighted combination of trained, frozen adapters."""

    method: Literal["fusion"]
    fuse: list[str]
    """The directories of the adapters to fuse (at least 2, as `peftkit train` exports them: runs/NAME/adapter), all
    on this recipe's model; relative to the recipe's directory."""
    value: bool = True
    """A value matrix W_v (initialised to the identity) maps each adapter's output (AdapterHub's dynamic fusion);
    false: the outputs are weighed as they are (static fusion)."""
    regularization: float = Field(0.01, ge=0)
    """lambda of the loss term lambda * sum ||I - W_v||^2 that keeps W_v near the identity; 0: off."""
    temperature: bool = False
    """Anneal the softmax temperature from 50 to 1 (by 0.05 per optimizer step) while training."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the attention scores."""

    _fused: list[Fused] | None = PrivateAttr(None)
    _sites: dict[str, list[int]] = PrivateAttr(default_factory=dict)

    @field_validator("fuse")
    @classmethod
    def _at_least_two(cls, fuse: list[str]) -> list[str]:
        if len(fuse) < 2:
            raise ValueError(f"lists {len(fuse)} adapter director{'y' if len(fuse) == 1 else 'ies'}; AdapterFusion "
                             "combines at least 2 (train each adapter first, then list their adapter/ directories)")
        return fuse

    @property
    def modules_to_save(self) -> list[str]:
        return []  # only the fusion parameters train


class _BaseOutput(nn.Module):
    """Stands in for the frozen base layer inside each fused weight-update layer: for the input tensor the fusion
    layer has just run the base on, it returns that output (N adapters would otherwise cost N more base matmuls);
    any other input (IA3's scaled input, OFT's rotated one) goes through the base. The base is kept outside the
    module tree (the fusion layer registers it once, as `base_layer`); its attributes (weight, bias, ...) read
    through."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "base", base)
        self.cached: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cached is not None and x is self.cached[0]:
            return self.cached[1]
        return self.base(x)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["base"], name)


class FusionLayer(AdapterLayer):
    """The fusion parameters of one site and the fused adapters' layers there (`fused`, keyed by position in `fuse`)."""

    def __init__(self, base_layer: nn.Module, fused: dict[str, AdapterLayer], size: int, cfg: FusionConfig) -> None:
        super().__init__(base_layer)
        self.facts = None
        self.size = size
        self.fused = nn.ModuleDict(fused)
        self.fused.requires_grad_(False)
        device = next(base_layer.parameters()).device
        where = draw_device(device)  # drawn on the CPU, then moved: one seed, one fusion on any device
        # One adapter alone at a site: softmax over one score is 1, so the site has no query or key (only W_v).
        attends = len(fused) > 1
        self.fusion_query = nn.Linear(size, size, device=where, dtype=torch.float32) if attends else None
        self.fusion_key = nn.Linear(size, size, device=where, dtype=torch.float32) if attends else None
        self.fusion_value = nn.Linear(size, size, bias=False, device=where, dtype=torch.float32) if cfg.value else None
        if where.type != "meta":
            with torch.no_grad():
                for linear in (self.fusion_query, self.fusion_key) if attends else ():
                    linear.weight.normal_(0.0, 0.02)  # AdapterHub's init_bert_weights
                    linear.bias.zero_()
                if self.fusion_value is not None:
                    self.fusion_value.weight.copy_(torch.eye(size))
        for linear in (self.fusion_query, self.fusion_key, self.fusion_value):
            if linear is not None:
                linear.to(device)
        self.fusion_dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.temperature = 1.0
        """The softmax temperature while training (`FusionTrainer` anneals it); evaluation uses 1."""

    def train(self, mode: bool = True) -> FusionLayer:
        super().train(mode)
        self.fused.eval()  # frozen adapters run as at inference; the base keeps the mode asked for
        self.base_layer.train(mode)
        return self

    def fuse(self, query: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
        """sum_i p_i W_v delta_i (fp32), p = softmax((W_q query + b_q) . (W_k delta_i + b_k) / T) over the adapters."""
        stacked = torch.stack([d.float() for d in deltas], dim=-2)  # (..., N, d)
        values = stacked if self.fusion_value is None else self.fusion_value(stacked)
        if self.fusion_query is None:  # one adapter: p = 1
            return values.squeeze(-2)
        q = self.fusion_query(query.float()).unsqueeze(-1)  # (..., d, 1)
        scores = (self.fusion_key(stacked) @ q).squeeze(-1)  # (..., N)
        temperature = self.temperature if self.training else 1.0
        probs = torch.softmax(self.fusion_dropout(scores) / temperature, dim=-1)
        return (probs.unsqueeze(-2) @ values).squeeze(-2)

    def fusion_params(self) -> dict[str, nn.Parameter]:
        """The trained parameters (the fused adapters' are in `adapter_params()` too, frozen: they are saved)."""
        return {n: p for n, p in self.adapter_params().items() if not n.startswith("fused.")}


class FusedLinear(FusionLayer):
    """A site on one linear (or embedding) layer, fusing the weight-update adapters that wrap it."""

    def __init__(self, base_layer: nn.Module, fused: dict[str, AdapterLayer], size: int, cfg: FusionConfig) -> None:
        super().__init__(base_layer, fused, size, cfg)
        self.base_output = _BaseOutput(base_layer)
        from peftkit.methods.lora_layers import DoraEmbedding, DoraLinear  # DoRA reads its base's weights (and its type)

        for layer in self.fused.values():
            if not isinstance(layer, (DoraLinear, DoraEmbedding)):
                layer.base_layer = self.base_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        self.base_output.cached = (x, y)
        try:
            deltas = [layer(x).float() - y.float() for layer in self.fused.values()]
        finally:
            self.base_output.cached = None
        return y + self.fuse(y, deltas).to(y.dtype)


class FusedBlock(FusionLayer):
    """A site after a sub-layer (attention or MLP), fusing the bottleneck adapters there."""

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        y = first_output(out)
        layers = list(self.fused.values())
        deltas = [layer.delta(args, kwargs, y) for layer in layers]
        query = layers[0].source(args, kwargs, y)  # one placement for all: what the adapters read
        return with_first_output(out, y + self.fuse(query, deltas).to(y.dtype))


class FusedEntry(BaseModel):
    source: str | None = None
    config: dict


class PeftFusionConfig(PeftConfigBase):
    """peftkit's adapter_config.json of an AdapterFusion (no peft equivalent)."""

    fused: list[FusedEntry] = Field(default_factory=list)
    value: bool = True
    regularization: float = Field(0.01, ge=0)
    temperature: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class FusionTrainer(MethodTrainer):
    """The value regulariser and the temperature schedule."""

    def __init__(self, layers: list[FusionLayer], cfg: FusionConfig) -> None:
        self.layers, self.cfg = layers, cfg
        self.temperature = START_TEMPERATURE if cfg.temperature else 1.0
        self._set_temperature()

    def _set_temperature(self) -> None:
        for layer in self.layers:
            layer.temperature = self.temperature

    def regularizer(self) -> torch.Tensor | None:
        values = [layer.fusion_value.weight for layer in self.layers if layer.fusion_value is not None]
        if not values or not self.cfg.regularization:
            return None
        return self.cfg.regularization * sum(((torch.eye(v.shape[0], device=v.device) - v) ** 2).sum() for v in values)

    def after_step(self, step: int) -> None:
        if self.cfg.temperature:
            self.temperature = max(START_TEMPERATURE - step * START_TEMPERATURE / 1000, 1.0)
            self._set_temperature()

    def state_dict(self) -> dict:
        return {"temperature": self.temperature}

    def load_state_dict(self, state: dict) -> None:
        self.temperature = float(state["temperature"])
        self._set_temperature()


class Fusion(Method):
    name = "fusion"
    title = "AdapterFusion"
    peft_type = "ADAPTER_FUSION"
    config = FusionConfig
    peft_config = PeftFusionConfig
    param_names = PARAM_NAMES
    mergeable = False

    @classmethod
    def select_targets(cls, model: nn.Module, cfg: FusionConfig, every_entry: bool) -> list[str]:
        """The sites: every module any fused adapter adapts, in model order (each remembers which adapters)."""
        from peftkit.methods.fusion_sources import check_model, fused_adapters

        fused = fused_adapters(cfg)
        check_model(fused, model)
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        sites: dict[str, list[int]] = {}
        for i, f in enumerate(fused):
            f.cfg = f.method.resolve(f.cfg, model_type)
            for path in f.method.select_targets(model, f.cfg, False):
                sites.setdefault(path, []).append(i)
        cfg._sites = sites
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        return sorted(sites, key=order.__getitem__)

    @classmethod
    def wrap(cls, base: nn.Module, cfg: FusionConfig, path: str) -> FusionLayer:
        from peftkit.methods.fusion_sources import copy_weights

        layers: dict[str, AdapterLayer] = {}
        for i in cfg._sites[path]:
            f = cfg._fused[i]
            layers[str(i)] = f.method.wrap(base, f.cfg, path)
            if f.state is not None:
                copy_weights(layers[str(i)], f, path)
        if cfg._fused[0].method.name == "bottleneck":
            return FusedBlock(base, layers, next(iter(layers.values())).adapter_up.out_features, cfg)
        size = base.embedding_dim if isinstance(base, nn.Embedding) else linear_shape(base)[1]
        return FusedLinear(base, layers, size, cfg)

    @classmethod
    def to_peft(cls, cfg: FusionConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        from peftkit.hub import pinned_reference
        from peftkit.methods.fusion_sources import fused_adapters

        # a hub adapter's source as the run records it (user/name@COMMIT), not its snapshot in this machine's cache
        return cls.peft_common(cfg, targets, base_name) | {
            "fused": [{"source": pinned_reference(f.source) or f.source, "config": f.config}
                      for f in fused_adapters(cfg)],
            "value": cfg.value, "regularization": cfg.regularization, "temperature": cfg.temperature,
            "dropout": cfg.dropout}

    @classmethod
    def from_peft(cls, peft: PeftFusionConfig, config_file: Path) -> FusionConfig:
        from peftkit.methods.fusion_sources import check_fusable, read_entry

        if len(peft.fused) < 2:
            raise PeftkitError(f'{config_file}: "fused" lists {len(peft.fused)} adapters; an AdapterFusion has at '
                               f"least 2. {REEXPORT}")
        fused = [read_entry(entry.config, entry.source, f"{config_file} (fused[{i}])")
                 for i, entry in enumerate(peft.fused)]
        check_fusable(fused, f"{config_file}: fused")
        cfg = FusionConfig(method="fusion", fuse=[f.source for f in fused], value=peft.value,
                           regularization=peft.regularization, temperature=peft.temperature, dropout=peft.dropout)
        cfg._fused = fused
        return cfg

    @classmethod
    def source_dirs(cls, cfg: FusionConfig) -> dict[str, str]:
        return {f"adapter.fuse[{i}]": path for i, path in enumerate(cfg.fuse)}

    @classmethod
    def check_sources(cls, cfg: FusionConfig, recipe: Any, model: nn.Module, commit: str | None) -> None:
        """The fused adapters' commit, RoPE scaling, and whether and how their base was quantized (the quantization
        section, from the same dtype) are the recipe's base's (their name: at injection, `select_targets`)."""
        from peftkit.methods.fusion_sources import check_commit, check_quantization, check_rope, fused_adapters

        check_commit(fused_adapters(cfg), recipe.model.name_or_path, recipe.model.revision, commit)
        check_rope(fused_adapters(cfg), recipe.model.rope_scaling)
        device = next(model.parameters()).device.type
        check_quantization(fused_adapters(cfg), recipe.quantization, recipe.model.dtype,
                           None if device == "meta" else device)

    @classmethod
    def recipe_conflict(cls, recipe: Any) -> str | None:
        if recipe.classifier:
            return ("adapter.method fusion: model.task sequence_classification would need its new head trained beside "
                    "the fusion, which peftkit's AdapterFusion does not do yet; fuse adapters of a causal LM")
        if recipe.adapter.init_from:
            return ("adapter.init_from: an AdapterFusion starts from the adapters adapter.fuse lists (and new fusion "
                    "parameters); remove init_from")
        return None

    @classmethod
    def trainer(cls, model: nn.Module, cfg: FusionConfig, total_steps: int) -> FusionTrainer:
        return FusionTrainer([m for m in model.modules() if isinstance(m, FusionLayer)], cfg)

    @classmethod
    def kept_for_backward(cls, cfg: Any, layer: AdapterLayer) -> tuple[int, int]:
        # Per token: the N deltas, their keys and values (N x d each), the query and the N probabilities. The
        # fused layers inside count their own (by their methods).
        if not isinstance(layer, FusionLayer):
            return 0, 0
        n, d = len(layer.fused), layer.size
        return 3 * n * d + d + n, 0

    @classmethod
    def describe(cls, cfg: FusionConfig) -> str:
        return f"{cls.title} of {len(cfg.fuse)} adapters"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        if isinstance(layer, FusionLayer):  # the fused adapters keep their trained weights
            with torch.no_grad():
                for p in layer.fusion_params().values():
                    p.copy_(torch.randn(p.shape, generator=generator) * std)


for _layer in (FusionLayer, FusedLinear, FusedBlock):
    _layer.method = Fusion
