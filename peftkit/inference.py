"""What `peftkit eval` and `peftkit generate` run: a base model, a base + adapter, or a merged model.

The tokenizer loads apart from the model, so that a data or prompt mistake is reported in seconds, before a
multi-GB model loads. With an adapter, the base is the given model or the adapter's base_model_name_or_path,
loaded at its recorded revision and re-quantized as the adapter was trained (`load_adapted_model`).
"""

from __future__ import annotations

import json

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import torch
from torch import nn

from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.recipe import DataConfig, ModelConfig, QuantizationConfig, Recipe

if TYPE_CHECKING:
    from peftkit.modeling import Tokenizers

FORMATS = get_args(DataConfig.model_fields["format"].annotation)


def _tokenizers() -> Tokenizers:
    from peftkit.modeling import Tokenizers  # (modeling's imports wait for a command that loads a model)

    return Tokenizers()


@dataclass
class ModelSource:
    model: ModelConfig | None = None
    """The model, or the base of `adapter` (default: the adapter's recorded base)."""
    quantization: QuantizationConfig | None = None
    """bitsandbytes settings for a model without adapter (an adapter brings its own)."""
    adapter: str | None = None
    """A PEFT-format adapter directory to apply."""
    trust_remote_code: bool = False
    """The user's --trust-remote-code: needed for an adapter whose base runs its own modelling code."""
    mixed_precision: str = "no"
    """training.mixed_precision of the recipe the model comes from: the autocast it runs under on CUDA
    (`peftkit.runtime.inference_autocast`), as the run's evaluations did; without a recipe, none."""
    model_from_recipe: bool = False
    """`model` is a recipe's: an adapter's base loads with its dtype, attn_implementation and revision, as the run
    loaded it (a --model flag names the base only, loaded as the adapter's recorded base would be)."""
    chat_template: str | None = None
    """The recipe's data.chat_template, which the tokenizer gets in place of its own (kept under --model: the
    recipe's data and its run's adapter were rendered with it); None without a recipe (`tokenizer`)."""
    adapter_template: bool = True
    """Whether the chat template an adapter carries (a run's adapter/chat_template.jinja) renders the prompts where
    `chat_template` is None. Not for a recipe's start (`peftkit.start_eval.from_the_start`): its run renders in the
    recipe's template (the base tokenizer's own), whatever adapter.init_from was trained with."""
    added: dict = field(default_factory=dict, repr=False, compare=False)
    """`added_tokens`' answers for this command, by the base tokenizer they were found against (shared by the
    copies `here` makes): the tokenizer and the model each need them."""
    tokenizers: Tokenizers = field(default_factory=_tokenizers, repr=False, compare=False)
    """The tokenizers this command read (`tokenizer`'s, with its chat template; shared by the copies `here`,
    a comparison's rows and each data.eval set's job make): `tokenizer` and loading the model take them from here
    rather than read them again."""

    @classmethod
    def of_recipe(cls, cfg: Recipe, run_adapter: str | None) -> ModelSource:
        """A recipe's model, with the adapter of its run directory (if any), run as the run evaluated it."""
        return cls(cfg.model, cfg.quantization, run_adapter, mixed_precision=cfg.training.mixed_precision,
                   model_from_recipe=True, chat_template=cfg.data.chat_template)

    def with_flags(self, model: str | None, adapter: str | None, trust_remote_code: bool) -> ModelSource:
        """This source with the command line's --model, --adapter and --trust-remote-code on top."""
        if not model:
            return replace(self, adapter=adapter or self.adapter, trust_remote_code=trust_remote_code)
        given = ModelConfig(name_or_path=model, dtype="auto", trust_remote_code=trust_remote_code)
        return replace(self, model=given, model_from_recipe=False, adapter=adapter or self.adapter,
                       trust_remote_code=trust_remote_code)

    @property
    def adapter_base(self) -> ModelConfig | str | None:
        """What an adapter is applied to (`peftkit.adapter_base.load_adapter_base`'s `base`)."""
        return self.model if self.model_from_recipe else self.base

    @property
    def base(self) -> str | None:
        from peftkit.peft_format import recorded_base

        if self.model:
            return self.model.name_or_path
        return recorded_base(self.adapter) if self.adapter else None

    def describe(self) -> str:
        return f"{self.base} with adapter {self.adapter}" if self.adapter else str(self.base)

    def classifier(self) -> bool:
        """Whether this is a sequence classifier, from its files alone: a recipe's model.task, an adapter saved as
        SEQ_CLS, or a model directory whose config.json names a ...ForSequenceClassification class."""
        return self.model_classifier() or self.adapter_task() == "SEQ_CLS"

    def model_classifier(self) -> bool:
        """Whether the model itself, whatever the adapter, is a sequence classifier: a recipe's model.task, or a model
        directory whose config.json names only ...ForSequenceClassification classes (none of which generates)."""
        if self.model is None:
            return False
        if self.model.task == "sequence_classification":
            return True
        classes = self.model_config().get("architectures") or []
        return bool(classes) and all(str(a).endswith("ForSequenceClassification") for a in classes)

    def model_config(self) -> dict:
        """The model's config.json as read from its directory, or for a hub id from the hub (its cache offline), at
        the revision it loads: a merged classifier or reward model published there is told from its files too (it was
        taken for a language model); {} where there is none."""
        if self.model is None:
            return {}
        if (local := Path(self.model.name_or_path)).is_dir():
            return _json(local / "config.json")
        from peftkit.hub import hub_file

        return _json(file) if (file := hub_file(self.model.name_or_path, "config.json", self.model.revision)) else {}

    def adapter_task(self) -> str | None:
        """The adapter's PEFT task_type (`CAUSAL_LM`, `SEQ_CLS`), None without an adapter or where it says none."""
        return _json(Path(self.adapter) / "adapter_config.json").get("task_type") if self.adapter else None

    def check_adapter_task(self) -> None:
        """A language model's adapter (task_type CAUSAL_LM) over a sequence classifier, as a reward model's directory
        given with --model, was not trained on it: said so, where it was taken for a classifier of classes
        (`reward_model` read the adapter's head, which it has none of)."""
        if self.adapter_task() != "CAUSAL_LM" or not self.model_classifier():
            return
        from peftkit.peft_format import recorded_base

        name = self.model.name_or_path
        outputs = self.model.num_labels or len(self.model_config().get("id2label") or {0: 0, 1: 1})
        what = "a reward model (a sequence classifier of one output)" if outputs == 1 else "a sequence classifier"
        raise PeftkitError(f"{self.adapter} is a language model's adapter (task_type CAUSAL_LM in its "
                           f"adapter_config.json), and {name} is {what}: the adapter was not trained on it. Give "
                           f"--model its language model ({recorded_base(self.adapter) or 'the base it was trained on'}), "
                           f"or evaluate {name} alone or with a SEQ_CLS adapter trained on it.")

    def reward_model(self) -> bool:
        """Whether this is a reward model, a classifier of one output, from its files alone: an adapter's saved head of
        one row (the head it loads with, `adapter_labels`, whatever a recipe's model.num_labels says), else a recipe's
        model.num_labels (training.objective reward sets 1), else a model's config.json of one label."""
        if not self.classifier():
            return False
        if self.adapter and (outputs := self.head_outputs()) is not None:
            return outputs == 1
        if self.model is not None and self.model.num_labels is not None:
            return self.model.num_labels == 1
        if self.adapter:
            return False
        return len(self.model_config().get("id2label") or {0: 0, 1: 1}) == 1

    def head_outputs(self) -> int | None:
        """The rows of the adapter's saved classification head; None without one, or where it cannot be read
        (loading says so in its own words)."""
        from safetensors import safe_open

        from peftkit.adapters import PEFT_PREFIX
        from peftkit.classify import HEAD_NAMES

        # (the head's output layer, as `adapter_labels` reads it: BERT's and a decoder's head is one Linear, RoBERTa's
        # ends in out_proj)
        outputs = {f"{PEFT_PREFIX}{h}{part}.weight" for h in HEAD_NAMES for part in ("", ".out_proj")}
        try:
            with safe_open(Path(self.adapter) / "adapter_model.safetensors", "pt") as f:
                heads = [key for key in f.keys() if key in outputs]
                return f.get_slice(heads[0]).get_shape()[0] if heads else None
        except (OSError, ValueError, AttributeError):
            return None

    def tokenizer(self):
        """The tokenizer of the model (or of the adapter's base), with the recipe's data.chat_template, else the one
        the adapter carries (a run's adapter/ trained with data.chat_template), else its own."""
        return self.routed_tokenizer(self.adapter)

    def routed_tokenizer(self, adapter: str | None):
        """`tokenizer`, with the chat template that adapter `adapter` (None: none, the base's own) would give it:
        what a row of a mixed batch routed to that adapter (or to the base) is read with, as alone. The base's
        tokenizer is this source's (its adapter's base: they share it)."""
        from peftkit.adapter_base import base_revision, check_remote_code
        from peftkit.data.chat_templates import adapter_template
        from peftkit.peft_format import CONFIG_NAME, check_adapter_dir, read_peft_config, recorded_base

        cfg = self.model
        if self.adapter:
            if cfg is None:  # the adapter names the base: its own errors first (a missing or broken adapter)
                check_adapter_dir(Path(self.adapter))
                read_peft_config(Path(self.adapter))
                if self.base is None:
                    raise PeftkitError(f"{Path(self.adapter) / CONFIG_NAME} records no base model "
                                       "(base_model_name_or_path): name it with --model.")
            check_remote_code(self.adapter, self.trust_remote_code)
            cfg = cfg or ModelConfig(name_or_path=self.base or self.adapter, trust_remote_code=self.trust_remote_code)
            # the base's tokenizer at the revision its weights load at (a run's: the commit it was trained on)
            revision = base_revision(self.adapter, cfg.name_or_path, recorded_base(self.adapter),
                                     recorded_base(self.adapter, "revision"), cfg.revision, say=False)
            # the base's tokenizer with the tokens the adapter's training added (model.add_tokens), in its order
            cfg = cfg.model_copy(update={"revision": revision})
            cfg = cfg.model_copy(update={"add_tokens": self.added_tokens(self.adapter, cfg)})
        if cfg is None:
            raise PeftkitError("No model to load: pass --model, or --adapter with a recorded base model.")
        return self.tokenizers.read(cfg, self.chat_template or (adapter_template(adapter) if self.adapter_template
                                                                else None))

    def loading_tokenizer(self):
        """What loading the model (without adapter) reads of its tokenizer, from `tokenizers`: model.add_tokens' rows,
        a classifier's pad id; None where it reads none (`peftkit.adapter_base.load_adapter_base`'s rule)."""
        needed = self.model.add_tokens or self.model.task == "sequence_classification"
        return self.tokenizers(self.model) if needed else None

    def added_tokens(self, adapter_dir: str, cfg: ModelConfig) -> list[str]:
        """`peftkit.new_tokens.adapter_tokens`, found once per adapter and base tokenizer (name, revision,
        trust_remote_code: all it reads of `cfg`) while this source lives: a peft adapter's tokenizer is read to find
        them, once where the tokenizer and the model both ask."""
        from peftkit.new_tokens import adapter_tokens

        key = (adapter_dir, cfg.name_or_path, cfg.revision, cfg.trust_remote_code)
        if key not in self.added:
            self.added[key] = adapter_tokens(adapter_dir, cfg)
        return list(self.added[key])

    def load(self, device: torch.device | None = None, labels=None) -> nn.Module:
        """The model in eval mode on `device` (default: the model's `device` setting), with the adapter applied.
        `labels`: a sequence classifier's classes, for a model without adapter (`peftkit.modeling.load_model`)."""
        from peftkit.adapter_base import load_adapted_model
        from peftkit.modeling import load_model, resolve_device
        from peftkit.progress import phase
        from peftkit.runtime import inference_autocast, under_autocast

        device = device or resolve_device(self.model.device if self.model else "auto")
        source = self.here(device)
        with phase(f"Loading {source.describe()}..."):
            if source.adapter:
                model = load_adapted_model(source.adapter_base, source.adapter, device, source.trust_remote_code,
                                           tokens_of=source.added_tokens, tokenizer_of=source.tokenizers)[0]
            else:
                model = load_model(source.model, source.quantization, device, labels, tok=source.loading_tokenizer())
                model = model.eval()
        return under_autocast(model, inference_autocast(source.mixed_precision, device), device)

    def load_named(self, adapters: list[tuple[str, str]], device: torch.device | None = None):
        """(model, NamedAdapters): the base loaded once with every (name, adapter directory) on it, none active; the
        base is the given model, else the adapters' recorded one (`peftkit.adapters.named.load_named_model`)."""
        from peftkit.adapters.named import load_named_model
        from peftkit.modeling import resolve_device
        from peftkit.runtime import inference_autocast, under_autocast

        device = device or resolve_device(self.model.device if self.model else "auto")
        source = self.here(device)
        model, named, _ = load_named_model(adapters, source.adapter_base if source.model else None, device,
                                           source.trust_remote_code, source.tokenizers)
        return under_autocast(model, inference_autocast(source.mixed_precision, device), device), named

    def here(self, device: torch.device) -> ModelSource:
        """This source as `device` runs it, so that a GPU run evaluates on a laptop: a recipe's flash_attention_2
        that cannot run here gives way to transformers' default kernel (the same outputs up to rounding), and
        16-bit weights on a CPU without native 16-bit matmuls are said to be slow; a `warning:` line for each."""
        from peftkit.modeling import flash_attention_missing
        from peftkit.runtime import cpu_dtype_note

        model = self.model
        if model is None:
            return self
        if model.attn_implementation == "flash_attention_2" and (need := flash_attention_missing(device)):
            warnings.warn(f"model.attn_implementation: flash_attention_2 needs {need}; running with transformers' "
                          "default attention here instead (the same outputs up to rounding).", PeftkitWarning,
                          stacklevel=3)
            model = model.model_copy(update={"attn_implementation": None})
        if note := cpu_dtype_note(model.dtype, device):
            warnings.warn(f"{note} Here: --set model.dtype=float32.", PeftkitWarning, stacklevel=3)
        return replace(self, model=model)


