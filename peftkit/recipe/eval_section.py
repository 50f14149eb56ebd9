"""The recipe's `eval` section: evaluation during and after training (the base model's, generated samples, task
metrics of generated answers)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from peftkit.metrics import CLASSIFICATION_METRICS, GENERATION_METRICS, METRICS
from peftkit.section import Section

class EvalConfig(Section):
    """Evaluation during and after training."""

    batch_size: int = Field(8, gt=0)
    base_model: bool = True
    """Also evaluate the base model before training, so the summary shows base vs fine-tuned loss."""
    samples: int = Field(3, ge=0)
    """Generate greedily for the first N rows of data.eval, with the base model (before training, when
    base_model is true) and the fine-tuned one: the summary shows them side by side. 0: off."""
    max_new_tokens: int = Field(64, gt=0)
    """Longest generated answer of `samples` and of `metrics`, in tokens."""
    metrics: list[str] = Field(default_factory=list)
    """Task metrics of the model's greedy answers to data.eval's prompts (`exact_match`, `token_f1`, `rouge_l`:
    `peftkit.metrics`), computed with the eval loss at every eval (training.eval_steps, the end, and the base
    model before training) and logged as `eval_<name>`. `loss` and `perplexity` are always computed; for
    model.task: sequence_classification, `loss`, `accuracy` and `macro_f1` (listing them here changes nothing)."""
    normalize: Literal["squad", "strip", "none"] = "squad"
    """Normalisation of answer and reference before `exact_match` / `token_f1` (as `peftkit eval --normalize`)."""

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            raise ValueError(f"eval.metrics: {', '.join(map(repr, unknown))} is not a metric peftkit computes; "
                             f"choose from {', '.join(GENERATION_METRICS + CLASSIFICATION_METRICS)} (loss and "
                             "perplexity are always computed; accuracy and macro_f1 always for classification)")
        return list(dict.fromkeys(names))

    @property
    def generation_metrics(self) -> list[str]:
        """The metrics of `metrics` that need generated answers, in the order given."""
        return [m for m in self.metrics if m in GENERATION_METRICS]
