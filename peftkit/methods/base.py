"""What every weight-update method shares: the method protocol (`Method`), its PEFT config's common fields, and
what it adds to the training loop (`MethodTrainer`). The layer it wraps a base layer in is
`peftkit.methods.layer.AdapterLayer`.

A method is a class with class-level hooks (no instances): its recipe config, its PEFT config, the layer it
wraps a base layer in, and its **one** merge math, `merge_weight(weight, parts, facts)`. That function is the
only place a method's update meets a weight: the in-place `AdapterLayer.merge`, the pure
`peftkit.adapters.state_dicts.merge_state_dict` and `peftkit merge` all call it, with the layer's tensors (`parts`, by
their PEFT names) and its per-layer facts (`facts`: scaling inputs, layout), never a global scaling.

A method may also have model-level tensors that every adapted layer uses (VeRA's frozen random projections):
`Method.shared_tensors` builds them from the targets' shapes, one `SharedTensors` module (`peftkit.methods.layer`)
holds them for all the layers, and `parts` hands them to `merge_weight` beside the layer's own tensors.

A module adapter (Llama-Adapter, bottleneck) wraps whole blocks (attention, MLP) that `select_targets` picks,
computes something of its own beside them and folds into no weight: `mergeable = False`, and every merge path
refuses it through `peftkit.methods.layer.refuse_unmergeable`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.layer import AdapterLayer
from peftkit.section import Section, TargetRegex

REEXPORT = "Fix the file, or export the adapter again."


class PeftConfigBase(BaseModel):
    """The fields of adapter_config.json every method reads; each method's subclass adds its own. PEFT
    writes more, which are ignored. Defaults are PEFT's own, so a config with fields left out reads the same."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    peft_type: str | None = None
    base_model_name_or_path: str | None = None
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    revision: str | None = None
    """The hub revision of the base the adapter was trained on (peftkit writes `model.revision` here)."""
    task_type: str | None = None
    """PEFT's task: `SEQ_CLS` loads the base as a sequence classifier (`peftkit.classify`); anything else, a causal LM."""


def targets_from_peft(targets: list[str] | str, config_file: Path,
                      key: str = "target_modules") -> list[str] | str | TargetRegex:
    """adapter_config.json's `target_modules` (or another module list, `key`) in recipe form: a string other
    than `all-linear` is a regex."""
    if not isinstance(targets, str) or targets == "all-linear":
        return targets
    try:
        return TargetRegex(regex=targets)
    except ValidationError as e:
        raise PeftkitError(f'{config_file}: "{key}" {e.errors()[0]["msg"].removeprefix("Value error, ")}. '
                           f"{REEXPORT}") from None


