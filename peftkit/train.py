"""The training loop: recipe in, run directory out.

    seed → load tokenizer, data, model (maybe 4-bit) → base eval → seed again → inject adapters
    → optimizer/scheduler on accelerate → loop (accumulate, clip, step, log, eval, checkpoint) → export

Loss is the sum of token cross-entropies over a whole accumulation window divided by the window's
label-token count, so batch_size x grad_accum = 8 x 1 and 4 x 2 give the same gradient.

Run directory (a contract other tools rely on):
    adapter/            PEFT-format adapter (adapter_model.safetensors, adapter_config.json, peftkit.json)
    merged/             full model + tokenizer (export.merged)
    checkpoints/step-N/ resumable state (adapter, optimizer, scheduler, RNG, data position)
    metrics.jsonl       one JSON object per logged step / eval
    recipe.yaml         the resolved recipe
    manifest.json       versions, hashes, seed, final metrics, sha256 of every exported file
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from peftkit.adapters import adapter_state_dict, count_parameters, inject_adapters, load_adapter_state_dict, trainable_parameters
from peftkit.data import load_examples, micro_batches
from peftkit.errors import PeftkitError
from peftkit.evaluate import evaluate_loss, token_loss_sum
from peftkit.fileio import (append_line, atomic_directory, atomic_write_bytes, atomic_write_json, atomic_write_text,
                            fsync_path)
from peftkit.merge import conv1d_modules, merged_model, save_merged
from peftkit.modeling import DTYPES, load_model, load_tokenizer, prepare_for_training, resolve_device
from peftkit.peft_format import WEIGHTS_NAME, peft_config, save_adapter
from peftkit.recipe import Recipe, TrainingConfig

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------- setup


def seed_everything(seed: int, deterministic_cuda: bool) -> None:
    """Seed torch (CPU and CUDA) and pick deterministic kernels.

    CPU kernels are deterministic for a given thread count anyway; `use_deterministic_algorithms` makes
    any nondeterministic op raise rather than silently differ. On CUDA that costs speed (no atomics-based
    kernels, cuBLAS workspace pinned), so it is opt-in there with training.deterministic.
    """
    torch.manual_seed(seed)
    if deterministic_cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    if deterministic_cuda or not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)


def build_optimizer(cfg: TrainingConfig, params: list[torch.nn.Parameter], device: torch.device, console: Console):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[cfg.optimizer]
    if cfg.optimizer.startswith("paged") and device.type != "cuda":
        console.print(f"[yellow]note:[/] {cfg.optimizer} on CPU: bitsandbytes has no paged memory here and keeps the "
                      "optimizer state in ordinary buffers; the results are the same, the memory saving is not.")
    # bitsandbytes warns again at the first step(); the note above says it once, in our words.
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_lambda(cfg: TrainingConfig, total_steps: int):
    """Linear warmup over warmup_steps, then cosine/linear decay to 0 at total_steps (or constant)."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        if cfg.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated by torch; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def mixed_precision(cfg: TrainingConfig, device: torch.device) -> str:
    if cfg.mixed_precision != "auto":
        if cfg.mixed_precision != "no" and device.type != "cuda":
            raise PeftkitError(f"training.mixed_precision: {cfg.mixed_precision} needs a CUDA device; use auto or no on CPU.")
        return cfg.mixed_precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


def check_device_support(cfg: Recipe, device: torch.device) -> None:
    """Combinations that only fail once the device is known, caught before anything is loaded."""
    q = cfg.quantization
    if q is not None and device.type == "cpu" and q.method != "int8" and q.compute_dtype == "float16":
        raise PeftkitError(
            "quantization.compute_dtype: float16 on CPU: CPUs have no fast float16 matmuls and float16 training "
            "needs the loss scaling that only runs on CUDA, so it would be slow and underflow. Use float32 (or "
            "bfloat16) on CPU; float16 is for CUDA devices without bfloat16."
        )
    if device.type == "cuda" and "bfloat16" in (cfg.model.dtype, q.compute_dtype if q else None) \
            and not torch.cuda.is_bf16_supported():
        raise PeftkitError(f"bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use float16 or float32.")


