"""Which task each prompt or row is, for an adapter whose method reads task ids (multitask prompt tuning: its soft
prompt differs per task; Poly: its layers' routing does). `peftkit generate`, `peftkit eval` and `peftkit chat` take
`--task N` (every prompt and row is task N) or, with data, each row's own `task` column, as training read it. An
adapter of several tasks given neither is an error naming --task: task 0 would be a silent guess; but a recipe's own
eval data without the column is task 0 for `peftkit eval`, as training read it. One of a single task needs neither,
and a model whose method reads no task ids ignores the data's column (as training does) and refuses --task.

Task ids are integers: the data's `task` column is one, so an adapter records no task names to accept instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.inference import ModelSource

Item = TypeVar("Item")  # an Example (loss) or a Prompt (generation): both carry `task_id`


def adapter_task_count(source: ModelSource) -> int | None:
    """How many tasks the source's adapter has, if its method reads task ids; None for any other model (no
    adapter, a merged model, another method). Read from adapter_config.json alone, before the model loads."""
    from peftkit.peft_format import CONFIG_NAME, check_adapter_dir, read_peft_config

    if not source.adapter:
        return None
    path = Path(source.adapter)
    check_adapter_dir(path)  # a model or run directory given as --adapter: said as such, not a traceback
    method, peft = read_peft_config(path)
    return getattr(method.from_peft(peft, path / CONFIG_NAME), method.tasks_key) if method.reads_task_ids else None


def resolve_tasks(source: ModelSource, task: int | None, given: list[int | None], data: str | None,
                  untasked: int | None = None) -> list[int | None]:
    """Each item's task id for `source`: `task` (--task) for all, else `given` (the data's column), checked
    against the adapter's task count.

    Args:
        given: each item's own task (None: its row has no `task`; every --prompt is None).
        data: where the items come from (a data file or hub id), for the messages; None for --prompt.
        untasked: the task of data without the column, where something says it (a recipe's own data is task 0
            throughout, as training read it: `peftkit eval RUN_DIR` gives the run's figures); None: an error.
    """
    count = adapter_task_count(source)
    if count is None:
        if task is not None:
            raise PeftkitError(f"--task {task}: only a multitask prompt tuning or Poly adapter reads a task id, and "
                               f"{source.describe()} has none; drop --task.")
        return given
    span = f"0 .. {count - 1}"
    if task is not None:
        if not 0 <= task < count:
            raise PeftkitError(f"--task {task}: {source.adapter} has {count} task(s); give a task id in {span}.")
        return [task] * len(given)
    if given and None not in given:
        if (top := max(given)) >= count:
            raise PeftkitError(f"{data}: a row's 'task' is {top}, but {source.adapter} has {count} task(s) ({span}); "
                               "fix the rows' task ids, or pass --task N to use one task for every row.")
        return given
    if any(t is not None for t in given):
        raise PeftkitError(f"Some rows of {data} have a 'task' field and some do not; give every row its task id, or "
                           "pass --task N to use one task for every row.")
    if count == 1 or (untasked is not None and given):
        return [untasked or 0] * len(given)
    where = f", or give every row of {data} a 'task' column" if data else ""
    raise PeftkitError(f"{source.adapter} is {_adapter_kind(source)} adapter of {count} tasks, and nothing says which "
                       f"task to use: pass --task N ({span}){where}.")


def with_tasks(source: ModelSource, task: int | None, items: list[Item], data: str | None = None,
               untasked: int | None = None) -> list[Item]:
    """`items` (examples or prompts) with the task ids `resolve_tasks` gives them (copies; unchanged when the model
    reads no task ids; `Examples` keep their arrays and get the ids in place)."""
    from peftkit.data.stored import Examples

    if isinstance(items, Examples):
        items.task_ids = resolve_tasks(source, task, items.task_ids, data, untasked)
        return items
    tasks = resolve_tasks(source, task, [item.task_id for item in items], data, untasked)
    return [item if item.task_id == t else replace(item, task_id=t) for item, t in zip(items, tasks, strict=True)]


def _adapter_kind(source: ModelSource) -> str:
    """'a multitask prompt tuning' or 'a Poly': the method of the source's adapter, for a message."""
    from peftkit.peft_format import read_peft_config

    method, _ = read_peft_config(Path(source.adapter))
    return "a Poly" if method.name == "poly" else "a multitask prompt tuning"


def recipe_reads_tasks(cfg) -> bool:
    """Whether a recipe's method reads the data's `task` column (multitask prompt tuning, Poly); any other ignores
    it."""
    from peftkit.methods import method_of

    return method_of(cfg.adapter).reads_task_ids


def check_training_tasks(cfg, split: str, tasks: Iterable[int | None]) -> None:
    """Training's check of the data's task ids (None: a row without one) against adapter.num_tasks, as the data
    loads (before the model does). The forward then needs no check of its own on a GPU, where reading the ids would
    stop the host every step; `split` names the recipe key the rows came from ('data.train', 'data.eval')."""
    from peftkit.methods import method_of

    if not recipe_reads_tasks(cfg):
        return
    key = method_of(cfg.adapter).tasks_key
    count = getattr(cfg.adapter, key)
    top = max((task for task in tasks if task is not None), default=None)
    if top is not None and top >= count:
        where = split.removeprefix("data.")  # data.train, data.eval, or a named set's data.eval.NAME
        path = cfg.data.eval_sources()[where[5:]].path if where.startswith("eval.") else getattr(cfg.data, where)
        raise PeftkitError(f"{split} ({path}): a row's 'task' is {top}, but adapter.{key} is {count}: the rows' "
                           f"task ids must lie in 0 .. {count - 1}. Fix the rows, or set adapter.{key}: {top + 1}.")
