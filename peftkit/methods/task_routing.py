"""Per-row task ids for a weight-update method whose layers read them (Poly: each layer mixes its skills by the row's
task), given to the model's forward as `task_ids=` (the keyword `peftkit.methods.virtual.task_inputs` adds from the
data's `task` column, as for multitask prompt tuning) or set for a whole `generate` (`generation_tasks`).

One `TaskIds` per model, on it as an attribute: its forward pre-hook takes `task_ids` out of the model's keywords
(never the model's own input) and keeps them for the layers of this forward; a forward without them keeps None (the
layers then use task 0, as multitask prompt tuning does). They stay until the next forward of the model, so that
gradient checkpointing's recomputation of a decoder layer in backward reads the same ids. A plain object (no module):
the model's state dict and module list do not change, and a deepcopy of the model copies it with its layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from peftkit.errors import PeftkitError

ATTR = "peftkit_task_ids"


class TaskIds:
    """The task ids of the model's current forward, for its layers to read (`current`)."""

    def __init__(self) -> None:
        self.current: torch.Tensor | None = None
        self.generating: torch.Tensor | None = None  # each row's task for the forwards of one `generate`

    def before_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if "task_ids" not in kwargs:
            self.current = self.generating
            return None
        kwargs = dict(kwargs)
        self.current = kwargs.pop("task_ids")
        return args, kwargs

    def rows(self, batch: int, device: torch.device) -> torch.Tensor:
        """(batch,) task ids of this forward on `device`: the given ones, or task 0 for every row."""
        if self.current is None:
            return torch.zeros(batch, dtype=torch.long, device=device)  # made there: no copy
        ids = self.current.reshape(-1)
        if len(ids) != batch:
            raise PeftkitError(f"{len(ids)} task ids for a batch of {batch} rows: give each row one.")
        # Not range-checked here, where on a GPU reading them would stop the host every forward: training
        # (`check_training_tasks`) and inference (`resolve_tasks`) check the data's ids as it loads.
        return ids.to(device, torch.long)


def task_ids_of(model: nn.Module) -> TaskIds:
    """The model's `TaskIds`, put on it (with its hook) the first time: every layer that reads task ids shares it."""
    holder = getattr(model, ATTR, None)
    if holder is None:
        holder = TaskIds()
        setattr(model, ATTR, holder)
        model.register_forward_pre_hook(holder.before_forward, with_kwargs=True)
    return holder


def reads_layer_task_ids(model: nn.Module) -> bool:
    """Whether `model`'s layers read task ids (a `TaskIds` is on it)."""
    return getattr(model, ATTR, None) is not None


@contextmanager
def generation_tasks(model: nn.Module, task_ids: torch.Tensor | None) -> Iterator[None]:
    """Every forward of a `generate` inside the block runs each row with its task (`task_ids`), as peft's Poly hands
    them to every step; nothing for a model whose layers read none."""
    holder = getattr(model, ATTR, None)
    if holder is None or task_ids is None:
        yield
        return
    holder.generating = task_ids
    try:
        yield
    finally:
        holder.generating = None
