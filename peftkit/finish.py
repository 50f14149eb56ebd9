"""The end of a training run: the final evaluation, the checks that the result is usable (finite adapter and
loss), export.best's choice, the export, the samples after fine-tuning, manifest.json, the report and the summary
table. Every process calls `finish`; only the main process writes."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from peftkit import distributed, zero
from peftkit.adapters.state_dicts import load_adapter_state_dict, nonfinite_tensors
from peftkit.checkpoint import LoopState
from peftkit.errors import PeftkitError
from peftkit.export import export
from peftkit.fileio import DiskFullError, atomic_write_json, fsync_path
from peftkit.methods import method_of
from peftkit.metrics import CLASSIFICATION_METRICS, GENERATION_METRICS, KTO_METRICS, PREFERENCE_METRICS, REWARDS
from peftkit.modeling import dtype_name
from peftkit.progress import counted, phase
from peftkit.rope_scaling import fresh_dynamic_rope
from peftkit.runtime import peak_memory_mb
from peftkit.samples import answers, print_samples, sample_prompts
from peftkit.start_eval import BASE, START, prefix, title

if TYPE_CHECKING:
    from torch import nn

    from peftkit.recipe import Recipe
    from peftkit.start import Run


RESTART = ("Lower training.lr and start again with `peftkit train RECIPE --overwrite`: --resume continues only the "
           "same recipe, which would diverge again the same way.")
"""What to do about a run that diverged (runs are deterministic, so resuming it unchanged diverges again)."""


class TrainingFailed(PeftkitError):
    """The run went through but its result is unusable (non-finite loss or weights): exit 1, nothing exported."""

    exit_code = 1


def task_metrics(cfg: Recipe) -> list[str]:
    """The metrics an evaluation reports beside the loss: a classifier's accuracy and macro-F1, a DPO run's reward
    accuracy, margin and mean rewards, else eval.metrics' generation metrics."""
    if cfg.training.objective == "kto":
        return [*KTO_METRICS[:1], *REWARDS, *KTO_METRICS[1:]]
    if cfg.training.pairs:
        return [*PREFERENCE_METRICS, *REWARDS]
    return list(CLASSIFICATION_METRICS) if cfg.classification else cfg.eval.generation_metrics


def finish(run: Run, state: LoopState, started: float, show_summary: bool) -> dict:
    """Final evaluation, the checks that the result is usable, export, manifest and summary."""
    cfg, out = run.cfg, run.out
    model = distributed.unwrap(run.accelerator, run.model)
    eval_result = run.evaluate(state.step) if run.eval_ex else None
    if run.main:
        fsync_path(run.metrics_path)
    eval_result, best_weights = _take_best(run, model, state, eval_result)
    weights = _check_finite(run, model, eval_result, state, best_weights)
    # The main process keeps the answers: the others generate only under FSDP, where each forward is a collective.
    prompts = sample_prompts(cfg, run.tok)
    generates = run.main or distributed.sharded(run.accelerator)
    texts = []
    if prompts and generates:
        with fresh_dynamic_rope(model), phase(f"Generating {counted(len(prompts), 'sample')} with the fine-tuned model "
                                              "(eval.samples)...", run.console):
            texts = answers(model, run.tok, prompts, cfg)  # as `peftkit generate` of the exported adapter answers
    if not run.main:  # the main process exports, samples and writes the manifest
        run.accelerator.wait_for_everyone()
        return {}
    evaluated = _evaluated(run, eval_result)
    try:
        # A hub base's revision as the commit that loaded: the adapter names the base it was trained on.
        model_cfg = cfg.model.model_copy(update={"revision": run.base_commit or cfg.model.revision})
        card_metrics = {k: v for k, v in run.summary.items() if k.startswith((BASE, START))} | evaluated
        exported = export(model, run.tok, cfg.model_copy(update={"adapter": run.adapter, "model": model_cfg}),
                          run.targets, out, run.method_trainer, run.labels, weights, card_metrics)
    except DiskFullError as e:
        raise DiskFullError(f"{e} Training itself finished. {run.resume_hint()}") from None
    if prompts:
        samples = run.summary.get("samples") or [{"prompt": p.text, "reference": p.reference} for p in prompts]
        for sample, text in zip(samples, texts, strict=True):
            sample["fine_tuned"] = text
        run.summary["samples"] = samples
    summary = {
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "train_loss": state.losses[-1] if state.losses else None,
        **evaluated,
        **run.summary,
        **(run.selection.summary(state.step >= run.total_steps) if run.selection else {}),
        "tokens": state.tokens,
        "elapsed_s": time.time() - started,
        "peak_mem_mb": peak_memory_mb(run.device),
    }
    _write_manifest(run, model, state, summary, exported)
    report = _write_report(run) if cfg.export.report else None
    if show_summary:
        _print_summary(run.console, summary, out, exported + ([report] if report else []), cfg.adapter.init_from)
    run.accelerator.wait_for_everyone()
    return summary


