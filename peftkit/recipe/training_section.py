"""The recipe's `training` section: the optimisation loop (optimizer, schedule, precision, checkpoints), the
training objective and its settings, early stopping and the trackers metrics go to."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from peftkit.section import Section

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

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        """`report_to: wandb`, one tracker as transformers' TrainingArguments take it: a list of one; `none`, and
        `[none]` (which transformers takes too), none."""
        if value in ("none", ["none"]):
            return []
        return [value] if isinstance(value, str) else value

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
