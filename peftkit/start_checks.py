"""The checks at the start of a run (`peftkit.start.setup`) that need the data read: the run's optimizer steps from
its examples, a warmup longer than the run refused, and warnings where training.eval_steps, early stopping,
export.best or training.save_steps cannot act in them, or LoRA+'s embedding rate is ignored. The recipe's own checks
(`peftkit.recipe`) cannot see the step count."""

from __future__ import annotations

import warnings

from peftkit.data import steps_per_epoch
from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.recipe import Recipe
from peftkit.runtime import warmup_steps


def _total_steps(tcfg, examples: int, processes: int) -> int:
    """training.max_steps, or `epochs` whole passes over the (packed) training examples; a warmup longer than the
    run, which the recipe's check cannot see without the data, is refused here, before the model loads."""
    total = tcfg.max_steps or tcfg.epochs * steps_per_epoch(examples, tcfg.batch_size * processes, tcfg.grad_accum)
    if tcfg.warmup_steps > total:
        raise PeftkitError(f"training.warmup_steps ({tcfg.warmup_steps}) is larger than the run's {total} optimizer "
                           f"steps (training.epochs {tcfg.epochs} over {examples:,} training examples, batch_size "
                           f"{tcfg.batch_size} x grad_accum {tcfg.grad_accum} x {processes} process(es)), so the "
                           "learning rate would never reach training.lr; lower warmup_steps.")
    if warmup_steps(tcfg, total) == total > 1:
        key = "warmup_steps" if tcfg.warmup_steps else f"warmup_ratio ({tcfg.warmup_ratio}, rounded up)"
        warnings.warn(PeftkitWarning(f"training.{key} ({total}) is the whole run: the learning rate rises at "
                                     f"every step and ends at {total}/{total + 1} of training.lr, never reaching it; "
                                     f"lower {key.split()[0]}."), stacklevel=2)
    return total


def _check_loraplus(tcfg) -> None:
    """training.loraplus_lr_embedding other than its default without loraplus_lr_ratio is ignored (LoRA+ is off:
    every parameter trains at training.lr). A warning, not a recipe error: the recipe.yaml of a run made before it
    was said must still load (`peftkit eval RUN_DIR`, --resume, verify's re-run)."""
    rate = tcfg.loraplus_lr_embedding
    if tcfg.loraplus_lr_ratio is None and rate != type(tcfg).model_fields["loraplus_lr_embedding"].default:
        warnings.warn(PeftkitWarning(
            f"training.loraplus_lr_embedding: {rate:g} is the learning rate of an embedding's LoRA under LoRA+, and "
            "training.loraplus_lr_ratio is null (LoRA+ off: every parameter trains at training.lr), so it is "
            "ignored; set loraplus_lr_ratio (e.g. 16), or remove loraplus_lr_embedding."), stacklevel=2)


def _check_evaluations(cfg: Recipe, total: int) -> None:
    """A warning where training.eval_steps evaluates nothing, or leaves early stopping or export.best too few
    evaluations in the run's `total` steps to act on (the recipe's check, `Recipe._check_selection`, only sees that
    there are some). Warnings, not recipe errors (transformers' Trainer refuses eval steps without eval data): the
    recipe.yaml of a run made before them must still load (`peftkit eval RUN_DIR`, --resume)."""
    tcfg, best, es = cfg.training, cfg.best_metric, cfg.training.early_stopping
    if tcfg.eval_steps and not cfg.data.eval:
        warnings.warn(PeftkitWarning(f"training.eval_steps is {tcfg.eval_steps}, but this recipe has no data.eval to "
                                     "evaluate on, so nothing is evaluated during training; set data.eval, or remove "
                                     "training.eval_steps."), stacklevel=2)
    if es is None and best is None:
        return
    during = (total - 1) // tcfg.eval_steps  # evaluations before the last step (the end's cannot stop the run)
    run = f"training.eval_steps {tcfg.eval_steps} makes {during} evaluation(s) before the run's last step ({total})"
    if es is not None and during <= es.patience:  # a first evaluation to improve on, then `patience` without
        warnings.warn(PeftkitWarning(f"training.early_stopping.patience is {es.patience}, and {run}: too few for it "
                                     f"ever to stop the run, which needs {es.patience + 1}; lower eval_steps or "
                                     "patience."), stacklevel=2)
    if best is not None and during == 0:
        warnings.warn(PeftkitWarning(f"export.best: {run}, so the final evaluation is the only one and its adapter, "
                                     "the final one, is exported; lower eval_steps."), stacklevel=2)


def _check_checkpoints(tcfg, total: int) -> None:
    """A warning where training.save_steps is longer than the run: no checkpoint is ever written, so a run killed or
    stopped midway has nothing to --resume from (a warning, as `_check_evaluations`: the step count depends on the
    data, which the recipe's checks do not read)."""
    if tcfg.save_steps and tcfg.save_steps > total:
        warnings.warn(PeftkitWarning(f"training.save_steps is {tcfg.save_steps}, longer than the run's {total} steps, "
                                     "so no checkpoint is written and a run stopped midway cannot --resume; lower "
                                     "save_steps."), stacklevel=2)
