"""Choosing among a run's evaluations: early stopping (`training.early_stopping`) and the adapter `export.best`
exports.

Each evaluation during training (every training.eval_steps, and the end) is shown to a `Selection`. For
early stopping it tracks the best value of one metric and how many evaluations have passed without beating it
by more than `min_delta`; `patience` such evaluations stop the run. For `export.best` it keeps a CPU copy of the
adapter at the best evaluation of its metric (ties keep the earlier one), which the export writes instead of
the final weights. Both are part of a checkpoint (`selection.json`, `best_adapter.safetensors`), so a resumed
run chooses as the uninterrupted one would.

A metric is the primary evaluation set's (`loss`: eval_loss in metrics.jsonl) or, dotted, another set's of data.eval
(`general.loss`: eval_general_loss).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from peftkit.metrics import LOWER_IS_BETTER

STATE_FILE = "selection.json"
WEIGHTS_FILE = "best_adapter.safetensors"


def lower_is_better(metric: str, mode: str = "auto") -> bool:
    """min for loss and perplexity (`general.loss` too), a preference run's rejected_reward and KTO's kl, max for task
    metrics, unless `mode` says which."""
    return metric.rpartition(".")[2] in LOWER_IS_BETTER if mode == "auto" else mode == "min"


def watched(cfg, metric: str) -> str:
    """`metric` as a `Watch` follows it: a dotted one of the primary set (`numbers.loss`) is its plain name, whose
    figure is eval_loss; the rest as written."""
    name, _, figure = metric.rpartition(".")
    return figure if name and name == next(iter(cfg.data.eval)) else metric


def value_of(result: dict, metric: str) -> float:
    """`metric`'s value in an evaluation's result: the primary set's at the top, another set's under `sets`."""
    name, _, figure = metric.rpartition(".")
    return result["sets"][name][figure] if name else result[figure]


@dataclass
class Watch:
    """The best value of one metric so far, where it was reached, and the evaluations since."""

    metric: str
    lower: bool
    min_delta: float = 0.0
    value: float | None = None
    step: int | None = None
    stale: int = 0

    def see(self, step: int, value: float) -> bool:
        """Record one evaluation's value; True when it is the new best. A NaN or inf value never is, nor None (a KTO
        margin of an evaluation without desirable or undesirable answers: `peftkit.kto.FIGURES`)."""
        better = value is not None and math.isfinite(value) and (self.value is None or (
            value < self.value - self.min_delta if self.lower else value > self.value + self.min_delta))
        if better:
            self.value, self.step, self.stale = value, step, 0
        else:
            self.stale += 1
        return better

    @property
    def direction(self) -> str:
        return "lower" if self.lower else "higher"

    @property
    def logged(self) -> str:
        """The metric's name in metrics.jsonl: `eval_loss`, `eval_general_loss` (of `general.loss`)."""
        return f"eval_{self.metric.replace('.', '_')}"


class Selection:
    """Early stopping and the best adapter of one run, fed every evaluation's result."""

    def __init__(self, stopper: Watch | None, patience: int | None, best: Watch | None) -> None:
        self.stopper, self.patience, self.best = stopper, patience, best
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.best_result: dict[str, float] | None = None

    @classmethod
    def of(cls, cfg) -> Selection | None:
        """The recipe's selection, or None when it has neither early stopping nor export.best."""
        es, metric = cfg.training.early_stopping, cfg.best_metric
        if es is None and metric is None:
            return None
        stopper = Watch(watched(cfg, es.metric), lower_is_better(es.metric, es.mode), es.min_delta) if es else None
        metric = watched(cfg, metric) if metric else None
        if metric is not None and es is not None and metric == stopper.metric:
            best = Watch(metric, stopper.lower)
        else:
            best = Watch(metric, lower_is_better(metric)) if metric else None
        return cls(stopper, es.patience if es else None, best)

    def observe(self, step: int, result: dict[str, float], weights) -> None:
        """Take one evaluation; `weights()` gives the adapter's state dict, copied only when it is the new best."""
        if self.stopper is not None:
            self.stopper.see(step, value_of(result, self.stopper.metric))
        if self.best is not None and self.best.see(step, value_of(result, self.best.metric)):
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights().items()}
            self.best_result = dict(result)

    @property
    def should_stop(self) -> bool:
        return self.stopper is not None and self.stopper.stale >= self.patience

    def stop_reason(self) -> str:
        s = self.stopper
        if s.step is None:  # no evaluation was finite: none was ever the best
            return f"early stopping: eval {s.metric} has not been finite in any of the {s.stale} evaluations"
        return (f"early stopping: eval {s.metric} has not improved by more than min_delta {s.min_delta} "
                f"({s.direction} is better) for {s.stale} evaluations, since {s.value:.4f} at step {s.step}")

    def summary(self, trained_all: bool) -> dict:
        """What the run's summary (and manifest) says of the choice. `trained_all`: the run reached its last step,
        so it did not stop early, whatever its final evaluation (stale past the patience) says."""
        out = {}
        if self.stopper is not None:
            out["stopped_early"] = self.should_stop and not trained_all
        if self.best is not None and self.best.step is not None:
            out["best"] = {"metric": self.best.logged, "value": self.best.value, "step": self.best.step}
        return out

    # ------------------------------------------------------------------ checkpoints

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        state = {"stopper": asdict(self.stopper) if self.stopper else None,
                 "best": asdict(self.best) if self.best else None, "best_result": self.best_result}
        (directory / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        if self.best_weights is not None:
            save_file(self.best_weights, directory / WEIGHTS_FILE)

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote. Raises (KeyError, ValueError, OSError) on a file that does not fit."""
        from safetensors.torch import load_file

        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        for name in ("stopper", "best"):
            watch, saved = getattr(self, name), state[name]
            if (watch is None) != (saved is None) or (watch is not None and saved["metric"] != watch.metric):
                raise ValueError(f"the checkpoint's {name} metric differs from the recipe's")
            if watch is not None:
                setattr(self, name, Watch(**saved))
        self.best_result = state["best_result"]
        weights = directory / WEIGHTS_FILE
        self.best_weights = load_file(weights) if weights.is_file() else None
