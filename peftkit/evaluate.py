"""Loss and perplexity of a model on a dataset: mean next-token cross-entropy over the labelled tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.data import IGNORE_INDEX, Example, eval_loader
from peftkit.errors import PeftkitError
from peftkit.inference import ModelSource, check_choices, recipe_source
from peftkit.recipe import DataConfig


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
    source: ModelSource = field(default_factory=ModelSource)
    batch_size: int = 8


def eval_job(recipe: Path | None, overrides: list[str], model: str | None, data: str | None, fmt: str | None,
             adapter: str | None, max_length: int | None, batch_size: int | None, on_bad_rows: str | None,
             trust_remote_code: bool = False) -> EvalJob:
    """The `peftkit eval` arguments as one job. With a recipe (or a run directory, read through its recipe.yaml,
    whose adapter/ is then the default --adapter) its model, data.eval, format and eval settings are the
    defaults and flags override them; without one, --model and --data are needed and the rest take the
    recipe defaults, so figures are comparable with training's."""
    if recipe is None:
        if not model or not data:
            raise PeftkitError("peftkit eval needs a RECIPE (or a run directory), or both --model and --data.")
        job = EvalJob(data=data, data_cfg=DataConfig(train=data))
    else:
        cfg, run_adapter = recipe_source(recipe, overrides)
        source = data or cfg.data.eval
        if not source:
            raise PeftkitError(f"{recipe} has no data.eval to evaluate on; pass --data FILE (or set data.eval).")
        job = EvalJob(data=source, data_cfg=cfg.data, split=cfg.data.eval_split if not data else "train",
                      source=ModelSource(cfg.model, cfg.quantization, run_adapter), batch_size=cfg.eval.batch_size)
    check_choices(fmt, on_bad_rows)
    updates = {k: v for k, v in (("format", fmt), ("max_length", max_length), ("on_bad_rows", on_bad_rows)) if v}
    job.data_cfg = job.data_cfg.model_copy(update=updates)
    job.source = job.source.with_flags(model, adapter, trust_remote_code)
    job.batch_size = batch_size or job.batch_size
    return job


def evaluate(job: EvalJob) -> dict[str, float]:
    """`peftkit eval`: loss, perplexity and token count of a base, adapted or merged model on a dataset.

    The tokenizer and data are read before the model loads, so a data or format mistake is reported in
    seconds. With an adapter, the base is the job's model or the adapter's base_model_name_or_path, loaded
    (and re-quantized) as the adapter was trained.
    """
    from peftkit.data import load_examples
    from peftkit.modeling import resolve_device

    source = job.source
    device = resolve_device(source.model.device if source.model else "auto")
    tok = source.tokenizer()
    examples, _ = load_examples(tok, job.data, job.split, job.data_cfg)
    model = source.load(device)
    metrics = evaluate_loss(model, examples, job.batch_size, tok.pad_token_id)
    if not math.isfinite(metrics["loss"]):
        # Reported, not printed as 'loss nan': a number that looks like a result hides a broken model.
        what = source.describe()
        raise PeftkitError(
            f"{what} produces a non-finite loss ({metrics['loss']}) on {job.data}: its weights hold NaN/inf, or its "
            "activations overflow in 16-bit. Check the model's weights (a diverged training run saves NaN), or "
            "evaluate a float32 copy of the model."
        )
    return metrics
