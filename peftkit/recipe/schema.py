"""The recipe schema: pydantic models holding every setting and its default (the single source of truth;
the rest of peftkit reads typed fields, never `dict.get(key, default)`)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator

from peftkit.errors import did_you_mean
from peftkit.methods import AdapterConfig, default_adapter, method_of
from peftkit.metrics import CLASSIFICATION_METRICS, GENERATION_METRICS, LOSS_METRICS, METRICS
from peftkit.section import Section, TargetRegex  # noqa: F401  (re-exported by peftkit.recipe)

DType = Literal["float32", "bfloat16", "float16"]
DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def is_hub_dataset(source: str) -> bool:
    """Whether data.train / data.eval names a hub dataset: not an absolute path (a recipe's data files are made
    absolute when it loads) and without a data file's extension."""
    path = Path(source)
    return not path.is_absolute() and path.suffix.lower() not in DATA_EXTENSIONS


class LongContextConfig(Section):
    """LongLoRA (Chen et al. 2023): shifted sparse attention while training; full attention at eval and generation."""

    s2_attention: bool = False
    """Train with S²-Attn: each token attends causally only inside its group of `group_size_ratio × data.max_length`
    tokens, and half of the heads see the groups shifted by half a group. Llama-style models (sdpa or eager)."""
    group_size_ratio: float = Field(0.25, gt=0, le=1)
    """Group size as a fraction of data.max_length; their product must be a whole number of at least 2 tokens."""

    def group_size(self, max_length: int) -> int:
        return round(self.group_size_ratio * max_length)


class RopeScalingConfig(Section):
    """RoPE scaling, set on the model's config as it loads (transformers' `rope_parameters`, checked by transformers'
    own validation): the model then covers `factor` × its max_position_embeddings positions. LongLoRA extends a
    context this way: linear, factor = data.max_length / max_position_embeddings rounded up."""

    type: Literal["linear", "dynamic", "yarn"]
    """transformers' rope_type. linear: position interpolation (positions divided by factor; Chen et al. 2023, the
    LongLoRA paper's choice); dynamic: NTK-aware scaling of the rotary base, growing with the sequence length; yarn:
    YaRN (Peng et al. 2023). (llama3 and longrope need more than a factor: they come in a model's own config.json.)"""
    factor: float = Field(gt=1)
    """How many times the model's max_position_embeddings the scaled model covers."""


class ModelConfig(Section):
    """The base model."""

    name_or_path: str
    """A local directory with `config.json` and weights, or a hub id (e.g. `meta-llama/Llama-3.2-1B`)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Dtype the base weights are loaded in; `auto` keeps the checkpoint's own."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name_or_path` is a hub id."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub model. Off unless you trust the repository."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when available, else CPU."""
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    """Attention kernel; None lets transformers choose. flash_attention_2 needs CUDA and the flash-attn package;
    with data.packing its batches are flattened into one row (padding-free, varlen kernels)."""
    task: Literal["causal_lm", "sequence_classification"] = "causal_lm"
    """causal_lm: next-token prediction (AutoModelForCausalLM). sequence_classification: one label per row
    (AutoModelForSequenceClassification, data.format: classification), its new head (`classifier` or `score`)
    trained in full and saved with the adapter."""
    num_labels: int | None = Field(None, ge=2)
    """sequence_classification: the number of classes, for integer labels 0..num_labels-1. Default: read from
    data.train (the largest integer label + 1, or the sorted set of string labels)."""
    long_context: LongContextConfig | None = None
    """LongLoRA's shifted sparse attention during training (`s2_attention: true`); omit for plain attention."""
    rope_scaling: RopeScalingConfig | None = None
    """`{type: linear, factor: 2}`: RoPE scaling, to train (and run) past the model's max_position_embeddings; the
    adapter records it (peftkit.json), so `peftkit eval`/`generate` load the base scaled the same way."""


class QuantizationConfig(Section):
    """Load the base quantized through bitsandbytes (QLoRA). Omit the section for a 16/32-bit base."""

    method: Literal["nf4", "fp4", "int8"] = "nf4"
    """nf4: 4-bit NormalFloat (QLoRA); fp4: 4-bit float; int8: LLM.int8()."""
    double_quant: bool = True
    """Quantize the per-block absmax constants too (bitsandbytes `compress_statistics`): ~0.37 bit/param less."""
    compute_dtype: DType = "bfloat16"
    """Dtype the 4-bit weights are dequantized to for each matmul."""
    quant_storage: Literal["uint8", "float32", "bfloat16", "float16"] = "uint8"
    """Storage dtype of the packed 4-bit weights; FSDP sharding needs a float type matching the model."""
    skip_modules: list[str] = Field(default_factory=lambda: ["lm_head"])
    """Modules kept in full precision (the output head by default, as bitsandbytes/transformers do)."""


