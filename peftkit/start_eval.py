"""What a run's evaluation before training (eval.base_model) evaluates, and how its figures are named.

An ordinary run evaluates the base model: `base_eval_loss`, `base_eval_<metric>`, `base_eval_<set>_loss`, the samples'
`base` answers, titled "base model". A run with `adapter.init_from` continues an adapter (SFT then more SFT, DPO after
SFT): it evaluates the model it starts from, the base with that adapter (its step-0 model, which the run's later
evaluations improve on, as the Trainer's `eval_on_start` of a loaded PeftModel does), named `start_eval_loss`, ...,
`start` answers, titled "start (init_from: NAME)". The bare base's figures belong to the run that trained the adapter
(its own manifest has them; `peftkit eval --model BASE` gives them): a second evaluation of every set before training
would cost as much as the first.

Runs from before 7 December 2026 evaluated the bare base under init_from too (`base_eval_*`): their reports and cards
read as written, and `peftkit verify` re-runs them so (`AS_BASE`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

BASE = "base_eval_"
START = "start_eval_"
AS_BASE = "PEFTKIT_BASE_EVAL"
"""Set to "1" by `peftkit verify` for its re-run of an init_from run whose manifest records no `start_eval_` figure (a
run from before they were kept): the re-run evaluates the bare base before training, as that run did."""


def from_adapter(cfg) -> bool:
    """Whether `cfg`'s run evaluates, before training, the base with adapter.init_from's adapter (once injected)."""
    return bool(cfg.adapter.init_from) and os.environ.get(AS_BASE) != "1"


def prefix(metrics: dict) -> str:
    """The prefix of the figures before training in a run's summary (its manifest's `metrics`): `start_eval_` where it
    has any (an init_from run's), else `base_eval_`."""
    return START if any(key.startswith(START) for key in metrics) else BASE


def sample_key(samples: list) -> str:
    """The key of the answers before training in a run's samples: `start` (an init_from run's) or `base`."""
    return "start" if any(isinstance(s, dict) and "start" in s for s in samples) else "base"


def title(start: bool, init_from: object = None) -> str:
    """The title of the figures before training: "base model", or (`start`) "start (init_from: NAME)", NAME the
    adapter as a card names it (`shown`: a run's `RUN/adapter` as `RUN/adapter`; a hub adapter as the recipe records
    it, `user/name@COMMIT`)."""
    if not start:
        return "base model"
    if not isinstance(init_from, str) or not init_from:
        return "start (init_from)"
    return f"start (init_from: {shown(init_from)})"


def shown(path: str) -> str:
    """An adapter directory a recipe starts from (init_from, fuse, source_adapter) as a card, a report or a summary
    names it: a hub adapter's snapshot by its reference pinned to the commit read (`user/name@COMMIT`, as the run's
    recipe.yaml records it), a run's `adapter/` by its run too (`sft/adapter`: every run's is named adapter), another
    local directory by its name, a hub id as it is. Never more of a local path: its parents say nothing on the Hub or
    another machine, and verify's re-run of a project moved with its run reads it at another path."""
    from peftkit.hub import pinned_reference

    local = Path(path)
    if not local.is_absolute():
        return path
    if pinned := pinned_reference(path):
        return pinned
    return f"{local.parent.name}/{local.name}" if local.name == "adapter" else local.name


def from_the_start(source, init_from: str | None) -> tuple:
    """(source, title): a recipe's model source (`peftkit.inference.ModelSource`) without an adapter of its own, as the
    recipe's run starts: with `init_from` (its adapter.init_from) as its adapter, titled as train titles its figures and
    samples before training (`title`); unchanged and None without init_from or where the source has an adapter (a run
    directory's adapter/). `peftkit eval RECIPE`, `generate RECIPE` and `chat RECIPE` run this model (the bare base, a
    model no run of the recipe starts from: `--set adapter.init_from=null`). Its prompts are rendered as the run renders
    them, in the recipe's chat template (the base tokenizer's own without data.chat_template), not in one init_from
    carries (chat_template.jinja)."""
    if not init_from or source.adapter is not None:
        return source, None
    return replace(source, adapter=init_from, adapter_template=False), title(True, init_from)


def said(start: str) -> str:
    """The first line of `peftkit eval`, `generate` or `chat` of a recipe's start (`from_the_start`'s `start` title):
    what runs, and how to run the bare base instead."""
    return (f"{start}: the base with the recipe's adapter.init_from, as train evaluates it before training (the bare "
            "base: --set adapter.init_from=null)")
