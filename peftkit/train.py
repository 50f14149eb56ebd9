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

import contextlib
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from peftkit import distributed, long_context, zero
from peftkit.adapters import (adapter_layers, check_copies, count_parameters, inject_adapters,
                              load_adapter_state_dict, trainable_parameters)
from peftkit.checkpoint import LoopState, also_at, checkpoint_dirs, run_inputs, save_checkpoint
from peftkit.checkpoint import resume as resume_checkpoint
from peftkit.classify import ClassifyEval, example_loss_sum, with_head
from peftkit.data import describe_stats, load_examples, step_windows, steps_per_epoch
from peftkit.data.checks import guard_token_ids
from peftkit.data.classification import ClassificationCollator, LabelSet, load_classification
from peftkit.data.packing import check_isolated, describe_packing, flatten, pack_examples
from peftkit.errors import PeftkitError, PeftkitWarning
from peftkit.evaluate import RunEval, token_loss_sum
from peftkit.loss import labelled_count
from peftkit.manifest import hub_commit
from peftkit.task_ids import check_training_tasks, recipe_reads_tasks
from peftkit.finish import RESTART, TrainingFailed, finish, task_metrics  # noqa: F401 (TrainingFailed: part of this module's API)
from peftkit.fileio import DiskFullError, append_line, atomic_write_text, unlink_durably
from peftkit.methods import MethodTrainer, method_of
from peftkit.methods.expert_lists import check_start
from peftkit.modeling import load_config, load_model, load_tokenizer, prepare_for_training, resolve_device
from peftkit.peft_format import load_adapter
from peftkit.progress import TrainProgress, phase
from peftkit.recipe import Recipe
from peftkit.rope_scaling import check_context_length, fresh_dynamic_rope
from peftkit.rundir import clear_run, open_run_dir, records_at, truncate_metrics
from peftkit.runtime import (build_optimizer, check_device_support, check_fp16_gradients, cpu_dtype_note,
                             emulated_bf16_note, lr_lambda, mixed_precision, nondeterministic_op_error,
                             optimizer_groups, peak_memory_mb, pin_cublas_workspace, scheduled_lr, seed_everything)
