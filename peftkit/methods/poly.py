"""Poly / MHR: Polytropon (Ponti et al. 2022, arXiv:2202.13914) and Multi-Head Routing (Caccia et al. 2022,
arXiv:2211.03831); peft 0.21's POLY. Each target holds `n_skills` LoRA modules of rank r, each cut into `n_splits`
heads along its input (A) and output (B) features (n_splits > 1: MHR); a router's learned logits table (n_tasks,
n_splits x n_skills) mixes them per row by the row's task t:

    w = z / (sum over skills of z + 1e-12),  z = sigmoid(logits[t])  (eval)  or  a RelaxedBernoulli(1, logits[t]) sample
    A_t[head] = sum_s w[head, s] A[head, s],  B_t likewise,  y = W x + x A_t B_t / r  (A_t (in, r), B_t (r, out))

A row's task is the data's `task` column (training, `peftkit eval`) or `--task N` (`peftkit.task_ids`), handed to the
layers by `peftkit.methods.task_routing`; a forward without task ids runs every row as task 0 (as multitask prompt
tuning), where peft raises. Initialised as peft: per layer, in model order, each skill's and head's A (r, in / n_splits)
kaiming-uniform (skills outer, heads inner), B zeros (kaiming-uniform the same way with init_weights false), then the
logits U(-1e-3, 1e-3): one seed gives peft's numbers. The forward is peft's, op for op (the einsums, two batched
matmuls, / r, in the adapter's fp32; the sum rounded once to the base's dtype), and so is the training sample (torch's
RelaxedBernoulli, one draw of (rows, n_splits, n_skills) uniforms per layer and forward, without the argument check
whose `.all()` stopped the host every step): one seed gives peft's training outputs too.

peft's file: `<path>.poly_lora_A` (n_splits, n_skills, in / n_splits, r), `<path>.poly_lora_B` (n_splits, n_skills, r,
out / n_splits), `<path>.poly_router.module_logits` (n_tasks, n_splits n_skills). The update depends on each row's task,
so the adapter folds into no single weight (peft's Poly has no merge at all); one task's evaluation update,
(A_t B_t)^T / r, does: `merge_task` (`peftkit merge --task N`) names it, and the other tasks are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from peftkit.errors import PeftkitError
from peftkit.methods.base import Method, draw_device, refuse_unsupported, targets_from_peft
from peftkit.methods.layer import AdapterLayer, linear_shape, not_a_linear
from peftkit.methods.target_filters import (LORA_TARGETS, ExcludedTargets, NoDefault, PeftExcludedTargets,
                                             filters_from_peft)
from peftkit.methods.task_routing import TaskIds, task_ids_of
from peftkit.section import TargetRegex

EPS = 1e-12  # peft's, in the router's normalisation
DEFAULTS = LORA_TARGETS
"""peft 0.21's TRANSFORMERS_MODELS_TO_POLY_TARGET_MODULES_MAPPING (a copy of LoRA's)."""


class PolyConfig(ExcludedTargets):
    """Poly / MHR: n_skills LoRA modules per target, mixed per row by its task's learned routing."""

    method: Literal["poly"]
    r: int = Field(8, gt=0)
    """Rank of each skill's LoRA (the update is scaled by 1 / r)."""
    n_tasks: int = Field(1, gt=0)
    """How many tasks the data's `task` ids (0 .. n_tasks - 1) name; each has its own routing over the skills."""
    n_skills: int = Field(4, gt=0)
    """LoRA modules per target, shared by all tasks."""
    n_splits: int = Field(1, gt=0)
    """Heads each skill is cut into (MHR, routed head by head); 1: Polytropon. Must divide every target's in and out
    features."""
    poly_type: Literal["poly"] = "poly"
    """The router (peft has one: `poly`)."""
    init_weights: bool = True
    """true: B starts at 0 (the base model); false (debugging, as peft): B kaiming-uniform too."""
    target_modules: Literal["all-linear"] | list[str] | TargetRegex | None = None
    """Module-name suffixes, `all-linear` or {regex: ...}; null: peft's default for the architecture (q_proj, v_proj for
    Llama). nn.Linear and 4-bit/8-bit layers only (peft's Poly takes no GPT-2 Conv1D)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full and saved whole (e.g. `lm_head`)."""
    merge_task: int | None = Field(None, ge=0)
    """peftkit's (peft has no merge): the task whose update `export.merged` folds into the weights (its evaluation
    routing); null: not mergeable. `peftkit merge --task N` sets it for a saved adapter. Not written to the adapter."""

    @model_validator(mode="after")
    def _merge_task_is_a_task(self) -> PolyConfig:
        # (with init_from, n_tasks is the adapter's: checked once it is read, `peftkit.init_from`)
        if self.merge_task is not None and self.merge_task >= self.n_tasks and not self.init_from:
            raise ValueError(f"merge_task {self.merge_task} is past the adapter's tasks (0 .. {self.n_tasks - 1}); "
                             "name one of them")
        return self