class DataSource(Section):
    """One dataset of a list in data.train, read with its own split, columns and format."""

    path: str
    """A local .json/.jsonl/.csv/.parquet/.txt file or a hub dataset id."""
    split: str | None = None
    """Its split (a slice of a local file: `train[:1000]`); default data.train_split."""
    columns: dict[str, str] | None = None
    """Its columns for the format's fields (as data.columns, which it replaces for this dataset); default
    data.columns."""
    format: Literal["alpaca", "chat", "completion", "text", "classification"] | None = None
    """The format its rows are read and tokenized in (axolotl's per-dataset `type:`), to mix alpaca rows with
    conversations; default data.format, which data.eval and generation's prompts are read in. Not `classification`
    (a classifier's datasets are all data.format classification)."""


def _check_columns(key: str, columns: dict[str, str], named: str, fmt: str, fix: str = "") -> None:
    """Each key of `columns` a field of format `fmt`, `named` as its key (data.format, data.train[1].format)."""
    from peftkit.data.formats import format_fields

    fields = format_fields(fmt)
    for field in columns:
        if field not in fields:
            raise ValueError(f"{key}: {field!r} is not a field of {named} {fmt} ({', '.join(fields)}); each key names "
                             f"a field, its value the data's column.{did_you_mean(field, fields)}{fix}")


