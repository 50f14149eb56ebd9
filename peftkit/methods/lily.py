"""Lily, low-rank interconnected adaptation across layers (Zhong et al. 2024, arXiv:2407.09946; peft 0.21's LILY): each
target's input goes through an A (r x in) shared by `stride_A` consecutive layers of its kind, then through a mix of
`num_B` B experts (r x out each) shared by all the layers of its kind, weighed by a per-layer router averaged over
every token of the batch:

    h = A x,  p = mean over the batch's tokens of softmax(router h)  (num_B),  y = W x + scaling h (sum_e p_e B_e)

A layer's kind is peft's group: the `target_modules` entry its path ends with (the longest; a regex: one kind) and its
shape. Shared A and B are one module held by every layer of the group (peft's file, and peftkit's, repeat them under
each layer: `<path>.lily_A.weight` (r, in), `<path>.lily_B.weight` (num_B r, out), `<path>.lily_router.weight` (num_B,
r), peft's names and shapes). Initialised as peft: per layer, in model order, the three nn.Linear draws, then A and the
router kaiming-uniform and B zeros (the base model; kaiming-uniform too with init_weights false), all from torch's
generator, then the sharing keeps the group leaders': one seed gives peft's numbers. The router's mean over the batch
makes the update depend on the batch, so it folds into no weight: not mergeable (peft's Lily cannot merge either).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, linear_shape, not_a_linear
from peftkit.methods.supertuning import DEFAULTS as LORA_DEFAULTS
from peftkit.methods.target_filters import (ExcludedTargets, LayerTargets, NoDefault, PeftExcludedTargets,
                                             PeftLayerTargets, filters_from_peft)
from peftkit.section import TargetRegex

DEFAULTS = LORA_DEFAULTS
"""peft 0.21's TRANSFORMERS_MODELS_TO_LILY_TARGET_MODULES_MAPPING (LoRA's) for the architectures peftkit is tested on
and their close relatives (GPT-2's c_attn is a Conv1D, which peft's Lily does not adapt: no default here)."""


class LilyConfig(LayerTargets, ExcludedTargets):
    """Lily: per-layer routers over B experts shared by all the layers of a kind, A shared by stride_A of them."""

    method: Literal["lily"]
    r: int = Field(32, gt=0)
    """Rank of A and of each B expert (peft advises 2 to 4 times a LoRA's: fewer adapters carry it)."""
    stride_A: int = Field(1, ge=1)
    """Consecutive layers of a kind that share one A (1: each its own)."""
    num_B: int = Field(2, ge=2)
    """B experts shared by all the layers of a kind, mixed by each layer's router (at least 2 to train it)."""
    scaling: float = 1.0
    """The update is scaled by this number (no alpha / r)."""
    init_weights: bool = True
    """true: B starts at 0, the base model; false (debugging, as peft): B kaiming-uniform too."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex | None = None
    """Module-name suffixes, `all-linear` or {regex: ...}; null: peft's default for the architecture (q_proj, v_proj
    for Llama). nn.Linear and 4-bit/8-bit layers only. Each entry (a regex: all of it) is a kind of layer."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""


@dataclass(frozen=True)
class LilyFacts:
    scaling: float
    num_B: int