def _json(file: Path) -> dict:
    """A settings file's object; {} where it is missing, a FIFO whose read would block, or not a JSON object (loading
    then says what it is, in its own words)."""
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def model_source(recipe: Path | None, overrides: list[str], model: str | None, adapter: str | None,
                 trust_remote_code: bool, command: str) -> tuple[ModelSource, Recipe | None, str | None]:
    """What `peftkit COMMAND` (generate, chat) runs: a recipe's model (a run directory's with its adapter/; a recipe
    with adapter.init_from, its run's start, the base with that adapter, as the run's samples before training answer)
    with --model and --adapter on top, or those flags alone; the recipe, if any; and the title of the recipe's start
    where that runs (`peftkit.start_eval.from_the_start`), else None."""
    start = None
    if recipe is not None:
        from peftkit.start_eval import from_the_start

        cfg, run_adapter = recipe_source(recipe, overrides, named=bool(model or adapter), trust_remote_code=trust_remote_code)
        source = ModelSource.of_recipe(cfg, run_adapter)
        if not (model or adapter):
            source, start = from_the_start(source, cfg.adapter.init_from)
        source = source.with_flags(model, adapter, trust_remote_code)
    else:
        if not model and not adapter:
            raise PeftkitError(f"peftkit {command} needs a model: --model M (and/or --adapter DIR), or a RECIPE or "
                               "run directory.")
        check_no_overrides(overrides, command)
        source, cfg = ModelSource().with_flags(model, adapter, trust_remote_code), None
    check_base_is_there(source, recipe)
    source.check_adapter_task()
    if command in ("generate", "chat") and source.classifier():
        if source.reward_model():
            raise PeftkitError(f"{source.describe()} is a reward model: it scores a prompt with an answer and "
                               f"generates no text, so there is nothing for peftkit {command} to do. Score preference "
                               "pairs with `peftkit eval` (loss, reward_accuracy, reward_margin).")
        raise PeftkitError(f"{source.describe()} is a sequence classifier: it predicts a label and generates no text, "
                           f"so there is nothing for peftkit {command} to do. Score it with `peftkit eval` (loss, "
                           "accuracy, macro_f1).")
    return source, cfg, start


