"""A recipe's sections and keys, as its error messages name them: which pydantic model holds the keys at a key
path (the adapter method's config that `method:` picks), its keys in the order an error lists them, the other
sections a misplaced key belongs to, and the suggestion for a misspelt or foreign key (peft's, axolotl's,
transformers' names for ours)."""

from __future__ import annotations

import functools
import types
import typing
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, PydanticSchemaGenerationError, TypeAdapter, ValidationError

from peftkit.errors import did_you_mean
from peftkit.methods import DEFAULT_METHOD, METHODS
from peftkit.methods.alora import Activation
from peftkit.methods.bdlora import BlockDiagonalLora
from peftkit.methods.kasa import Kasa
from peftkit.methods.velora import Velora
from peftkit.methods.param_lora import TargetParameters
from peftkit.methods.target_filters import ExcludedTargets, LayerTargets
from peftkit.methods.replication import LayerReplication
from peftkit.methods.token_rows import TrainableTokenIndices
from peftkit.recipe.schema import Recipe
from peftkit.section import AdapterSection

def _members(annotation: Any) -> list[Any]:
    """The types a field accepts: the members of a union, without `Annotated` wrappers (discriminator tags)."""
    if typing.get_origin(annotation) is Annotated:
        return _members(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    if typing.get_origin(annotation) is list and (item := typing.get_args(annotation)):  # a list of sections: theirs
        return [annotation, *(m for m in _members(item[0]) if isinstance(m, type) and issubclass(m, BaseModel))]
    return [annotation]


def _section_model(loc: tuple, data: Any = None) -> type[BaseModel] | None:
    """The pydantic model whose fields live at `loc` (a path of keys), or None. Where the section is a union of
    adapter methods' configs, the one that `data` (the recipe) picks with its `method:` key."""
    node, methods = data, []
    for key in loc:
        node = node.get(key) if isinstance(node, dict) else None
        name = node.get("method") if isinstance(node, dict) else None
        methods.append(name if isinstance(name, str) else None)
    return _section_model_of(tuple(loc), tuple(methods))


@functools.lru_cache(maxsize=1024)  # a recipe of thousands of unknown keys asks for the same few sections each time
def _section_model_of(loc: tuple, methods: tuple) -> type[BaseModel] | None:
    """`_section_model` of the keys `loc`, where `methods` holds the `method:` written at each of them (or None)."""
    model: Any = Recipe
    named: type[BaseModel] | None = None  # the section of each entry of a mapping of names to sections (data.eval's)
    for key, method in zip(loc, methods, strict=True):
        if isinstance(key, int):  # an entry of a list of sections (data.train's): the entry's section
            continue
        if named is not None:  # a name of such a mapping: its entry's section
            model, named = named, None
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or key not in model.model_fields:
            return None
        members = _members(model.model_fields[key].annotation)
        candidates = [a for a in members if isinstance(a, type)]
        models = [a for a in candidates if issubclass(a, BaseModel)]
        model = _chosen_method(models, method) if len(models) > 1 else next(iter(models), None)
        named = next((m for a in members if typing.get_origin(a) is dict for m in _members(typing.get_args(a)[1])
                      if isinstance(m, type) and issubclass(m, BaseModel)), None)
    return model


def _chosen_method(models: list[type[BaseModel]], name: str | None) -> type[BaseModel] | None:
    """The config of the method `name` (the default method for None, or an unknown one)."""
    config = METHODS[name].config if name in METHODS else METHODS[DEFAULT_METHOD].config
    return config if config in models else models[0]

def _home_sections(key: str, section: tuple, data: Any, value: Any = None) -> list[str]:
    """The other top-level sections that have the key `key` (`max_length` written under training: data); of
    several, those that would take `value` (`method: lora` is adapter's, not quantization's)."""
    models = {name: _section_model((name,), data) for name in Recipe.model_fields if (name,) != tuple(section)}
    homes = {name: model for name, model in models.items() if model is not None and key in model.model_fields}
    return [name for name, model in homes.items() if _takes(name, model, key, value)] or list(homes)


def _synonym_home(key: str, section: tuple, data: Any, value: Any = None) -> tuple[str, str] | None:
    """Another tool's name (`_SYNONYMS`) for a key of another top-level section here that would take `value`
    (axolotl's flat `learning_rate: 2e-4` at the top: training's `lr`; `sequence_len` in training: data's
    `max_length`): (that section, our key); else None."""
    ours = _SYNONYMS.get(key.lower().replace("-", "_"), ())
    for name in (ours,) if isinstance(ours, str) else ours:
        for home in Recipe.model_fields:
            model = _section_model((home,), data) if (home,) != tuple(section) else None
            if model is not None and name in model.model_fields and _takes(home, model, name, value):
                return home, name
    return None


def _plain_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _takes(section: str, model: type[BaseModel], key: str, value: Any) -> bool:
    if (section, key) == ("adapter", "method"):  # each method's config takes only its own name
        return isinstance(value, str) and value in METHODS
    try:
        TypeAdapter(model.model_fields[key].annotation).validate_python(value)
    except (ValidationError, PydanticSchemaGenerationError):
        return False
    return True

# Names other tools use for our keys: a user coming from peft/axolotl/transformers gets pointed at ours.
_SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "learning_rate": "lr", "gradient_accumulation_steps": "grad_accum", "num_epochs": "epochs",
    "num_train_epochs": "epochs", "micro_batch_size": "batch_size", "per_device_train_batch_size": "batch_size",
    "lr_scheduler": "scheduler", "lr_scheduler_type": "scheduler", "optim": "optimizer", "base_model": "name_or_path",
    "torch_dtype": "dtype", "sequence_len": "max_length", "max_seq_length": "max_length", "target": "target_modules",
    "bnb_4bit_quant_type": "method", "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype", "bnb_4bit_quant_storage": "quant_storage",
    "type": ("method", "format"),  # peft's config's (an adapter's method), axolotl's dataset entry's (its format)
    "logging_steps": "log_steps",
}

