"""Experiment trackers (`training.report_to`): TensorBoard, Weights & Biases and MLflow through accelerate's
tracker API. metrics.jsonl stays the record of a run; a tracker gets a copy of each of its lines.

Where they write: TensorBoard under `<output_dir>/trackers/<run name>/`; MLflow to `MLFLOW_TRACKING_URI`, by
default `<output_dir>/trackers/mlruns`; W&B offline (files under `<output_dir>/trackers/wandb`) unless
`WANDB_MODE` is set, so no account is needed. The recipe goes along as the run's hyperparameters.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from peftkit.errors import PeftkitError

PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
DIRECTORY = "trackers"


def check_trackers(report_to: list[str]) -> None:
    """A PeftkitError naming the package to install for each tracker whose package is missing."""
    missing = [name for name in report_to if not any(importlib.util.find_spec(p) for p in PACKAGES[name])]
    if missing:
        raise PeftkitError(
            f"training.report_to: {', '.join(missing)} needs its package, which is not installed; run "
            f"`pip install {' '.join(PACKAGES[m][0] for m in missing)}`, or remove it from training.report_to."
        )


def flat_config(recipe_dict: dict, prefix: str = "") -> dict:
    """The recipe as `section.key: value` with scalar values (trackers take no nesting; lists become text)."""
    flat = {}
    for key, value in recipe_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flat_config(value, f"{name}.")
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:  # None, lists
            flat[name] = str(value)
    return flat


class Trackers:
    """The run's trackers on one accelerator; `log` sends a metrics.jsonl record, `close` ends them."""

    def __init__(self, accelerator, recipe, out: Path) -> None:
        self.accelerator = accelerator
        names = recipe.training.report_to
        if "mlflow" in names:
            os.environ.setdefault("MLFLOW_TRACKING_URI", (out / DIRECTORY / "mlruns").resolve().as_uri())
        init = {"wandb": {"mode": os.environ.get("WANDB_MODE", "offline"), "dir": str(out / DIRECTORY)}}
        (out / DIRECTORY).mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers(out.resolve().name, config=flat_config(recipe.model_dump(mode="json")),
                                  init_kwargs={n: init[n] for n in names if n in init})

    def log(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.accelerator.log(values, step=record["step"])

    def close(self) -> None:
        self.accelerator.end_training()
