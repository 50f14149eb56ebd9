"""Loss and perplexity of a model on a dataset: mean next-token cross-entropy over the labelled tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.data import IGNORE_INDEX, Example, eval_loader
from peftkit.errors import PeftkitError
from peftkit.recipe import DataConfig, ModelConfig, QuantizationConfig

FORMATS = get_args(DataConfig.model_fields["format"].annotation)


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over labelled positions, number of labelled positions).

    Summing and dividing by the token count of the whole accumulation window (not averaging per
    micro-batch) weights every token equally however the padding falls.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()  # tensors: the caller decides when to sync


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int) -> dict[str, float]:
    """{'loss', 'perplexity', 'num_tokens'} of `model` on `examples` (eval mode, restored afterwards)."""
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)
    try:
        for batch in eval_loader(examples, batch_size, pad_id):
            loss, n = token_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
            total += loss.double()
            tokens += n
    finally:
        model.train(was_training)
    tokens = int(tokens)
    mean = float(total) / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "num_tokens": tokens}


@dataclass
class EvalJob:
    """What `peftkit eval` evaluates: a model (or base + adapter) on one data source, as training reads it."""

    data: str
    data_cfg: DataConfig
    split: str = "train"
    model: ModelConfig | None = None
    quantization: QuantizationConfig | None = None
    adapter: str | None = None
    batch_size: int = 8
    trust_remote_code: bool = False
    """The user's --trust-remote-code: needed for an adapter whose base runs its own modelling code."""


def eval_job(recipe: Path | None, overrides: list[str], model: str | None, data: str | None, fmt: str | None,
             adapter: str | None, max_length: int | None, batch_size: int | None, on_bad_rows: str | None,
             trust_remote_code: bool = False) -> EvalJob:
    """The `peftkit eval` arguments as one job. With a recipe (or a run directory, read through its recipe.yaml,
    whose adapter/ is then the default --adapter) its model, data.eval, format and eval settings are the
    defaults and flags override them; without one, --model and --data are needed and the rest take the
    recipe defaults, so figures are comparable with training's."""
    from peftkit.recipe import load_recipe

    if recipe is None:
        if not model or not data:
            raise PeftkitError("peftkit eval needs a RECIPE (or a run directory), or both --model and --data.")
        defaults = DataConfig(train=data)
        job = EvalJob(data=data, data_cfg=defaults, model=ModelConfig(name_or_path=model, dtype="auto"))
    else:
        run_dir = recipe if recipe.is_dir() else None
        if run_dir is not None:
            if not (run_dir / "recipe.yaml").is_file():
                raise PeftkitError(f"{run_dir} is a directory without recipe.yaml: give a recipe file or a peftkit run "
                                   "directory.")
            recipe = run_dir / "recipe.yaml"
        cfg = load_recipe(recipe, overrides)
        source = data or cfg.data.eval
        if not source:
            raise PeftkitError(f"{recipe} has no data.eval to evaluate on; pass --data FILE (or set data.eval).")
        job = EvalJob(data=source, data_cfg=cfg.data, split=cfg.data.eval_split if not data else "train",
                      model=cfg.model, quantization=cfg.quantization, batch_size=cfg.eval.batch_size)
        if run_dir is not None and adapter is None and (run_dir / "adapter").is_dir():
            job.adapter = str(run_dir / "adapter")
        if model:
            job.model = ModelConfig(name_or_path=model, dtype="auto")
    for flag, value, choices in (("--format", fmt, FORMATS), ("--on-bad-rows", on_bad_rows, ("error", "skip"))):
        if value is not None and value not in choices:
            raise PeftkitError(f"{flag} {value!r}: use {', '.join(choices[:-1])} or {choices[-1]}.")
    updates = {k: v for k, v in (("format", fmt), ("max_length", max_length), ("on_bad_rows", on_bad_rows)) if v}
    job.data_cfg = job.data_cfg.model_copy(update=updates)
    job.adapter = adapter or job.adapter
    job.batch_size = batch_size or job.batch_size
    job.trust_remote_code = trust_remote_code
    return job


def evaluate(job: EvalJob) -> dict[str, float]:
    """`peftkit eval`: loss, perplexity and token count of a base, adapted or merged model on a dataset.

    The tokenizer and data are read before the model loads, so a data or format mistake is reported in
    seconds. With an adapter, the base is the job's model or the adapter's base_model_name_or_path, loaded
    (and re-quantized) as the adapter was trained.
    """
    from peftkit.data import load_examples
    from peftkit.modeling import check_remote_code, load_adapted_model, load_model, load_tokenizer, resolve_device
    from peftkit.peft_format import recorded_base

    device = resolve_device(job.model.device if job.model else "auto")
    base = job.model.name_or_path if job.model else None
    tok_cfg = job.model
    if job.adapter:
        check_remote_code(job.adapter, job.trust_remote_code)
        base = base or recorded_base(job.adapter)
        tok_cfg = tok_cfg or ModelConfig(name_or_path=base or job.adapter, revision=recorded_base(job.adapter, "revision"),
                                         trust_remote_code=job.trust_remote_code)
    tok = load_tokenizer(tok_cfg)
    examples, _ = load_examples(tok, job.data, job.split, job.data_cfg)
    if job.adapter:
        model = load_adapted_model(base, job.adapter, device, job.trust_remote_code)[0]
    else:
        model = load_model(job.model, job.quantization, device)
    metrics = evaluate_loss(model, examples, job.batch_size, tok.pad_token_id)
    if not math.isfinite(metrics["loss"]):
        # Reported, not printed as 'loss nan': a number that looks like a result hides a broken model.
        what = f"{base} with adapter {job.adapter}" if job.adapter else base
        raise PeftkitError(
            f"{what} produces a non-finite loss ({metrics['loss']}) on {job.data}: its weights hold NaN/inf, or its "
            "activations overflow in 16-bit. Check the model's weights (a diverged training run saves NaN), or "
            "evaluate a float32 copy of the model."
        )
    return metrics