def _evaluated(run: Run, eval_result: dict | None) -> dict:
    """The final evaluation's figures as the summary names them (None where the run had no eval set)."""
    return {
        "eval_loss": eval_result["loss"] if eval_result else None,
        "eval_perplexity": eval_result["perplexity"] if eval_result and "perplexity" in eval_result else None,
        **{f"eval_{m}": eval_result[m] if eval_result else None for m in task_metrics(run.cfg)},
        **({k: v for k, v in run.record(eval_result).items() if k not in run.eval_ex.record(eval_result)}
           if eval_result else {}),  # data.eval's other sets: eval_<name>_loss, ...
    }


def _write_manifest(run: Run, model: nn.Module, state: LoopState, summary: dict, exported: list[Path]) -> None:
    """manifest.json (atomically): what the run read and wrote, with their hashes, its summary and where it ran."""
    from peftkit import manifest as manifest_mod

    cfg, out = run.cfg, run.out
    data = {split.removeprefix("data."): hashes for split, hashes in run.inputs.items() if split.startswith("data.")}
    manifest = manifest_mod.build_manifest(cfg, out, summary, exported, run.device, state.losses, data_sha256=data,
                                           base_model_sha256=run.inputs["model.name_or_path"],
                                           init_from_sha256=run.inputs.get("adapter.init_from", {}),
                                           sources_sha256={key: run.inputs[key] for key in
                                                           method_of(cfg.adapter).source_dirs(cfg.adapter)},
                                           distributed=distributed.describe(run.accelerator)
                                           | ({"trimmed_slices": True} if state.trimmed_slices else {}),
                                           base_model_commit=run.base_commit,
                                           dtype=dtype_name(model.get_input_embeddings().weight.dtype),
                                           examples_sha256=run.examples_sha256, data_form=run.data_form)
    try:
        atomic_write_json(out / "manifest.json", manifest)
    except DiskFullError as e:
        raise DiskFullError(f"{e} Training itself finished. {run.resume_hint()}") from None


def _take_best(run: Run, model, state: LoopState, eval_result: dict | None) -> tuple[dict | None, dict | None]:
    """With export.best, put the best evaluation's adapter into the model (what is sampled and merged) and return
    that evaluation's result and adapter (what is exported: under DeepSpeed's 16-bit modes the fp32 masters, which
    the model's 16-bit copy would round); else the final result and None."""
    best = run.selection.best if run.selection else None
    if best is None or best.step is None or best.step == state.step:
        return eval_result, None
    with zero.gathered(model, modify=True):
        load_adapter_state_dict(model, run.selection.best_weights)
    run.console.print(f"export.best: exporting the adapter of step {best.step} (eval {best.metric} {best.value:.4f}), "
                      f"not the final one of step {state.step}.", highlight=False)
    return run.selection.best_result, run.selection.best_weights


def _write_report(run: Run) -> Path | None:
    """report/ of the finished run. The run's results are already safe on disk: a report that fails is a
    warning, not a failed run (`peftkit report RUN_DIR` can write it again)."""
    from peftkit.report import write_report

    try:
        return write_report(run.out)
    except Exception as e:  # noqa: BLE001 - whatever breaks the plots must not undo a finished run
        run.console.print(f"[yellow]warning:[/] the report was not written ({type(e).__name__}: {escape(str(e))}); "
                          f"run `peftkit report {run.out}` to try again.", highlight=False)
        return None


def _check_finite(run: Run, model, eval_result: dict | None, state: LoopState, weights: dict | None) -> dict:
    """A run whose adapter or final eval loss is NaN/inf exports nothing and fails, whatever nan_policy says
    (skip_step keeps single bad steps out of the weights; it does not make a broken result usable). Returns the
    adapter's state dict, which the export writes: `weights` (export.best's), else the model's (gathered by every
    process under FSDP)."""
    weights = distributed.adapter_weights(model, run.saved_modules) if weights is None else weights
    bad = nonfinite_tensors(weights)
    skipped = f" ({state.skipped_steps} steps were skipped for a non-finite loss or gradients)" if state.skipped_steps else ""
    if bad:
        raise TrainingFailed(
            f"Training ended with non-finite adapter weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})"
            f"{skipped}; nothing was exported. Keep training.max_grad_norm set, or use model.dtype: float32. "
            + RESTART
        )
    if eval_result is not None and not math.isfinite(eval_result["loss"]):
        raise TrainingFailed(
            f"The final eval loss is {eval_result['loss']}{skipped}: the fine-tuned model's predictions are not "
            "finite on data.eval, so nothing was exported. Lower training.lr, keep training.max_grad_norm set, or "
            "use model.dtype: float32."
        )
    return weights