def check_base_is_there(source: ModelSource, recipe: Path | None) -> None:
    """A base recorded as a local path (a recipe's model.name_or_path, an adapter's base_model_name_or_path) that is
    gone, as after moving a project or copying a run to another machine, is said with where the path comes from and
    how to give the base instead (it was "Model directory not found")."""
    if source.model is not None and not source.model_from_recipe:
        return  # --model: the user's own path, said as it is
    base = source.base
    if not base or not local_path(base) or Path(base).exists():
        return
    if source.model_from_recipe:
        where = f"model.name_or_path of {recipe / 'recipe.yaml' if recipe.is_dir() else recipe}"
    else:
        where = f"base_model_name_or_path of {Path(source.adapter) / 'adapter_config.json'}"
    raise base_gone(base, where)


def base_gone(base: str, where: str) -> PeftkitError:
    """The error of a recorded local base `base` that is not there; `where`: the file (and key) that records it."""
    return PeftkitError(f"The base model {base} ({where}{relative_to_cwd(base)}) is not there: moved or deleted since? "
                        "Give it with --model DIR.")


def local_path(name: str) -> bool:
    """A model name that can only be a local path (`peftkit.local_or_hub.meant_locally`): absolute, `./`, `../`, `~`,
    or `runs/base` where runs/ is a directory here."""
    from peftkit.local_or_hub import meant_locally

    return name.startswith(".") or meant_locally(name)


