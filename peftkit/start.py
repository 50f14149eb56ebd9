"""The start of a run: everything that can fail before the run directory is touched (device and memory checks,
data, model, the base's evaluation, the adapter, optimizer and scheduler on accelerate), gathered in `Run`, which
`peftkit.train`'s loop and `peftkit.finish` work with."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from peftkit import distributed, long_context, zero
from peftkit.adapters import check_copies
from peftkit.checkpoint import LoopState, checkpoint_dirs, run_inputs, save_checkpoint
from peftkit.classify import ClassifyEval, with_head
from peftkit.data.chat_templates import warn_init_from_template
from peftkit.data.checks import guard_token_ids
from peftkit.data.classification import LabelSet
from peftkit.data.packing import check_isolated
from peftkit.data.preference import Pairs
from peftkit.data.stored import examples_digest
from peftkit.evaluate import RunEval
from peftkit.fileio import DiskFullError, append_line
from peftkit.finish import task_metrics
from peftkit.manifest import hub_commit
from peftkit.methods import MethodTrainer, method_of
from peftkit.modeling import load_config, load_model, load_tokenizer, resolve_device
from peftkit.preference import objective_loss
from peftkit.progress import phase
from peftkit.quantization import check_quantization_section, check_skip_modules
from peftkit.recipe import Recipe
from peftkit.rope_scaling import check_context_length, fresh_dynamic_rope
from peftkit.runtime import (build_optimizer, check_device_support, cpu_dtype_note, emulated_bf16_note, lr_lambda,
                             mixed_precision, optimizer_groups, seed_everything)
from peftkit.selection import Selection
from peftkit.start_adapter import _inject, _with_new_tokens
from peftkit.start_base import _base_samples, _evaluate_base, _reference_logps
from peftkit.start_checks import _check_checkpoints, _check_evaluations, _check_loraplus, _total_steps
from peftkit.start_data import _load_data, _training_rows
from peftkit.start_eval import BASE, START, from_adapter
from peftkit.trackers import DIRECTORY as TRACKERS_DIR
from peftkit.trackers import Trackers, check_trackers


@dataclass
class Run:
    """What the loop works with, built by `setup`."""

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
    """data.eval's loss examples and eval.metrics' prompts (a classifier's: its rows); None without data.eval. Of
    several sets, the first (primary) one's, whose figures are eval_loss, ..."""
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
    other_evals: dict = field(default_factory=dict)
    """data.eval's other sets by name (a mapping's after the first), each a RunEval or ClassifyEval: its figures are
    `eval_<name>_loss`, ..., kept in an evaluation's result under `sets`."""
    last_eval: tuple[int, dict] | None = None
    labels: LabelSet | None = None
    """A classifier's classes (model.task: sequence_classification), read from data.train."""
    adapter: object = None
    """The adapter as injected: the recipe's, with a classifier's head added to modules_to_save."""
    examples_sha256: dict = field(default_factory=dict)
    """`examples_digest` of data.train's and data.eval's examples (`train`, `eval`), before any packing."""
    compiled: dict = field(default_factory=dict)
    """training.compile: the loss functions through torch.compile, made at their first step."""
    data_form: str | None = None
    """Preference pairs' and KTO's rows' form in data.train (`chat`: conversations, `completion`: text), recorded as
    manifest.json's `data_form`; None for other data (data.format says it)."""
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
            self.compiled[fn] = compiled(fn, backend)
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
        trainer = self.method_trainer
        if trainer is not None and trainer.per_process:  # (each process's, gathered by all, as the RNG's)
            trainer = distributed.by_rank(self.accelerator, trainer.state_dict())
        path = self.out / "checkpoints" / f"step-{state.step:08d}"
        model = distributed.unwrap(self.accelerator, self.model)
        gathered = distributed.gathered_state(self.accelerator, model, self.saved_modules, self.optimizer)
        if self.main:
            try:
                path = save_checkpoint(self.out, model, self.saved_modules, self.optimizer, self.scheduler, state,
                                       self.inputs, self.cfg.training.save_total_limit, trainer,
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

    def evaluate(self, step: int, unlogged: dict | None = None) -> dict:
        """Evaluate at `step` (once: the end of an early-stopped run reuses its last evaluation), show it to the
        selection and log it. `unlogged`: the step's training line, which training.log_steps left out; when this
        evaluation stops the run early, it is logged first, as the last step of a run that ends there is."""
        if self.last_eval is not None and self.last_eval[0] == step:
            return self.last_eval[1]
        model = distributed.unwrap(self.accelerator, self.model)  # every process joins (loss batches, prompts shared out)
        with fresh_dynamic_rope(model):  # as `peftkit eval` of the exported adapter sees it
            result = self.eval_ex(model)
            if self.other_evals:  # after the primary set: its figures are those of a run evaluating it alone
                result["sets"] = {name: evaluation(model) for name, evaluation in self.other_evals.items()}
        if self.selection is not None:
            self.selection.observe(step, result, lambda: distributed.adapter_weights(model, self.saved_modules))
        if unlogged is not None and self.stopped_early:
            self.log(unlogged)
        self.log({"step": step, **self.record(result)})
        self.last_eval = (step, result)
        return result

    def record(self, result: dict, prefix: str = "eval_") -> dict[str, float]:
        """An evaluation's figures under metrics.jsonl / summary names: the primary set's `eval_loss`, ..., then each
        other set's `eval_<name>_loss`, ... (`prefix` `base_eval_`: the base model's)."""
        sets = result.get("sets", {})
        return self.eval_ex.record(result, prefix) | {
            key: value for name, evaluation in self.other_evals.items()
            for key, value in evaluation.record(sets[name], f"{prefix}{name}_").items()}

    def describe(self, result: dict) -> str:
        """The console's line of an evaluation: the primary set's, then `<name>: eval loss ...` of each other."""
        sets = result.get("sets", {})
        return "; ".join([self.eval_ex.describe(result), *(f"{name}: {evaluation.describe(sets[name])}"
                                                            for name, evaluation in self.other_evals.items())])


def make_accelerator(cfg: Recipe, out: Path):
    """accelerate's Accelerator, made first: it knows this process's rank and device (`peftkit.distributed`)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    check_trackers(cfg.training.report_to)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a worker of `accelerate launch` / torchrun: stop with the launcher
        from peftkit.launch import die_with_parent

        die_with_parent()
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


def setup(cfg: Recipe, out: Path, resume: bool, console: Console, accelerator, cache: bool = True) -> Run:
    """Seed, check the device and memory, load data and model, evaluate the base, inject the adapter (with
    adapter.init_from, evaluate the base with it instead: `peftkit.start_eval`) and build the optimizer: everything
    that can fail before the run directory is touched."""
    # With several processes each has its own device (cuda:<local rank>, or the CPU).
    device = accelerator.device if accelerator.num_processes > 1 else resolve_device(cfg.model.device)
    config, tok = _check_device_and_config(cfg, device, accelerator, resume, console)
    train_ex, evals, labels, digests, form = _data(cfg, tok, config, cache, accelerator, console)
    warn_init_from_template(cfg, tok, form)  # (conversations continuing an adapter's other template)
    total_steps = _checked_steps(cfg, len(train_ex), accelerator.num_processes)
    model, inputs, base_commit = _base_model(cfg, device, labels, tok, console)
    # A classifier's new head trains in full and is saved with the adapter, as peft's SEQ_CLS does.
    adapter = with_head(cfg.adapter, model) if cfg.classifier else cfg.adapter
    adapter = _with_new_tokens(cfg, model, tok, adapter, config, console)
    if _referenced(cfg):  # the reference at the precision DeepSpeed's engine trains in (its forward's)
        zero.cast_as_the_engine(accelerator, model)
    start = from_adapter(cfg)  # (init_from: the figures before training are the base's with its adapter)
    summary = {} if start else _base_passes(cfg, model, tok, train_ex, evals, accelerator, console)
    targets = _inject(cfg, model, adapter, accelerator, console, summary)
    if _referenced(cfg) and _reference_after(cfg):
        zero.cast_as_the_engine(accelerator, model)  # the adapter's weights too (init_from's: the reference's)
        with accelerator.autocast():
            _reference_logps(cfg, model, tok, train_ex, evals, accelerator, console)
    if start:
        summary = _base_passes(cfg, model, tok, train_ex, evals, accelerator, console, start) | summary
    method_of(cfg.adapter).check_run(model, cfg.adapter)
    method_trainer = method_of(cfg.adapter).trainer(model, cfg.adapter, total_steps)
    model, optimizer, scheduler = _prepared(cfg, model, adapter, device, accelerator, total_steps, console)
    eval_ex, other_evals = next(iter(evals.values()), None), dict(list(evals.items())[1:])
    return Run(cfg, out, console, device, model, tok, optimizer, scheduler, accelerator, train_ex, eval_ex, targets,
               inputs, total_steps, summary, method_trainer, Selection.of(cfg), labels=labels, adapter=adapter,
               base_commit=base_commit, examples_sha256=digests, other_evals=other_evals, data_form=form)


def _check_device_and_config(cfg: Recipe, device: torch.device, accelerator, resume: bool, console: Console):
    """Seed, and the checks that need no data: the device and engine, the model's config (data.max_length within its
    positions, the quantization section), the precision's notes and the memory estimate; (the config, the tokenizer).
    The tokenizer is read once, here, and passed on: the estimate, the model's loading and the new tokens' rows use
    it (each read it again: 5 reads of a 151k-token tokenizer, 1 to 2 s each, in a run with model.add_tokens)."""
    from peftkit.memory import check_fits, estimate_memory, print_estimate

    seed_everything(cfg.training.seed, cfg.training.deterministic, device)
    check_device_support(cfg, device)
    distributed.check_engine(cfg, accelerator)
    config = load_config(cfg.model)
    check_context_length(cfg, config)  # data.max_length within the (RoPE-scaled) positions
    check_quantization_section(config, cfg.model, cfg.quantization, resume)
    if note := cpu_dtype_note(cfg.model.dtype, device) or emulated_bf16_note(cfg, device):
        console.print(f"[yellow]note:[/] {escape(note)}")
    tok = load_tokenizer(cfg.model, cfg.data.chat_template)
    estimate = estimate_memory(cfg, device, tok)
    print_estimate(console, estimate)
    check_fits(estimate, device)
    return config, tok


def _data(cfg: Recipe, tok, config, cache: bool, accelerator,
          console: Console) -> tuple[Sequence, dict, LabelSet | None, dict, str | None]:
    """(the rows training draws from, data.eval's evaluations by name, a classifier's classes or None, the examples'
    digests by `Run.examples_sha256`'s keys, `Run.data_form`), read before the model loads; aLoRA's invocation tokens
    looked for."""
    train_ex, train_stats, evals, labels = _load_data(cfg, tok, config, cache, accelerator.num_processes)
    _note_rows_left_out(cfg, evals, console)
    if accelerator.num_processes > 1:
        for evaluation in evals.values():
            evaluation.processes = accelerator  # the processes share out the eval batches
    if ids := getattr(cfg.adapter, "alora_invocation_tokens", None):
        from peftkit.methods.alora import check_invocation

        # (a DPO run's: its pairs' answers, two examples a pair)
        if warning := check_invocation(ids, train_ex.examples if isinstance(train_ex, Pairs) else train_ex, tok):
            console.print(warning, style="yellow", markup=False, highlight=False)
    trained = train_ex.examples if isinstance(train_ex, Pairs) else train_ex  # (a DPO run's: the pairs' answers)
    digests = {"train": examples_digest(trained)} | {cfg.data.eval_key(name): examples_digest(evaluation.examples)
                                                     for name, evaluation in evals.items()}
    return _training_rows(cfg, train_ex, train_stats, console), evals, labels, digests, train_stats.get("form")


def _note_rows_left_out(cfg: Recipe, evals: dict, console: Console) -> None:
    """Say how many rows of each data.eval set eval.metrics leave out, as the loss does (`RunEval.left_out`)."""
    from peftkit.data.prompts import left_out_text

    for name, evaluation in evals.items():
        if left := getattr(evaluation, "left_out", 0):
            console.print(f"note: eval.metrics answer {len(evaluation.prompts)} rows of {cfg.data.eval_setting(name)}; "
                          f"{left_out_text(left, cfg.data.max_length)}.", markup=False, highlight=False)


def _checked_steps(cfg: Recipe, rows: int, processes: int) -> int:
    """The run's optimizer steps over its `rows` training rows, with the checks that need them
    (`peftkit.start_checks`)."""
    total_steps = _total_steps(cfg.training, rows, processes)
    _check_evaluations(cfg, total_steps)
    _check_checkpoints(cfg.training, total_steps)
    _check_loraplus(cfg.training)
    return total_steps


def _base_model(cfg: Recipe, device: torch.device, labels: LabelSet | None, tok,
                console: Console) -> tuple[torch.nn.Module, dict, str | None]:
    """(the base model loaded and checked, the run's inputs for its record, the commit of a hub base's snapshot)."""
    with phase("Loading model...", console):
        model = load_model(cfg.model, cfg.quantization, device, labels, tok)
    if cfg.quantization is not None:  # (a recipe's typo; a saved run's section loads as it trained, in eval)
        check_skip_modules(model, cfg.quantization)
    guard_token_ids(model, tok)
    if cfg.training.pairs:
        from peftkit.preference import without_dropout

        without_dropout(model)
    inputs = run_inputs(cfg)  # after loading: a hub id's files are then in the local cache
    base_commit = hub_commit(cfg.model.name_or_path, cfg.model.revision)
    method_of(cfg.adapter).check_sources(cfg.adapter, cfg, model, base_commit)  # fusion's, X-LoRA's: this base's
    if cfg.data.packing:
        check_isolated(model)
    long_context.apply(model, cfg)  # model.long_context: S²-Attn in training mode only
    return model, inputs, base_commit


def _referenced(cfg: Recipe) -> bool:
    """DPO's and KTO's losses compare with a reference; ORPO, SimPO and reward models have none: their base
    evaluation is a figure."""
    return cfg.training.pairs and objective_loss(cfg.training).needs_reference


def _reference_after(cfg: Recipe) -> bool:
    """Whether the reference is taken after the adapter's injection. The reference is the model training starts from:
    the base without the adapter (before the injection); or, after the injection, adapter.init_from's adapter over
    it, or the base stacked by LoRA's layer_replication (the deeper model its zero-initialized LoRAs start as, which
    peft's base is once stacked; the base before the injection is another model)."""
    return bool(cfg.adapter.init_from or getattr(cfg.adapter, "layer_replication", None))


def _base_passes(cfg: Recipe, model, tok, train_ex, evals: dict, accelerator, console: Console,
                 start: bool = False) -> dict:
    """The summary's base figures (None where not evaluated), from the base before the adapter is injected: the
    reference's log-probabilities where it is the base, eval.base_model's evaluation or samples. `start` (an
    adapter.init_from run's, `peftkit.start_eval`): after the injection, the figures and samples of the base with
    that adapter, the model training starts from (`start_eval_loss`, ...)."""
    prefix = START if start else BASE
    summary = {f"{prefix}loss": None} | {f"{prefix}{m}": None for m in task_metrics(cfg)}
    eval_ex, referenced = next(iter(evals.values()), None), _referenced(cfg)
    if referenced:
        with accelerator.autocast():
            if not _reference_after(cfg):
                _reference_logps(cfg, model, tok, train_ex, evals, accelerator, console)
            if cfg.eval.base_model:  # (no base evaluation, but the base's answers beside the fine-tuned ones)
                summary |= _base_samples(cfg, model, tok, accelerator, console, start)
    elif eval_ex and cfg.eval.base_model and not referenced:  # on --resume too: its figures are in the manifest, as an
        # unbroken run's. At the precision of the run's later evaluations (its forward's, after prepare); under
        # DeepSpeed, which holds 16-bit weights from prepare on and runs no autocast, at the recipe's model.dtype.
        with accelerator.autocast():
            summary |= _evaluate_base(cfg, model, tok, evals, accelerator, console, start)
    return summary


def _prepared(cfg: Recipe, model, adapter, device: torch.device, accelerator, total_steps: int, console: Console):
    """(model, optimizer, scheduler) through accelerate's prepare (DeepSpeed's ZeRO configured first), each process
    then seeded apart, the adapter's copies and autocast checked."""
    tcfg = cfg.training
    optimizer = build_optimizer(tcfg, optimizer_groups(tcfg, model), device, console, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, total_steps))
    if zero.active(accelerator):
        zero.configure(cfg, accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.num_processes > 1:
        # From here on each process draws its own numbers (as accelerate's set_seed(device_specific=True)): seeded
        # alike, every process drew the same dropout masks and module_dropout skips for its rows, where one process
        # draws independent ones for all of them. Everything that must agree (the adapter's init) is drawn above.
        torch.manual_seed(tcfg.seed + accelerator.process_index)
    check_copies(accelerator.unwrap_model(model), adapter)
    distributed.autocast_only(accelerator, model)
    return model, optimizer, scheduler


def compiled(fn, backend: bool | str):
    """`fn` through torch.compile with training.compile's `backend` (true: inductor), dynamic shapes. Inductor draws
    the step's random numbers (dropout's masks, NEFTune's noise, Poly's routing samples) from torch's generator, as
    the eager step does (its `fallback_random`): its own fused generator draws others, and a compiled Poly run
    trained another adapter than the eager one (max abs difference 0.038 after 3 steps of a 1-layer Llama; 1.9e-7
    now, measured)."""
    if backend is True or backend == "inductor":
        return torch.compile(fn, backend="inductor", dynamic=True, options={"fallback_random": True})
    return torch.compile(fn, backend=backend, dynamic=True)