class DataConfig(Section):
    """Training and evaluation data."""

    train: str | list[str | DataSource]
    """A local .json/.jsonl/.csv/.parquet/.txt file or a hub dataset id; or a list of them, each a path or hub id or
    {path, split, columns, format}, whose rows are concatenated in the list's order and then shuffled together."""

    @field_validator("train")
    @classmethod
    def _some_train_data(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("an empty list; give a path or hub id, or a list of one or more")
        return value
    eval: str | dict[str, str | DataSource] | None = None
    """A file or hub dataset id, as one entry of `train` (one, not a list); or several evaluation sets by name, each
    a path or hub id or {path, split, columns, format}: `{numbers: data/eval.jsonl, general: data/general.jsonl}`.
    The first is the primary set, whose figures are `eval_loss`, `eval_perplexity`, ... (what early stopping,
    export.best and the summary read); each other set's are `eval_<name>_loss`, ... Omit to skip evaluation."""

    @field_validator("eval")
    @classmethod
    def _eval_names(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if not value:
            raise ValueError("an empty mapping; give a path or hub id, or one or more `name: dataset`")
        if "path" in value and set(value) <= set(DataSource.model_fields):
            raise ValueError("a mapping of names to datasets, and this is one dataset's {path, ...}; name it: "
                             "`eval: {NAME: {path: ..., format: ...}}`, or give its path alone")
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"{name!r} is not a usable name of an evaluation set: its figures are logged as "
                                 "eval_<name>_loss, so use letters, digits, `_` and `-` only")
        return value
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `train` and `eval` when they are hub datasets. A run records a digest
    of the rows it read, so `--resume` and `verify` tell when a branch has moved; pin a commit to read the same rows."""
    format: Literal["alpaca", "chat", "completion", "text", "classification"] = "alpaca"
    """alpaca: instruction/input/output; chat: messages; completion: prompt/completion; text: text;
    classification: text, label and optional text_pair (model.task: sequence_classification)."""
    max_length: int = Field(512, gt=0)
    """Examples are truncated to this many tokens; one with no target token left is dropped (and counted)."""
    truncation: Literal["keep", "drop", "error"] = "keep"
    """An example whose target is cut by `max_length` (its end, EOS / end-of-turn, is lost, so the model does not
    learn to stop there): `keep` trains on it as cut and reports the count, `drop` leaves it out, `error` stops
    naming the first such row."""
    train_on: Literal["answers", "last_answer", "all"] = "answers"
    """Which tokens carry the loss: `answers`, every answer (alpaca's output, a completion, each assistant turn of a
    conversation, with its EOS or end-of-turn token); `last_answer`, a conversation's last assistant turn only (the
    earlier ones are context; the same as `answers` for the other formats, whose rows hold one answer); `all`, every
    token, prompts, system and user turns too (axolotl's `train_on_inputs: true`)."""
    system_prompt: str | None = None
    """data.format chat (or a data.train entry's): the system message of each conversation that opens without one
    (LLaMA-Factory's default_system, axolotl's default_system_message)."""
    chat_template: str | None = None
    """data.format chat (or a data.train entry's): the chat template to set on the tokenizer (a base model's has
    none; an instruct model's is replaced): a built-in (`chatml`, `llama3`), a .jinja file, a local tokenizer or model directory whose template
    to copy, or the jinja text itself (`peftkit.data.chat_templates`); load_recipe reads a file or directory into its
    text, which the run's recipe.yaml keeps. null: the tokenizer's own."""
    columns: dict[str, str] = Field(default_factory=dict)
    """The data's own column for a field the format reads, where it names it otherwise: `{instruction: question,
    output: answer}` reads alpaca rows from `question` and `answer` columns."""

    @model_validator(mode="after")
    def _columns_are_fields(self) -> DataConfig:
        entries = [(f"data.train[{i}]", e) for i, e in enumerate(self.train) if isinstance(e, DataSource)] \
            if isinstance(self.train, list) else []
        entries += [(f"data.eval.{name}", e) for name, e in self.eval.items() if isinstance(e, DataSource)] \
            if isinstance(self.eval, dict) else []
        for i, entry in entries:
            if entry.format == "classification":
                raise ValueError(f"{i}.format: classification is data.format's alone: a classifier's "
                                 "datasets are all read as data.format classification; remove it")
            if entry.format is not None and self.format == "classification":
                raise ValueError(f"{i}.format: a classifier's datasets are all read as data.format "
                                 "classification (text, label, optional text_pair); remove it")
        chat = self.format == "chat" or any(entry.format == "chat" for _, entry in entries)
        said = f"data.format is {self.format}" + (", and no dataset of data.train is chat" if entries else "")
        if self.system_prompt is not None and not chat:
            raise ValueError(f"data.system_prompt is the system message of chat conversations, and {said}; remove "
                             "it, or use data.format: chat")
        if self.chat_template is not None and not chat:
            raise ValueError(f"data.chat_template is the template of chat conversations, and {said}, whose rows no "
                             "template renders; remove it, or use data.format: chat")
        _check_columns("data.columns", self.columns, "data.format", self.format)
        for i, entry in entries:
            fmt = entry.format or self.format
            named = "data.format" if fmt == self.format else f"{i}.format"
            if entry.columns:
                _check_columns(f"{i}.columns", entry.columns, named, fmt)
            elif entry.columns is None and fmt != self.format:  # it reads data.columns, another format's
                _check_columns("data.columns", self.columns, named, fmt,
                               f" Or give {i} columns of its own ({{}} for none).")
        return self

    train_split: str = "train"
    eval_split: str = "train"
    """Split to read; a local file is one, `train`, which both may slice as a hub split is sliced: `train[:95%]`."""
    shuffle: bool = True
    packing: bool = False
    """Pack several training examples into each row of up to `max_length` tokens, each with its own position ids
    from 0, so that no token attends across an example boundary (transformers' packed-sequence masks); fewer
    pad tokens are computed. Evaluation is never packed."""
    group_by_length: bool = False
    """Batch training examples of similar length (transformers' `group_by_length`, its get_length_grouped_indices):
    less padding, the order of the batches still random by (seed, epoch). Not with `packing` (no padding to save)
    nor with `shuffle: false` (the grouping is a random draw)."""

    @model_validator(mode="after")
    def _grouping_needs_padded_shuffled_rows(self) -> DataConfig:
        if self.group_by_length and self.packing:
            raise ValueError("data.group_by_length and data.packing both cut padding: packing fills each row with "
                             "several examples, so there is no padding left to group away; keep one of them")
        if self.group_by_length and not self.shuffle:
            raise ValueError("data.group_by_length draws a random order (megabatches sorted by length), and "
                             "data.shuffle: false keeps the data's own order; keep one of them")
        return self
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes. Batches are formed in the main process, so the order is the same."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """A row that is malformed or whose format fields are missing, not text, or not valid Unicode: stop with
    its line, or skip it and report the count."""
    _columns_key: str = PrivateAttr("data.columns")
    """The recipe key `columns` came from, as a bad row's error names it: data.train[1].columns where `reading` read
    a dataset of the list through that entry's own."""
    _format_key: str = PrivateAttr("data.format")
    """The recipe key `format` came from, as `_columns_key` is for columns: data.train[1].format where `reading` read
    a dataset of the list with that entry's own."""

    def train_sources(self) -> list[DataSource]:
        """data.train as a list of datasets, each with its split, columns and format filled in (one for a single
        path)."""
        entries = self.train if isinstance(self.train, list) else [self.train]
        return [DataSource(path=entry, split=self.train_split, columns=self.columns, format=self.format)
                if isinstance(entry, str)
                else entry.model_copy(update={"split": entry.split or self.train_split,
                                              "columns": self.columns if entry.columns is None else entry.columns,
                                              "format": entry.format or self.format})
                for entry in entries]

    def eval_sources(self) -> dict[str, DataSource]:
        """data.eval by name, each with its split (default data.eval_split), columns and format filled in; the first
        is the primary set. One path is the one set named `eval`; {} without data.eval."""
        if self.eval is None:
            return {}
        entries = self.eval if isinstance(self.eval, dict) else {"eval": self.eval}
        return {name: DataSource(path=entry, split=self.eval_split, columns=self.columns, format=self.format)
                if isinstance(entry, str)
                else entry.model_copy(update={"split": entry.split or self.eval_split,
                                              "columns": self.columns if entry.columns is None else entry.columns,
                                              "format": entry.format or self.format})
                for name, entry in entries.items()}

    @property
    def primary_eval(self) -> DataSource | None:
        """data.eval's first (or only) set, whose figures are eval_loss, ...; None without data.eval."""
        return next(iter(self.eval_sources().values()), None)

    def eval_key(self, name: str) -> str:
        """The key of data.eval's set `name` in a run's records (data_sha256): `eval` for one path, `eval[name]`."""
        return f"eval[{name}]" if isinstance(self.eval, dict) else "eval"

    def for_eval(self, name: str) -> DataConfig:
        """This section as data.eval's set `name` is read: with its own columns and format."""
        entry = self.eval_sources()[name]
        read = self.model_copy(update={"columns": entry.columns, "format": entry.format})
        if isinstance(self.eval, dict) and getattr(self.eval[name], "columns", None) is not None:
            read._columns_key = f"data.eval.{name}.columns"
        return read

    def reading(self, source: str) -> DataConfig:
        """This section as a command reads `source` (`eval`/`generate --data`): data.revision is the recipe's
        datasets', so another dataset is read without it; a dataset of data.train's list is read with its own
        columns and format. A local path matches as the same file, however it is written."""
        def same(path: str) -> bool:
            return path == source or (not is_hub_dataset(path) and Path(path).resolve() == Path(source).resolve())

        if not any(same(path) for _, path, _ in self.sources()):
            return self.model_copy(update={"revision": None})
        i, entry = next(((i, e) for i, e in enumerate(self.train_sources()) if same(e.path)), (None, None))
        if entry is None:  # a set of data.eval's, read with its own columns and format
            return next((self.for_eval(name) for name, e in self.eval_sources().items() if same(e.path)), self)
        read = self.model_copy(update={"columns": entry.columns, "format": entry.format})
        if isinstance(self.train, list) and getattr(self.train[i], "columns", None) is not None:
            read._columns_key = f"data.train[{i}].columns"
        if isinstance(self.train, list) and getattr(self.train[i], "format", None) is not None:
            read._format_key = f"data.train[{i}].format"
        return read

    def sources(self) -> list[tuple[str, str, str]]:
        """(key, path or hub id, split) of each dataset the recipe reads: `train` (one path), or `train[0]`,
        `train[1]`, ... (a list), and `eval` (one path) or `eval[name]` (a mapping). The keys name the datasets in a
        run's records (data_sha256)."""
        train = self.train_sources()
        keys = [f"train[{i}]" for i in range(len(train))] if isinstance(self.train, list) else ["train"]
        found = [(key, entry.path, entry.split) for key, entry in zip(keys, train, strict=True)]
        return found + [(self.eval_key(name), entry.path, entry.split) for name, entry in self.eval_sources().items()]


class EarlyStoppingConfig(Section):
    """Stop when the eval metric has not improved for `patience` evaluations in a row (every training.eval_steps)."""

    metric: str = "loss"
    """`loss`, `perplexity`, or one of eval.metrics (`exact_match`, ...)."""
    mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower (min) or higher (max) is better; auto: min for loss and perplexity, max for the rest."""
    patience: int = Field(3, gt=0)
    """Evaluations without improvement before the run stops."""
    min_delta: float = Field(0.0, ge=0)
    """An improvement smaller than this does not count."""


# transformers' lr_scheduler_type values (TrainingArguments', axolotl's) that are not peftkit's: what to write
# instead, or None where peftkit has no such schedule.
TRANSFORMERS_SCHEDULERS = {
    "cosine_with_min_lr": "cosine, with min_lr_ratio (transformers' min_lr_rate, or min_lr / lr)",
    "warmup_stable_decay": "wsd (decay_ratio: num_decay_steps as a share of the run's steps; decay_type, "
                           "min_lr_ratio)",
    "constant_with_warmup": "constant (peftkit's constant warms up first, over warmup_steps or warmup_ratio)",
    **dict.fromkeys(("polynomial", "inverse_sqrt", "reduce_lr_on_plateau", "cosine_warmup_with_min_lr", "greedy")),
}


class TrainingConfig(Section):
    """The optimisation loop."""

    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run; wins over `epochs`."""
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(4, gt=0)
    """Examples per micro-batch."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step: effective batch = batch_size x grad_accum."""
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"] = "adamw"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """The AdamW optimizers' (beta1, beta2): [0.9, 0.95] is common for large models."""

    @field_validator("adam_betas", mode="before")
    @classmethod
    def _two_betas(cls, value: Any) -> Any:
        """One beta was said as the key missing ('Add adam_betas: under training:'), a number as 'a valid tuple'."""
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError("must be two numbers, [beta1, beta2] (default [0.9, 0.999])")
        return value
    adam_epsilon: float = Field(1e-8, gt=0)
    scheduler: Literal["cosine", "linear", "constant", "wsd", "cosine_with_restarts"] = "cosine"
    """After the warmup: cosine or linear decay to min_lr_ratio, constant, wsd (warmup-stable-decay, MiniCPM's,
    arXiv:2404.06395): lr, then a decay to min_lr_ratio over the last decay_ratio of the steps, or
    cosine_with_restarts: num_cycles cosine decays to 0 (transformers' hard restarts)."""

    @field_validator("scheduler", mode="before")
    @classmethod
    def _transformers_scheduler(cls, value: Any) -> Any:
        """A transformers lr_scheduler_type was refused with the list of choices alone: say which is the same."""
        if not isinstance(value, str) or value not in TRANSFORMERS_SCHEDULERS:
            return value
        if instead := TRANSFORMERS_SCHEDULERS[value]:
            raise ValueError(f"{value} is transformers' lr_scheduler_type; write scheduler: {instead}")
        ours = ", ".join(get_args(cls.model_fields["scheduler"].annotation))
        raise ValueError(f"{value} is transformers' lr_scheduler_type, and peftkit has no scheduler like it; use one "
                         f"of {ours}")
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Warm up over this share of the run's optimizer steps, rounded up (transformers' warmup_ratio); or give
    warmup_steps."""
    min_lr_ratio: float = Field(0.0, ge=0, lt=1)
    """cosine, linear and wsd: decay to this share of lr, not to 0 (transformers' cosine_with_min_lr min_lr_rate)."""
    decay_ratio: float = Field(0.1, gt=0, le=1)
    """wsd only: decay over this last share of the run's optimizer steps, rounded up, never into the warmup
    (transformers' get_wsd_schedule num_decay_steps as a share)."""
    decay_type: Literal["cosine", "linear", "1-sqrt"] = "cosine"
    """wsd only: the decay's shape (transformers' get_wsd_schedule decay_type, and its default)."""
    num_cycles: int = Field(1, ge=1)
    """cosine_with_restarts only: the cosine decays after the warmup, each over an equal share of the steps."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm; null disables clipping."""
    seed: int = Field(0, ge=0, le=2**32 - 1)
    """Seeds torch and the data order; < 2**32 because the data order seeds with seed x 1_000_003 + epoch."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a CUDA device that supports it, none on CPU."""

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _bare_no(cls, value: Any) -> Any:
        """`mixed_precision: no` unquoted is YAML 1.1's false: the `no` it reads as."""
        return "no" if value is False else value
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more compute."""
    neftune_noise_alpha: float | None = Field(None, gt=0)
    """NEFTune (Jain et al. 2023, arXiv:2310.05914): in training forwards, uniform noise of magnitude
    alpha / sqrt(length x hidden) on the input embeddings, as TRL's `neftune_noise_alpha` (5 in the paper)."""
    compile: Literal[False, True, "inductor", "aot_eager"] = False
    """torch.compile the training step's forward and loss (true: the inductor backend, which generates kernels and
    needs a C++ compiler on CPU; aot_eager: graph capture without code generation, for debugging). Compiling takes
    tens of seconds at the first step; evaluation and generation stay eager."""
    log_steps: int = Field(1, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    """Evaluate every N steps (and always at the end when data.eval is set)."""
    save_steps: int | None = Field(None, gt=0)
    """Write a resumable checkpoint every N steps."""
    save_total_limit: int = Field(2, gt=0)
    """Checkpoints kept on disk (oldest removed first)."""
    deterministic: bool = False
    """Deterministic kernels on CUDA too (slower); CPU runs are always deterministic."""
    nan_policy: Literal["stop", "skip_step"] = "stop"
    """A NaN/inf loss stops the run (keeping the last checkpoint) or skips that optimizer step."""
    loraplus_lr_ratio: float | None = Field(None, gt=0)
    """LoRA+ (Hayou et al. 2024): lora_B trains at this many times `lr`, lora_A and the rest at `lr` (the paper
    suggests 16 with a somewhat lower lr). null: one learning rate for every parameter."""
    loraplus_lr_embedding: float = Field(1e-6, gt=0)
    """LoRA+ only: the learning rate of an embedding's LoRA (lora_embedding_A/B), peft's `loraplus_lr_embedding`
    and its default."""
    early_stopping: EarlyStoppingConfig | None = None
    """Stop early when the eval metric stops improving (needs data.eval and training.eval_steps). null: off."""
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    """Also log the metrics to these trackers, through accelerate's tracker API (metrics.jsonl stays the
    record). Each needs its package (`pip install tensorboard`, `wandb`, `mlflow`); tensorboard and mlflow
    write under <output_dir>/trackers/, wandb runs offline unless WANDB_MODE says otherwise."""

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainingConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) and warmup_ratio ({self.warmup_ratio}) both set the "
                             "warmup; keep one")
        if self.min_lr_ratio and self.scheduler in ("constant", "cosine_with_restarts"):
            raise ValueError(f"min_lr_ratio ({self.min_lr_ratio}) is where cosine, linear and wsd decay end, and "
                             f"scheduler is {self.scheduler}; remove it or use cosine, linear or wsd")
        for key, scheduler in (("decay_ratio", "wsd"), ("decay_type", "wsd"), ("num_cycles", "cosine_with_restarts")):
            value = getattr(self, key)
            if self.scheduler != scheduler and value != type(self).model_fields[key].default:
                raise ValueError(f"{key} ({value}) shapes the {scheduler} scheduler, and scheduler is "
                                 f"{self.scheduler}; remove it or use scheduler: {scheduler}")
        if not all(0 <= beta < 1 for beta in self.adam_betas):
            raise ValueError(f"adam_betas {list(self.adam_betas)}: each beta is in [0, 1)")
        if self.optimizer == "sgd" and (self.adam_betas != (0.9, 0.999) or self.adam_epsilon != 1e-8):
            raise ValueError("adam_betas and adam_epsilon are the AdamW optimizers', and optimizer is sgd; remove them "
                             "or use an AdamW optimizer")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) is larger than max_steps ({self.max_steps}); "
                "lower warmup_steps"
            )
        return self