class PeftPolyConfig(PeftExcludedTargets):
    """The fields of a POLY adapter_config.json that peftkit reads (defaults: peft 0.21's PolyConfig)."""

    r: int = Field(8, gt=0)
    n_tasks: int = Field(1, gt=0)
    n_skills: int = Field(4, gt=0)
    n_splits: int = Field(1, gt=0)
    poly_type: str = "poly"
    init_weights: bool = True


@dataclass(frozen=True)
class PolyFacts:
    r: int
    n_splits: int
    n_skills: int
    task: int | None = None  # the task a merge folds in (`merge_task`)


def task_update(parts: dict[str, torch.Tensor], facts: PolyFacts) -> torch.Tensor:
    """(out, in) fp32: task `facts.task`'s update as the evaluation forward applies it, (A_t B_t)^T / r, A_t and B_t
    the skills mixed head by head by the sigmoid of its logits, normalised (peft's PolyRouter in eval mode)."""
    a, b = parts["poly_lora_A"].float(), parts["poly_lora_B"].float()
    z = torch.sigmoid(parts["poly_router.module_logits"].float()[facts.task]).view(facts.n_splits, facts.n_skills)
    w = z / (z.sum(dim=-1, keepdim=True) + EPS)
    a_t = torch.einsum("qs,qsdr->qdr", w, a).reshape(-1, facts.r)  # (in, r): head q holds inputs q * in / n_splits ..
    b_t = torch.einsum("qs,qsrd->qrd", w, b).transpose(0, 1).reshape(facts.r, -1)  # (r, out), likewise the outputs
    return (a_t @ b_t).T / facts.r


def _kaiming_blocks(n_splits: int, n_skills: int, rows: int, cols: int) -> torch.Tensor:
    """(n_splits, n_skills, cols, rows): peft's per-skill, per-head nn.Linear-style draws of (rows, cols), transposed,
    skills outer and heads inner."""
    out = torch.empty(n_splits, n_skills, cols, rows)
    for skill in range(n_skills):
        for split in range(n_splits):
            block = torch.empty(rows, cols)
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            out[split, skill] = block.T
    return out


class PolyRouter(nn.Module):
    """The learned logits table (n_tasks, n_splits x n_skills) and peft's PolyRouter forward."""

    def __init__(self, module_logits: torch.Tensor, n_splits: int, n_skills: int) -> None:
        super().__init__()
        self.module_logits = nn.Parameter(module_logits)
        self.n_splits, self.n_skills = n_splits, n_skills

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        """(rows, n_splits, n_skills) mixing weights of the rows' tasks."""
        logits = self.module_logits[task_ids].view(-1, self.n_splits, self.n_skills)
        if self.training:  # (validate_args: its check of the logits reads them on the host)
            logits = RelaxedBernoulli(temperature=1.0, logits=logits, validate_args=False).rsample()
        else:
            logits = torch.sigmoid(logits)
        return logits / (logits.sum(dim=-1, keepdim=True) + EPS)


