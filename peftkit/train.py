"""The training loop: recipe in, run directory out.

    seed → load tokenizer, data, model (maybe 4-bit) → base eval → seed again → inject adapters
    → optimizer/scheduler on accelerate → loop (accumulate, clip, step, log, eval, checkpoint) → export

Loss is the sum of token cross-entropies over a whole accumulation window divided by the window's
label-token count, so batch_size x grad_accum = 8 x 1 and 4 x 2 give the same gradient. A method's
regulariser (`MethodTrainer.regularizer`, e.g. AdaLoRA's orthogonality term) is added once per optimizer
step, so it keeps that property; metrics.jsonl logs it apart (`regularizer`), `loss` is the cross-entropy.

Each evaluation (the base before training, every eval_steps, the end) is `peftkit.evaluate.RunEval`: the loss,
and eval.metrics of greedy answers. Generating leaves torch's RNG as it was, so the dropout masks, and the
adapter's bits, are the same with or without eval.metrics.

Run directory (a contract other tools rely on):
    adapter/            PEFT-format adapter (adapter_model.safetensors, adapter_config.json, peftkit.json)
    merged/             full model + tokenizer (export.merged)
    checkpoints/step-N/ resumable state (adapter, optimizer, scheduler, RNG, data position, checksums)
    metrics.jsonl       one JSON object per logged step / eval
    recipe.yaml         the resolved recipe
    manifest.json       versions, hashes, seed, final metrics, sha256 of every exported file
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from peftkit.adapters import (adapter_layers, adapter_state_dict, count_parameters, inject_adapters,
                              load_adapter_state_dict, nonfinite_tensors, trainable_parameters)
from peftkit.checkpoint import LoopState, checkpoint_dirs, run_inputs, save_checkpoint
from peftkit.checkpoint import resume as resume_checkpoint
from peftkit.data import describe_stats, load_examples, micro_batches
from peftkit.data.packing import describe_packing, pack_examples
from peftkit.errors import PeftkitError
from peftkit.evaluate import RunEval, token_loss_sum
from peftkit.fileio import DiskFullError, append_line, atomic_directory, atomic_write_json, atomic_write_text, fsync_path
from peftkit.merge import base_provenance, conv1d_modules, merged_model, save_merged
from peftkit.methods import MethodTrainer, method_of
from peftkit.metrics import GENERATION_METRICS
from peftkit.modeling import DTYPES, load_model, load_tokenizer, prepare_for_training, resolve_device
from peftkit.peft_format import load_adapter, peft_config, save_adapter
from peftkit.progress import TrainProgress
from peftkit.recipe import Recipe
from peftkit.rundir import clear_run, open_run_dir, truncate_metrics
from peftkit.runtime import (build_optimizer, check_device_support, cpu_dtype_note, lr_lambda, mixed_precision,
                             optimizer_groups, peak_memory_mb, seed_everything)
from peftkit.samples import answers, sample_prompts, samples_table

# ------------------------------------------------------------------------------------------- signals


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM during the loop: finish the current optimizer step, checkpoint, stop.

    Acting on the signal where it lands would be wrong: between `optimizer.step()` and the step counter,
    or before the step's metrics line, the checkpoint would not match the weights and a resumed run would
    repeat or skip a step. So the handler only sets a flag, which the loop reads between steps. A second
    signal interrupts at once (the newest periodic checkpoint stays).
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum


# ------------------------------------------------------------------------------------------- train


class TrainingFailed(PeftkitError):
    """The run went through but its result is unusable (non-finite loss or weights): exit 1, nothing exported."""

    exit_code = 1


@dataclass
class _Run:
    """What the loop works with, built by `_setup`."""

    cfg: Recipe
    out: Path
    console: Console
    device: torch.device
    model: torch.nn.Module
    tok: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    accelerator: object
    train_ex: list
    eval_ex: RunEval | None
    """data.eval's loss examples and eval.metrics' prompts; None without data.eval."""
    targets: list[str]
    inputs: dict
    total_steps: int
    summary: dict = field(default_factory=dict)
    method_trainer: MethodTrainer | None = None
    """What the adapter method adds to the loop (`Method.trainer`): a regulariser, an after-step hook, state."""

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def checkpoint(self, state: LoopState) -> Path:
        try:
            return save_checkpoint(self.out, self.accelerator.unwrap_model(self.model), self.cfg.adapter.modules_to_save,
                                   self.optimizer, self.scheduler, state, self.inputs, self.cfg.training.save_total_limit,
                                   self.method_trainer)
        except DiskFullError as e:
            raise DiskFullError(f"{e} {self.resume_hint()}") from None

    def resume_hint(self) -> str:
        ckpts = checkpoint_dirs(self.out)
        if not ckpts:
            return "No checkpoint was written yet, so the run starts again from step 0 (set training.save_steps)."
        return f"The newest whole checkpoint is {ckpts[-1].name}: continue with `peftkit train RECIPE --resume`."

    def evaluate(self, step: int) -> dict:
        result = self.eval_ex(self.model, self.accelerator.unwrap_model(self.model))
        append_line(self.metrics_path, json.dumps({"step": step, **self.eval_ex.record(result)}), sync=False)
        return result


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False, console: Console | None = None,
          show_summary: bool = True) -> dict:
    """Run a recipe end to end and return the summary (also in manifest.json).

    Args:
        recipe: a validated recipe (see `peftkit.recipe.load_recipe`).
        resume: continue from the newest intact checkpoint in the output directory.
        overwrite: replace a run of another recipe found in the output directory (never the user's files).
        console: where progress and the summary go.
        show_summary: print the closing table (`verify` re-runs in a temporary directory and says its own).
    """
    console = console or Console()
    out = Path(recipe.export.output_dir)
    with open_run_dir(out, recipe.to_yaml(), resume, overwrite, console):
        started = time.time()
        run = _setup(recipe, out, resume, console)
        # Only now, with data and model loaded, does the directory become this recipe's run.
        if not resume:
            clear_run(out)
        atomic_write_text(out / "recipe.yaml", recipe.to_yaml())
        state = LoopState()
        if resume:
            ckpt, state = resume_checkpoint(out, run.model, run.optimizer, run.scheduler, run.inputs, console,
                                            run.method_trainer)
            truncate_metrics(run.metrics_path, state.step, run.total_steps)
            console.print(f"Resumed from {ckpt.name} (step {state.step} of {run.total_steps}).")
        _loop(run, state)
        return _finish(run, state, started, show_summary)


def _setup(cfg: Recipe, out: Path, resume: bool, console: Console) -> _Run:
    """Seed, check the device and memory, load data and model, evaluate the base, inject the adapter and
    build the optimizer: everything that can fail before the run directory is touched."""
    from accelerate import Accelerator

    from peftkit.memory import check_fits, estimate_memory, print_estimate

    tcfg = cfg.training
    seed_everything(tcfg.seed, tcfg.deterministic)
    device = resolve_device(cfg.model.device)
    check_device_support(cfg, device)
    if note := cpu_dtype_note(cfg, device):
        console.print(f"[yellow]note:[/] {note}")
    estimate = estimate_memory(cfg, device)
    print_estimate(console, estimate)
    check_fits(estimate, device)
    tok = load_tokenizer(cfg.model)
    train_ex, train_stats = load_examples(tok, cfg.data.train, cfg.data.train_split, cfg.data)
    eval_ex = None
    if cfg.data.eval:  # the loss examples, and eval.metrics' prompts: a data mistake shows before the model loads
        eval_ex = RunEval.of(cfg, tok, load_examples(tok, cfg.data.eval, cfg.data.eval_split, cfg.data)[0])
    for line in describe_stats(train_stats, cfg.data):
        console.print(line, markup=False, highlight=False, style="yellow" if line.startswith("warning:") else None)
    if cfg.data.packing:
        packed = pack_examples(train_ex, cfg.data.max_length)
        console.print(describe_packing(train_ex, packed, cfg.data.max_length), highlight=False)
        train_ex = packed
    inputs = run_inputs(cfg)

    with console.status("Loading model..."):
        model = load_model(cfg.model, cfg.quantization, device)
    summary = {"base_eval_loss": None} | {f"base_eval_{m}": None for m in cfg.eval.generation_metrics}
    if eval_ex and cfg.eval.base_model and not resume:
        n = len(eval_ex)
        with console.status(f"Evaluating the base model on {n} examples (eval.base_model: true)..."):
            base = eval_ex(model)
        console.print(f"base model: {eval_ex.describe(base)} on {n} examples", highlight=False)
        summary |= {k: v for k, v in eval_ex.record(base, "base_eval_").items() if k != "base_eval_perplexity"}
        if prompts := sample_prompts(cfg, tok):
            with console.status(f"Generating {len(prompts)} samples with the base model (eval.samples)..."):
                summary["samples"] = [{"prompt": p.text, "reference": p.reference, "base": text}
                                      for p, text in zip(prompts, answers(model, tok, prompts, cfg), strict=True)]

    # Seed again right before the adapter is drawn: its init must not depend on what loading consumed.
    torch.manual_seed(tcfg.seed)
    # An adapter to start from may list targets for other architectures (peft's generic defaults); its
    # weights decide, and load_adapter_state_dict refuses any that do not land (as for `peftkit eval`).
    targets = inject_adapters(model, cfg.adapter, every_entry=not cfg.adapter.init_from)
    if cfg.adapter.init_from:
        load_adapter_state_dict(model, load_adapter(cfg.adapter.init_from)[1])
    prepare_for_training(model, tcfg.gradient_checkpointing)
    summary["trainable_params"], summary["total_params"] = trainable, total = count_parameters(model)
    where = f" on {len(targets)} modules" if targets else ""  # the prompt family adapts the model as a whole
    console.print(f"{method_of(cfg.adapter).describe(cfg.adapter)}{where}: {trainable:,} trainable "
                  f"of {total:,} parameters ({100 * trainable / total:.3f}%)")

    per_epoch = -(-len(train_ex) // tcfg.batch_size)
    total_steps = tcfg.max_steps or max(1, (tcfg.epochs * per_epoch) // tcfg.grad_accum)
    method_trainer = method_of(cfg.adapter).trainer(model, cfg.adapter, total_steps)
    optimizer = build_optimizer(tcfg, optimizer_groups(tcfg, model), device, console)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, total_steps))
    accelerator = Accelerator(mixed_precision=mixed_precision(tcfg, device), cpu=device.type == "cpu")
    model, optimizer = accelerator.prepare(model, optimizer)
    return _Run(cfg, out, console, device, model, tok, optimizer, scheduler, accelerator, train_ex, eval_ex, targets,
                inputs, total_steps, summary, method_trainer)


def _loop(run: _Run, state: LoopState) -> None:
    """Optimizer steps from `state.step` to the end: accumulate, clip, step, log, evaluate, checkpoint."""
    cfg, tcfg = run.cfg, run.cfg.training
    stream = micro_batches(run.train_ex, tcfg.batch_size, tcfg.seed, cfg.data.shuffle, run.tok.pad_token_id,
                           start=state.step * tcfg.grad_accum, num_workers=cfg.data.num_workers)
    run.model.train()
    window_start, window_tokens = time.time(), 0
    with StopRequest() as stop, TrainProgress(run.console, run.total_steps, state.step) as progress:
        while state.step < run.total_steps:
            if stop.signal is not None:
                path = run.checkpoint(state)
                raise PeftkitError(
                    f"{'Interrupted' if stop.signal == signal.SIGINT else 'Stopped by SIGTERM'} at step "
                    f"{state.step}; checkpoint saved to {path}. Continue with `peftkit train RECIPE --resume`."
                )
            window = [next(stream) for _ in range(tcfg.grad_accum)]
            tokens = sum(int(b["attention_mask"].sum()) for b in window)  # counted on CPU: no device sync
            window_tokens += tokens
            loss_value, grad_norm, regularizer = _step(run, window, tokens, state)
            if loss_value is None:
                continue
            if state.step % tcfg.log_steps == 0 or state.step == run.total_steps:
                tps = window_tokens / max(time.time() - window_start, 1e-9)
                lr = run.scheduler.get_last_lr()[0]
                record = {"step": state.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                          "tokens": state.tokens, "tokens_per_s": tps, "peak_mem_mb": peak_memory_mb(run.device)}
                if regularizer is not None:
                    record["regularizer"] = regularizer
                append_line(run.metrics_path, json.dumps(record), sync=False)
                progress.update(state.step, loss_value, lr, tps)
                window_start, window_tokens = time.time(), 0
            if run.eval_ex and tcfg.eval_steps and state.step % tcfg.eval_steps == 0 and state.step < run.total_steps:
                result = run.evaluate(state.step)
                progress.note(f"step {state.step}: {run.eval_ex.describe(result)}")
            if tcfg.save_steps and state.step % tcfg.save_steps == 0:
                run.checkpoint(state)


def _step(run: _Run, window: list[dict], tokens: int, state: LoopState) -> tuple[float | None, float | None, float | None]:
    """One optimizer step over the micro-batches of `window`; (loss, grad norm, the method's regulariser or None),
    or (None, None, None) when a non-finite loss was skipped (training.nan_policy: skip_step)."""
    tcfg, accelerator = run.cfg.training, run.accelerator
    n_label = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
    loss_sum = torch.zeros((), device=accelerator.device)
    for batch in window:
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        loss, _ = token_loss_sum(run.model, batch)
        accelerator.backward(loss / n_label)
        loss_sum += loss.detach()
    loss_value = float(loss_sum) / n_label  # one device sync per optimizer step
    reg_value = _regularize(run)
    if not math.isfinite(loss_value + (reg_value or 0.0)):
        run.optimizer.zero_grad(set_to_none=True)
        if tcfg.nan_policy == "stop":
            ckpts = checkpoint_dirs(run.out)
            raise PeftkitError(
                f"Loss became {loss_value} at step {state.step + 1}; training stopped. "
                + (f"The last good checkpoint is {ckpts[-1]} (resume with --resume after lowering training.lr). "
                   if ckpts else "No checkpoint was written (set training.save_steps). ")
                + "Set training.nan_policy: skip_step to skip such steps instead."
            )
        state.skipped_steps += 1
        run.console.print(f"[yellow]step {state.step + 1}: loss {loss_value}, step skipped[/]")
        state.step += 1
        run.scheduler.step()
        return None, None, None
    grad_norm = None
    if tcfg.max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(trainable_parameters(run.model), tcfg.max_grad_norm))
    run.optimizer.step()
    run.scheduler.step()
    if run.method_trainer is not None:
        run.method_trainer.after_step(state.step + 1)  # peft's place for AdaLoRA's allocator: gradients still here
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += tokens
    state.losses.append(loss_value)
    return loss_value, grad_norm, reg_value


def _regularize(run: _Run) -> float | None:
    """Backpropagate the method's regulariser, once for the whole step; its value, or None without one."""
    reg = run.method_trainer.regularizer() if run.method_trainer is not None else None
    if reg is None:
        return None
    run.accelerator.backward(reg)
    return float(reg.detach())


def _finish(run: _Run, state: LoopState, started: float, show_summary: bool) -> dict:
    """Final evaluation, the checks that the result is usable, export, manifest and summary."""
    from peftkit import manifest as manifest_mod

    cfg, out = run.cfg, run.out
    model = run.accelerator.unwrap_model(run.model)
    eval_result = run.evaluate(state.step) if run.eval_ex else None
    fsync_path(run.metrics_path)
    _check_finite(run, model, eval_result, state)
    try:
        exported = export(model, run.tok, cfg, run.targets, out, run.method_trainer)
    except DiskFullError as e:
        raise DiskFullError(f"{e} Training itself finished; {run.resume_hint()}") from None
    if prompts := sample_prompts(cfg, run.tok):
        samples = run.summary.get("samples") or [{"prompt": p.text, "reference": p.reference} for p in prompts]
        for sample, text in zip(samples, answers(model, run.tok, prompts, cfg), strict=True):
            sample["fine_tuned"] = text
        run.summary["samples"] = samples
    summary = {
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "train_loss": state.losses[-1] if state.losses else None,
        "eval_loss": eval_result["loss"] if eval_result else None,
        "eval_perplexity": eval_result["perplexity"] if eval_result else None,
        **{f"eval_{m}": eval_result[m] if eval_result else None for m in run.cfg.eval.generation_metrics},
        **run.summary,
        "tokens": state.tokens,
        "elapsed_s": time.time() - started,
        "peak_mem_mb": peak_memory_mb(run.device),
    }
    data = {split.removeprefix("data."): hashes for split, hashes in run.inputs.items() if split.startswith("data.")}
    manifest = manifest_mod.build_manifest(cfg, out, summary, exported, run.device, state.losses, data_sha256=data,
                                           base_model_sha256=run.inputs["model.name_or_path"],
                                           init_from_sha256=run.inputs.get("adapter.init_from", {}))
    atomic_write_json(out / "manifest.json", manifest)
    report = _write_report(run) if cfg.export.report else None
    if show_summary:
        _print_summary(run.console, summary, out, exported + ([report] if report else []))
    return summary


def _write_report(run: _Run) -> Path | None:
    """report/ of the finished run. The run's results are already safe on disk: a report that fails is a
    warning, not a failed run (`peftkit report RUN_DIR` can write it again)."""
    from peftkit.report import write_report

    try:
        return write_report(run.out)
    except Exception as e:  # noqa: BLE001 - whatever breaks the plots must not undo a finished run
        run.console.print(f"[yellow]warning:[/] the report was not written ({type(e).__name__}: {e}); "
                          f"run `peftkit report {run.out}` to try again.", highlight=False)
        return None


def _check_finite(run: _Run, model, eval_result: dict | None, state: LoopState) -> None:
    """A run whose adapter or final eval loss is NaN/inf exports nothing and fails, whatever nan_policy says
    (skip_step keeps single bad steps out of the weights; it does not make a broken result usable)."""
    bad = nonfinite_tensors(adapter_state_dict(model, run.cfg.adapter.modules_to_save))
    skipped = f" ({state.skipped_steps} steps were skipped for a non-finite loss)" if state.skipped_steps else ""
    if bad:
        raise TrainingFailed(
            f"Training ended with non-finite adapter weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})"
            f"{skipped}; nothing was exported. Lower training.lr, keep training.max_grad_norm set, or use "
            "model.dtype: float32. " + run.resume_hint().replace("continue with", "you can continue from it with")
        )
    if eval_result is not None and not math.isfinite(eval_result["loss"]):
        raise TrainingFailed(
            f"The final eval loss is {eval_result['loss']}{skipped}: the fine-tuned model's predictions are not "
            "finite on data.eval, so nothing was exported. Lower training.lr, keep training.max_grad_norm set, or "
            "use model.dtype: float32."
        )


def export(model, tok, cfg: Recipe, targets: list[str], out: Path, method_trainer: MethodTrainer | None = None) -> list[Path]:
    """Write adapter/ and/or merged/ as the recipe asks; returns the exported directories. `method_trainer`
    fills in what only the run knows (AdaLoRA: its length and rank pattern, with the pruned triplets cut)."""
    exported = []
    if cfg.export.adapter:
        adapter, state = cfg.adapter, adapter_state_dict(model, cfg.adapter.modules_to_save)
        if method_trainer is not None:
            adapter, state = method_trainer.export(adapter, state)
        config = peft_config(adapter, targets, _base_name(cfg), bool(conv1d_modules(model)), model.config.model_type,
                             revision=cfg.model.revision, model_config=model.config)
        state, config = method_of(cfg.adapter).for_original_base(adapter_layers(model), state, config)
        with atomic_directory(out / "adapter") as tmp:
            save_adapter(tmp, state, config, cfg.quantization, quantized_on=_device_of(model).type,
                         trust_remote_code=cfg.model.trust_remote_code)
        exported.append(out / "adapter")
    if cfg.export.merged:
        dtype = DTYPES[cfg.export.merged_dtype or _load_dtype(cfg, model)]
        save_merged(merged_model(model, cfg.adapter, dtype), tok, out / "merged",
                    base_provenance(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code))
        exported.append(out / "merged")
    return exported


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _base_name(cfg: Recipe) -> str:
    return cfg.model.name_or_path


def _load_dtype(cfg: Recipe, model) -> str:
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    dtype = getattr(model.config, "dtype", None) or torch.float32
    return str(dtype).removeprefix("torch.")


def _print_summary(console: Console, s: dict, out: Path, exported: list[Path]) -> None:
    from rich.table import Table

    table = Table(title="peftkit train: done", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # a path folds onto the next line, never cut to `/tmp/run…` in a log
    if s["base_eval_loss"] is not None:
        table.add_row("eval loss, base model", f"{s['base_eval_loss']:.4f}  (ppl {math.exp(min(s['base_eval_loss'], 700)):.2f})")
    if s["eval_loss"] is not None:
        table.add_row("eval loss, fine-tuned", f"{s['eval_loss']:.4f}  (ppl {s['eval_perplexity']:.2f})")
    for metric in (m for m in GENERATION_METRICS if f"eval_{m}" in s):  # eval.metrics
        for who, key in (("base model", f"base_eval_{metric}"), ("fine-tuned", f"eval_{metric}")):
            if s.get(key) is not None:
                table.add_row(f"{metric}, {who}", f"{s[key]:.4f}")
    table.add_row("steps", f"{s['steps']}" + (f" ({s['skipped_steps']} skipped)" if s["skipped_steps"] else ""))
    table.add_row("time", f"{s['elapsed_s']:.1f} s")
    table.add_row("peak memory", f"{s['peak_mem_mb']:.0f} MiB")
    for path in exported:
        table.add_row(path.name, str(path))
    table.add_row("run directory", str(out))
    console.print(table)
    if s.get("samples"):
        console.print(samples_table(s["samples"]))
