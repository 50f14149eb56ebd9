"""Sequence classification (model.task: sequence_classification): the classifier head, the loss, and what an
evaluation reports (mean cross-entropy, accuracy, macro-F1), for a training run and for `peftkit eval`.

The model is transformers' `AutoModelForSequenceClassification`: the base with a new head on top, `classifier`
(BERT, RoBERTa, DeBERTa: on the first token, [CLS]) or `score` (Llama, Qwen2, GPT-2: on the last token that is
not padding, found through `config.pad_token_id`). The head is new, so it trains in full beside the adapter and
is saved in it as a `modules_to_save` module, exactly as peft's SEQ_CLS task does: keys
`base_model.model.classifier.weight` (`...score.weight`), adapter_config.json `task_type: "SEQ_CLS"`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.data import Example
from peftkit.data.classification import ClassificationCollator
from peftkit.errors import PeftkitError
from peftkit.metrics import CLASSIFICATION_METRICS, accuracy, macro_f1
from peftkit.rope_scaling import alone_batches, fresh_dynamic_rope, row_positions

HEAD_NAMES = ("classifier", "score")
"""transformers' names for a sequence-classification head, as peft's `SEQ_CLS_HEAD_NAMES`."""


def head_names(model: nn.Module) -> list[str]:
    """The classification head of a `...ForSequenceClassification` model: its top-level child named `classifier`
    or `score`."""
    children = dict(model.named_children())
    found = [name for name in HEAD_NAMES if name in children]
    if not found:
        raise PeftkitError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)} "
                           f"(its modules: {', '.join(children)}); peftkit cannot tell which module to train and save.")
    return found


def with_head(adapter_cfg, model: nn.Module):
    """The adapter settings with the model's head in `modules_to_save` (trained in full, saved with the adapter);
    head names the model lacks (peft writes both `classifier` and `score`) are dropped."""
    kept = [name for name in adapter_cfg.modules_to_save if name not in HEAD_NAMES]
    return adapter_cfg.model_copy(update={"modules_to_save": [*kept, *head_names(model)]})


def classification_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, num_labels) logits; token_type_ids go in only when the batch has them (a BERT-style text_pair)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    return model(**inputs).logits


def example_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor],
                     labelled: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the rows' cross-entropies, number of rows): the counterpart of `token_loss_sum`, so that a step's
    loss is the mean over every row of the accumulation window however it is split into micro-batches. (Every row
    has its one label: `labelled`, the counterpart's, is not needed.)"""
    logits = classification_logits(model, batch)
    labels = batch["labels"]
    return F.cross_entropy(logits.float(), labels, reduction="sum"), torch.tensor(labels.numel())


@torch.no_grad()
def predict(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int,
            processes=None) -> tuple[torch.Tensor, list[int]]:
    """(the (rows, num_labels) fp32 logits, the rows' class ids) of `model` on `examples`, in the examples' order, in
    eval mode (the model's mode is restored afterwards). The batches are `alone_batches`': under dynamic RoPE
    (longrope) a row past the context shares a batch only with rows of its length, so that it scores as alone,
    whatever eval.batch_size.

    `processes` (an accelerate Accelerator, several processes): each predicts every num_processes-th batch and the
    shares are gathered back, so every process holds the whole, computed once, and decides the same (an early stop,
    export.best). Every process runs as many forwards (one short of batches repeats its first, unused), which keeps
    FSDP's collectives in step."""
    rank, world = (processes.process_index, processes.num_processes) if processes is not None else (0, 1)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = alone_batches(model, len(examples), lambda i: row_positions(examples[i]), batch_size)
    collate, shares, first = ClassificationCollator(pad_id), [], None  # shares: (indices, logits, class ids)
    try:
        for i, rows in enumerate(batches):
            batch = collate([examples[j] for j in rows])
            first = batch if first is None else first
            if i % world == rank:
                with fresh_dynamic_rope(model):  # each batch as on a freshly loaded model (`evaluate_loss`)
                    logits = classification_logits(model, {k: v.to(device) for k, v in batch.items()})
                shares.append((rows, logits.float().cpu(), batch["labels"].tolist()))
        for _ in range(-(-len(batches) // world) - len(shares)):
            with fresh_dynamic_rope(model):
                classification_logits(model, {k: v.to(device) for k, v in first.items()})
    finally:
        model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        shares = gather_object(shares)
    order = torch.tensor([j for rows, *_ in shares for j in rows]).argsort()  # back to the examples' order
    labels = [label for *_, labels in shares for label in labels]
    return torch.cat([logits for _, logits, _ in shares])[order], [labels[k] for k in order.tolist()]


def evaluate_classification(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int,
                            processes=None) -> dict[str, float]:
    """{'loss' (mean cross-entropy per row), 'accuracy', 'macro_f1', 'num_examples'} of `model` on `examples`
    (`processes`: shared out, as `predict` says)."""
    logits, labels = predict(model, examples, batch_size, pad_id, processes)
    loss = float(F.cross_entropy(logits, torch.tensor(labels), reduction="mean"))
    predicted = logits.argmax(-1).tolist()
    return {"loss": loss, "accuracy": accuracy(predicted, labels), "macro_f1": macro_f1(predicted, labels),
            "num_examples": len(labels)}


@dataclass
class ClassifyEval:
    """What a classification run evaluates on data.eval (the base before training, every training.eval_steps, the
    end): `RunEval`'s counterpart, with the loss, accuracy and macro-F1 of the predicted classes."""

    examples: list[Example]
    pad_id: int
    batch_size: int
    metrics: list[str] = field(default_factory=lambda: list(CLASSIFICATION_METRICS))
    processes: object = None
    """The run's Accelerator when it has several processes: they share out the batches (`predict`)."""

    def __len__(self) -> int:
        return len(self.examples)

    def __call__(self, model: nn.Module, generator: nn.Module | None = None) -> dict[str, float]:
        return evaluate_classification(model, self.examples, self.batch_size, self.pad_id, self.processes)

    def record(self, result: dict[str, float], prefix: str = "eval_") -> dict[str, float]:
        """The result under metrics.jsonl / summary names: `eval_loss`, `eval_accuracy`, `eval_macro_f1`."""
        return {f"{prefix}{k}": result[k] for k in ("loss", *self.metrics)}

    def describe(self, result: dict[str, float]) -> str:
        """`eval loss 0.6931, accuracy 0.5000, macro_f1 0.3333` for the console."""
        return f"eval loss {result['loss']:.4f}" + "".join(f", {m} {result[m]:.4f}" for m in self.metrics)