class PolyLinear(AdapterLayer):
    """Poly around nn.Linear or a bitsandbytes linear layer; `tasks` is the model's `TaskIds` (`Poly.link_layers`)."""

    def __init__(self, base_layer: nn.Module, cfg: PolyConfig) -> None:
        super().__init__(base_layer)
        in_features, out_features = linear_shape(base_layer)
        self.facts = PolyFacts(cfg.r, cfg.n_splits, cfg.n_skills)
        self.tasks = TaskIds()  # (this layer's own until it is linked to the model's)
        splits, skills, r = cfg.n_splits, cfg.n_skills, cfg.r
        a_shape, b_shape = (splits, skills, in_features // splits, r), (splits, skills, r, out_features // splits)
        device, where = base_layer.weight.device, draw_device(base_layer.weight.device)
        if where.type == "meta":  # (the memory estimate: shapes only)
            a, b, logits = (torch.empty(s, device=where) for s in (a_shape, b_shape, (cfg.n_tasks, splits * skills)))
        else:  # peft's draws in peft's order: A, B (or zeros), the logits
            a = _kaiming_blocks(splits, skills, r, in_features // splits)
            b = torch.zeros(b_shape) if cfg.init_weights else _kaiming_blocks(splits, skills, out_features // splits, r)
            logits = torch.empty(cfg.n_tasks, splits * skills).uniform_(-1e-3, 1e-3)
        self.poly_lora_A = nn.Parameter(a.to(device))
        self.poly_lora_B = nn.Parameter(b.to(device))
        self.poly_router = PolyRouter(logits.to(device), splits, skills)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        rows, r = x.shape[0], self.facts.r
        weights = self.poly_router(self.tasks.rows(rows, self.poly_lora_A.device))
        # peft's order of operations: each row's A (in, r) and B (r, out), mixed head by head, then x A B / r
        a = torch.einsum("bqs,qsdr->bqdr", (weights, self.poly_lora_A)).reshape(rows, -1, r)
        b = torch.einsum("bqs,qsrd->bqrd", (weights, self.poly_lora_B)).transpose(1, 2).reshape(rows, r, -1)
        update = x.reshape(rows, -1, x.shape[-1]).to(a.dtype).bmm(a).bmm(b) / r
        # peft adds it into the base output in place (one rounding to its dtype), then casts to the input's dtype
        return (result + update.reshape(result.shape)).to(result.dtype).to(x.dtype)


class Poly(Method):
    name = "poly"
    title = "Poly"
    peft_type = "POLY"
    config = PolyConfig
    peft_config = PeftPolyConfig
    param_names = ("poly_lora_A", "poly_lora_B", "poly_router.module_logits")
    rank_dims = {"poly_lora_A": 3, "poly_lora_B": 2}
    mergeable = False
    reads_task_ids = True
    tasks_key = "n_tasks"
    recipe_only = ("merge_task",)

    @classmethod
    def merge_refusal(cls, cfg=None) -> str | None:
        if getattr(cfg, "merge_task", None) is not None:
            return None
        return ("Poly adapters (method: poly) cannot be merged into a plain model: each row's update mixes the skills "
                "by that row's task (n_tasks routings), so no single weight holds it (peft's Poly cannot merge "
                "either). Name the one task to fold in: `peftkit merge --adapter DIR --task N` merges one Poly adapter "
                "alone (combining adapters takes no task; adapter.merge_task: N for export.merged), or keep the "
                "adapter separate: set export.merged: false (or skip `peftkit merge`) and use it with `peftkit "
                "eval/generate --adapter DIR --task N`.")

    @classmethod
    def recipe_conflict(cls, recipe) -> str | None:
        if recipe.adapter.n_tasks == 1:
            return None
        if recipe.data.packing:
            return ("data.packing: a packed row holds several examples, and Poly routes each row by one task id "
                    "(packing drops the rows' task ids); set data.packing: false, or adapter.n_tasks: 1")
        if recipe.model.task == "sequence_classification":
            return ("adapter.n_tasks: a sequence classifier's rows carry no task ids here (its data has no `task` "
                    "column), so every row would train task 0; set adapter.n_tasks: 1")
        return None

    @classmethod
    def resolve(cls, cfg: PolyConfig, model_type: str | None) -> PolyConfig:
        if cfg.target_modules is not None:
            return cfg
        if model_type not in DEFAULTS:
            raise NoDefault("target_modules", "Poly", model_type, DEFAULTS, "name the modules",
                            "target_modules: [q_proj, v_proj] for a Llama-like model")
        return cfg.model_copy(update={"target_modules": DEFAULTS[model_type]})

    @classmethod
    def wrap(cls, base: nn.Module, cfg: PolyConfig, path: str) -> PolyLinear:
        if kind := not_a_linear(base):
            raise PeftkitError(f"adapter.target_modules: '{path}' is {kind}; Poly adapts nn.Linear (and 4-bit/8-bit) "
                               "layers only, as peft 0.21's Poly. Leave it out of adapter.target_modules, or use "
                               "adapter.method: lora.")
        in_features, out_features = linear_shape(base)
        if in_features % cfg.n_splits or out_features % cfg.n_splits:
            raise PeftkitError(f"adapter.n_splits: {cfg.n_splits} does not divide the features of '{path}' "
                               f"({in_features} in, {out_features} out): each skill is cut into n_splits equal heads "
                               "of both. Pick n_splits dividing both (1 always does), or leave the layer out of "
                               "adapter.target_modules.")
        return PolyLinear(base, cfg)

    @classmethod
    def link_layers(cls, model: nn.Module, cfg: PolyConfig, layers: dict[str, AdapterLayer]) -> None:
        """The model's `TaskIds` (one for all its layers: its hook takes the forward's `task_ids`)."""
        holder = task_ids_of(model)
        for layer in layers.values():
            layer.tasks = holder

    @classmethod
    def layer_facts(cls, cfg: PolyConfig, path: str, fan_in_fan_out: bool) -> PolyFacts:
        return PolyFacts(cfg.r, cfg.n_splits, cfg.n_skills, getattr(cfg, "merge_task", None))

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: PolyFacts) -> torch.Tensor:
        return weight + task_update(parts, facts)

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: PolyFacts) -> torch.Tensor:
        return weight - task_update(parts, facts)

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: PolyFacts) -> tuple[int | None, ...]:
        a, b = parts["poly_lora_A"], parts["poly_lora_B"]
        return b.shape[0] * b.shape[3], a.shape[0] * a.shape[2]

    @classmethod
    def to_peft(cls, cfg: PolyConfig, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        exclude = cfg.exclude_modules
        return cls.peft_common(cfg, targets, base_name) | {
            "exclude_modules": exclude.regex if isinstance(exclude, TargetRegex) else exclude,
            "r": cfg.r, "n_tasks": cfg.n_tasks, "n_skills": cfg.n_skills, "n_splits": cfg.n_splits,
            "poly_type": cfg.poly_type, "init_weights": cfg.init_weights}

    @classmethod
    def from_peft(cls, peft: PeftPolyConfig, config_file: Path) -> PolyConfig:
        refuse_unsupported(peft, config_file, ())
        if peft.poly_type != "poly":
            raise PeftkitError(f"{config_file}: poly_type is {peft.poly_type!r}; peft 0.21 (and peftkit) has the "
                               "'poly' router only. Fix the file, or export the adapter again.")
        return PolyConfig(
            method="poly", r=peft.r, n_tasks=peft.n_tasks, n_skills=peft.n_skills, n_splits=peft.n_splits,
            init_weights=peft.init_weights,
            target_modules=targets_from_peft(peft.target_modules, config_file) if peft.target_modules else None,
            modules_to_save=peft.modules_to_save or [], **filters_from_peft(peft, config_file))

    @classmethod
    def kept_for_backward(cls, cfg: PolyConfig, layer: AdapterLayer) -> tuple[int, int]:
        # Per token the input's fp32 copy and x A (r); per layer nothing (the routing weights are per row).
        return linear_shape(layer.base_layer)[0] + cfg.r, 0

    @classmethod
    def kept_per_row(cls, cfg: PolyConfig, layer: AdapterLayer) -> int:
        # Each row's mixed A (in, r) and B (r, out), and its routing weights (the sample and its normalisation).
        in_features, out_features = linear_shape(layer.base_layer)
        return cfg.r * (in_features + out_features) + 3 * cfg.n_splits * cfg.n_skills

    @classmethod
    def describe(cls, cfg: PolyConfig) -> str:
        heads = f", {cfg.n_splits} heads (MHR)" if cfg.n_splits > 1 else ""
        return f"Poly r={cfg.r}, {cfg.n_skills} skills{heads}, {cfg.n_tasks} task(s)"


PolyLinear.method = Poly
