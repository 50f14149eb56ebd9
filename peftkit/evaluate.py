"""Loss and perplexity of a model on a dataset: mean next-token cross-entropy over the labelled tokens."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.data import IGNORE_INDEX, Example, eval_loader
from peftkit.errors import PeftkitError


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


def evaluate(model_path: str, data: str, fmt: str, adapter: str | None = None, max_length: int = 512,
             batch_size: int = 8, split: str = "train") -> dict[str, float]:
    """`peftkit eval`: loss, perplexity and token count of a base, adapted or merged model on a dataset.

    Args:
        model_path: a model directory or hub id (a merged model is just a model).
        data: a local data file or hub dataset id.
        fmt: alpaca | chat | completion | text (loss only on the target tokens, as in training).
        adapter: a PEFT adapter directory to apply on top of `model_path`.
    """
    from peftkit.data import load_examples
    from peftkit.modeling import load_adapted_model, load_model, load_tokenizer, resolve_device
    from peftkit.recipe import DataConfig, ModelConfig

    device = resolve_device()
    if adapter:
        model, _, tok, _, _ = load_adapted_model(model_path, adapter, device)
    else:
        cfg = ModelConfig(name_or_path=model_path, dtype="auto")
        model, tok = load_model(cfg, None, device), load_tokenizer(cfg)
    examples, _ = load_examples(tok, data, split, DataConfig(train=data, format=fmt, max_length=max_length))
    metrics = evaluate_loss(model, examples, batch_size, tok.pad_token_id)
    if not math.isfinite(metrics["loss"]):
        # Reported, not printed as 'loss nan': a number that looks like a result hides a broken model.
        what = f"{model_path} with adapter {adapter}" if adapter else model_path
        raise PeftkitError(
            f"{what} produces a non-finite loss ({metrics['loss']}) on {data}: its weights hold NaN/inf, or its "
            "activations overflow in 16-bit. Check the model's weights (a diverged training run saves NaN), or "
            "evaluate a float32 copy of the model."
        )
    return metrics
