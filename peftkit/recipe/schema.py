"""The recipe schema: pydantic models holding every setting and its default (the single source of truth;
the rest of peftkit reads typed fields, never `dict.get(key, default)`)."""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal, get_args

import yaml
from pydantic import Field, field_validator, model_validator

from peftkit.errors import did_you_mean
from peftkit.methods import AdapterConfig, default_adapter, method_of
from peftkit.metrics import (CLASSIFICATION_METRICS, GENERATION_METRICS, KTO_METRICS, LOSS_METRICS, METRICS,
                             PREFERENCE_METRICS, REWARDS)
from peftkit.recipe.combinations import check_long_context, check_objective, check_task
from peftkit.recipe.data_section import (  # noqa: F401  (DataSource, is_hub_dataset: re-exported)
    DATA_EXTENSIONS, DataConfig, DataSource, _own_format, is_hub_dataset)
from peftkit.section import Section, TargetRegex  # noqa: F401  (re-exported by peftkit.recipe)

DType = Literal["float32", "bfloat16", "float16"]


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
    num_labels: int | None = Field(None, ge=1)
    """sequence_classification: the number of classes, for integer labels 0..num_labels-1. Default: read from
    data.train (the largest integer label + 1, or the sorted set of string labels). 1 is a reward model's one score
    (training.objective: reward), and its default there."""
    long_context: LongContextConfig | None = None
    """LongLoRA's shifted sparse attention during training (`s2_attention: true`); omit for plain attention."""
    rope_scaling: RopeScalingConfig | None = None
    """`{type: linear, factor: 2}`: RoPE scaling, to train (and run) past the model's max_position_embeddings; the
    adapter records it (peftkit.json), so `peftkit eval`/`generate` load the base scaled the same way."""
    add_tokens: list[str] = Field(default_factory=list)
    """New special tokens (`["<|im_start|>", "<|im_end|>"]`: ChatML's markers for a base model): added to the
    tokenizer, the embeddings resized to hold them, their rows trained (`peftkit.new_tokens`). A token the tokenizer
    has already is left as it is."""

    @field_validator("add_tokens")
    @classmethod
    def _distinct_tokens(cls, tokens: list[str]) -> list[str]:
        if blank := [t for t in tokens if not t.strip()]:
            raise ValueError(f"{blank[0]!r} is empty or whitespace: a token needs text")
        if len(set(tokens)) < len(tokens):
            raise ValueError(f"{next(t for t in tokens if tokens.count(t) > 1)!r} is listed twice")
        return tokens


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


