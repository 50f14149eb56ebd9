"""The training loss without full-size fp32 copies of the logits.

The plain `F.cross_entropy(logits.flatten(0, 1).float(), ...)` makes an fp32 copy of every position's logits and
keeps an fp32 log-softmax of the same size for backward: with a 128k vocabulary, batch 4 x 2048 tokens, that is
two 4.2 GB tensors beside the 2.1 GB of bf16 logits the model returns. Here only the labelled positions are taken
(prompt and padding positions never enter), and their cross-entropy is computed in fp32 a chunk of rows at a time;
with gradients on, each chunk is recomputed in backward (activation checkpointing) instead of keeping its fp32
log-softmax. The per-token values are the plain computation's; only the order of the final fp32 sum differs.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from peftkit.data import IGNORE_INDEX

CHUNK_ELEMENTS = 2**26
"""Logit elements per chunk: 256 MiB of fp32 at a time (523 rows of a 128k vocabulary)."""


def _chunk_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


LOGITS_FROM = "logits_from"
"""A batch's key for `logits_from` of its labels, counted on the CPU before the batch moves (no host sync)."""


def logits_from(labels: torch.Tensor) -> int:
    """The first position whose logits a next-token loss over (batch, time) `labels` reads: the one before the first
    labelled token of any row (0 where none is). The output head need not see the positions before it: a prompt's
    logits cost a forward and backward through the head (a fifth of SmolLM2-135M's compute, 49k x 576) and memory of
    batch x time x vocab, for nothing the loss reads."""
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(0)
    return int(labelled.int().argmax()) if bool(labelled.any()) else 0


def on_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict:
    """A token batch moved to `device`, with its `LOGITS_FROM` counted first, where it is (no host sync)."""
    return {k: v.to(device) for k, v in batch.items()} | {LOGITS_FROM: logits_from(batch["labels"])}


def trimmed_head(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor]:
    """({"logits_to_keep": n} for the model's forward, or {}; the batch's labels for the positions whose logits it
    then returns): the output head computes logits from `logits_from` of the labels on (the batch's `LOGITS_FROM`,
    counted on the CPU, else counted here). Every position where trimming could change anything: a model whose
    forward takes no `logits_to_keep`, a head an adapter wraps (a method that mixes positions, VeLoRA's batch
    projection, would see others), the prompt family's virtual tokens (its logits are cut after the forward), and a
    compiled step (a shape per batch would recompile)."""
    from peftkit.methods.virtual import virtual_tokens

    labels = batch["labels"]
    inner = model if isinstance(model, PreTrainedModel) else getattr(model, "module", None)  # (DDP's, DeepSpeed's)
    if torch.compiler.is_compiling() or not isinstance(inner, PreTrainedModel) or virtual_tokens(inner) is not None:
        return {}, labels
    if type(inner.get_output_embeddings()) is not nn.Linear or not _takes_logits_to_keep(type(inner)):
        return {}, labels
    start = batch.get(LOGITS_FROM)
    start = logits_from(labels) if start is None else start
    return ({"logits_to_keep": labels.shape[1] - start}, labels[:, start:]) if start else ({}, labels)


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def labelled_count(labels: torch.Tensor) -> int:
    """How many positions of (batch, time) `labels` have a labelled next token: what `next_token_loss_sum` sums
    over. Counted where the labels are (the CPU, before a batch moves), it spares the loss a host sync."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor,
                        labelled: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over the labelled positions, their number) of (batch, time, vocab)
    `logits` and (batch, time) `labels` (IGNORE_INDEX where unlabelled); the sum is an fp32 scalar.

    `labelled`, their number (`labelled_count` of the labels while on the CPU), makes picking them a gather of a
    known size. Counting them here instead reads a GPU tensor, which stops the host until the forward has run: a
    sync per micro-batch, before its backward can be queued."""
    if logits.shape[:2] != labels.shape:  # the positions below would pick other rows, silently
        raise ValueError(f"logits of {tuple(logits.shape[:2])} positions for labels of {tuple(labels.shape)}")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if torch.compiler.is_compiling():  # one graph: picking rows by a mask has a data-dependent shape (a graph break)
        return _chunk_sum(logits[:, :-1].flatten(0, 1), targets.flatten()), keep.sum()
    labelled = int(keep.sum()) if labelled is None else labelled
    # The labelled positions in order, as (row, time): their logits (n, vocab) in the model's dtype, gathered alone
    # whatever the logits' strides (the prompt family's are a slice: a reshape would copy them all), and targets.
    # (Not on an empty mask, rows one token wide: CUDA's kernel crashed on one before torch 2.9.)
    where = torch.nonzero_static(keep, size=labelled) if keep.numel() else keep.new_zeros((0, 2), dtype=torch.long)
    row, time = where.unbind(1)
    picked, wanted = logits[row, time], targets[row, time]
    if not labelled:  # (a stand-in row: `peftkit.distributed.shard`) a zero whose backward reaches every parameter
        return picked.float().sum(), keep.sum()
    rows = max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    recompute = torch.is_grad_enabled() and picked.requires_grad
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, len(wanted), rows):
        chunk, target = picked[start:start + rows], wanted[start:start + rows]
        total = total + (checkpoint(_chunk_sum, chunk, target, use_reentrant=False) if recompute
                         else _chunk_sum(chunk, target))
    return total, keep.sum()


def _chunk_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(logits.float(), targets, reduction="none")


def row_logps(logits: torch.Tensor, labels: torch.Tensor, labelled: int | None = None) -> torch.Tensor:
    """Each row's summed next-token log-probability of its labelled tokens, (rows,) in fp32: a sequence's
    log-likelihood, which DPO compares (`peftkit.preference`). Picked and chunked as `next_token_loss_sum` picks them,
    so no fp32 copy of every position's logits is made; `labelled` as there."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits of {tuple(logits.shape[:2])} positions for labels of {tuple(labels.shape)}")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if torch.compiler.is_compiling():  # one graph: every position, the unlabelled ones zeroed
        per_token = _chunk_logps(logits[:, :-1].flatten(0, 1), targets.clamp(min=0).flatten()).view(targets.shape)
        return (per_token * keep).sum(1)
    labelled = int(keep.sum()) if labelled is None else labelled
    where = torch.nonzero_static(keep, size=labelled) if keep.numel() else keep.new_zeros((0, 2), dtype=torch.long)
    row, time = where.unbind(1)
    picked, wanted = logits[row, time], targets[row, time]
    if not labelled:  # a zero whose backward reaches every parameter (a stand-in pair: `peftkit.distributed.shard`)
        return torch.zeros(len(labels), dtype=torch.float32, device=logits.device) + picked.float().sum()
    rows = max(1, CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    recompute = torch.is_grad_enabled() and picked.requires_grad
    parts = [checkpoint(_chunk_logps, picked[s:s + rows], wanted[s:s + rows], use_reentrant=False) if recompute
             else _chunk_logps(picked[s:s + rows], wanted[s:s + rows]) for s in range(0, len(wanted), rows)]
    # Put back in place and summed along each row (not a scatter-add, whose CUDA kernel adds in no fixed order).
    dense = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    dense = dense.index_put((row, time), torch.cat(parts))
    return dense.sum(1)