def cpu_dtype_note(cfg: Recipe, device: torch.device) -> str | None:
    """A note for 16-bit weights on a CPU without native bf16 matmuls, where they are slow, not lean.

    Measured on a 2-core AVX2 machine: a (1024 x 256) @ (256 x 32000) matmul ran at 12 GFLOP/s in bf16 vs 73 in
    fp32, and the QLoRA benchmark with bf16 embeddings/lm_head (vocab 32000) stepped 24x slower than with fp32.
    """
    if device.type != "cpu" or cfg.model.dtype not in ("bfloat16", "float16"):
        return None
    with contextlib.suppress(Exception):
        if cfg.model.dtype == "bfloat16" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None  # AVX512-BF16 / AMX: bf16 matmuls are fast here
    return (f"model.dtype: {cfg.model.dtype} on a CPU without native 16-bit matmuls: the weights take half the "
            "memory, but matmuls run several times slower than in float32 (up to ~20x for a large vocabulary). "
            "Use model.dtype: float32 on this machine unless memory is what limits you.")


# ------------------------------------------------------------------------------------ run directory


def _check_output_dir(out: Path, recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory; --overwrite clears it."""
    previous = out / "recipe.yaml"
    if out.exists() and not out.is_dir():
        raise PeftkitError(f"export.output_dir {out} is a file, not a directory; choose another path.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PeftkitError(f"export.output_dir {out} cannot be created ({e.strerror}); choose another path.") from None
    if overwrite and out.exists():
        for name in ("adapter", "merged", CHECKPOINTS, "metrics.jsonl", "recipe.yaml", "manifest.json"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        return
    if previous.exists() and previous.read_text() != recipe.to_yaml():
        raise PeftkitError(
            f"{out} holds a run of a different recipe (its recipe.yaml differs). Choose another export.output_dir, "
            "or pass --overwrite to replace that run."
        )
    if resume and not latest_checkpoint(out):
        raise PeftkitError(f"--resume: no checkpoint in {out / CHECKPOINTS}. Set training.save_steps to write "
                           "checkpoints, or run without --resume.")


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / CHECKPOINTS).glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return ckpts[-1] if ckpts else None


@dataclass
class LoopState:
    step: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0


def save_checkpoint(out: Path, model, cfg: Recipe, optimizer, scheduler, state: LoopState) -> Path:
    """checkpoints/step-N/ written as a whole (temp dir + rename); then old ones beyond the limit removed."""
    path = out / CHECKPOINTS / f"step-{state.step:08d}"
    fsync_path(out / "metrics.jsonl")  # the lines up to this step are on disk before the checkpoint is
    with atomic_directory(path) as tmp:
        from safetensors.torch import save_file

        save_file(adapter_state_dict(model, cfg.adapter.modules_to_save), tmp / WEIGHTS_NAME)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng}, tmp / STATE_FILE)
        (tmp / TRAINER_STATE).write_text(json.dumps(state.__dict__))
    for old in sorted((out / CHECKPOINTS).glob("step-*[0-9]"))[: -cfg.training.save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler) -> LoopState:
    from safetensors.torch import load_file

    load_adapter_state_dict(model, load_file(path / WEIGHTS_NAME))
    # weights_only: the restricted unpickler (tensors, dicts, numbers), never arbitrary objects.
    blob = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["cpu"])
    if "cuda" in blob["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["rng"]["cuda"])
    return LoopState(**json.loads((path / TRAINER_STATE).read_text()))


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint (and a partial last line of a kill)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


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


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False, console: Console | None = None) -> dict:
    """Run a recipe end to end and return the summary (also in manifest.json).

    Args:
        recipe: a validated recipe (see `peftkit.recipe.load_recipe`).
        resume: continue from the newest checkpoint in the output directory.
        overwrite: replace a different run found in the output directory.
        console: where progress and the summary go.
    """
    from accelerate import Accelerator

    from peftkit import manifest as manifest_mod
    from peftkit.memory import estimate_memory, print_estimate

    console = console or Console()
    cfg, tcfg = recipe, recipe.training
    out = Path(cfg.export.output_dir)
    _check_output_dir(out, cfg, resume, overwrite)
    started = time.time()

    seed_everything(tcfg.seed, tcfg.deterministic)
    device = resolve_device(cfg.model.device)
    check_device_support(cfg, device)
    if note := cpu_dtype_note(cfg, device):
        console.print(f"[yellow]note:[/] {note}")
    print_estimate(console, estimate_memory(cfg))
    tok = load_tokenizer(cfg.model)
    train_ex, train_stats = load_examples(tok, cfg.data.train, cfg.data.train_split, cfg.data)
    eval_ex = load_examples(tok, cfg.data.eval, cfg.data.eval_split, cfg.data)[0] if cfg.data.eval else None
    _report_data(console, train_stats)

    with console.status("Loading model..."):
        model = load_model(cfg.model, cfg.quantization, device)
    pad_id = tok.pad_token_id
    base_eval = None
    if eval_ex and cfg.eval.base_model and not resume:
        base_eval = evaluate_loss(model, eval_ex, cfg.eval.batch_size, pad_id)

    # Seed again right before the adapter is drawn: its init must not depend on what loading consumed.
    torch.manual_seed(tcfg.seed)
    targets = inject_adapters(model, cfg.adapter)
    prepare_for_training(model, tcfg.gradient_checkpointing)
    trainable, total = count_parameters(model)
    console.print(f"LoRA r={cfg.adapter.r} on {len(targets)} modules: {trainable:,} trainable of {total:,} "
                  f"parameters ({100 * trainable / total:.3f}%)")

    per_epoch = -(-len(train_ex) // tcfg.batch_size)
    total_steps = tcfg.max_steps or max(1, (tcfg.epochs * per_epoch) // tcfg.grad_accum)
    optimizer = build_optimizer(tcfg, trainable_parameters(model), device, console)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, total_steps))
    accelerator = Accelerator(mixed_precision=mixed_precision(tcfg, device), cpu=device.type == "cpu")
    model, optimizer = accelerator.prepare(model, optimizer)

    # Only now, with data and model loaded, does the directory become this recipe's run.
    atomic_write_text(out / "recipe.yaml", cfg.to_yaml())
    state = LoopState()
    metrics_path = out / "metrics.jsonl"
    if resume:
        ckpt = latest_checkpoint(out)
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        _truncate_metrics(metrics_path, state.step)
        console.print(f"Resumed from {ckpt.name} (step {state.step} of {total_steps}).")
    else:
        metrics_path.unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)

    stream = micro_batches(train_ex, tcfg.batch_size, tcfg.seed, cfg.data.shuffle, pad_id,
                           start=state.step * tcfg.grad_accum, num_workers=cfg.data.num_workers)
    eval_result = None
    model.train()
    progress = _progress(console)
    task = progress.add_task("train", total=total_steps, completed=state.step, loss=float("nan"), lr=0.0, tps=0.0)
    window_start, window_tokens = time.time(), 0
    with StopRequest() as stop, progress:
        while state.step < total_steps:
            if stop.signal is not None:
                path = save_checkpoint(out, accelerator.unwrap_model(model), cfg, optimizer, scheduler, state)
                raise PeftkitError(
                    f"{'Interrupted' if stop.signal == signal.SIGINT else 'Stopped by SIGTERM'} at step "
                    f"{state.step}; checkpoint saved to {path}. Continue with `peftkit train RECIPE --resume`."
                )
            window = [next(stream) for _ in range(tcfg.grad_accum)]
            n_label = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
            loss_sum = torch.zeros((), device=accelerator.device)
            for batch in window:
                window_tokens += int(batch["attention_mask"].sum())  # counted on CPU: no device sync
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                loss, _ = token_loss_sum(model, batch)
                accelerator.backward(loss / n_label)
                loss_sum += loss.detach()
            loss_value = float(loss_sum) / n_label  # one device sync per optimizer step
            if not math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                if tcfg.nan_policy == "stop":
                    last = latest_checkpoint(out)
                    raise PeftkitError(
                        f"Loss became {loss_value} at step {state.step + 1}; training stopped. "
                        + (f"The last good checkpoint is {last} (resume with --resume after lowering training.lr). "
                           if last else "No checkpoint was written (set training.save_steps). ")
                        + "Set training.nan_policy: skip_step to skip such steps instead."
                    )
                state.skipped_steps += 1
                console.print(f"[yellow]step {state.step + 1}: loss {loss_value}, step skipped[/]")
                state.step += 1
                scheduler.step()
                continue
            grad_norm = None
            if tcfg.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(trainable_parameters(model), tcfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += window_tokens
            state.losses.append(loss_value)
            lr = scheduler.get_last_lr()[0]

            if state.step % tcfg.log_steps == 0 or state.step == total_steps:
                elapsed = time.time() - window_start
                tps = window_tokens / max(elapsed, 1e-9)
                record = {"step": state.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                          "tokens": state.tokens, "tokens_per_s": tps, "peak_mem_mb": peak_memory_mb(device)}
                append_line(metrics_path, json.dumps(record), sync=False)
                progress.update(task, completed=state.step, loss=loss_value, lr=lr, tps=tps)
                window_start, window_tokens = time.time(), 0
            if eval_ex and tcfg.eval_steps and state.step % tcfg.eval_steps == 0 and state.step < total_steps:
                eval_result = evaluate_loss(model, eval_ex, cfg.eval.batch_size, pad_id)
                append_line(metrics_path, json.dumps({"step": state.step, "eval_loss": eval_result["loss"],
                                                      "eval_perplexity": eval_result["perplexity"]}), sync=False)
            if tcfg.save_steps and state.step % tcfg.save_steps == 0:
                save_checkpoint(out, accelerator.unwrap_model(model), cfg, optimizer, scheduler, state)

    model = accelerator.unwrap_model(model)
    if eval_ex:
        eval_result = evaluate_loss(model, eval_ex, cfg.eval.batch_size, pad_id)
        append_line(metrics_path, json.dumps({"step": state.step, "eval_loss": eval_result["loss"],
                                              "eval_perplexity": eval_result["perplexity"]}), sync=False)
    fsync_path(metrics_path)
    exported = export(model, tok, cfg, targets, out)
    summary = {
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "train_loss": state.losses[-1] if state.losses else None,
        "eval_loss": eval_result["loss"] if eval_result else None,
        "eval_perplexity": eval_result["perplexity"] if eval_result else None,
        "base_eval_loss": base_eval["loss"] if base_eval else None,
        "trainable_params": trainable,
        "total_params": total,
        "tokens": state.tokens,
        "elapsed_s": time.time() - started,
        "peak_mem_mb": peak_memory_mb(device),
    }
    atomic_write_json(out / "manifest.json", manifest_mod.build_manifest(cfg, out, summary, exported, device, state.losses))
    _print_summary(console, summary, out, exported)
    return summary


def export(model, tok, cfg: Recipe, targets: list[str], out: Path) -> list[Path]:
    """Write adapter/ and/or merged/ as the recipe asks; returns the exported directories."""
    exported = []
    if cfg.export.adapter:
        state = adapter_state_dict(model, cfg.adapter.modules_to_save)
        config = peft_config(cfg.adapter, targets, _base_name(cfg), fan_in_fan_out=bool(conv1d_modules(model)))
        with atomic_directory(out / "adapter") as tmp:
            save_adapter(tmp, state, config, cfg.quantization, quantized_on=_device_of(model).type)
        exported.append(out / "adapter")
    if cfg.export.merged:
        dtype = DTYPES[cfg.export.merged_dtype or _load_dtype(cfg, model)]
        save_merged(merged_model(model, cfg.adapter, dtype), tok, out / "merged")
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


def _report_data(console: Console, stats: dict) -> None:
    msg = f"{stats['examples']} training examples"
    if stats["bad_rows"]:
        msg += f"; skipped {stats['bad_rows']} bad rows (data.on_bad_rows: skip)"
    if stats["too_long"]:
        msg += f"; dropped {stats['too_long']} whose target lies beyond data.max_length"
    console.print(msg)


def _progress(console: Console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
    )


def _print_summary(console: Console, s: dict, out: Path, exported: list[Path]) -> None:
    from rich.table import Table

    table = Table(title="peftkit train: done", show_header=False)
    if s["base_eval_loss"] is not None:
        table.add_row("eval loss, base model", f"{s['base_eval_loss']:.4f}  (ppl {math.exp(min(s['base_eval_loss'], 700)):.2f})")
    if s["eval_loss"] is not None:
        table.add_row("eval loss, fine-tuned", f"{s['eval_loss']:.4f}  (ppl {s['eval_perplexity']:.2f})")
    table.add_row("steps", f"{s['steps']}" + (f" ({s['skipped_steps']} skipped)" if s["skipped_steps"] else ""))
    table.add_row("time", f"{s['elapsed_s']:.1f} s")
    table.add_row("peak memory", f"{s['peak_mem_mb']:.0f} MiB")
    for path in exported:
        table.add_row(path.name, str(path))
    table.add_row("run directory", str(out))
    console.print(table)