class EarlyStoppingConfig(Section):
    """Stop when the eval metric has not improved for `patience` evaluations in a row (every training.eval_steps)."""

    metric: str = "loss"
    """`loss`, `perplexity`, or one of eval.metrics (`exact_match`, ...), of data.eval's primary set; `NAME.loss`,
    ... of its set NAME, where data.eval names several (`general.loss`: eval_general_loss)."""
    mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower (min) or higher (max) is better; auto: min for loss, perplexity, rejected_reward and kl, max for
    the rest."""
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
    objective: Literal["sft", "dpo", "orpo", "simpo", "reward", "kto"] = "sft"
    """sft: the next-token loss on the answers (supervised fine-tuning). The others train on data.format preference
    (a prompt, a chosen and a rejected answer) to raise the chosen answer's likelihood over the rejected's. dpo:
    Direct Preference Optimization (Rafailov et al. 2023), relative to a frozen reference's likelihoods: the model
    training starts from, the base without the adapter or, with adapter.init_from, with that adapter as it starts
    (as TRL's DPOTrainer takes them for a PEFT model; no second copy is held). orpo (Hong et al. 2024) and simpo
    (Meng et al. 2024): no reference, on the answers' mean log-probability per token. reward: a reward model (the
    Bradley-Terry loss of InstructGPT, Ouyang et al. 2022; TRL's RewardTrainer), model.task sequence_classification
    with one output, the score of the prompt and an answer: -log sigmoid(score(chosen) - score(rejected)). kto:
    Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on data.format unpaired (a prompt, one answer and whether
    it is desirable), relative to a reference as dpo's, as TRL's KTOTrainer computes it."""
    dpo_beta: float = Field(0.1, gt=0)
    """dpo: how far the adapter may move from the reference (TRL's `beta`, its default): the rewards are beta x the
    log-likelihood ratios; smaller lets it go further."""
    dpo_loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """dpo: sigmoid, the paper's -log sigmoid(beta x margin); ipo (Azar et al. 2023), (margin per answer token -
    1 / (2 beta))^2; hinge (SLiC), max(0, 1 - beta x margin). As TRL's `loss_type` of the same names."""
    orpo_lambda: float = Field(0.1, gt=0)
    """orpo: the weight of the odds-ratio term beside the chosen answer's negative log-likelihood (the paper's lambda;
    TRL's and LLaMA-Factory's `beta`, and their default)."""
    simpo_beta: float = Field(2.0, gt=0)
    """simpo: the reward scale (the paper's beta; 2.0 to 2.5 in its settings)."""
    simpo_gamma: float = Field(1.0, ge=0)
    """simpo: the target reward margin (the paper's gamma: 1.0 with beta 2.0 for Llama-3-Base)."""
    reward_center: float = Field(0.0, ge=0)
    """reward: the weight of a penalty on the mean of a pair's two scores, squared, keeping them near 0 (Eisenstein
    et al. 2023; TRL's `center_rewards_coefficient`, which suggests 0.01). 0: off."""

    kto_beta: float = Field(0.1, gt=0)
    """kto: the rewards are beta x the log-likelihood ratios to the reference (TRL's `beta`, its default)."""
    kto_desirable_weight: float = Field(1.0, gt=0)
    """kto: the weight of a desirable answer's loss (TRL's `desirable_weight`); with more desirable than undesirable
    answers, the paper suggests weights that make desirable x count over undesirable x count between 1 and 4/3."""
    kto_undesirable_weight: float = Field(1.0, gt=0)
    """kto: the weight of an undesirable answer's loss (TRL's `undesirable_weight`)."""

    @property
    def pairs(self) -> bool:
        """The objective trains on pairs of rows (data.format preference: dpo, orpo, simpo, reward; kto: data.format
        unpaired, each answer with its mismatched one for the KL estimate, `peftkit.data.unpaired`)."""
        return self.objective != "sft"
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
    metric (eval loss without early stopping); a metric name (`loss`, `exact_match`, ...; another set's of
    data.eval as `NAME.loss`) picks by that one. Needs data.eval and training.eval_steps."""
    report: bool = True
    """Write report/ (report.html and its plots, as `peftkit report` does) when the run ends."""
    push_to_hub: str | None = None
    """Hugging Face Hub repository (`user/name`) that adapter/ is pushed to when the run has finished and exported,
    as `peftkit push RUN_DIR user/name` does (to main or push_revision, created where absent with the owner's default
    visibility or private with push_private; refused where the branch holds an earlier push's files adapter/ lacks;
    recorded in manifest.json's `pushed_to_hub`). merged/ is not pushed: `peftkit push RUN_DIR
    user/other --merged` does. Offline (HF_HUB_OFFLINE) or without a token the run is refused before it starts."""
    push_private: bool = False
    """push_to_hub's repository is created private (`peftkit push --private`); an existing public one is refused,
    nothing pushed."""
    push_revision: str | None = None
    """The branch push_to_hub commits to, created from main where absent (`peftkit push --revision`); null: main."""

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, repo_id: str | None) -> str | None:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        if repo_id is None:
            return None
        if repo_id.count("/") != 1:  # a bare name goes to whichever account the token is (as `peftkit push` says)
            raise ValueError(f"{repo_id!r} is no Hub repository id: give user/name (or organization/name)")
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise ValueError(f"{repo_id!r} is no Hub repository id ({str(e).rstrip('.')})") from None
        return repo_id

    @field_validator("push_revision")
    @classmethod
    def _branch(cls, revision: str | None) -> str | None:
        if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):  # create_branch would name a branch so
            raise ValueError(f"export.push_revision {revision} is a commit id, and a push makes a commit on a branch: "
                             "give the branch's name (created from main where absent)")
        if revision is not None and not revision.strip():
            raise ValueError("export.push_revision is empty: give a branch's name, or null for main")
        return revision

    @model_validator(mode="after")
    def _push_needs_adapter(self) -> ExportConfig:
        how = (f"export.push_revision {self.push_revision!r}" if self.push_revision is not None
               else "export.push_private: true" if self.push_private else None)
        if how and not self.push_to_hub:
            raise ValueError(f"{how} is how export.push_to_hub pushes, and export.push_to_hub is not set: set it "
                             f"(user/name), or remove {how.split()[0].rstrip(':')}")
        if self.push_to_hub and not self.adapter:
            raise ValueError("export.push_to_hub pushes the run's adapter/, and export.adapter is false: set it true "
                             f"(merged/ is pushed by `peftkit push RUN_DIR {self.push_to_hub} --merged`)")
        return self


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
                getattr(self.adapter, "modules_to_save", None) or self.classifier):
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
                + (f". {self.data._eval_format_note}" if self.data._eval_format_note else "")
            )
        hub = {source for _, source, _ in self.data.sources() if is_hub_dataset(source)}
        if self.data.revision and not hub:
            raise ValueError("data.revision: a revision of a hub dataset, and data.train and data.eval are local "
                             "files; remove data.revision")
        if self.data.revision and len(hub) > 1:
            raise ValueError(f"data.revision: one revision for two hub datasets ({', '.join(sorted(hub))}), which "
                             "have commits of their own; remove data.revision, or use one dataset's two splits "
                             "(data.train_split, data.eval_split)")
        check_task(self)
        check_objective(self)
        if self.training.objective == "reward" and self.model.num_labels is None:
            self.model.num_labels = 1  # (a reward model's head: one score, whatever the checkpoint's config says)
        check_long_context(self)
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
        """training.early_stopping and export.best need evaluations during training, of a metric computed: the
        primary set's (`loss`) or, dotted, another set's of data.eval (`general.loss`)."""
        for key, metric in (("training.early_stopping", getattr(self.training.early_stopping, "metric", None)),
                            ("export.best", self.best_metric)):
            if metric is None:
                continue
            if not self.data.eval or not self.training.eval_steps:
                raise ValueError(f"{key} chooses among the evaluations during training, and this recipe has none; "
                                 "set data.eval and training.eval_steps")
            name, _, figure = metric.rpartition(".")
            if "." in metric:  # said at the line of the metric's name
                key = key if key == "export.best" else f"{key}.metric"
            if "." in metric and not (name and figure):  # `.loss` read as `loss`, logged as eval__loss
                raise ValueError(f"{key}: {metric!r} has no {'set name before' if not name else 'metric after'} its "
                                 "dot; write NAME.METRIC for a set of data.eval (general.loss), or the metric "
                                 "alone for the primary set's (loss)")
            if name:
                self._check_eval_set(key, metric, name)
            # a classifier computes its loss, accuracy and macro_f1 (no perplexity), whatever eval.metrics lists
            computed = (("loss", *CLASSIFICATION_METRICS) if self.classification else
                        ("loss", *KTO_METRICS, *REWARDS) if self.training.objective == "kto" else
                        ("loss", *PREFERENCE_METRICS, *REWARDS) if self.training.pairs else
                        (*LOSS_METRICS, *self.eval.metrics))
            if figure not in computed:
                # eval.metrics can add a generation metric to a language model's evaluations, nothing else
                addable = figure in GENERATION_METRICS and not self.classification
                raise ValueError(f"{key}: metric {metric!r} is not computed during training (computed: "
                                 f"{', '.join(f'{name}.{c}' if name else c for c in computed)}); use one of those"
                                 + (f", or add {figure!r} to eval.metrics" if addable else ""))

    def _check_eval_set(self, key: str, metric: str, name: str) -> None:
        """`metric`, dotted (`general.loss`), names a set of data.eval, a mapping of sets by name."""
        if not isinstance(self.data.eval, dict):
            raise ValueError(f"{key}: {metric!r} is a metric of data.eval's set {name!r}, and data.eval is one "
                             f"dataset, whose figures are eval_loss, ...; write {metric.rpartition('.')[2]!r}, or "
                             "give data.eval several sets by name: `eval: {NAME: path, ...}`")
        if name not in self.data.eval:
            raise ValueError(f"{key}: {metric!r} is a metric of data.eval's set {name!r}, and data.eval has no set of "
                             f"that name.{did_you_mean(name, self.data.eval)} Its sets: {', '.join(self.data.eval)}")

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
    def classifier(self) -> bool:
        """model.task is sequence_classification: the model is a classifier, one of classes (`classification`) or a
        reward model (training.objective: reward)."""
        return self.model.task == "sequence_classification"

    @property
    def classification(self) -> bool:
        """A classifier of classes, on data.format: classification (not a reward model, which scores pairs)."""
        return self.classifier and self.training.objective != "reward"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_yaml().encode()).hexdigest()