def relative_to_cwd(name: str) -> str:
    """', read from the current directory DIR' for a relative path (peft records the one its base was loaded from)."""
    return "" if Path(name).is_absolute() else f", read from the current directory {Path.cwd()}"


def check_no_overrides(overrides: list[str], command: str) -> None:
    """--set changes a recipe's keys: without a recipe it would change nothing, which is said, not ignored."""
    if overrides:
        raise PeftkitError(f"--set {overrides[0]}: --set changes keys of a recipe, and this `peftkit {command}` has "
                           "none. Give a RECIPE or run directory first, or drop --set.")


def _what_the_directory_holds(directory: Path) -> str:
    """A hint for a directory given where a run was expected: an adapter's or a model's files say which option takes
    it (an adapter inside a run: the run above it)."""
    if (directory / "adapter_config.json").is_file():
        if (directory.parent / "recipe.yaml").is_file():
            return f" It holds an adapter of the run {directory.parent}: give that directory."
        return (f" It holds a PEFT adapter: pass it as --adapter {directory} (with --model BASE if its recorded base "
                "moved).")
    if (directory / "config.json").is_file():
        return f" It holds a model: pass it as --model {directory}."
    return ""


def recipe_source(recipe: Path, overrides: list[str], named: bool = False,
                  trust_remote_code: bool = False) -> tuple[Recipe, str | None]:
    """A recipe file, or a run directory read through its recipe.yaml: (the recipe, the run's adapter/ if it
    has one, the default --adapter). A run directory without adapter/ is an error unless `named` (--model or
    --adapter says what to load): its base model alone would pass for the fine-tuned one. A run directory's recipe
    that records model.trust_remote_code: true needs the user's --trust-remote-code (`trust_remote_code`): a run
    copied from elsewhere never decides to run code, as a manifest or an adapter's peftkit.json never does."""
    from peftkit.recipe import load_recipe

    if not recipe.exists():  # (load_recipe's "Recipe file not found" would hide that a run directory was meant)
        raise PeftkitError(f"{recipe} does not exist: give a recipe file or a peftkit run directory (a recipe's "
                           "export.output_dir).")
    run_dir = recipe if recipe.is_dir() else None
    if run_dir is not None:
        if not (run_dir / "recipe.yaml").is_file():
            raise PeftkitError(f"{run_dir} is a directory without recipe.yaml: give a recipe file or a peftkit run "
                               f"directory.{_what_the_directory_holds(run_dir)}")
        recipe = run_dir / "recipe.yaml"
    adapter = run_dir / "adapter" if run_dir is not None else None
    cfg = load_recipe(recipe, overrides)
    if run_dir is not None:  # a project moved or copied with its run: its recipe.yaml records absolute paths
        from peftkit.rundir import moved_project

        cfg, moved = moved_project(cfg, run_dir)
        for key, (old, now) in moved.items():
            warnings.warn(PeftkitWarning(f"{key}: {old} is not there; read at {now}, which lies where it did relative "
                                         "to the run directory (a project moved with its run)."), stacklevel=2)
    in_a_run = run_dir is not None or any((recipe.parent / n).exists() for n in ("manifest.json", "checkpoints"))
    if in_a_run and cfg.model.trust_remote_code and not trust_remote_code:
        raise PeftkitError(f"{recipe} records model.trust_remote_code: true, so loading {cfg.model.name_or_path} would "
                           "execute the modelling code that ships with it. A run directory's files never decide that: "
                           "if you trust that code, pass --trust-remote-code.")
    if run_dir is not None and Path(cfg.export.output_dir).resolve() == run_dir.resolve():
        resume = f"`peftkit train {recipe} --resume`"
    else:  # a moved or copied run: its recipe.yaml would resume the original (and is refused)
        resume = f"`peftkit train RECIPE --resume` with its project's recipe ({recipe} names {cfg.export.output_dir})"
    if adapter is not None and not adapter.is_dir() and not named:
        instead = (f"evaluate its merged model with --model {run_dir / 'merged'}" if (run_dir / "merged").is_dir()
                   else f"finish it with {resume}" if (run_dir / "checkpoints").is_dir()
                   else "export it with export.adapter: true")
        raise PeftkitError(f"{run_dir} holds no adapter/ (export.adapter: false, or the run has not finished), so its "
                           f"base model would stand in for the fine-tuned one. Name what to load: {instead}, or give "
                           f"--adapter DIR (the base model alone: pass {recipe}).")
    if adapter is not None and adapter.is_dir() and not (run_dir / "manifest.json").exists():
        warnings.warn(PeftkitWarning(f"{run_dir} has no manifest.json: the run has not finished (or was stopped while "
                                     f"it made its end again); this is the adapter/ it exported last. {resume} "
                                     "finishes it."), stacklevel=2)
    return cfg, str(adapter) if adapter is not None and adapter.is_dir() else None