from peftkit.samples import answers, sample_prompts
from peftkit.selection import Selection
from peftkit.trackers import DIRECTORY as TRACKERS_DIR
from peftkit.trackers import Trackers, check_trackers

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
    train_ex: Sequence
    eval_ex: RunEval | ClassifyEval | None
    """data.eval's loss examples and eval.metrics' prompts (a classifier's: its rows); None without data.eval."""
    targets: list[str]
    inputs: dict
    total_steps: int
    summary: dict = field(default_factory=dict)
    method_trainer: MethodTrainer | None = None
    """What the adapter method adds to the loop (`Method.trainer`): a regulariser, an after-step hook, state."""
    selection: Selection | None = None
    """training.early_stopping and export.best, fed every evaluation."""
    trackers: Trackers | None = None
    """training.report_to, started once the run directory is this run's."""
    last_eval: tuple[int, dict] | None = None
    labels: LabelSet | None = None
    """A classifier's classes (model.task: sequence_classification), read from data.train."""
    adapter: object = None
    """The adapter as injected: the recipe's, with a classifier's head added to modules_to_save."""
    compiled: dict = field(default_factory=dict)
    """training.compile: the loss functions through torch.compile, made at their first step."""
    base_commit: str | None = None
    """The commit of a hub base's snapshot that loaded (`manifest.hub_commit`): recorded, and the exported adapter's
    `revision`, so that what loads it later loads this base even after the branch moved."""

    def loss_function(self, fn):
        """`fn` as the training step runs it: compiled with training.compile (the model's forward is traced through
        it), else as it is. Evaluation and generation stay eager: their shapes and caches would only recompile."""
        backend = self.cfg.training.compile
        if not backend:
            return fn
        if fn not in self.compiled:
            self.compiled[fn] = torch.compile(fn, backend="inductor" if backend is True else backend, dynamic=True)
        return self.compiled[fn]

    @property
    def stopped_early(self) -> bool:
        """training.early_stopping has ended the run (a resumed run may find it so)."""
        return self.selection is not None and self.selection.should_stop

    @property
    def saved_modules(self) -> list[str]:
        """What the adapter saves whole (adapter.modules_to_save, a classifier's head)."""
        return self.adapter.modules_to_save

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def main(self) -> bool:
        """The process that writes and prints (the only one, unless launched with several)."""
        return self.accelerator.is_main_process

    def checkpoint(self, state: LoopState) -> Path:
        """checkpoints/step-N, written by the main process with every process's RNG state (all must call this)."""
        rng = distributed.rng_states(self.accelerator)
        path = self.out / "checkpoints" / f"step-{state.step:08d}"
        model = distributed.unwrap(self.accelerator, self.model)
        gathered = distributed.gathered_state(self.accelerator, model, self.saved_modules, self.optimizer)
        if self.main:
            try:
                path = save_checkpoint(self.out, model, self.saved_modules, self.optimizer, self.scheduler, state,
                                       self.inputs, self.cfg.training.save_total_limit, self.method_trainer,
                                       self.selection, rng, gathered)
            except DiskFullError as e:
                raise DiskFullError(f"{e} {self.resume_hint()}") from None
        self.accelerator.wait_for_everyone()
        return path

    def resume_hint(self) -> str:
        """Where a run stopped by something outside it (a full disk) continues."""
        ckpts = checkpoint_dirs(self.out)
        if not ckpts:
            unset = "" if self.cfg.training.save_steps else " (set training.save_steps to write checkpoints)"
            return f"No checkpoint was written yet, so the run starts again from step 0{unset}."
        return f"The newest whole checkpoint is {ckpts[-1].name}: continue with `peftkit train RECIPE --resume`."

    def log(self, record: dict) -> None:
        """One metrics.jsonl line (and the same to training.report_to's trackers), from the main process."""
        if not self.main:
            return
        try:
            append_line(self.metrics_path, json.dumps(record), sync=False)
        except DiskFullError:  # a line may be cut short in it: `--resume` cuts the log back to its checkpoint
            raise DiskFullError(f"No space left on the device while appending to {self.metrics_path}; its last line "
                                f"may be cut short, which --resume drops. {self.resume_hint()}") from None
        if self.trackers is not None:
            try:
                self.trackers.log(record)
            except DiskFullError as e:
                raise DiskFullError(f"{e} {self.resume_hint()}") from None

    def evaluate(self, step: int) -> dict:
        """Evaluate at `step` (once: the end of an early-stopped run reuses its last evaluation), log it and show
        it to the selection."""
        if self.last_eval is not None and self.last_eval[0] == step:
            return self.last_eval[1]
        model = distributed.unwrap(self.accelerator, self.model)  # every process joins (loss batches, prompts shared out)
        with fresh_dynamic_rope(model):  # as `peftkit eval` of the exported adapter sees it
            result = self.eval_ex(model)
        self.log({"step": step, **self.eval_ex.record(result)})
        if self.selection is not None:
            self.selection.observe(step, result, lambda: distributed.adapter_weights(model, self.saved_modules))
        self.last_eval = (step, result)
        return result


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
    cublas_note = pin_cublas_workspace(recipe.training.deterministic, recipe.model.device)  # before CUDA starts
    accelerator = _accelerator(recipe, out)
    console = (console or Console()) if accelerator.is_main_process else Console(quiet=True)
    if cublas_note:
        console.print(f"[yellow]note:[/] {escape(cublas_note)}")
    run_dir = (open_run_dir(out, recipe.to_yaml(), resume, overwrite, console) if accelerator.is_main_process
               else contextlib.nullcontext())  # one writer: the main process holds the directory
    with run_dir:
        accelerator.wait_for_everyone()  # the directory is checked and tidied before any process reads it
        if resume and not accelerator.is_main_process:
            distributed.check_sees_checkpoints(out, accelerator.process_index)
        started = time.time()
        run = _setup(recipe, out, resume, console, accelerator, cache)
        # Only now, with data and model loaded, does the directory become this recipe's run.
        if run.main and not resume:
            clear_run(out)
        if run.main:
            atomic_write_text(out / "recipe.yaml", recipe.to_yaml())
        accelerator.wait_for_everyone()
        state = LoopState()
        if resume:
            ckpt, state = resume_checkpoint(out, distributed.unwrap(accelerator, run.model), run.optimizer, run.scheduler, run.inputs, console,
                                            run.method_trainer, run.selection, accelerator.process_index,
                                            accelerator.num_processes, hub_model=None if run.base_commit is None
                                            else recipe.model.name_or_path)
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
        if recipe.training.report_to and run.main:
            run.trackers = Trackers(run.accelerator, recipe, out, (state.step, records_at(run.metrics_path, state.step))
                                    if resume else None)
        try:
            with nondeterministic_op_error():
                _loop(run, state)
            return finish(run, state, started, show_summary)
        finally:
            if run.trackers is not None:
                run.trackers.close()