class ExportConfig(Section):
    """What the run writes."""

    output_dir: str
    """Run directory: adapter/, merged/, checkpoints/, metrics.jsonl, recipe.yaml, manifest.json."""
    adapter: bool = True
    """Write adapter/ in Hugging Face PEFT format."""
    merged: bool = False
    """Write merged/: the base with the adapter folded in, plus the tokenizer."""
    merged_dtype: DType | None = None
    """Dtype of the merged weights; default: the base model's dtype."""
    best: bool | str = False
    """Export the adapter of the best evaluation instead of the last: true picks by training.early_stopping's
    metric (eval loss without early stopping); a metric name (`loss`, `exact_match`, ...) picks by that one.
    Needs data.eval and training.eval_steps."""
    report: bool = True
    """Write report/ (report.html and its plots, as `peftkit report` does) when the run ends."""


class EvalConfig(Section):
    """Evaluation during and after training."""

    batch_size: int = Field(8, gt=0)
    base_model: bool = True
    """Also evaluate the base model before training, so the summary shows base vs fine-tuned loss."""
    samples: int = Field(3, ge=0)
    """Generate greedily for the first N rows of data.eval, with the base model (before training, when
    base_model is true) and the fine-tuned one: the summary shows them side by side. 0: off."""
    max_new_tokens: int = Field(64, gt=0)
    """Longest generated answer of `samples` and of `metrics`, in tokens."""
    metrics: list[str] = Field(default_factory=list)
    """Task metrics of the model's greedy answers to data.eval's prompts (`exact_match`, `token_f1`, `rouge_l`:
    `peftkit.metrics`), computed with the eval loss at every eval (training.eval_steps, the end, and the base
    model before training) and logged as `eval_<name>`. `loss` and `perplexity` are always computed; for
    model.task: sequence_classification, `loss`, `accuracy` and `macro_f1` (listing them here changes nothing)."""
    normalize: Literal["squad", "strip", "none"] = "squad"
    """Normalisation of answer and reference before `exact_match` / `token_f1` (as `peftkit eval --normalize`)."""

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            raise ValueError(f"eval.metrics: {', '.join(map(repr, unknown))} is not a metric peftkit computes; "
                             f"choose from {', '.join(GENERATION_METRICS + CLASSIFICATION_METRICS)} (loss and "
                             "perplexity are always computed; accuracy and macro_f1 always for classification)")
        return list(dict.fromkeys(names))

    @property
    def generation_metrics(self) -> list[str]:
        """The metrics of `metrics` that need generated answers, in the order given."""
        return [m for m in self.metrics if m in GENERATION_METRICS]