class LilyLinear(AdapterLayer):
    """Lily around nn.Linear or a bitsandbytes linear layer; `lily_A` and `lily_B` become the group's shared modules
    (`Lily.link_layers`), `lily_router` stays the layer's own."""

    def __init__(self, base_layer: nn.Module, cfg: LilyConfig) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        self.facts = LilyFacts(cfg.scaling, cfg.num_B)
        device = base_layer.weight.device
        where = draw_device(device)
        # peft's draws in peft's order: the three nn.Linear constructions, then A and the router again, then B
        a = nn.Linear(in_features, cfg.r, bias=False, device=where)
        b = nn.Linear(out_features, cfg.num_B * cfg.r, bias=False, device=where)
        router = nn.Linear(cfg.r, cfg.num_B, bias=False, device=where)
        if where.type != "meta":
            nn.init.kaiming_uniform_(a.weight, a=5 ** 0.5)
            nn.init.kaiming_uniform_(router.weight, a=5 ** 0.5)
            if cfg.init_weights:
                nn.init.zeros_(b.weight)
            else:
                nn.init.kaiming_uniform_(b.weight, a=5 ** 0.5)
        self.lily_A, self.lily_B, self.lily_router = a.to(device), b.to(device), router.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        a, b, router = self.lily_A.weight, self.lily_B.weight, self.lily_router.weight
        num_b = self.facts.num_B
        # peft's order of operations: the mean of the router's softmax over every token of the batch weighs the experts
        hidden = F.linear(x.to(a.dtype), a)
        weights = F.softmax(F.linear(hidden, router), dim=-1).reshape(-1, num_b).mean(dim=0)
        combined = torch.einsum("e,eio->io", weights, b.reshape(num_b, -1, b.shape[1]))
        return result + (torch.matmul(hidden, combined) * self.facts.scaling).to(result.dtype)


class PeftLilyConfig(PeftLayerTargets, PeftExcludedTargets):
    """The fields of a LILY adapter_config.json that peftkit reads (defaults: peft 0.21's LilyConfig)."""

    r: int = Field(32, gt=0)
    stride_A: int = Field(1, ge=1)
    num_B: int = Field(2, ge=2)
    scaling: float = 1.0
    init_weights: bool = True


def kind_of(path: str, targets: list[str] | str | TargetRegex) -> str:
    """peft's group name of the layer at `path`: the longest `target_modules` entry the path ends with (peft's own
    pick among several depends on a set's order), its last name under all-linear (peft's expansion), a regex whole."""
    if isinstance(targets, TargetRegex):
        return targets.regex
    if targets == "all-linear":
        return path.rsplit(".", 1)[-1]
    return max((t for t in targets if path.endswith(t)), key=len, default=path)


