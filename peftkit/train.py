"""The training loop: recipe in, run directory out.

    seed → load tokenizer, data, model (maybe 4-bit) → base eval → seed again → inject adapters
    (adapter.init_from: inject, then evaluate the base with that adapter, the run's start)
    → optimizer/scheduler on accelerate → loop (accumulate, clip, step, log, eval, checkpoint) → export

Loss is the sum of token cross-entropies over a whole accumulation window divided by the window's
label-token count, so batch_size x grad_accum = 8 x 1 and 4 x 2 give the same gradient. A method's
regulariser (`MethodTrainer.regularizer`, e.g. AdaLoRA's orthogonality term) is added once per optimizer
step, so it keeps that property; metrics.jsonl logs it apart (`regularizer`), `loss` is the cross-entropy. A
method's term of a micro-batch (`MethodTrainer.batch_loss`, ShadowPEFT's auxiliary loss on its forward's shadow state)
is a sum over the labelled tokens added to that micro-batch's before the division: trained on, not logged.

Each evaluation (the base before training, every eval_steps, the end) is `peftkit.evaluate.RunEval`: the loss,
and eval.metrics of greedy answers. Generating leaves torch's RNG as it was, so the dropout masks, and the
adapter's bits, are the same with or without eval.metrics.

Run directory (a contract other tools rely on):
    adapter/            PEFT-format adapter (adapter_model.safetensors, adapter_config.json, peftkit.json)
    merged/             full model + tokenizer (export.merged)
    checkpoints/step-N/ resumable state (adapter, optimizer, scheduler, RNG, data position, checksums)
    metrics.jsonl       one JSON object per logged step / eval
    recipe.yaml         the resolved recipe (a hub adapter as user/name@COMMIT, the commit read)
    manifest.json       versions, hashes, seed, final metrics, sha256 of every exported file
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from peftkit import distributed, zero
from peftkit.adapters import trainable_parameters
from peftkit.checkpoint import LoopState, also_at, checkpoint_dirs, read_adapters
from peftkit.checkpoint import resume as resume_checkpoint
from peftkit.classify import example_loss_sum
from peftkit.data import step_windows
from peftkit.data.classification import ClassificationCollator
from peftkit.data.packing import flatten
from peftkit.errors import PeftkitError, Stopped
from peftkit.evaluate import token_loss_sum
from peftkit.loss import LOGITS_FROM, labelled_count, logits_from
from peftkit.preference import objective_loss
from peftkit.finish import RESTART, TrainingFailed, finish  # noqa: F401 (TrainingFailed: part of this module's API)
from peftkit.fileio import atomic_write_text, unlink_durably
from peftkit.progress import TrainProgress
from peftkit.push import check_recipe_push, push_run
from peftkit.recipe import Recipe, recorded
from peftkit.rundir import clear_run, metrics_records, open_run_dir, truncate_metrics
from peftkit.runtime import nondeterministic_op_error, peak_memory_mb, pin_cublas_workspace, scheduled_lr
from peftkit.start import Run, make_accelerator, setup
from peftkit.trackers import Trackers

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


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False, console: Console | None = None,
          show_summary: bool = True, cache: bool = True) -> dict:
    """Run a recipe end to end and return the summary (also in manifest.json).

    Args:
        recipe: a validated recipe (see `peftkit.recipe.load_recipe`).
        resume: continue from the newest intact checkpoint in the output directory.
        overwrite: replace a run of another recipe found in the output directory (never the user's files).
        console: where progress and the summary go.
        show_summary: print the closing table (`verify` re-runs in a temporary directory and says its own).
        cache: read and keep the tokenized data in the cache (`peftkit.data.cache`); False tokenizes it anew.
    """
    out = Path(recipe.export.output_dir)
    if recipe.export.push_to_hub:  # before anything trains: a run whose end could push nothing is refused now
        check_recipe_push(recipe.export)
    cublas_note = pin_cublas_workspace(recipe.training.deterministic, recipe.model.device)  # before CUDA starts
    accelerator = make_accelerator(recipe, out)
    console = (console or Console()) if accelerator.is_main_process else Console(quiet=True)
    if cublas_note:
        console.print(f"[yellow]note:[/] {escape(cublas_note)}")
    record = recorded(recipe).to_yaml()  # (its hub adapters pinned to the commits read, not this machine's snapshots)
    run_dir = (open_run_dir(out, record, resume, overwrite, console) if accelerator.is_main_process
               else contextlib.nullcontext())  # one writer: the main process holds the directory
    with run_dir:
        accelerator.wait_for_everyone()  # the directory is checked and tidied before any process reads it
        if resume and not accelerator.is_main_process:
            distributed.check_sees_checkpoints(out, accelerator.process_index)
        started = time.time()
        run = setup(recipe, out, resume, console, accelerator, cache)
        # Only now, with data and model loaded, does the directory become this recipe's run.
        if run.main and not resume:
            clear_run(out)
        if run.main and not resume:
            atomic_write_text(out / "recipe.yaml", record)
        accelerator.wait_for_everyone()
        state = LoopState(trimmed_slices=distributed.trims_slices(
            run.cfg, distributed.unwrap(accelerator, run.model).config, accelerator.num_processes))
        if resume:
            state = _resumed(run, out, console)
            if run.main:  # (after the checkpoint's inputs are checked: a refused resume leaves the run's recipe.yaml)
                atomic_write_text(out / "recipe.yaml", record)
        if recipe.training.report_to and run.main:
            run.trackers = Trackers(run.accelerator, recipe, out, (state.step, metrics_records(run.metrics_path))
                                    if resume else None)
        try:
            with nondeterministic_op_error():
                _loop(run, state)
            summary = finish(run, state, started, show_summary)
        except BaseException as e:
            if run.trackers is not None:
                run.trackers.close(ended_by=e)
            raise
        if run.trackers is not None:
            run.trackers.close()
        if run.main and recipe.export.push_to_hub:  # the run's files are written: a failed push loses none of them
            push_run(out, recipe.export, console)
        return summary


def _resumed(run: Run, out: Path, console: Console) -> LoopState:
    """The loop's state from the newest intact checkpoint, loaded into the model, optimizer and scheduler; the run
    directory made unfinished again (no manifest, metrics.jsonl cut back to the checkpoint)."""
    accelerator = run.accelerator
    ckpt, state = resume_checkpoint(out, distributed.unwrap(accelerator, run.model), run.optimizer, run.scheduler,
                                    run.inputs, console, run.method_trainer, run.selection, accelerator.process_index,
                                    accelerator.num_processes, hub_model=None if run.base_commit is None
                                    else run.cfg.model.name_or_path,
                                    sources=read_adapters(run.cfg.adapter))
    if state.step > run.total_steps:  # the recipe and data are the run's (checked): not a checkpoint of it
        raise PeftkitError(f"{ckpt} is at step {state.step}, past this run's {run.total_steps} steps: no run of "
                           "this recipe made it (it was added to the run directory). Remove it to resume "
                           "from the checkpoint before it.")
    if run.main:
        # A finished run is unfinished again until `finish` writes its manifest: killed from here on, it no
        # longer looks finished (with metrics.jsonl cut back to the checkpoint, it no longer verified).
        unlink_durably(out / "manifest.json")
        truncate_metrics(run.metrics_path, state.step, state.step if run.stopped_early else run.total_steps)
    run.summary["resumed_at_step"] = state.step  # elapsed_s and peak_mem_mb are this process's
    console.print(f"Resumed from {ckpt.name} (step {state.step} of {run.total_steps})."
                  + (" The run had finished: its final evaluation and exports are made again."
                     if state.step >= run.total_steps or run.stopped_early else ""))
    return state


def _loop(run: Run, state: LoopState) -> None:
    """Optimizer steps from `state.step` to the end: accumulate, clip, step, log, evaluate, checkpoint."""
    cfg, tcfg = run.cfg, run.cfg.training
    # Global micro-batches: every process draws the same rows and trains on its slice (`_step`).
    collate = (ClassificationCollator(run.tok.pad_token_id) if cfg.classification else
               run.train_ex.collator(run.tok.pad_token_id) if cfg.training.pairs else None)
    stream = step_windows(run.train_ex, tcfg.batch_size * run.accelerator.num_processes, tcfg.grad_accum, tcfg.seed,
                          cfg.data.shuffle, run.tok.pad_token_id, start=state.step, num_workers=cfg.data.num_workers,
                          collate=collate, pin_memory=run.accelerator.device.type == "cuda",  # copies then run async
                          group_by_length=cfg.data.group_by_length)
    run.model.train()
    extra = also_at()  # a verify re-run's: the recorded run's checkpoint steps
    window_start, window_tokens = time.time(), 0
    # closing: the data workers stop with the loop, whatever ends it. An error's traceback keeps this frame (and so
    # the stream) alive to the interpreter's exit, which then waited forever on workers that ignore SIGTERM.
    with contextlib.closing(stream), StopRequest() as stop, TrainProgress(run.console, run.total_steps,
                                                                          state.step) as progress:
        while state.step < run.total_steps and not run.stopped_early:
            _stop_if_asked(run, state, stop)
            window = next(stream)
            lr = scheduled_lr(tcfg, run.scheduler)  # the rate this step applies (the scheduler steps after it)
            tokens = sum(int(b["attention_mask"].sum()) for b in window)  # counted on CPU: no device sync
            window_tokens += tokens
            loss_value, grad_norm, regularizer, trained = _step(run, window, tokens, state)
            tps = window_tokens / max(time.time() - window_start, 1e-9)
            unlogged = None  # this step's line where log_steps leaves it out: an early stop here logs it still
            if loss_value is not None:  # a skipped step (nan_policy: skip_step) has no loss to show or log
                progress.update(state.step, loss_value, lr, tps)  # every step: the bar moves, the first gets a line
                record = {"step": state.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                          "tokens": state.tokens, "tokens_per_s": tps, "peak_mem_mb": peak_memory_mb(run.device)}
                if regularizer is not None:
                    record["regularizer"] = regularizer
                record |= trained
                if state.step % tcfg.log_steps == 0 or state.step == run.total_steps:
                    run.log(record)
                    window_start, window_tokens = time.time(), 0
                else:
                    unlogged = record
            else:
                progress.skipped(state.step)
            paused = time.time()  # evaluations and checkpoints are not training: tokens_per_s leaves them out
            if run.eval_ex and tcfg.eval_steps and state.step % tcfg.eval_steps == 0 and state.step < run.total_steps:
                result = run.evaluate(state.step, unlogged)
                progress.note(f"step {state.step}: {run.describe(result)}")
            if tcfg.save_steps and state.step % tcfg.save_steps == 0 or state.step in extra:
                run.checkpoint(state)
            window_start += time.time() - paused
            if run.stopped_early:
                progress.stopped()
                progress.note(f"step {state.step}: {run.selection.stop_reason()}")
                break
    # One during the last step stops too, before the final evaluation and export; asked once the handler is gone, so
    # that a signal while the progress bar closed (after a last look inside) was not taken and forgotten: the run went
    # on to its end and exited 0, its Ctrl-C ignored.
    _stop_if_asked(run, state, stop)


def _stop_if_asked(run: Run, state: LoopState, stop: StopRequest) -> None:
    """Checkpoint and stop when a process was sent SIGINT or SIGTERM (all of them together, with one message)."""
    if received := distributed.any_signal(run.accelerator, stop.signal):
        path = run.checkpoint(state)
        raise Stopped(
            f"{'Stopped by SIGTERM' if received == signal.SIGTERM else 'Interrupted'} at step "
            f"{state.step}; checkpoint saved to {path}. Continue with `peftkit train RECIPE --resume`."
        )


def _forward_backward(run: Run, window: list[dict], state: LoopState) -> tuple[float, dict]:
    """Forward and backward of each micro-batch of `window` (this process's slice), gradients synchronised at the
    last; (the loss's mean over the global window, a DPO/KTO step's reward figures or {}), with one host sync."""
    tcfg, accelerator = run.cfg.training, run.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    # The loss is a mean over the global window's labelled tokens (a classifier's: its rows, one label each; DPO's:
    # its pairs, two rows each).
    pairs = tcfg.pairs
    count = labelled_count
    if run.cfg.classification:
        n_label, loss_fn = sum(len(b["labels"]) for b in window), example_loss_sum
    elif pairs:  # (KTO's: its examples, each with its mismatched one)
        objective = objective_loss(tcfg, accelerator)
        n_label, loss_fn = sum(len(b["labels"]) // 2 for b in window), objective
    else:  # (a method's own objective, CPT's: `MethodTrainer.token_loss`)
        own = run.method_trainer.token_loss() if run.method_trainer is not None else None
        count, loss_fn = own if own is not None else (labelled_count, token_loss_sum)
        n_label = sum(count(b["labels"]) for b in window)
    loss_fn = run.loss_function(loss_fn)
    loss_sum = torch.zeros((), device=accelerator.device)
    pair_sums = torch.zeros(len(objective.SUMS) - 1, device=accelerator.device) if pairs else None  # the rewards' sums
    flat = run.cfg.model.attn_implementation == "flash_attention_2"  # packed rows go in as one, padding-free
    for i, batch in enumerate(window):
        stand_in = distributed.stands_in(batch, rank, world, group=2 if pairs else 1)
        batch = distributed.shard(batch, rank, world, state.trimmed_slices,  # (a resumed run: as it began)
                                  group=2 if pairs else 1)
        batch = flatten(batch) if flat and "position_ids" in batch else batch
        labelled = None if run.cfg.classification else count(batch["labels"])  # on the CPU: no sync
        head_from = {} if run.cfg.classification else {LOGITS_FROM: logits_from(batch["labels"])}  # (too)
        batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()} | head_from
        last = i == len(window) - 1
        with distributed.no_sync(accelerator, run.model, last), distributed.standing_in(stand_in):
            loss, counted = loss_fn(run.model, batch, labelled)
            extra = _batch_loss(run, batch, labelled)
            distributed.backward(accelerator, run.model, (loss if extra is None else loss + extra) * world / n_label,
                                 last)  # x world: DDP averages
        loss_sum += loss.detach()
        if pairs:
            pair_sums += counted.detach()
    trained = {}  # a DPO step's mean rewards, reward accuracy and margin, as TRL logs them
    if pairs:  # (summed across the processes with the loss: still one sync)
        loss_sum, *rest = distributed.total(accelerator, torch.cat([loss_sum[None], pair_sums])).unbind()
        # (a figure of None, KTO's margin of a batch without an undesirable answer, is left out, as TRL leaves it)
        trained = {k: v for k, v in objective.figures(torch.stack([loss_sum, *rest])).items()
                   if k != "loss" and v is not None}
    loss_value = float(distributed.total(accelerator, loss_sum) if not pairs else loss_sum) / n_label  # one sync
    return loss_value, trained


def _step(run: Run, window: list[dict], tokens: int,
          state: LoopState) -> tuple[float | None, float | None, float | None, dict]:
    """One optimizer step over the micro-batches of `window`; (loss, grad norm, the method's regulariser or None,
    a DPO step's reward figures or {}), or (None, None, None, {}) when a non-finite loss was skipped
    (training.nan_policy: skip_step)."""
    loss_value, trained = _forward_backward(run, window, state)
    tcfg, accelerator = run.cfg.training, run.accelerator
    reg_value = _regularize(run)
    if not math.isfinite(loss_value + (reg_value or 0.0)):
        return _not_finite(run, state, f"Loss became {loss_value}", f"loss {loss_value}")
    # A finite loss can still give non-finite gradients; fp16's loss scaler skips those steps itself, and lowers its
    # scale then (only then). accelerate's optimizer.step_was_skipped misses the skips of a fused AdamW (peftkit's
    # adamw), which takes the scaler's inf check into its own kernel. Under DeepSpeed (no accelerate scaler) the
    # engine's own fp16 scaler skips, and says so.
    scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else None
    grad_norm, stepped = distributed.optimizer_step(accelerator, run.model, run.optimizer,
                                                    trainable_parameters(run.model), tcfg.max_grad_norm,
                                                    check_finite=accelerator.scaler is None)
    if not stepped:
        return _not_finite(run, state, f"The gradient norm became {grad_norm}", f"gradient norm {grad_norm}")
    if run.method_trainer is not None:
        run.method_trainer.after_step(state.step + 1)  # peft's place for AdaLoRA's allocator: gradients still here
    if (scale is not None and accelerator.scaler.get_scale() < scale) or zero.skipped(accelerator, run.model):
        return _scaler_skipped(run, state)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += tokens
    state.losses.append(loss_value)
    return loss_value, grad_norm, reg_value, trained


def _not_finite(run: Run, state: LoopState, became: str, what: str) -> tuple[None, None, None, dict]:
    """A step whose loss or gradients are not finite: training.nan_policy stops the run, or skips the step."""
    run.optimizer.zero_grad(set_to_none=True)
    if run.cfg.training.nan_policy == "stop":
        ckpts = checkpoint_dirs(run.out)
        raise PeftkitError(
            f"{became} at step {state.step + 1}; training stopped. "
            + (f"The last good checkpoint is {ckpts[-1]}. " if ckpts else "")
            + f"{RESTART} Set training.nan_policy: skip_step to skip such steps instead."
        )
    state.skipped_steps += 1
    run.console.print(f"[yellow]step {state.step + 1}: {what}, step skipped[/]")
    state.step += 1  # the data moves on; the schedule waits for the next update, as after `_scaler_skipped`
    return None, None, None, {}


def _scaler_skipped(run: Run, state: LoopState) -> tuple[None, None, None, dict]:
    """A step fp16's loss scaler skipped (inf/nan in the scaled gradients; it lowered its scale), often one of the
    first while it finds its scale: counted as skipped (no loss line, no update), whatever training.nan_policy says.
    The schedule stays, as accelerate's AcceleratedScheduler, transformers' Trainer and DeepSpeed leave it."""
    run.optimizer.zero_grad(set_to_none=True)
    state.skipped_steps += 1
    scaler = run.accelerator.scaler  # (None under DeepSpeed, whose engine holds its own)
    run.console.print(f"[yellow]step {state.step + 1}: fp16's loss scaler found inf/nan gradients, step skipped"
                      + (f" (loss scale now {scaler.get_scale():g})" if scaler is not None else "") + "[/]")
    state.step += 1
    return None, None, None, {}


def _batch_loss(run: Run, batch: dict, labelled: int | None) -> torch.Tensor | None:
    """The method's term for this micro-batch (`MethodTrainer.batch_loss`: ShadowPEFT's auxiliary loss), in the loss
    sum's units, or None. A classifier's and a preference objective's steps take none (peft adds it to a causal LM's
    loss only)."""
    if run.method_trainer is None or run.cfg.classification or run.cfg.training.pairs:
        return None
    return run.method_trainer.batch_loss(batch, labelled)


def _regularize(run: Run) -> float | None:
    """Backpropagate the method's regulariser, once for the whole step; its value, or None without one."""
    reg = run.method_trainer.regularizer() if run.method_trainer is not None else None
    if reg is None:
        return None
    run.accelerator.backward(reg)
    return float(reg.detach())