def _total_steps(tcfg, examples: int, processes: int) -> int:
    """training.max_steps, or `epochs` whole passes over the (packed) training examples; a warmup longer than the
    run, which the recipe's check cannot see without the data, is refused here, before the model loads."""
    total = tcfg.max_steps or tcfg.epochs * steps_per_epoch(examples, tcfg.batch_size * processes, tcfg.grad_accum)
    if tcfg.warmup_steps > total:
        raise PeftkitError(f"training.warmup_steps ({tcfg.warmup_steps}) is larger than the run's {total} optimizer "
                           f"steps (training.epochs {tcfg.epochs} over {examples:,} training examples, batch_size "
                           f"{tcfg.batch_size} x grad_accum {tcfg.grad_accum} x {processes} process(es)), so the "
                           "learning rate would never reach training.lr; lower warmup_steps.")
    if tcfg.warmup_steps == total > 1:
        warnings.warn(PeftkitWarning(f"training.warmup_steps ({total}) is the whole run: the learning rate rises at "
                                     f"every step and ends at {total}/{total + 1} of training.lr, never reaching it; "
                                     "lower warmup_steps."), stacklevel=2)
    return total


def _accelerator(cfg: Recipe, out: Path):
    """accelerate's Accelerator, made first: it knows this process's rank and device (`peftkit.distributed`)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    check_trackers(cfg.training.report_to)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a worker of `accelerate launch` / torchrun: stop with the launcher
        distributed.die_with_parent()
    # A process that trains twice (a notebook, verify, tests) may change mixed precision, which accelerate's
    # process-wide state refuses once set; the process group (PartialState) stays.
    AcceleratorState._reset_state()
    device = resolve_device(cfg.model.device)
    engine = zero.accelerator_kwargs(device) if zero.requested() else {"cpu": device.type == "cpu"}
    handlers = distributed.accelerator_handlers(cfg, engine.pop("kwargs_handlers", []))
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.training, device), project_dir=out / TRACKERS_DIR,
                              log_with=cfg.training.report_to or None, kwargs_handlers=handlers, **engine)
    zero.build_whole(accelerator)
    return accelerator


def _setup(cfg: Recipe, out: Path, resume: bool, console: Console, accelerator, cache: bool = True) -> _Run:
    """Seed, check the device and memory, load data and model, evaluate the base, inject the adapter and
    build the optimizer: everything that can fail before the run directory is touched."""
    from peftkit.memory import check_fits, estimate_memory, print_estimate

    tcfg = cfg.training
    # With several processes each has its own device (cuda:<local rank>, or the CPU).
    device = accelerator.device if accelerator.num_processes > 1 else resolve_device(cfg.model.device)
    seed_everything(tcfg.seed, tcfg.deterministic, device)
    check_device_support(cfg, device)
    distributed.check_engine(cfg, accelerator)
    check_context_length(cfg, load_config(cfg.model))  # data.max_length within the (RoPE-scaled) positions
    if note := cpu_dtype_note(cfg.model.dtype, device) or emulated_bf16_note(cfg, device):
        console.print(f"[yellow]note:[/] {escape(note)}")
    estimate = estimate_memory(cfg, device)
    print_estimate(console, estimate)
    check_fits(estimate, device)
    tok = load_tokenizer(cfg.model)
    train_ex, train_stats, eval_ex, labels = _load_data(cfg, tok, cache)
    if eval_ex is not None and accelerator.num_processes > 1:
        eval_ex.processes = accelerator  # the processes share out the eval batches
    if ids := getattr(cfg.adapter, "alora_invocation_tokens", None):
        from peftkit.methods.alora import check_invocation

        if warning := check_invocation(ids, train_ex, tok):
            console.print(warning, style="yellow", markup=False, highlight=False)
    train_ex = _training_rows(cfg, train_ex, train_stats, console)
    total_steps = _total_steps(tcfg, len(train_ex), accelerator.num_processes)

    with phase("Loading model...", console):
        model = load_model(cfg.model, cfg.quantization, device, labels)
    guard_token_ids(model, tok)
    inputs = run_inputs(cfg)  # after loading: a hub id's files are then in the local cache
    base_commit = hub_commit(cfg.model.name_or_path, cfg.model.revision)
    if cfg.data.packing:
        check_isolated(model)
    long_context.apply(model, cfg)  # model.long_context: S²-Attn in training mode only
    # A classifier's new head trains in full and is saved with the adapter, as peft's SEQ_CLS does.
    adapter = with_head(cfg.adapter, model) if cfg.classification else cfg.adapter
    summary = {"base_eval_loss": None} | {f"base_eval_{m}": None for m in task_metrics(cfg)}
    if eval_ex and cfg.eval.base_model:  # on --resume too: its figures are in the manifest, as an unbroken run's
        # At the precision of the run's later evaluations (its forward's, after prepare); under DeepSpeed, which
        # holds 16-bit weights from prepare on and runs no autocast, at the recipe's model.dtype.
        with accelerator.autocast():
            summary |= _evaluate_base(cfg, model, tok, eval_ex, accelerator, console)

    # Seed again right before the adapter is drawn: its init must not depend on what loading consumed.
    torch.manual_seed(tcfg.seed)
    # An adapter to start from may list targets for other architectures (peft's generic defaults); its
    # weights decide, and load_adapter_state_dict refuses any that do not land (as for `peftkit eval`).
    check_start(adapter, model)
    start = load_adapter(cfg.adapter.init_from)[1] if cfg.adapter.init_from else None
    targets = inject_adapters(model, adapter, every_entry=start is None, state=start)
    if start is not None:
        load_adapter_state_dict(model, start)
    if cfg.export.merged:
        _check_biases_merge(model)
    prepare_for_training(model, tcfg.gradient_checkpointing)
    if not zero.active(accelerator):  # (DeepSpeed scales fp16 losses with fp32 master weights of its own)
        check_fp16_gradients(model, accelerator.mixed_precision)
    summary["trainable_params"], summary["total_params"] = trainable, total = count_parameters(model)
    where = f" on {len(targets)} modules" if targets else ""  # the prompt family adapts the model as a whole
    console.print(f"{method_of(cfg.adapter).describe(cfg.adapter)}{where}: {trainable:,} trainable "
                  f"of {total:,} parameters ({100 * trainable / total:.3f}%)")

    method_trainer = method_of(cfg.adapter).trainer(model, cfg.adapter, total_steps)
    optimizer = build_optimizer(tcfg, optimizer_groups(tcfg, model), device, console, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, total_steps))
    if zero.active(accelerator):
        zero.configure(cfg, accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    check_copies(accelerator.unwrap_model(model), adapter)
    distributed.autocast_only(accelerator, model)
    return _Run(cfg, out, console, device, model, tok, optimizer, scheduler, accelerator, train_ex, eval_ex, targets,
                inputs, total_steps, summary, method_trainer, Selection.of(cfg), labels=labels, adapter=adapter,
                base_commit=base_commit)


def _check_biases_merge(model) -> None:
    """export.merged with lora_bias on a layer without a bias: refused before training, not after it."""
    if bare := [name for name, layer in adapter_layers(model).items()
                if getattr(getattr(layer, "lora_B", None), "bias", None) is not None
                and getattr(layer.base_layer, "bias", None) is None]:
        raise PeftkitError(f"adapter.lora_bias: '{bare[0]}' (and {len(bare) - 1} more) has no bias, so export.merged "
                           "cannot fold lora_B's bias into the model (peft cannot either). Set export.merged: false "
                           "(the adapter loads in peft with its biases), or lora_bias: false.")


def _evaluate_base(cfg: Recipe, model, tok, eval_ex: RunEval | ClassifyEval, accelerator, console: Console) -> dict:
    """eval.base_model: the base model's eval loss and metrics, and eval.samples' base answers, for the summary."""
    n = len(eval_ex)
    with phase(f"Evaluating the base model on {n} examples (eval.base_model: true)...", console):
        base = eval_ex(model)
    console.print(f"base model: {eval_ex.describe(base)} on {n} examples", highlight=False)
    summary = {k: v for k, v in eval_ex.record(base, "base_eval_").items() if k != "base_eval_perplexity"}
    # The base's samples go into the main process's summary; the model is not sharded yet, so only it generates.
    if accelerator.is_main_process and (prompts := sample_prompts(cfg, tok)):
        with phase(f"Generating {len(prompts)} samples with the base model (eval.samples)...", console):
            summary["samples"] = [{"prompt": p.text, "reference": p.reference, "base": text}
                                  for p, text in zip(prompts, answers(model, tok, prompts, cfg), strict=True)]
    return summary


def _training_rows(cfg: Recipe, examples: Sequence, stats: dict, console: Console) -> Sequence:
    """The rows training draws from: the examples, packed into rows for data.packing; their counts printed."""
    for line in describe_stats(stats, cfg.data):
        console.print(line, markup=False, highlight=False, style="yellow" if line.startswith("warning:") else None)
    if not cfg.data.packing:
        return examples
    rows = pack_examples(examples, cfg.data.max_length)
    console.print(describe_packing(examples, rows, cfg.data.max_length), highlight=False)
    return rows


def _load_data(cfg: Recipe, tok, cache: bool = True) -> tuple[list, dict, RunEval | ClassifyEval | None, LabelSet | None]:
    """(training examples, their counts, data.eval's evaluation or None, a classifier's classes or None), all read
    before the model loads, so that a data mistake shows in seconds."""
    data = cfg.data
    if cfg.classification:  # the classes come from data.train; data.eval's labels are mapped to them
        train_ex, stats, labels = load_classification(tok, data.train, data.train_split, data, None, cfg.model.num_labels)
        eval_ex = None
        if data.eval:
            examples = load_classification(tok, data.eval, data.eval_split, data, labels)[0]
            eval_ex = ClassifyEval(examples, tok.pad_token_id, cfg.eval.batch_size)
        return train_ex, stats, eval_ex, labels
    tasks = recipe_reads_tasks(cfg)
    train_ex, stats = load_examples(tok, data.train, data.train_split, data, tasks=tasks, cache=cache)
    check_training_tasks(cfg, "data.train", train_ex.task_ids)
    eval_ex = None
    if data.eval:  # the loss examples, and eval.metrics' prompts
        eval_ex = RunEval.of(cfg, tok, load_examples(tok, data.eval, data.eval_split, data, tasks=tasks, cache=cache)[0])
        prompts = [*eval_ex.prompts, *sample_prompts(cfg, tok)]
        check_training_tasks(cfg, "data.eval", [*eval_ex.examples.task_ids, *(p.task_id for p in prompts)])
    return train_ex, stats, eval_ex, None


def _loop(run: _Run, state: LoopState) -> None:
    """Optimizer steps from `state.step` to the end: accumulate, clip, step, log, evaluate, checkpoint."""
    cfg, tcfg = run.cfg, run.cfg.training
    # Global micro-batches: every process draws the same rows and trains on its slice (`_step`).
    collate = ClassificationCollator(run.tok.pad_token_id) if cfg.classification else None
    stream = step_windows(run.train_ex, tcfg.batch_size * run.accelerator.num_processes, tcfg.grad_accum, tcfg.seed,
                          cfg.data.shuffle, run.tok.pad_token_id, start=state.step, num_workers=cfg.data.num_workers,
                          collate=collate, pin_memory=run.accelerator.device.type == "cuda")  # copies then run async
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
            loss_value, grad_norm, regularizer = _step(run, window, tokens, state)
            tps = window_tokens / max(time.time() - window_start, 1e-9)
            if loss_value is not None:  # a skipped step (nan_policy: skip_step) has no loss to show or log
                progress.update(state.step, loss_value, lr, tps)  # every step: the bar moves, the first gets a line
                if state.step % tcfg.log_steps == 0 or state.step == run.total_steps:
                    record = {"step": state.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                              "tokens": state.tokens, "tokens_per_s": tps, "peak_mem_mb": peak_memory_mb(run.device)}
                    if regularizer is not None:
                        record["regularizer"] = regularizer
                    run.log(record)
                    window_start, window_tokens = time.time(), 0
            paused = time.time()  # evaluations and checkpoints are not training: tokens_per_s leaves them out
            if run.eval_ex and tcfg.eval_steps and state.step % tcfg.eval_steps == 0 and state.step < run.total_steps:
                result = run.evaluate(state.step)
                progress.note(f"step {state.step}: {run.eval_ex.describe(result)}")
            if tcfg.save_steps and state.step % tcfg.save_steps == 0 or state.step in extra:
                run.checkpoint(state)
            window_start += time.time() - paused
            if run.stopped_early:
                progress.stopped()
                progress.note(f"step {state.step}: {run.selection.stop_reason()}")
                break
        _stop_if_asked(run, state, stop)  # one during the last step stops too, before the final evaluation and export


def _stop_if_asked(run: _Run, state: LoopState, stop: StopRequest) -> None:
    """Checkpoint and stop when a process was sent SIGINT or SIGTERM (all of them together)."""
    if distributed.any_process(run.accelerator, stop.signal is not None):
        path = run.checkpoint(state)
        raise PeftkitError(
            f"{'Stopped by SIGTERM' if stop.signal == signal.SIGTERM else 'Interrupted'} at step "
            f"{state.step}; checkpoint saved to {path}. Continue with `peftkit train RECIPE --resume`."
        )


def _step(run: _Run, window: list[dict], tokens: int, state: LoopState) -> tuple[float | None, float | None, float | None]:
    """One optimizer step over the micro-batches of `window`; (loss, grad norm, the method's regulariser or None),
    or (None, None, None) when a non-finite loss was skipped (training.nan_policy: skip_step)."""
    tcfg, accelerator = run.cfg.training, run.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    # The loss is a mean over the global window's labelled tokens (a classifier's: its rows, one label each).
    if run.cfg.classification:
        n_label, loss_fn = sum(len(b["labels"]) for b in window), example_loss_sum
    else:
        n_label, loss_fn = sum(labelled_count(b["labels"]) for b in window), token_loss_sum
    loss_fn = run.loss_function(loss_fn)
    loss_sum = torch.zeros((), device=accelerator.device)
    flat = run.cfg.model.attn_implementation == "flash_attention_2"  # packed rows go in as one, padding-free
    for i, batch in enumerate(window):
        batch = distributed.shard(batch, rank, world)
        batch = flatten(batch) if flat and "position_ids" in batch else batch
        labelled = None if run.cfg.classification else labelled_count(batch["labels"])  # on the CPU: no sync
        batch = {k: v.to(accelerator.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        last = i == len(window) - 1
        with distributed.no_sync(accelerator, run.model, last):
            loss, _ = loss_fn(run.model, batch, labelled)
            distributed.backward(accelerator, run.model, loss * world / n_label, last)  # x world: DDP averages
        loss_sum += loss.detach()
    loss_value = float(distributed.total(accelerator, loss_sum)) / n_label  # one sync per optimizer step
    reg_value = _regularize(run)
    if not math.isfinite(loss_value + (reg_value or 0.0)):
        return _not_finite(run, state, f"Loss became {loss_value}", f"loss {loss_value}")
    # A finite loss can still give non-finite gradients; fp16's loss scaler skips those steps itself.
    grad_norm, stepped = distributed.optimizer_step(accelerator, run.model, run.optimizer,
                                                    trainable_parameters(run.model), tcfg.max_grad_norm,
                                                    check_finite=accelerator.scaler is None)
    if not stepped:
        return _not_finite(run, state, f"The gradient norm became {grad_norm}", f"gradient norm {grad_norm}")
    run.scheduler.step()
    if run.method_trainer is not None:
        run.method_trainer.after_step(state.step + 1)  # peft's place for AdaLoRA's allocator: gradients still here
    run.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += tokens
    state.losses.append(loss_value)
    return loss_value, grad_norm, reg_value


def _not_finite(run: _Run, state: LoopState, became: str, what: str) -> tuple[None, None, None]:
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
    state.step += 1
    run.scheduler.step()
    return None, None, None


def _regularize(run: _Run) -> float | None:
    """Backpropagate the method's regulariser, once for the whole step; its value, or None without one."""
    reg = run.method_trainer.regularizer() if run.method_trainer is not None else None
    if reg is None:
        return None
    run.accelerator.backward(reg)
    return float(reg.detach())