# transformers', axolotl's and peft's keys that are another section's here, or a value of a key, or no setting at
# all: what to write instead, in whichever section they were written (a spelling match would mislead: transformers'
# `per_device_eval_batch_size` in training is not training's `batch_size`).
_FOREIGN = {
    "bf16": " transformers' `bf16: true` is training's `mixed_precision: bf16` here.",
    "fp16": " transformers' `fp16: true` is training's `mixed_precision: fp16` here.",
    "per_device_eval_batch_size": " The evaluation's batch size is eval's `batch_size` (eval: {batch_size: N}).",
    "eval_batch_size": " The evaluation's batch size is eval's `batch_size` (eval: {batch_size: N}).",
    "evaluation_strategy": " peftkit evaluates every training.eval_steps steps (and at the end) where data.eval is set.",
    "eval_strategy": " peftkit evaluates every training.eval_steps steps (and at the end) where data.eval is set.",
    "save_strategy": " peftkit checkpoints every training.save_steps steps.",
    "load_best_model_at_end": " `export.best: true` exports the adapter of the best evaluation instead of the last.",
    "metric_for_best_model": " `export.best: METRIC` picks the best evaluation by METRIC (loss, exact_match, ...).",
    "load_in_4bit": " A 4-bit base is a `quantization:` section (top level: method nf4, double_quant ...).",
    "load_in_8bit": " An 8-bit base is a `quantization:` section with `method: int8` (top level).",
    "lora_target_linear": " axolotl's `lora_target_linear: true` is adapter's `target_modules: all-linear` here.",
    "task_type": " peft's `task_type` is the model's `task` here (causal_lm by default, or sequence_classification).",
    "dataset": " The training data is data's `train` (a file, a hub id, or a list of them).",
    "datasets": " The training data is data's `train` (a file, a hub id, or a list of them).",
    "early_stopping_patience": " Early stopping is training's `early_stopping: {patience: N}` (metric, mode too).",
    "flash_attention": " axolotl's `flash_attention: true` is model's `attn_implementation: flash_attention_2` here.",
    "wandb_project": " The W&B project is the run directory's name (export.output_dir's last part); training's "
                     "`report_to: [wandb]` turns W&B on.",
}