def hub_data_flags(data: str | None, split: str | None, revision: str | None, data_cfg: DataConfig | None,
                   default_split: str) -> tuple[str, DataConfig | None]:
    """(the split, the data settings) with --split and --data-revision applied: what is read of a hub dataset given
    with --data (--split: or a slice of a local file, `train[95%:]`). `default_split`: the split read without
    --split."""
    from peftkit.recipe import is_hub_dataset

    if split is not None and not data:
        raise PeftkitError("--split picks what is read of the data given with --data; give --data FILE or DATASET_ID.")
    if revision is not None and not (data and is_hub_dataset(data)):
        raise PeftkitError("--data-revision picks what is read of a hub dataset given with --data; "
                           + (f"{data} is a local file." if data else "give --data DATASET_ID."))
    return split or default_split, data_cfg.model_copy(update={"revision": revision}) if revision else data_cfg


def check_choices(fmt: str | None, on_bad_rows: str | None) -> None:
    """--format and --on-bad-rows take the recipe's values."""
    for flag, value, choices in (("--format", fmt, FORMATS), ("--on-bad-rows", on_bad_rows, ("error", "skip"))):
        if value is not None and value not in choices:
            raise PeftkitError(f"{flag} {value!r}: use {', '.join(choices[:-1])} or {choices[-1]}.")