class Lily(Method):
    name = "lily"
    title = "Lily"
    peft_type = "LILY"
    config = LilyConfig
    peft_config = PeftLilyConfig
    param_names = ("lily_A.weight", "lily_B.weight", "lily_router.weight")
    rank_dims = {"lily_A": 0, "lily_router": 1}
    mergeable = False

    @classmethod
    def merge_refusal(cls, cfg=None) -> str:
        return ("Lily adapters (method: lily) cannot be merged into a plain model: each layer's router averages over "
                "every token of the batch, so the update depends on the batch (peft's Lily cannot merge either). Keep "
                "the adapter separate: set export.merged: false (or skip `peftkit merge`) and use it with `peftkit "
                "eval/generate --adapter DIR`.")

    @classmethod
    def resolve(cls, cfg: LilyConfig, model_type: str | None) -> LilyConfig:
        if cfg.target_modules is not None:
            return cfg
        if model_type not in DEFAULTS:
            raise NoDefault("target_modules", "Lily", model_type, DEFAULTS, "name the modules",
                            "target_modules: [q_proj, v_proj] for a Llama-like model")
        return cfg.model_copy(update={"target_modules": DEFAULTS[model_type]})

    @classmethod
    def wrap(cls, base: nn.Module, cfg: LilyConfig, path: str) -> LilyLinear:
        if kind := not_a_linear(base):
            raise PeftkitError(f"adapter.target_modules: '{path}' is {kind}; Lily adapts nn.Linear (and 4-bit/8-bit) "
                               "layers only, as peft 0.21's Lily. Leave it out of adapter.target_modules, or use "
                               "adapter.method: lora.")
        return LilyLinear(base, cfg)

    @classmethod
    def link_layers(cls, model: nn.Module, cfg: LilyConfig, layers: dict[str, AdapterLayer]) -> None:
        """peft's sharing, in model order: per group (kind, shape), every layer takes the first one's B, and each run
        of stride_A layers the A of its first."""
        groups: dict[tuple, list[AdapterLayer]] = {}
        for path, layer in layers.items():
            groups.setdefault((kind_of(path, cfg.target_modules), linear_shape(layer.base_layer)), []).append(layer)
        for members in groups.values():
            for i, layer in enumerate(members):
                layer.lily_B = members[0].lily_B
                layer.lily_A = members[i - i % cfg.stride_A].lily_A

    @classmethod
    def shared_across_layers(cls, cfg: LilyConfig) -> str:
        # (FSDP2: torch's fully_shard of the second decoder layer failed, 'Invariant encountered', by hand on the CPU)
        a = f", and an A (lily_A) per {cfg.stride_A} of them (stride_A)" if cfg.stride_A > 1 else ""
        return ("trains one B module (lily_B) per kind of layer, which the layers of that kind in every decoder layer share"
                + a)

    @classmethod
    def repeated_in_file(cls, peft: PeftLilyConfig, targets: dict[str, dict[str, tuple[int, ...]]]) -> int:
        """The numbers of every A and B the file repeats under a layer that shares its group leader's (`link_layers`'
        grouping, read from the file's shapes)."""
        kinds = targets_from_peft(peft.target_modules, Path("adapter_config.json")) if peft.target_modules else []
        groups: dict[tuple, list[dict[str, tuple[int, ...]]]] = {}
        for path, parts in targets.items():  # (in any order: a group of n repeats n - 1 Bs, n - ceil(n / stride_A) As)
            shape = (parts["lily_A.weight"][1], parts["lily_B.weight"][1])
            groups.setdefault((kind_of(path, kinds), shape), []).append(parts)
        repeated = 0
        for members in groups.values():
            for i, parts in enumerate(members):
                repeated += _numel(parts["lily_B.weight"]) if i else 0
                repeated += _numel(parts["lily_A.weight"]) if i % peft.stride_A else 0
        return repeated

    @classmethod
    def layer_facts(cls, cfg: LilyConfig, path: str, fan_in_fan_out: bool) -> LilyFacts:
        return LilyFacts(cfg.scaling, cfg.num_B)

    @classmethod
    def to_peft(cls, cfg: LilyConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        # target_modules as the recipe names them (peft groups the layers by them: exact paths would share nothing)
        # and exclude_modules with them; all-linear as peft expands it, the adapted layers' names
        # (null, peft's default, is names too: the adapted layers')
        names = (cfg.target_modules.regex if isinstance(cfg.target_modules, TargetRegex) else
                 sorted({t.rsplit(".", 1)[-1] for t in targets}) if cfg.target_modules in ("all-linear", None) else
                 sorted(cfg.target_modules))
        exclude = cfg.exclude_modules
        return cls.peft_common(cfg, targets, base_name) | {
            "target_modules": names,
            "exclude_modules": exclude.regex if isinstance(exclude, TargetRegex) else exclude,
            "r": cfg.r, "stride_A": cfg.stride_A, "num_B": cfg.num_B, "scaling": cfg.scaling,
            "init_weights": cfg.init_weights,
        }

    @classmethod
    def from_peft(cls, peft: PeftLilyConfig, config_file: Path) -> LilyConfig:
        refuse_unsupported(peft, config_file, ())
        return LilyConfig(
            method="lily", r=peft.r, stride_A=peft.stride_A, num_B=peft.num_B, scaling=peft.scaling,
            init_weights=peft.init_weights,
            target_modules=targets_from_peft(peft.target_modules, config_file) if peft.target_modules else None,
            modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: LilyConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token the input (its cast copy), the rank-r hidden state and the router's softmax and logits; per layer
        # the combined B (r x out), counted twice as an upper bound.
        in_features, out_features = linear_shape(layer.base_layer)
        return in_features + cfg.r + 2 * cfg.num_B, 2 * cfg.r * out_features

    @classmethod
    def describe(cls, cfg: LilyConfig) -> str:
        return f"Lily r={cfg.r}, A per {cfg.stride_A} layers, {cfg.num_B} B experts"

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        # B away from its zero start and the routers far apart (a clear mix); the shared modules drawn again by each
        # of their layers from the same generator
        with torch.no_grad():
            for name, p in layer.adapter_params().items():
                scale = std * 10 if name.startswith("lily_router") else std
                p.copy_((torch.randn(p.shape, generator=generator) * scale).to(p.device))


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


LilyLinear.method = Lily