def _other_sets(s: dict) -> list[tuple[str, str]]:
    """The summary's line of each other set of data.eval (`eval_<name>_loss`): its loss, base (or an init_from run's
    start) and fine-tuned, and its eval.metrics (a classifier's accuracy and macro-F1, a DPO run's reward accuracy and
    margin)."""
    rows, before = [], prefix(s)
    for name in (k[5:-5] for k in s if k.startswith("eval_") and k.endswith("_loss") and k != "eval_loss"):
        first = s.get(f"{before}{name}_loss")
        figures = [f"{first:.4f} {'start' if before == START else 'base'} -> "] if first is not None else []
        figures.append(f"{s[f'eval_{name}_loss']:.4f}")
        if s.get(f"eval_{name}_perplexity") is not None:
            figures.append(f"  (ppl {s[f'eval_{name}_perplexity']:.2f})")
        figures += [f", {m} {s[f'eval_{name}_{m}']:.4f}" for m in (*GENERATION_METRICS, *CLASSIFICATION_METRICS,
                                                                    *PREFERENCE_METRICS, "kl")
                    if s.get(f"eval_{name}_{m}") is not None]
        rows.append((f"eval loss, {name}", "".join(figures)))
    return rows


def _print_summary(console: Console, s: dict, out: Path, exported: list[Path], init_from: str | None = None) -> None:
    """The run's figures and files: a table in a terminal; in a log (not a terminal) one `name  value` line each, so
    that no path is folded across lines where a reader copies it from. The figures before training are the base
    model's, or an adapter.init_from run's start's (`peftkit.start_eval`)."""
    from rich.table import Table
    from rich.text import Text

    rows, before = [], prefix(s)
    first = title(before == START, init_from)
    classifier = s["eval_loss"] is not None and s["eval_perplexity"] is None  # no perplexity of a class
    if s.get(f"{before}loss") is not None:
        ppl = "" if classifier else f"  (ppl {math.exp(min(s[f'{before}loss'], 700)):.2f})"
        rows.append((f"eval loss, {first}", f"{s[f'{before}loss']:.4f}{ppl}"))
    if s["eval_loss"] is not None:
        ppl = "" if classifier else f"  (ppl {s['eval_perplexity']:.2f})"
        rows.append(("eval loss, fine-tuned", f"{s['eval_loss']:.4f}{ppl}"))
    for metric in (m for m in (*GENERATION_METRICS, *CLASSIFICATION_METRICS, *PREFERENCE_METRICS, "kl")
                   if f"eval_{m}" in s):  # eval.metrics, a classifier's, a DPO run's, a KTO run's
        for who, key in ((first, f"{before}{metric}"), ("fine-tuned", f"eval_{metric}")):
            if s.get(key) is not None:
                rows.append((f"{metric}, {who}", f"{s[key]:.4f}"))
    rows += _other_sets(s)
    rows.append(("steps", f"{s['steps']}" + (f" ({s['skipped_steps']} skipped)" if s["skipped_steps"] else "")
                 + (" (stopped early)" if s.get("stopped_early") else "")))
    if best := s.get("best"):
        rows.append(("exported adapter", f"best {best['metric']} {best['value']:.4f}, step {best['step']} (export.best)"))
    since = f" (since the resume at step {s['resumed_at_step']})" if s.get("resumed_at_step") is not None else ""
    rows += [("time", f"{s['elapsed_s']:.1f} s{since}"), ("peak memory", f"{s['peak_mem_mb']:.0f} MiB{since}")]
    rows += [(path.name, str(path)) for path in exported] + [("run directory", str(out))]
    if console.is_terminal:
        table = Table(title="peftkit train: done", show_header=False)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")  # a path folds onto the next line, never cut to `/tmp/run…`
        for name, value in rows:
            table.add_row(Text(name), Text(value))  # Text: a path with [brackets] is shown, not read as markup
        console.print(table)
    else:
        width = max(len(name) for name, _ in rows)
        console.print("peftkit train: done", highlight=False)
        for name, value in rows:
            console.print(f"  {escape(name):<{width}}  {escape(value)}", soft_wrap=True, highlight=False)
    if s.get("samples"):
        print_samples(console, s["samples"], first)