class Recipe(Section):
    model: ModelConfig
    quantization: QuantizationConfig | None = None
    adapter: AdapterConfig = Field(default_factory=default_adapter)
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    export: ExportConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _combinations(self) -> Recipe:
        q = self.quantization
        if q is not None and q.method != "int8" and self.training.mixed_precision == "fp16":
            raise ValueError(
                "training.mixed_precision: fp16 with a 4-bit base overflows easily; use bf16 or auto"
            )
        if self.training.mixed_precision == "fp16" and self.model.dtype == "float16" and (
                getattr(self.adapter, "modules_to_save", None) or self.classification):
            raise ValueError(
                "training.mixed_precision: fp16 unscales fp32 gradients only, and with model.dtype: float16 the "
                "modules trained in full (adapter.modules_to_save, a classifier's head) would have fp16 ones "
                "(torch: 'Attempting to unscale FP16 gradients'); set model.dtype: float32 (the matmuls still run "
                "in fp16 under autocast), or use mixed_precision: bf16 where the GPU has it"
            )
        if self.eval.generation_metrics and (text := [k for k, e in self.data.eval_sources().items()
                                                      if e.format == "text"]) and self.data.format != "text":
            raise ValueError(
                f"eval.metrics: {', '.join(self.eval.generation_metrics)} score generated answers against each "
                f"row's reference, and data.eval.{text[0]} is format text, which has no prompt or reference; remove "
                "eval.metrics or give that set another format"
            )
        if self.eval.generation_metrics and self.data.format == "text":
            raise ValueError(
                f"eval.metrics: {', '.join(self.eval.generation_metrics)} score generated answers against each "
                "row's reference, and data.format 'text' has no prompt or reference (every token is target); "
                "remove eval.metrics or use the alpaca, completion or chat format"
            )
        hub = {source for _, source, _ in self.data.sources() if is_hub_dataset(source)}
        if self.data.revision and not hub:
            raise ValueError("data.revision: a revision of a hub dataset, and data.train and data.eval are local "
                             "files; remove data.revision")
        if self.data.revision and len(hub) > 1:
            raise ValueError(f"data.revision: one revision for two hub datasets ({', '.join(sorted(hub))}), which "
                             "have commits of their own; remove data.revision, or use one dataset's two splits "
                             "(data.train_split, data.eval_split)")
        _check_task(self)
        _check_long_context(self)
        self._check_selection()
        method = method_of(self.adapter)
        if self.export.best and method.trainer_reshapes:
            raise ValueError(
                f"export.best: adapter.method {method.name} changes the adapter's layout while it trains (its rank "
                "allocation), so an earlier evaluation's weights do not fit the final layout; remove export.best"
            )
        if conflict := method.recipe_conflict(self):
            raise ValueError(conflict)
        if self.training.loraplus_lr_ratio is not None and "B" not in method.loraplus_roles.values():
            raise ValueError(
                f"training.loraplus_lr_ratio: LoRA+ gives lora_B its own learning rate, for adapter.method: lora "
                f"(with DoRA, LoRA-FA or PiSSA) only, not {method.name}; remove training.loraplus_lr_ratio or use "
                "adapter.method: lora"
            )
        if self.export.merged and (refusal := method.merge_refusal(self.adapter)):
            raise ValueError(f"export.merged: {refusal}")
        return self

    def _check_selection(self) -> None:
        """training.early_stopping and export.best need evaluations during training, of a metric computed."""
        for key, metric in (("training.early_stopping", getattr(self.training.early_stopping, "metric", None)),
                            ("export.best", self.best_metric)):
            if metric is None:
                continue
            if not self.data.eval or not self.training.eval_steps:
                raise ValueError(f"{key} chooses among the evaluations during training, and this recipe has none; "
                                 "set data.eval and training.eval_steps")
            # a classifier computes its loss, accuracy and macro_f1 (no perplexity), whatever eval.metrics lists
            computed = ("loss", *CLASSIFICATION_METRICS) if self.classification else (*LOSS_METRICS, *self.eval.metrics)
            if metric not in computed:
                # eval.metrics can add a generation metric to a language model's evaluations, nothing else
                addable = metric in GENERATION_METRICS and not self.classification
                raise ValueError(f"{key}: metric {metric!r} is not computed during training (computed: "
                                 f"{', '.join(computed)}); use one of those"
                                 + (f", or add {metric!r} to eval.metrics" if addable else ""))

    @property
    def best_metric(self) -> str | None:
        """The metric export.best picks by, or None when export.best is off."""
        best = self.export.best
        if best is False:
            return None
        if best is True:
            return self.training.early_stopping.metric if self.training.early_stopping else "loss"
        return best

    @property
    def classification(self) -> bool:
        """model.task is sequence_classification."""
        return self.model.task == "sequence_classification"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()


