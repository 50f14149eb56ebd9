"""Examples -> padded batches, in an order that depends only on (seed, epoch), so a resumed run needs no replay."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from peftkit.data.examples import IGNORE_INDEX
from peftkit.data.stored import UNTYPED, Example
from peftkit.errors import PeftkitError


class Collator:
    """Right-pads a list of examples to the longest; pad labels are IGNORE_INDEX, attention 0 (CPT's types 0)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        """input_ids, labels and attention_mask (1 on real tokens); packed rows (`data.packing`) also get
        position_ids, and the model is then given those instead of the mask (`token_loss_sum`). Their padding is
        at position 0, each pad a sequence of one token: no real token attends to it (it comes last), and no
        position id exceeds the longest example's (dynamic RoPE scales by the largest one)."""
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        # Rows of one example each need no packed masks: the plain path (SDPA's causal kernel) is faster.
        packed = any(e.position_ids is not None and 0 in e.position_ids[1:] for e in batch)
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
            if packed:
                positions[i, :n] = torch.tensor(e.position_ids)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if packed:
            out = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}
        return out | task_ids(batch) | input_types(batch, width)


def input_types(batch: list[Example], width: int) -> dict[str, torch.Tensor]:
    """{'input_type_mask': (rows, width)} of CPT's per-token types where the examples have them (tokenized rows'
    `input_type_mask`), padded with 0 (no type: peft's example collator pads so), else {}."""
    if all(e.types is None for e in batch):
        return {}
    types = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        types[i, :len(e.input_ids)] = torch.tensor(e.types if e.types is not None else [UNTYPED] * len(e.input_ids))
    return {"input_type_mask": types}


def task_ids(batch: list[Example]) -> dict[str, torch.Tensor]:
    """{'task_ids': (rows,)} when the data's rows carry a `task` (multitask prompt tuning), else {}. A row without
    one, in data that has them, is a user error: its task would be a guess."""
    tasks = [e.task_id for e in batch]
    if all(t is None for t in tasks):
        return {}
    if any(t is None for t in tasks):
        raise PeftkitError("Some rows of the data have a 'task' field and some do not; give every row its task id.")
    return {"task_ids": torch.tensor(tasks, dtype=torch.long)}


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool,
                  lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Index batches of one epoch: a permutation that depends only on (seed, epoch), so any position can be
    recomputed on resume without replaying the loader.

    `lengths` (data.group_by_length: each example's token count): the permutation is transformers'
    `get_length_grouped_indices` drawn from the same generator, as its LengthGroupedSampler: a random one cut into
    megabatches of 50 batches (fewer on small data: 4 megabatches at least), each sorted longest first, the
    longest example's batch first of all (a run that runs out of memory does so at its first step). A batch then
    holds examples of similar length: less padding, the order of the batches still random."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if lengths is not None:
        from transformers.trainer_pt_utils import get_length_grouped_indices  # (1.2 s to import: only when asked)

        order = get_length_grouped_indices(lengths, batch_size, generator=generator)
    elif shuffle:
        order = torch.randperm(n, generator=generator).tolist()
    else:
        order = list(range(n))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def steps_per_epoch(examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over `examples`: every micro-batch of the epoch is in a window of up to
    `grad_accum` of them, the last window of an epoch shorter when they do not divide (as transformers' Trainer)."""
    micro_batches = -(-examples // batch_size)  # ceil
    return -(-micro_batches // grad_accum)


def step_windows(
    examples: Sequence[Example], batch_size: int, grad_accum: int, seed: int, shuffle: bool, pad_id: int, start: int = 0,
    num_workers: int = 0, collate: Callable | None = None, pin_memory: bool = False, group_by_length: bool = False,
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """An endless stream of optimizer steps' windows of collated micro-batches, epoch after epoch, from step
    `start`. A window never spans two epochs: `epochs: 1` trains on every example once, whatever `grad_accum`.
    `collate` (default `Collator(pad_id)`) turns a list of examples into a batch; `pin_memory` (for a CUDA run)
    puts it in page-locked memory, so its copy to the device overlaps the step. `group_by_length` (data.group_by_length):
    batches of examples of similar length (`epoch_batches`); under several processes `batch_size` is the global
    batch, so each process's slice of it (`distributed.shard`: consecutive rows) is of similar length too.

    Batch composition is decided here in the main process; workers only collate, so `num_workers > 0`
    yields the same batches in the same order. One DataLoader serves every epoch, so its workers start once: a
    loader per epoch started them anew each epoch (2 workers on 8-step epochs made training 2.5x slower).
    """
    lengths = example_lengths(examples) if group_by_length else None
    plan, ahead = itertools.tee(_windows(len(examples), batch_size, grad_accum, seed, shuffle, start, lengths))
    sampler = _Batches(ahead)  # (the loader's workers run ahead of the windows taken: tee keeps those between)
    # An own generator: a DataLoader otherwise draws its worker seed from the global RNG, which would shift dropout
    # masks depending on where a run (or a resumed one) starts.
    loader = iter(DataLoader(examples, batch_sampler=sampler, collate_fn=collate or Collator(pad_id),
                             num_workers=num_workers, pin_memory=pin_memory,
                             generator=torch.Generator().manual_seed(seed + start),
                             worker_init_fn=_ignore_stop_signals if num_workers else None))
    for window in plan:
        yield [next(loader) for _ in window]


def example_lengths(examples: Sequence[Example]) -> list[int]:
    """Each example's token count (`Examples` reads them from its offsets without building the examples, `Pairs` a
    pair's longer answer's)."""
    return examples.lengths() if hasattr(examples, "lengths") else [len(e.input_ids) for e in examples]


def _windows(n: int, batch_size: int, grad_accum: int, seed: int, shuffle: bool, start: int,
             lengths: list[int] | None = None) -> Iterator[list[list[int]]]:
    """The index batches of each optimizer step from step `start` on, in windows of up to `grad_accum`, endlessly."""
    epoch, step = divmod(start, steps_per_epoch(n, batch_size, grad_accum))
    while True:
        batches = epoch_batches(n, batch_size, seed, epoch, shuffle, lengths)[step * grad_accum:]
        yield from (batches[i:i + grad_accum] for i in range(0, len(batches), grad_accum))
        epoch, step = epoch + 1, 0


class _Batches:
    """A DataLoader's batch sampler over endless windows of index batches (`_windows`): their batches in order."""

    def __init__(self, windows: Iterator[list[list[int]]]) -> None:
        self.windows = windows

    def __iter__(self) -> Iterator[list[int]]:
        return (batch for window in self.windows for batch in window)


def _ignore_stop_signals(worker_id: int) -> None:
    """In a DataLoader worker: SIGINT and SIGTERM sent to the whole process group (Ctrl-C, Slurm, systemd) are the main
    process's to handle (it checkpoints and stops, then shuts its workers down); a worker killed by one would crash
    the run instead."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def eval_loader(examples: Sequence[Example], batch_size: int, pad_id: int, collate: Callable | None = None) -> DataLoader:
    return DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=collate or Collator(pad_id),
                      generator=torch.Generator().manual_seed(0))