# TRL's preference trainers' settings (DPOConfig, CPOConfig, ORPOConfig, KTOConfig) written in training or data,
# where the closest spelling misled (beta: kto_beta in a DPO recipe; loss_type: log_steps; label_smoothing:
# early_stopping; rpo_alpha: orpo_lambda); elsewhere they are no TRL setting (KaSA's adapter has a `beta`).
_TRL = {
    "beta": " TRL's `beta` is training's `dpo_beta` here (`simpo_beta` for SimPO, `kto_beta` for KTO; ORPOConfig's "
            "beta, its lambda, is `orpo_lambda`).",
    "loss_type": " TRL's DPO `loss_type` is training's `dpo_loss` here (sigmoid, ipo or hinge); CPOConfig's "
                 "`loss_type: simpo` is `objective: simpo`.",
    "max_prompt_length": " peftkit does not cut a prompt apart from its answer: data's `max_length` bounds each prompt "
                         "with its answer, and `data.truncation` says what becomes of an answer cut there (a pair "
                         "whose prompt leaves no answer token is dropped).",
    "max_completion_length": " peftkit does not cut an answer apart from its prompt: data's `max_length` bounds each "
                             "prompt with its answer, and `data.truncation` says what becomes of an answer cut there.",
    "label_smoothing": " TRL's `label_smoothing` (conservative DPO, the robust loss) has no peftkit setting: "
                       "training.dpo_loss is sigmoid, ipo or hinge.",
    "rpo_alpha": " TRL's `rpo_alpha` (an SFT loss on the chosen answers added to DPO's) has no peftkit setting; "
                 "`objective: orpo` trains an SFT loss with a preference term (`orpo_lambda`).",
    "cpo_alpha": " TRL's `cpo_alpha` (CPO's SFT term) has no peftkit setting: `objective: simpo` is CPOConfig's "
                 "`loss_type: simpo` with `cpo_alpha: 0`.",
    "ref_model": " The DPO and KTO reference is the model training starts from, as TRL's for a PEFT model: the base "
                 "model, or with `adapter.init_from` the base with that adapter (DPO after SFT); no other is set.",
    "precompute_ref_log_probs": " peftkit computes the reference's log-probabilities once, before training, always "
                                "(TRL's `precompute_ref_log_probs: true`).",
}

# transformers' quantization flags written in our `quantization:` section (whose `double_quant` tells it from the
# others), where the pointer to that section would send the user where they are: the value they are there.
_IN_QUANTIZATION = {
    "load_in_4bit": " Here a 4-bit base is `method: nf4` (bitsandbytes' load_in_4bit with its NF4 type; `fp4` for "
                    "FP4), with `double_quant: true` for bnb_4bit_use_double_quant.",
    "load_in_8bit": " Here an 8-bit base is `method: int8`.",
}

# peft keys whose closest name here is another setting: what they are, not a pointer to that setting.
_NOT_OURS = {
    ("bias", "lora_bias"): " peft's `bias` (all / lora_only: train the base's own biases) has no peftkit key; "
                           "'lora_bias' is another setting (a trained bias of the update, in lora_B).",
}


def _method_without(model: type[BaseModel] | None, key: str) -> str | None:
    """The method of an adapter config that lacks `key`, when saying so helps: the recipe chose a method other
    than the default, or `key` belongs to another method (`r` in an IA3 section). None otherwise."""
    method = next((m.name for m in METHODS.values() if m.config is model), None)
    if method is None:  # not an adapter section (quantization has a `method` too)
        return None
    elsewhere = any(key in m.config.model_fields for m in METHODS.values() if m.name != method)
    return method if method != DEFAULT_METHOD or elsewhere else None


def _all_fields(model: type[BaseModel]) -> set[str]:
    names = set(model.model_fields)
    for field in model.model_fields.values():
        for member in _members(field.annotation):
            if isinstance(member, type) and issubclass(member, BaseModel):
                names |= _all_fields(member)
    return names


def _suggest(key: str, valid: list[str]) -> str:
    normal = key.lower().replace("-", "_")  # `Batch-Size` is `batch_size` written another way
    if note := next((n for (theirs, ours), n in _NOT_OURS.items() if normal == theirs and ours in valid), None):
        return note
    if normal in _IN_QUANTIZATION and "double_quant" in valid:
        return _IN_QUANTIZATION[normal]
    if normal in _FOREIGN:
        return _FOREIGN[normal]
    if normal in _TRL and {"objective", "max_length"} & set(valid):  # (training's keys, data's)
        return _TRL[normal]
    for name in (key, normal):
        ours = _SYNONYMS.get(name, ())
        if meant := next((k for k in ((ours,) if isinstance(ours, str) else ours) if k in valid), None):
            return f" Did you mean '{meant}'?"
    if normal != key and normal in valid:
        return f" Did you mean '{normal}'?"
    return did_you_mean(normal, valid)


def _valid_keys(loc: tuple, data: Any = None) -> list[str]:
    model = _section_model(loc, data)
    return _field_order(model) if model else []


def _field_order(model: type[BaseModel]) -> list[str]:
    """A section's keys as an error lists them."""
    # Fields of a shared base (every adapter method's `init_from`, the layer methods' `layers_to_transform`, LoRA's
    # `trainable_token_indices`) come first in pydantic's order; a method's own keys, `method` first, read better
    # ahead of them, init_from last.
    shared = sorted((name for name in model.model_fields
                     if any(name in base.model_fields
                            for base in (LayerTargets, ExcludedTargets, TrainableTokenIndices, LayerReplication,
                                         Activation, TargetParameters, BlockDiagonalLora, Velora, Kasa))),
                    key=lambda name: name in AdapterSection.model_fields)
    return [name for name in model.model_fields if name not in shared] + shared