def _check_long_context(recipe: Recipe) -> None:
    """model.long_context: a causal LM, and a whole group size that fits data.max_length."""
    lc = recipe.model.long_context
    if lc is None or not lc.s2_attention:
        return
    if recipe.classification:
        raise ValueError("model.long_context.s2_attention: shifted sparse attention is for causal LMs; "
                         "model.task is sequence_classification, so remove model.long_context")
    if recipe.data.packing:
        raise ValueError("data.packing: shifted sparse attention (model.long_context.s2_attention) groups tokens from "
                         "the start of each row, not of each packed example, so a packed example would train "
                         "unlike itself alone; set data.packing: false (long examples fill their rows anyway)")
    size, max_length = lc.group_size_ratio * recipe.data.max_length, recipe.data.max_length
    if abs(size - round(size)) > 1e-9 or size < 2:
        raise ValueError(f"model.long_context.group_size_ratio: {lc.group_size_ratio} × data.max_length {max_length} "
                         f"= {size:g} tokens per group; it must be a whole number of at least 2 (data.max_length a "
                         f"multiple of 1/group_size_ratio), e.g. group_size_ratio: 0.25 with data.max_length: "
                         f"{max(8, -(-max_length // 4) * 4)}")


def _check_task(recipe: Recipe) -> None:
    """model.task and the settings that only make sense for one task."""
    classify, data = recipe.model.task == "sequence_classification", recipe.data
    if classify != (data.format == "classification"):
        raise ValueError(
            f"model.task is {recipe.model.task!r} and data.format is {data.format!r}: a sequence_classification model "
            "trains on data.format: classification (text, label, optional text_pair) and that format needs it; set "
            "both, or neither"
        )
    if recipe.model.num_labels is not None and not classify:
        raise ValueError("model.num_labels is set, but model.task is causal_lm; remove model.num_labels or set "
                         "model.task: sequence_classification")
    if not classify:
        if wrong := [m for m in recipe.eval.metrics if m in CLASSIFICATION_METRICS]:
            raise ValueError(f"eval.metrics: {', '.join(wrong)} score a classifier's predicted labels; model.task is "
                             "causal_lm, so remove them (or use model.task: sequence_classification)")
        return
    if recipe.eval.generation_metrics:
        raise ValueError(
            f"eval.metrics: {', '.join(recipe.eval.generation_metrics)} score generated text, and a "
            "sequence_classification model generates none; remove them (accuracy and macro_f1 are always computed "
            "for classification)"
        )
    if data.packing:
        raise ValueError("data.packing: a classification row is one example with one label; set data.packing: false")
    if data.train_on != "answers":
        raise ValueError(f"data.train_on: {data.train_on} chooses the tokens a language model's loss covers, and a "
                         "classifier's loss is one label per row; remove data.train_on")
    method = method_of(recipe.adapter)
    if not method.layer_targets or "modules_to_save" not in type(recipe.adapter).model_fields:
        raise ValueError(
            f"adapter.method: {method.name} cannot train a classifier: the new head must train in full beside the "
            "adapter, which the prompt family, Llama-Adapter and AdapterFusion do not do here; use a weight method "
            "(lora, ia3, loha, lokr, vera, fourierft, adalora, oft, hra, boft, ln_tuning) or bottleneck"
        )
    if recipe.quantization is not None:
        raise ValueError("quantization: 4/8-bit bases are not supported for model.task: sequence_classification yet; "
                         "remove the quantization section")
