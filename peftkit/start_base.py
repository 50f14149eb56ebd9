"""The base model's passes at the start of a run (`peftkit.start.setup`), before training changes it: a preference
objective's reference log-probabilities (DPO, KTO), and eval.base_model's evaluation and samples for the summary (with
adapter.init_from, of the base with that adapter: `peftkit.start_eval`)."""

from __future__ import annotations

from rich.console import Console

from peftkit.data.preference import Pairs
from peftkit.errors import PeftkitError
from peftkit.preference import nonfinite_references
from peftkit.progress import counted, phase
from peftkit.recipe import Recipe
from peftkit.samples import answers, sample_prompts
from peftkit.start_eval import BASE, START, title


def _reference_logps(cfg: Recipe, model, tok, train_ex: Pairs, evals: dict, accelerator, console: Console) -> None:
    """training.objective: dpo (kto): the reference model's log-probabilities of the answers of data.train's pairs and of
    each set of data.eval's, set on them (`peftkit.preference`): `model` as training starts from it, the base (before
    the adapter is injected) or, with adapter.init_from, the base with that adapter (after; with
    adapter.layer_replication, the stacked base with its LoRAs, zero at the start). (A DPO run has no base
    evaluation: its reference's loss is log 2 and its rewards 0 by definition.)"""
    from peftkit.preference import reference_logps

    sets = {"data.train": train_ex} | {cfg.data.eval_setting(name): evaluation.pairs
                                       for name, evaluation in evals.items()}
    processes = accelerator if accelerator.num_processes > 1 else None
    what = ("adapter.init_from's adapter" if cfg.adapter.init_from else "the base model, its layers stacked"
            if getattr(cfg.adapter, "layer_replication", None) else "the base model")
    items = "answers and their mismatched examples" if cfg.training.objective == "kto" else "answer pairs"
    with phase(f"Computing the reference ({what}) log-probabilities of {sum(map(len, sets.values()))} {items} "
               f"(training.objective: {cfg.training.objective})...", console):
        for key, pairs in sets.items():
            pairs.reference = reference_logps(model, pairs, cfg.eval.batch_size, tok.pad_token_id, processes,
                                              fresh_rope=key != "data.train")  # (eval: as `PreferenceEval`)
            if (bad := nonfinite_references(pairs.reference)) is not None:
                (count, first), pair = bad, "answer" if cfg.training.objective == "kto" else "pair"
                raise PeftkitError(
                    f"The reference ({what}) gives {count} of the {len(pairs)} {pair}s of {key} a "
                    f"log-probability that is not finite (the first: {pair} {first + 1} as kept): the model overflows "
                    f"at model.dtype {cfg.model.dtype}, or its weights hold inf or nan. "
                    f"{cfg.training.objective.upper()} would stop at its first "
                    "step ('Loss became nan'). Load it in float32 or bfloat16 rather than float16, and check the "
                    "model's weights.")


def _evaluate_base(cfg: Recipe, model, tok, evals: dict, accelerator, console: Console, start: bool = False) -> dict:
    """eval.base_model: the base model's eval loss and metrics on each set of data.eval (`base_eval_loss`, ...,
    `base_eval_<name>_loss`, ...), and eval.samples' base answers, for the summary; `start`: the model an
    adapter.init_from run starts from, the base with that adapter (`start_eval_loss`, ..., `peftkit.start_eval`)."""
    summary, who, what = {}, title(start, cfg.adapter.init_from), _what(start)
    for i, (name, evaluation) in enumerate(evals.items()):
        n = len(evaluation)
        prefix = (START if start else BASE) + ("" if i == 0 else f"{name}_")
        shown = "" if i == 0 else f" of data.eval.{name}"
        with phase(f"Evaluating {what} on {n} examples{shown} (eval.base_model: true)...", console):
            base = evaluation(model)
        console.print(f"{who}: {evaluation.describe(base)} on {n} examples{shown}", highlight=False)
        summary |= {k: v for k, v in evaluation.record(base, prefix).items() if k != f"{prefix}perplexity"}
    return summary | _base_samples(cfg, model, tok, accelerator, console, start)


def _base_samples(cfg: Recipe, model, tok, accelerator, console: Console, start: bool = False) -> dict:
    """{'samples': eval.samples' prompts, references and base answers} for the summary, or {}; `start`: the answers
    of the base with adapter.init_from's adapter, as `start`. The answers go into the main process's summary; the
    model is not sharded yet, so only it generates."""
    if not accelerator.is_main_process or not (prompts := sample_prompts(cfg, tok)):
        return {}
    with phase(f"Generating {counted(len(prompts), 'sample')} with {_what(start)} (eval.samples)...", console):
        return {"samples": [{"prompt": p.text, "reference": p.reference, "start" if start else "base": text}
                            for p, text in zip(prompts, answers(model, tok, prompts, cfg), strict=True)]}


def _what(start: bool) -> str:
    """The model evaluated before training, as the progress lines name it."""
    return "the base with adapter.init_from's adapter (the run's start)" if start else "the base model"