class MethodTrainer:
    """What a method adds to the training loop (`Method.trainer`), beside its layers' forward: an extra loss term,
    work after each optimizer step, state that a checkpoint must keep, and settings only the run knows at export.
    Every hook does nothing by default. (AdaLoRA: the orthogonality regulariser and the rank allocator.)"""

    per_process = False
    """Whether the state differs between processes (a generator each draws from for batches of its own shapes): a
    checkpoint then keeps every process's, and a resume gives each its own. False: every process's is the main's."""

    def regularizer(self) -> torch.Tensor | None:
        """A term added to the loss of each optimizer step (once per step, not per micro-batch: its gradient
        does not depend on how the step is split into micro-batches), or None."""
        return None

    def batch_loss(self, batch: dict, labelled: int | None) -> torch.Tensor | None:
        """A term added to a micro-batch's summed next-token loss right after its forward (ShadowPEFT's auxiliary
        loss, which reads that forward's shadow state), in the loss sum's units (a sum over the `labelled` positions
        of `batch["labels"]`), or None. Trained on, not logged: `loss` stays the cross-entropy."""
        return None

    def token_loss(self) -> tuple[Callable, Callable] | None:
        """The method's own training objective in place of the mean next-token cross-entropy of the data's labelled
        tokens (CPT's, over its context's answers too, weighted), as (count, loss_sum): `count(labels)`, the positions
        a batch of (rows, time) `labels` averages over, counted on the CPU; `loss_sum(model, batch, counted)`, their
        losses summed and their number, as `peftkit.evaluate.token_loss_sum`. None: the plain objective. Evaluation
        always uses the plain one (the data's loss, comparable across methods)."""
        return None

    def after_step(self, step: int) -> None:
        """Called after optimizer step number `step` (1 for the first), before the gradients are zeroed."""

    def state_dict(self) -> dict:
        """What a checkpoint keeps (tensors, lists, numbers: `torch.load(weights_only=True)` must read it)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s value on resume."""

    def export(self, cfg: Any, state: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        """The adapter settings and PEFT-keyed tensors to export, from the recipe's and the model's."""
        return cfg, state


def is_set(value: Any) -> bool:
    """Whether an adapter_config.json field holds a setting: not null, false, empty or "none" (0 is one:
    `layers_to_transform: 0` adapts layer 0)."""
    if value is None or value is False:
        return False
    return not isinstance(value, str | list | tuple | dict) or value not in ("", "none") and len(value) > 0


def refuse_unsupported(peft: BaseModel, config_file: Path, keys: tuple[str, ...], what: str = "peftkit") -> None:
    """A PEFT feature peftkit does not implement is refused, never silently ignored: any of `keys` set, or a
    `bias` other than 'none' (for a config that has the field)."""
    for key in keys:
        if is_set(getattr(peft, key)):
            raise PeftkitError(f"{config_file}: '{key}' is set; {what} does not support it yet.")
    if getattr(peft, "bias", "none") != "none":
        raise PeftkitError(f"{config_file}: bias={peft.bias!r}; peftkit supports bias='none' only.")




def draw_device(device: torch.device) -> torch.device:
    """Where a new adapter's initial values are drawn, for a base on `device`: the CPU, then moved beside the base
    (as peft's LoRA): one seed gives one adapter on any device. On the meta device itself (the memory estimate
    injects there, and an absurd rank must not allocate)."""
    return device if device.type == "meta" else torch.device("cpu")


class Method:
    """The protocol of a weight-update method; subclasses fill in every hook and register with
    `peftkit.methods.register`."""

    name: ClassVar[str]
    """`adapter.method` in a recipe."""
    title: ClassVar[str]
    """How the parameter-count line names it (`LoRA`)."""
    peft_type: ClassVar[str]
    """`peft_type` in adapter_config.json."""
    config: ClassVar[type[Section]]
    """The recipe's `adapter` section for this method."""
    peft_config: ClassVar[type[PeftConfigBase]]
    """The typed view of this method's adapter_config.json."""
    param_names: ClassVar[tuple[str, ...]]
    """PEFT key suffixes of one layer's tensors (`lora_A.weight`, ...): how a state dict's keys are split
    into (module path, tensor) without the live model."""
    untrained_names: ClassVar[tuple[str, ...]] = ()
    """Those of `param_names` the file saves beside the trained tensors and training never changes (SHiRA's
    `shira_indices`, DeLoRA's column norms `delora_w_norm`): not counted as trainable by `peftkit inspect`."""
    integer_names: ClassVar[tuple[str, ...]] = ()
    """Those of `param_names` the file holds as integers (SHiRA's `shira_indices`), which the adapter-tensor check
    (`peftkit.peft_format.check_adapter_tensors`) lets through; every other tensor must be floating-point, untrained
    ones too (DeLoRA's norms)."""
    rank_dims: ClassVar[dict[str, int]] = {}
    """For a shape-mismatch message: which dimension of a tensor (by its key's last part) is the rank."""
    shared_names: ClassVar[tuple[str, ...]] = ()
    """Names of the model-level tensors `shared_tensors` builds (`vera_A`, `vera_B`), saved as `base_model.<name>`."""
    shared_trained: ClassVar[tuple[str, ...]] = ()
    """Those of `shared_names` that train (VB-LoRA's vector bank), once for all the layers; the others are frozen."""
    shared_copies_per_layer: ClassVar[bool] = False
    """peft's file also repeats each saved shared tensor under every layer (`<path>.<name>`: RandLoRA's, whose layers
    hold the shared buffers): written so on export, checked equal and dropped on reading (`peftkit.peft_format`)."""
    loraplus_roles: ClassVar[dict[str, str]] = {}
    """For LoRA+ (`training.loraplus_lr_ratio`): the tensors (by PEFT key suffix) that train at `lr` ("A"), at
    ratio x `lr` ("B") or at `loraplus_lr_embedding` ("embedding"). A method without a "B" cannot use LoRA+."""
    trainer_reshapes: ClassVar[bool] = False
    """The method's trainer changes what the export holds as it trains (AdaLoRA's rank allocation): weights from
    an earlier step do not fit the final layout, so `export.best` is refused."""
    mergeable: ClassVar[bool] = True
    """Whether the update folds into the base weights (`merge_weight`). A module adapter (bottleneck,
    Llama-Adapter) or the prompt family computes something of its own beside the base: there is no merged
    model, and every merge path refuses it (`merge_refusal`, `refuse_unmergeable`)."""
    needs_bias: ClassVar[bool] = False
    """Its update is the base layer's bias (BEFT's): merged into a layer without one, it has nowhere to go, and the
    merge is refused (`check_bias_to_merge`; before training with export.merged)."""
    merges_tied: ClassVar[bool] = False
    """Its layers over one weight that two modules hold (an output head tied to the input embeddings) merge in place
    into it as one: trainable tokens, whose tied head is wrapped too and holds the embeddings' own rows. Any other
    method's in-place merge there is refused (`refuse_tied`)."""

    fsdp_refusal: ClassVar[str | None] = None
    """Why FSDP cannot train this method's adapter (as the end of a sentence), or None: `peftkit.distributed.check_engine`
    refuses it before the model loads."""
    alone: ClassVar[str | None] = None
    """Why an adapter of this method cannot sit beside other adapters on one base (named adapters, mixed batches), as
    the end of a sentence (ShadowPEFT's network beside the whole decoder, X-LoRA's pass over the whole model before
    each forward); None: it can. `peftkit.adapters.sharing.refuse_alone` says it, and a comparison evaluates such an
    adapter on a model of its own (`loads_alone`)."""

    reads_task_ids: ClassVar[bool] = False
    """The forward takes per-row `task_ids` (the data's `task` column, `--task`): multitask prompt tuning, Poly (whose
    layers read them through `peftkit.methods.task_routing`)."""
    reads_input_types: ClassVar[bool] = False
    """The training loss takes per-token types, the batch's `input_type_mask` (a tokenized row's column, peft's
    `input_type_mask=`): CPT. A recipe of any other method whose data has the column is refused as it loads
    (`peftkit.start_data`), where its types would be ignored silently."""
    tasks_key: ClassVar[str] = "num_tasks"
    """For a method that reads task ids: its config's key for how many tasks there are (Poly's, as peft's:
    `n_tasks`)."""
    layer_targets: ClassVar[bool] = True
    """The method wraps the layers `target_modules` names. False: it adapts the model as a whole (the prompt family,
    `peftkit.methods.virtual`: `install` puts one module on the model) and its adapter_config.json names no targets."""

    targets_in_config: ClassVar[bool] = True
    """adapter_config.json names the layers adapted (`target_modules`). False: other files do (X-LoRA's experts, each
    in its own directory with its own adapter_config.json)."""
    recipe_only: ClassVar[tuple[str, ...]] = ()
    """Keys of peftkit's own that adapter_config.json does not hold (Poly's `merge_task`): a recipe with
    adapter.init_from keeps its value of each (`peftkit.init_from`), which no adapter can match, and the config's
    checks run again with the adapter's settings."""

    @classmethod
    def install(cls, model: nn.Module, cfg: Any) -> nn.Module:
        """Adapt `model` as a whole (a method without `layer_targets`); returns the module it added."""
        raise NotImplementedError

    @classmethod
    def model_facts(cls, cfg: Any, model_config: Any) -> dict:
        """adapter_config.json fields that come from the base model's config (the prompt family's `token_dim`,
        `num_layers`, ...); none for a method whose layers say it all."""
        return {}

    @classmethod
    def trained_params(cls, cfg: Any, facts: dict) -> int | None:
        """The parameters training updates, where the file saves something else (P-tuning saves its prompt
        encoder's output, not the encoder), from the config and `facts` (adapter_config.json, `model_facts`'s
        fields among them); None where the saved tensors are what trained."""
        return None

    @classmethod
    def repeated_in_file(cls, peft: Any, targets: dict[str, dict[str, tuple[int, ...]]]) -> int:
        """Numbers the file of adapter_config.json `peft` holds more than once: copies, under other layers, of a tensor
        several layers share (Lily's A and B), from the layers' tensor shapes (`targets`: {path: {suffix: shape}}).
        `peftkit inspect` counts them once. Default: none."""
        return 0

    @classmethod
    def frozen_in_file(cls, peft: Any, shapes: dict[str, tuple[int, ...]]) -> int:
        """Numbers the file of adapter_config.json `peft` saves that training never updates, where its settings decide
        which (a ClassVar such as `untrained_names` cannot say): a pretrained ShadowPEFT backbone's embeddings, frozen
        and saved as peft saves them. From the file's tensor shapes by PEFT key (`shapes`); `peftkit inspect` leaves
        them out of the trainable count. Default: none."""
        return 0

    @classmethod
    def merge_refusal(cls, cfg: Any = None) -> str | None:
        """Why this method's adapters (of settings `cfg`, a recipe's or adapter_config.json's, where given) cannot be
        merged into the base weights (and what to do instead), or None."""
        if cls.mergeable:
            return None
        return (f"{cls.title} adapters (method: {cls.name}) add computation of their own to the model instead of "
                "changing its weights, so they cannot be merged into a plain model. Keep the adapter separate: set "
                "export.merged: false (or skip `peftkit merge`) and use it with `peftkit eval/generate --adapter DIR`.")

    @classmethod
    def shared_across_layers(cls, cfg: Any) -> str | None:
        """What parameter of this recipe's adapter several decoder layers' adapters reach, trained or frozen, as what
        follows 'adapter.method: X ' ('trains one tensor (...) that ...': naming the tensor and the key that shares
        it), or None. FSDP2 shards each decoder layer's parameters as its own unit, and torch's fully_shard fails at
        the second layer that reaches such a parameter, after the model has loaded: `peftkit.distributed.check_engine`
        refuses it first. Default: the model-level tensors that train (`shared_trained`: VB-LoRA's vector bank)."""
        if not cls.shared_trained:
            return None
        return f"trains one tensor ({', '.join(cls.shared_trained)}) that every adapted layer shares"

    @classmethod
    def skips_parameters(cls, cfg: Any) -> bool:
        """Whether a training forward may leave some of the adapter's parameters out of the graph, at random and
        per process (LyCORIS' `module_dropout`): torch DDP must then look for unused parameters every step."""
        return False

    @classmethod
    def recipe_conflict(cls, recipe: Any) -> str | None:
        """What in a whole recipe this method cannot do (`export.merged` for a method that cannot merge, ...), as
        a recipe error message, or None."""
        return None

    @classmethod
    def with_recipe(cls, cfg: Any, recipe: Any) -> None:
        """Keep on `cfg` (the recipe's adapter section, in place: private attributes, never written) what it takes
        from the rest of the recipe, which `install` does not see (CPT's context: data.chat_template, which renders
        its conversations as the data's). Called when a recipe validates (a run's manifest's, which `peftkit verify`
        re-runs, too), and again by `load_recipe` once the paths are resolved and data.chat_template read in."""

    @classmethod
    def positions_in_front(cls, cfg: Any) -> int:
        """The positions the adapter puts in front of every sequence (the prompt family's virtual tokens), which the
        checks of data.max_length and of the generations' room against the model's positions add
        (`peftkit.rope_scaling`): num_virtual_tokens where the method has it, else 0."""
        return getattr(cfg, "num_virtual_tokens", 0)

    @classmethod
    def resolve(cls, cfg: Any, model_type: str | None) -> Any:
        """`cfg` with the settings it leaves to the architecture (`model_type`, transformers' name) filled in."""
        return cfg

    @classmethod
    def select_targets(cls, model: nn.Module, cfg: Any, every_entry: bool) -> list[str]:
        """Full paths of the modules `wrap` is given, in model order (`cfg` already `resolve`d). Default: the
        Linear/Conv1D/Embedding layers `cfg.target_modules` names (`peftkit.adapters.find_targets`) that
        `cfg.exclude_modules` and `cfg.layers_to_transform` keep (`peftkit.methods.target_filters.narrow`); a module
        adapter picks whole blocks (attention, MLP) instead."""
        from peftkit.adapters import find_targets  # peftkit.adapters imports this module
        from peftkit.methods.target_filters import narrow  # (it imports this module too)

        return narrow(find_targets(model, cfg.target_modules, every_entry), cfg)

    @classmethod
    def wrap(cls, base: nn.Module, cfg: Any, path: str) -> AdapterLayer:
        """The adapter layer around `base`, the module at `path`; its facts come from `layer_facts`."""
        raise NotImplementedError

    @classmethod
    def wrap_parameters(cls, model: nn.Module, cfg: Any, wrapped: set[str], every_entry: bool) -> list[str]:
        """After the target modules (`wrapped`, by path) are wrapped: wrap parameters the method adapts directly
        (LoRA's target_parameters); their paths. `every_entry`: as for the target modules. Default: none."""
        return []

    @classmethod
    def link_layers(cls, model: nn.Module, cfg: Any, layers: dict[str, AdapterLayer]) -> None:
        """After every target is wrapped (`layers`, by path): tie layers together, wrapping more modules where the
        method ties them (trainable tokens: a head tied to the embeddings), added to `layers`. Default: nothing."""

    @classmethod
    def shared_tensors(cls, cfg: Any, shapes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """The fp32 CPU tensors, by `shared_names`, shared by an adapter on layers of (in, out) `shapes`; only
        called for a method with `shared_names`. The state-dict merge calls it too, for an adapter that did not
        save them, so they must follow from `cfg` and `shapes` alone."""
        return {}

    @classmethod
    def shared_from_layers(cls, cfg: Any, layers: list[AdapterLayer]) -> dict[str, torch.Tensor]:
        """Shared tensors the layers drew as they were built (VB-LoRA's bank, drawn by peft between the layers'
        own draws), over `shared_tensors`' of the same name; called at injection only. Default: none."""
        return {}

    @classmethod
    def saves_shared(cls, cfg: Any) -> bool:
        """Whether the adapter file carries the shared tensors (else they are regenerated on loading)."""
        return True

    @classmethod
    def to_peft_file(cls, state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
        """The PEFT-keyed tensors as adapter_model.safetensors holds them for adapter_config.json `config`, where
        peft's file differs from the model's tensors (VB-LoRA's `save_only_topk_weights`). Default: as they are."""
        return state

    @classmethod
    def from_peft_file(cls, state: dict[str, torch.Tensor], peft: Any, file: Path) -> dict[str, torch.Tensor]:
        """The inverse of `to_peft_file`, for a file read (and checked) with adapter_config.json `peft`."""
        return state

    @classmethod
    def layer_state(cls, layers: dict[str, AdapterLayer], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The PEFT-keyed `state` (a file's or a checkpoint's) as the injected model's `layers` (by path, in the model's
        order) hold it, where peft's file keys a tensor by what only that order gives (TinyLoRA's v of each group of
        consecutive layers, `base_model.tinylora_v.<group>`). Default: as it is."""
        return state

    @classmethod
    def layer_facts(cls, cfg: Any, path: str, fan_in_fan_out: bool) -> Any:
        """What `merge_weight` needs for the layer at `path` besides its tensors. `fan_in_fan_out`: the base
        weight is stored (in, out) (transformers' Conv1D)."""
        raise NotImplementedError

    @classmethod
    def base_facts(cls, facts: Any, parts: dict[str, torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
                   path: str) -> Any:
        """`facts` (`layer_facts`') completed from the base layer's own fp32 `weight` (as stored) and `bias` (or None),
        for a merge of a file's tensors `parts` into the module at `path`, where the layout follows from the weight
        and the file does not hold it (AdaMSS's clustering of the weight's rows; a live layer holds it already).
        Default: `facts` as they are."""
        return facts

    @staticmethod
    def merge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: Any) -> torch.Tensor:
        """The fp32 weight with the update folded in; `weight` (fp32) is not modified. The one merge math."""
        raise NotImplementedError

    @staticmethod
    def unmerge_weight(weight: torch.Tensor, parts: dict[str, torch.Tensor], facts: Any) -> torch.Tensor:
        """The inverse of `merge_weight`."""
        raise NotImplementedError

    @staticmethod
    def merge_bias(bias: torch.Tensor, parts: dict[str, torch.Tensor], facts: Any) -> torch.Tensor | None:
        """The fp32 bias with the update folded in, or None when the update leaves the bias alone (LoRA)."""
        return None

    @classmethod
    def merge_bias_of(cls, bias: torch.Tensor, weight: torch.Tensor, parts: dict[str, torch.Tensor],
                      facts: Any) -> torch.Tensor | None:
        """What every merge calls: `merge_bias`, for a method whose bias update reads the weight before the merge too
        (GLoRA's b + b D + E + W C) given that fp32 `weight`. Default: `merge_bias`, which does not read it."""
        return cls.merge_bias(bias, parts, facts)

    @staticmethod
    def unmerge_bias(bias: torch.Tensor, parts: dict[str, torch.Tensor], facts: Any) -> torch.Tensor | None:
        """The inverse of `merge_bias`."""
        return None

    @staticmethod
    def update_shape(parts: dict[str, torch.Tensor], facts: Any) -> tuple[int | None, ...]:
        """The shape of the base weight these tensors fit (None: any size along that dimension)."""
        raise NotImplementedError

    @classmethod
    def to_peft(cls, cfg: Any, targets: list[str], base_name: str, fan_in_fan_out: bool) -> dict:
        """adapter_config.json for an adapter on the modules `targets` (`peft_common` and the method's own)."""
        raise NotImplementedError

    @classmethod
    def peft_common(cls, cfg: Any, targets: list[str], base_name: str) -> dict:
        """The adapter_config.json fields every method writes. `target_modules` lists the exact module paths
        adapted, so that peft's suffix matching selects exactly the same layers whatever form the recipe used.
        `task_type` is set from model.task by `peftkit.peft_format.peft_config`."""
        return {"peft_type": cls.peft_type, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
                "target_modules": sorted(targets), "modules_to_save": cfg.modules_to_save or None,
                "inference_mode": True, "revision": None} | (
                    {"layers_to_transform": cfg.layers_to_transform, "layers_pattern": cfg.layers_pattern}
                    if hasattr(cfg, "layers_to_transform") else {}) | (
                    # the targets above already leave them out: peft would warn that it excluded nothing
                    {"exclude_modules": None} if hasattr(cfg, "exclude_modules") else {})

    @classmethod
    def from_peft(cls, peft: Any, config_file: Path) -> Any:
        """The recipe config of a validated `peft_config`; refuses what peftkit cannot apply faithfully."""
        raise NotImplementedError

    @classmethod
    def for_original_base(cls, layers: dict[str, AdapterLayer], state: dict[str, torch.Tensor],
                          config: dict) -> tuple[dict[str, torch.Tensor], dict]:
        """The exported adapter (PEFT-keyed `state`, adapter_config.json `config` of the model's `layers`) as it
        applies to the original base, for an init that moved part of the base into the adapter (LoRA's PiSSA);
        as given for every other."""
        return state, config

    @classmethod
    def kept_for_backward(cls, cfg: Any, layer: AdapterLayer) -> tuple[int, int]:
        """(values per token, values regardless of tokens) the adapter of `layer` keeps for backward beyond the
        base model's own activations: the method's share of the memory estimate (`peftkit.memory`), an upper
        bound. Default: a low-rank method's rank-r intermediate per token (`cfg.r`), nothing per layer."""
        return getattr(cfg, "r", 0), 0

    @classmethod
    def kept_per_row(cls, cfg: Any, layer: AdapterLayer) -> int:
        """fp32 values the adapter of `layer` keeps for backward per row of a micro-batch, whatever the row's length
        (Poly's factors mixed for each row's task): the memory estimate multiplies them by the rows. Default: none."""
        return 0

    @classmethod
    def forward_scratch(cls, cfg: Any, layer: AdapterLayer) -> int:
        """fp32 values the adapter of `layer` allocates in a forward and frees before the next layer's (DoRA's weight
        norm): the memory estimate adds the largest layer's. Default: none."""
        return 0

    @classmethod
    def describe(cls, cfg: Any) -> str:
        """The method and its size setting for the parameter-count line (`LoRA r=8`)."""
        return cls.title

    @classmethod
    def trainer(cls, model: nn.Module, cfg: Any, total_steps: int) -> MethodTrainer | None:
        """What the method adds to a training run of `total_steps` optimizer steps over the injected `model`, or
        None (most methods: their layers' forward is all). Raises a PeftkitError for settings the steps contradict."""
        return None

    @classmethod
    def check_run(cls, model: nn.Module, cfg: Any) -> None:
        """Raise a PeftkitError for settings a training run of the injected `model` cannot train with, whatever its
        steps (train runs it before `trainer`; validate runs it without training.max_steps, which `trainer` needs)."""

    @classmethod
    def source_dirs(cls, cfg: Any) -> dict[str, str]:
        """The directories of the adapters this method is built from, which a run reads (AdapterFusion's, X-LoRA's
        experts), by the recipe key naming each (`adapter.adapters['0']`): a run records their files' sha256 as inputs
        (`peftkit.checkpoint.run_inputs`, manifest.json's `sources_sha256`), so that `--resume` refuses and `peftkit
        verify` names one changed since. Default: none."""
        return {}

    @classmethod
    def save_sources(cls, cfg: Any, directory: Path) -> dict:
        """Copy into `directory`, the adapter directory being exported, the adapters this one is built from and reads
        from their own directories (X-LoRA's experts), so that it loads on its own wherever it is moved; the fields
        naming the copies in its peftkit.json (`peftkit.adapter_meta.PeftkitMeta`), relative to it: nothing written
        may name the run directory itself, which a re-run (`peftkit verify`) writes elsewhere. Default: nothing, {}."""
        return {}

    @classmethod
    def check_sources(cls, cfg: Any, recipe: Any, model: nn.Module, commit: str | None) -> None:
        """Raise a PeftkitError where adapters this method is built from (AdapterFusion's, X-LoRA's experts), read for
        training, were trained on another base than the recipe's: `recipe.model` (its name, RoPE scaling, dtype),
        `recipe.quantization`, `commit` (of a hub base, the one this run loaded; None for a local one). `model` is the
        base as loaded (on the meta device under `peftkit validate`). train calls it once the base is loaded, validate
        once it is built; a reloaded export is not checked (its base is the one it records). Default: nothing."""

    @classmethod
    def randomize(cls, layer: AdapterLayer, generator: torch.Generator, std: float) -> None:
        """Give `layer` an update far from identity (tests and benchmarks: a merge must not pass trivially)."""
        with torch.no_grad():
            for p in layer.adapter_params().values():
                p.copy_(torch.randn(p.shape, generator=generator) * std)
