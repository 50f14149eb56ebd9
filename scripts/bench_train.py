"""Benchmark: peftkit LoRA training vs. transformers `Trainer` + HF `peft` on the same recipe.

    python scripts/bench_train.py                          # CPU defaults: ~40 s on 2 idle cores
    python scripts/bench_train.py --device cuda --hidden 1024 --layers 8 --batch-size 8 --steps 60
    python scripts/bench_train.py --dora                   # DoRA on both sides (use_dora: true)
    python scripts/bench_train.py --model /tmp/smollm2 --trainable-tokens 8 --ab 3 --steps 4   # + trained token rows
    python scripts/bench_train.py --model /tmp/smollm2 --steps 12 --warmup 3 --floor   # the real SmolLM2-135M
    python scripts/bench_train.py --lora-fa                # peftkit LoRA vs peftkit LoRA-FA (adapter.lora_fa)
    python scripts/bench_train.py --compile inductor --warmup 5   # peftkit with training.compile (first steps compile)
    # peftkit with data.group_by_length vs without, one epoch of rows of 1 to 14 numbers (~80-500 tokens), ~10 min:
    python scripts/bench_train.py --group-by-length --words 14 --max-length 512 --steps 40 --warmup 1 --threads 1 \
        --repeats 3
    python scripts/bench_train.py --ab 4 --steps 6 --floor    # forward + backward only, all sides in one process
    python scripts/bench_train.py --ab 4 --steps 6 --floor --dropout 0.05   # LoRA dropout on both sides
    # a ~1.2B Llama shape in bf16 on one GPU, rows of ~400 tokens, with the frozen-base floor:
    python scripts/bench_train.py --device cuda --model-dtype bfloat16 --hidden 2048 --layers 16 \
        --intermediate 5632 --vocab 32000 --words 12 --max-length 512 --batch-size 8 --steps 30 --floor

Builds a random-init Llama-architecture model and alpaca data in a temp dir (nothing is downloaded),
then trains it twice with the same settings: model, data, steps, batch size, r, alpha, all-linear
targets, lr, cosine schedule without warmup, grad clip 1.0, seed, max_length. Both sides see the *same
batches in the same order*: peftkit tokenizes and orders the examples, and the baseline gets that
sequence with a sequential sampler and a padding collator (labels padded with -100). Each side runs in
a fresh subprocess (this script re-invokes itself with `--side`) so memory figures are comparable.

Measured, per side: wall-clock timestamps at the end of every optimizer step (peftkit: when it writes
the step's line to metrics.jsonl; Trainer: `on_step_end`), after a CUDA synchronize on GPU. Model
loading, adapter injection and export fall outside that window. The first `--warmup` steps are skipped;
s/step = (end of last step - end of step `warmup`) / timed steps, tokens/s = non-pad tokens of the timed
steps / that time. `--floor` adds a third side: the frozen base's forward and backward (to its input embeddings;
no adapter, no optimizer) on the same batches at the same precision, the least any adapter method can cost;
peftkit's s/step over it is its overhead. On CPU each side also notes its process's CPU time at each step's end: the
table's `tokens/s by CPU time` row (and the overheads over the floor by it), which other processes' load on a shared
machine moves less than the wall clock at --threads 1. Peak memory: CUDA max_memory_allocated, or peak RSS of the subprocess on CPU
(with the RSS after importing both libraries, so the growth can be compared too).

--group-by-length compares two peftkit sides, with data.group_by_length and without, on rows of mixed length (each
holds 1 to --words numbers, drawn uniformly): the --steps steps are one epoch, whose tokens / tokens/s is the time per
epoch it prints (by the wall clock, and by the side's CPU time, which a shared machine's load moves less at
--threads 1), with each side's padding (pad tokens / padded batch tokens over the timed steps).

--lora-fa compares two peftkit sides, LoRA and LoRA-FA, instead of peftkit and peft; it also shows the
activations one training forward keeps for backward at batch x max_length tokens, measured with
`peftkit.activations.saved_activation_bytes` (exact, where peak RSS on CPU is blurred by the allocator).

`--ab ROUNDS` builds every side's model in one process instead and times only the forward and backward pass
(`ab_pairs`): each of `--steps` batches runs on all the models back to back, in rotating order, ROUNDS times over,
and a ratio is the median over batches of two models' times on the same batch. Training runs on this 2-core VM
swing by 10 % and more between identical runs; these ratios agree to about 3 % between runs.

On a shared or busy CPU, timings swing by 2-10x between runs (torch's OpenMP threads wait on each other
when a core is taken): use `--repeats 3` (medians, alternating order) and `--threads 1` there. On CPU,
`--fixed-mmap-threshold` makes peak RSS track live memory rather than glibc's heap retention.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT_TAG = "BENCH_RESULT "


def common_args(description: str) -> argparse.ArgumentParser:
    """Flags shared by bench_train.py and bench_qlora.py."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per side")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (first-call overheads)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout on both sides (adapter.dropout, peft's "
                   "lora_dropout)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--words", type=int, default=1, help="numbers written out per row (longer rows: 1 is ~80 tokens)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in each side (default: torch's own)")
    p.add_argument("--repeats", type=int, default=1, help="runs per side, alternating order; medians are shown")
    p.add_argument("--json", help="also write every run's raw figures (step-end times, losses, memory) to this file")
    p.add_argument("--floor", action="store_true", help="also time the frozen base's forward + backward")
    p.add_argument("--ab", type=int, metavar="ROUNDS", help="instead of a training run per side: forward + backward "
                   "of every side's model in one process, each batch on all back to back, ROUNDS times over the "
                   "--steps batches (steady on a noisy machine; --floor adds the frozen base)")
    p.add_argument("--model", help="an existing model directory instead of a built one, e.g. /tmp/smollm2, the real "
                   "SmolLM2-135M that `scripts/measure_memory.py --smollm2` writes (the shape flags are then ignored)")
    # glibc's adaptive mmap threshold keeps freed activation buffers in the heap, which can move peak RSS by
    # tens of MiB either way; a fixed threshold returns them to the OS, so peak RSS tracks live memory.
    p.add_argument("--fixed-mmap-threshold", action="store_true", help="CPU: MALLOC_MMAP_THRESHOLD_=65536 in the sides")
    p.add_argument("--side", choices=["peftkit", "peft", "lora", "lora-fa", "floor", "grouped"], help=argparse.SUPPRESS)  # set by the parent process
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p


def recipe_for(args, workdir: Path, **sections):
    """The one recipe both sides run; `sections` adds or overrides (quantization, training keys...)."""
    from peftkit.recipe import Recipe

    training = dict(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, scheduler="cosine",
                    warmup_steps=0, max_grad_norm=1.0, seed=args.seed, log_steps=1)
    training.update(sections.pop("training", {}))
    return Recipe.model_validate(dict(
        model=dict(name_or_path=str(model_dir(args, workdir)), dtype=sections.pop("dtype", getattr(args, "model_dtype", None) or "float32"),
                   device=args.device) | sections.pop("model", {}),
        # bench_qlora.py has no --dora flag: LoRA there.
        adapter=dict(r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules="all-linear",
                     use_dora=getattr(args, "dora", False), **token_rows(args)) | expert_params(args)
        | sections.pop("adapter", {}),
        data=dict(train=str(workdir / "train.jsonl"), format="alpaca", max_length=args.max_length)
        | sections.pop("data", {}),
        training=training,
        export=dict(output_dir=str(workdir / "peftkit-run"), adapter=False, merged=False),
        eval=dict(base_model=False),
        **sections,
    ))


def token_rows(args) -> dict:
    """--trainable-tokens N: trainable_token_indices of N ids (from 10 on), on both sides."""
    n = getattr(args, "trainable_tokens", None)
    return {"trainable_token_indices": list(range(10, 10 + n))} if n else {}


def expert_params(args) -> dict:
    """--moe: LoRA on the attention projections and the experts' fused weights (target_parameters), on both sides.
    Named, not all-linear: on a transformers 5 mixture of experts, peft's all-linear also adds the router and the
    experts (gate_up_proj at twice the rank), as transformers 4's all-linear took them."""
    if not getattr(args, "moe", False):
        return {}
    return {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}


def model_dir(args, workdir: Path) -> Path:
    """--model, or the model the benchmark builds in its work directory."""
    return Path(args.model) if getattr(args, "model", None) else workdir / "model"


def write_data(args, workdir: Path) -> None:
    from peftkit.tiny import number_rows, write_jsonl

    # One epoch holds every step's batch, so both sides walk the same sequence without wrapping.
    counts = [args.words] * (args.steps * args.batch_size)
    if getattr(args, "group_by_length", False):  # mixed lengths: each row 1 to --words numbers
        draw = random.Random(2)
        counts = [draw.randint(1, args.words) for _ in counts]
    rows = number_rows(sum(counts), seed=1)
    starts = itertools.accumulate(counts, initial=0)
    joined = [{"instruction": "Write the numbers in words.", "input": " ".join(r["input"] for r in group),
               "output": ", ".join(r["output"] for r in group)}
              for group in (rows[a:a + k] for a, k in zip(starts, counts))]
    write_jsonl(workdir / "train.jsonl", rows if set(counts) == {1} else joined)


def ordered_examples(recipe):
    """The tokenized examples in the order peftkit's loop consumes them (seeded per-epoch permutations, grouped by
    length with data.group_by_length)."""
    from peftkit.data import epoch_batches, load_examples
    from peftkit.data.batches import example_lengths
    from peftkit.modeling import load_tokenizer

    tcfg = recipe.training
    tok = load_tokenizer(recipe.model)
    examples, _ = load_examples(tok, recipe.data.train, recipe.data.train_split, recipe.data)
    epochs = -(-tcfg.max_steps * tcfg.batch_size // len(examples)) + 1
    lengths = example_lengths(examples) if recipe.data.group_by_length else None
    batches = [b for e in range(epochs) for b in epoch_batches(len(examples), tcfg.batch_size, tcfg.seed, e, True,
                                                               lengths)]
    order = [i for b in batches for i in b]
    return tok, [examples[i] for i in order]


def _sync(device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def run_peftkit(recipe, _workdir: Path | None = None) -> dict:
    """peftkit.train.train(recipe); step ends timed where the loop writes each step's metrics line."""
    import peftkit.start as ps
    import peftkit.train as pt
    from rich.console import Console

    ends: list[float] = []
    cpu_ends: list[float] = []  # this process's CPU time: steadier than the wall clock on a shared CPU (--threads 1)
    original = ps.append_line  # Run.log's

    def timed_append_line(path, line, **kwargs):
        if '"loss"' in line:
            ends.append(_sync(recipe.model.device))
            cpu_ends.append(time.process_time())
        original(path, line, **kwargs)

    ps.append_line = timed_append_line
    try:
        summary = pt.train(recipe, overwrite=True, console=Console(quiet=True))
    finally:
        ps.append_line = original
    lines = (Path(recipe.export.output_dir) / "metrics.jsonl").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
    return {"step_ends": ends, "cpu_ends": cpu_ends, "losses": losses, "eval_loss": summary["eval_loss"],
            "trainable": summary["trainable_params"]}


def run_peftkit_measured(recipe, workdir: Path) -> dict:
    """run_peftkit, plus the bytes one forward at batch_size x max_length keeps for backward (--lora-fa)."""
    import torch

    from peftkit.adapters import inject_adapters
    from peftkit.activations import saved_activation_bytes
    from peftkit.modeling import load_model

    result = run_peftkit(recipe, workdir)
    model = load_model(recipe.model, None, torch.device(recipe.model.device))
    inject_adapters(model, recipe.adapter)
    ids = torch.randint(3, model.config.vocab_size, (recipe.training.batch_size, recipe.data.max_length),
                        device=recipe.model.device)
    result["saved_mb"] = saved_activation_bytes(model, {"input_ids": ids}) / 2**20
    return result


def floor_model(recipe):
    """The frozen base as the floor runs it: quantized as the recipe says, no adapter, gradients to its inputs."""
    import torch

    from peftkit.modeling import load_model

    model = load_model(recipe.model, recipe.quantization, torch.device(recipe.model.device))
    model.requires_grad_(False)
    model.enable_input_require_grads()  # backward runs through every layer, as it must to reach an adapter
    return model.train()


def peftkit_model(recipe):
    """The model as peftkit's train() builds it (load, seed, inject, prepare), for --ab."""
    import torch

    from peftkit.adapters import inject_adapters
    from peftkit.modeling import load_model, prepare_for_training
    from peftkit.runtime import seed_everything

    seed_everything(recipe.training.seed, deterministic_cuda=False)
    model = load_model(recipe.model, recipe.quantization, torch.device(recipe.model.device))
    torch.manual_seed(recipe.training.seed)
    inject_adapters(model, recipe.adapter)
    prepare_for_training(model, recipe.training.gradient_checkpointing)
    return model.train()


def autocast_bf16(recipe, model) -> bool:
    """Whether peftkit's step runs `model` under bf16 autocast (fp32 weights where mixed precision is bf16)."""
    import torch

    from peftkit.runtime import mixed_precision

    device = torch.device(recipe.model.device)
    return mixed_precision(recipe.training, device) == "bf16" and next(model.parameters()).dtype == torch.float32


def ab_pairs(recipe, models: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """--ab: forward + backward of each of `models` (name -> model), all in this process, on the recipe's first
    max_steps batches (training order, padded as in training), `rounds` times over. Each batch runs on every model
    back to back, the order rotating, so the times of one batch see the same machine (compare them with
    `paired_ratio`). Per model: its step times by the wall clock, and by this process's CPU time (which other
    processes' load moves less: on 2 busy cores a 1-thread step's wall time was twice its CPU time), in the same
    order for all."""
    import torch

    from peftkit.data.batches import eval_loader
    from peftkit.evaluate import token_loss_sum

    tok, ordered = ordered_examples(recipe)
    device = torch.device(recipe.model.device)
    batches = [{k: v.to(device) for k, v in b.items()}
               for _, b in zip(range(recipe.training.max_steps), eval_loader(ordered, recipe.training.batch_size,
                                                                            tok.pad_token_id))]
    bf16 = autocast_bf16(recipe, next(iter(models.values())))
    params = {name: [p for p in model.parameters() if p.requires_grad] for name, model in models.items()}

    def step(name: str, batch: dict) -> tuple[float, float]:
        start, cpu = _sync(recipe.model.device), time.process_time()
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss, n = token_loss_sum(models[name], batch)
        (loss / n).backward()
        for p in params[name]:
            p.grad = None
        return _sync(recipe.model.device) - start, time.process_time() - cpu

    for name in models:
        for batch in batches[:2]:
            step(name, batch)  # first calls: allocations, kernel selection
    names, times, cpu_times = list(models), {name: [] for name in models}, {name: [] for name in models}
    for i in range(rounds * len(batches)):
        for name in names[i % len(names):] + names[:i % len(names)]:
            wall, cpu = step(name, batches[i % len(batches)])
            times[name].append(wall)
            cpu_times[name].append(cpu)
    return times, cpu_times


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """The median over batches of time / the reference's time on the same batch (ab_pairs' lists)."""
    return statistics.median(a / b for a, b in zip(times, reference))


def report_ab(timed: tuple[dict[str, list[float]], dict[str, list[float]]], title: str) -> None:
    """The --ab table: each model's median s/step, and peftkit's time over peft's and the floor's on the same batch,
    by the wall clock and by CPU time (`ab_pairs`)."""
    print(f"\n{title}")
    for clock, times in zip(("wall", "CPU"), timed):
        print(f"by {clock} time: " + ", ".join(f"{name} {statistics.median(t):.4f}" for name, t in times.items())
              + " s/step")
        others = [name for name in ("peft", "floor") if name in times]
        print("  peftkit / " + ", peftkit / ".join(f"{name}: {paired_ratio(times['peftkit'], times[name]):.3f}"
                                                   for name in others)
              + (f"; peft / floor: {paired_ratio(times['peft'], times['floor']):.3f}" if "floor" in times else ""))
    print("forward + backward only (no optimizer, no data loading), one process; s/step: medians; a ratio is the "
          "median over batches of the two times on one batch")


def run_floor(recipe, _workdir: Path | None = None) -> dict:
    """The frozen base's forward and backward on peftkit's batches, at peftkit's precision (bf16 autocast on CUDA
    when the weights are float32), quantized as the recipe says (bench_qlora: the 4-bit base): the least time any
    adapter method's step can take."""
    import torch

    from peftkit.data.batches import eval_loader
    from peftkit.evaluate import token_loss_sum

    device = torch.device(recipe.model.device)
    tok, ordered = ordered_examples(recipe)
    model = floor_model(recipe)
    bf16 = autocast_bf16(recipe, model)
    ends: list[float] = []
    cpu_ends: list[float] = []
    for batch in eval_loader(ordered, recipe.training.batch_size, tok.pad_token_id):  # in order, padded as in training
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss, n = token_loss_sum(model, batch)
        (loss / n).backward()
        ends.append(_sync(recipe.model.device))
        cpu_ends.append(time.process_time())
        if len(ends) == recipe.training.max_steps:
            break
    return {"step_ends": ends, "cpu_ends": cpu_ends, "losses": [float("nan")]}


def step_timer(device: str):
    """(a transformers TrainerCallback that notes each optimizer step's end and each logged loss, the step ends'
    list, the losses' list). The callback also notes this process's CPU time at each step's end (`cpu_ends`)."""
    from transformers import TrainerCallback

    ends: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.cpu_ends: list[float] = []

        def on_step_end(self, *_, **__):
            ends.append(_sync(device))
            self.cpu_ends.append(time.process_time())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    return Timer(), ends, losses


def run_trainer(model, tok, ordered, recipe, workdir: Path, callbacks=(), **extra_args) -> dict:
    """transformers Trainer on an already adapted (peft) model, fed `ordered` sequentially; `callbacks` are
    added to the step timer."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    t, cuda = recipe.training, recipe.model.device == "cuda"
    timer, ends, losses = step_timer(recipe.model.device)

    args = TrainingArguments(
        output_dir=str(workdir / "trainer-run"), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=1, learning_rate=t.lr, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, train_sampling_strategy="sequential",
        dataloader_pin_memory=cuda, use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(),
        activation_checkpointing=t.gradient_checkpointing, activation_checkpointing_kwargs={"use_reentrant": False},
        **extra_args,
    )
    data = [{"input_ids": e.input_ids, "labels": e.labels} for e in ordered]
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timer, *callbacks],
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    trainer.train()
    return {"step_ends": ends, "cpu_ends": timer.cpu_ends, "losses": losses}


def peft_lora_model(recipe):
    """The recipe's LoRA (or DoRA) on its base, by peft; model.task sequence_classification: on the base as a
    classifier of model.num_labels outputs (a reward model's one), its new `score` head trained in full (SEQ_CLS)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from peftkit.modeling import load_tokenizer
    from peftkit.runtime import seed_everything

    classify = recipe.model.task == "sequence_classification"
    seed_everything(recipe.training.seed, deterministic_cuda=False)  # as peftkit: the same draw of a new head
    auto, labels = (AutoModelForSequenceClassification, {"num_labels": recipe.model.num_labels}) if classify else \
        (AutoModelForCausalLM, {})
    model = auto.from_pretrained(recipe.model.name_or_path, dtype=getattr(torch, recipe.model.dtype),
                                 use_kernels=False, **labels)  # as peftkit: the model's own code
    if classify:  # (a classifier scores a row at its last token before the padding)
        model.config.pad_token_id = load_tokenizer(recipe.model).pad_token_id
    model.to(recipe.model.device)
    model.config.use_cache = False
    a = recipe.adapter
    # As peftkit: same seed right before injection (so the same lora_A init), deterministic CPU kernels.
    seed_everything(recipe.training.seed, deterministic_cuda=False)
    config = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                        task_type="SEQ_CLS" if classify else "CAUSAL_LM",
                        target_modules=a.target_modules if isinstance(a.target_modules, list) else "all-linear",
                        use_dora=a.use_dora, trainable_token_indices=a.trainable_token_indices,
                        target_parameters=a.target_parameters)
    return get_peft_model(model, config)


def run_peft_lora(recipe, workdir: Path) -> dict:
    tok, ordered = ordered_examples(recipe)
    return run_trainer(peft_lora_model(recipe), tok, ordered, recipe, workdir,
                       optim="adamw_torch_fused" if recipe.model.device == "cuda" else "adamw_torch")


def child(recipe, run_side, workdir: Path, threads: int | None, lengths=None, imports: tuple[str, ...] = ()) -> None:
    """Run one side in this (fresh) process and print its result as one tagged JSON line. `lengths(recipe)`: the
    token count of each example in the order the sides take them (default: `ordered_examples`'); `imports`: more
    modules both sides import first (the same RSS baseline)."""
    import importlib

    import torch

    import peft, peftkit.train, transformers.trainer  # noqa: E401, F401  (both sides' imports: same RSS baseline)
    for name in imports:
        importlib.import_module(name)

    cuda = recipe.model.device == "cuda"
    if threads:
        torch.set_num_threads(threads)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with open("/proc/self/statm") as f:
        base_rss = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    result = run_side(recipe, workdir)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss
    result["base_mb"] = 0.0 if cuda else base_rss
    bs = recipe.training.batch_size
    counts = lengths(recipe) if lengths else [len(e.input_ids) for e in ordered_examples(recipe)[1]]
    batches = [counts[k * bs:(k + 1) * bs] for k in range(recipe.training.max_steps)]
    result["tokens_per_step"] = [sum(batch) for batch in batches]
    result["padded_per_step"] = [len(batch) * max(batch) for batch in batches]
    print(RESULT_TAG + json.dumps(result), flush=True)


def spawn_sides(workdir: Path, repeats: int, fixed_mmap_threshold: bool, sides: tuple[str, ...] = ("peftkit", "peft"),
                extra: tuple[str, ...] = (), warm_first: bool = False) -> dict[str, list[dict]]:
    """Re-run this script once per side per repeat, each in a fresh interpreter, alternating which side goes
    first (a load that drifts during the benchmark then hits both); collect the tagged JSON lines. `extra`:
    more flags for the sides. `warm_first` (CUDA): one untimed run of the first side before all others. On a GPU
    that has just started, the first process stalls 2-3 s at each batch of a new padded length (seen on an H200:
    the same steps of every later run take 0.13 s, on either side); without the warm-up that process is the
    first side's first repeat, which is what made one of two peftkit runs on an H100 look 3x slower."""
    results: dict[str, list[dict]] = {side: [] for side in sides}
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if fixed_mmap_threshold else {}))
    order = [sides if i % 2 == 0 else sides[::-1] for i in range(repeats)]
    for i, round_sides in enumerate([sides[:1]] * warm_first + order):
        for side in round_sides:
            cmd = [sys.executable, sys.argv[0], *sys.argv[1:], *extra, "--side", side, "--workdir", str(workdir)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            tagged = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
            if proc.returncode != 0 or not tagged:
                sys.exit(f"{side} side failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
            if i >= warm_first:
                results[side].append(result := json.loads(tagged[-1][len(RESULT_TAG):]))
                ends = result["step_ends"]  # as each run ends: a stopped benchmark keeps what it measured
                print(f"  {side}: {len(ends)} steps in {ends[-1] - ends[0]:.2f} s after the first, final loss "
                      f"{result['losses'][-1]:.4f}, peak {result['peak_mb']:,.0f} MiB", flush=True)
    return results


def summarize(res: dict, warmup: int) -> dict:
    ends, tokens = res["step_ends"], res["tokens_per_step"]
    # Step k's time is end(k) - end(k-1), so at least the first step is always left out.
    warmup = max(warmup, 1)
    if len(ends) <= warmup:
        sys.exit(f"only {len(ends)} steps timed; use --steps larger than --warmup ({warmup})")
    seconds, timed = ends[-1] - ends[warmup - 1], len(ends) - warmup
    n_tokens = sum(tokens[warmup:len(ends)])
    durations = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    cpu = res.get("cpu_ends")  # (CPU time: what other processes' load on a shared machine moves less, at --threads 1)
    cpu_seconds = cpu[len(ends) - 1] - cpu[warmup - 1] if cpu and len(cpu) >= len(ends) else float("nan")
    return {"s_step": seconds / timed, "s_step_median": statistics.median(durations), "tok_s": n_tokens / seconds,
            "tok_s_cpu": n_tokens / cpu_seconds, "s_step_cpu": cpu_seconds / timed,
            "peak": res["peak_mb"], "growth": res["peak_mb"] - res["base_mb"], "loss": res["losses"][-1],
            "loss10": statistics.mean(res["losses"][-10:]), "timed": timed, "saved": res.get("saved_mb", 0.0)}


def report(results: dict[str, list[dict]], args, title: str, cuda: bool) -> None:
    """Print one table; with --repeats, every figure is the median over the repeats."""
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title, "results": results}))
    runs = {side: [summarize(r, args.warmup) for r in rs] for side, rs in results.items()}
    s = {side: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for side, rs in runs.items()}
    mem = "peak CUDA alloc MiB" if cuda else "peak RSS MiB"
    rows = [("s/step (mean)", "s_step", "{:.4f}"), ("s/step (median step)", "s_step_median", "{:.4f}"),
            ("tokens/s", "tok_s", "{:,.0f}")]
    first, second = list(runs)[:2]  # the two compared sides, in the order spawned (then the floor, if any)
    by_cpu = all(s[side]["tok_s_cpu"] == s[side]["tok_s_cpu"] for side in s)  # (not NaN: every side noted its CPU time)
    if by_cpu and not cuda:
        rows.append(("tokens/s by CPU time", "tok_s_cpu", "{:,.0f}"))
    rows.append((mem, "peak", "{:,.0f}"))
    if not cuda:
        rows.append(("RSS growth MiB", "growth", "{:,.0f}"))
    if s[first]["saved"]:
        rows.append(("activations kept MiB", "saved", "{:,.1f}"))
    rows += [("final loss", "loss", "{:.4f}"), ("mean loss last 10", "loss10", "{:.4f}")]
    print(f"\n{title}")
    print(f"timed steps: {s[first]['timed']:.0f} per run (first {max(args.warmup, 1)} skipped); "
          f"{args.repeats} run(s) per side, median shown")
    for side, rs in runs.items() if args.repeats > 1 else ():
        print(f"  {side} s/step per run: " + ", ".join(f"{r['s_step']:.4f}" for r in rs))
    names = {"peftkit": "peftkit", "peft": "peft+Trainer", "lora": "LoRA", "lora-fa": "LoRA-FA", "grouped": "grouped"}
    ratio = names[first] + "/" + names[second]
    width = max(16, len(ratio) + 2)  # `peftkit/peft+Trainer` is 20 characters
    print(f"{'':22}{names[first]:>12}{names[second]:>14}{ratio:>{width}}")
    for label, key, fmt in rows:
        a, b = s[first][key], s[second][key]
        print(f"{label:22}{fmt.format(a):>12}{fmt.format(b):>14}{a / b:>{width}.3f}")
    print(f"ratio < 1: {names[first]} lower (better for s/step and memory, worse for tokens/s)")
    if "floor" in s:
        f = s["floor"]["s_step"]
        print(f"frozen-base floor (forward + backward, no adapter): {f:.4f} s/step, {s['floor']['tok_s']:,.0f} tokens/s; "
              f"over it: {names[first]} {100 * (s[first]['s_step'] / f - 1):+.1f} %, "
              f"{names[second]} {100 * (s[second]['s_step'] / f - 1):+.1f} %")
        if by_cpu and not cuda:
            f = s["floor"]["s_step_cpu"]
            print(f"  by CPU time: floor {f:.4f} s/step; over it: {names[first]} "
                  f"{100 * (s[first]['s_step_cpu'] / f - 1):+.1f} %, {names[second]} "
                  f"{100 * (s[second]['s_step_cpu'] / f - 1):+.1f} %")


def report_epoch(results: dict[str, list[dict]], warmup: int) -> None:
    """--group-by-length: each side's time per epoch (the epoch's tokens / its median tokens/s over the timed steps),
    by the wall clock and by the process's CPU time (which other processes' load on a shared machine moves less),
    and its padding (pad tokens / padded batch tokens over the same steps)."""
    timed = slice(max(warmup, 1), None)
    for side, rs in results.items():
        tokens, padded = rs[0]["tokens_per_step"], rs[0]["padded_per_step"]
        wall = statistics.median(summarize(r, warmup)["tok_s"] for r in rs)
        cpu = statistics.median(sum(tokens[timed]) / (r["cpu_ends"][-1] - r["cpu_ends"][timed.start - 1]) for r in rs)
        pad = 1 - sum(tokens[timed]) / sum(padded[timed])
        print(f"{side:10} {sum(tokens):,} tokens an epoch, {100 * pad:.0f} % padding: {sum(tokens) / wall:.1f} s "
              f"({wall:,.0f} tokens/s); by CPU time {sum(tokens) / cpu:.1f} s ({cpu:,.0f} tokens/s)")


def run_ab(args, recipe, peft_model) -> None:
    """--ab: peftkit's model, peft's (`peft_model(recipe)`) and with --floor the frozen base, timed by ab_pairs."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    models = {"peftkit": peftkit_model(recipe), "peft": peft_model(recipe)}
    if args.floor:
        models["floor"] = floor_model(recipe)
    report_ab(ab_pairs(recipe, models, args.ab),
              f"{recipe.adapter.method}{' + trainable tokens' if token_rows(args) else ''}"
              f"{f' (dropout {args.dropout})' if args.dropout else ''} over "
              f"{recipe.model.name_or_path if args.model else 'the built model'}"
              f"{' (NF4)' if recipe.quantization else ''}, {args.device}, batch {args.batch_size}, {args.steps} "
              f"batches x {args.ab} rounds, torch threads {torch.get_num_threads()}")


def build_llama(args, path: Path, dtype: str) -> None:
    """A random-init LlamaForCausalLM of the requested shape (head_dim 64, 4 query heads per key/value head, as
    Llama), saved in `dtype`, plus the character tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftkit.tiny import build_char_tokenizer

    tok = build_char_tokenizer(path)
    if args.vocab < len(tok):
        sys.exit(f"--vocab must be at least the tokenizer's {len(tok)} tokens")
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=max(512, args.max_length), bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if args.device == "cuda" else "cpu"):  # a 1B init on CPU takes minutes
        model = LlamaForCausalLM(config)
    model.to(getattr(torch, dtype)).save_pretrained(path)


def build_model(args, workdir: Path, arch: str = "llama") -> None:
    """The model a benchmark trains, built in its work directory: a Llama of real proportions with --intermediate
    (`build_llama`), else peftkit's tiny `arch` of --hidden and --layers; none with --model."""
    from peftkit.tiny import build_tiny_model

    if args.intermediate and not args.model:
        build_llama(args, workdir / "model", args.model_dtype)
    elif not args.model:
        build_tiny_model(workdir / "model", arch=arch, hidden_size=args.hidden, num_layers=args.layers, seed=0)


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, help="MLP width: with it (and --vocab) a Llama of real proportions "
                   "(head_dim 64); without, peftkit's tiny Llama (4 heads, MLP 2 x hidden, ~100-token vocabulary)")
    p.add_argument("--vocab", type=int, default=32000, help="with --intermediate: embedding/lm_head rows")
    p.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights of the base on both sides (float32 trains under bf16 autocast on CUDA)")
    p.add_argument("--compile", choices=["inductor", "aot_eager"], help="peftkit side: training.compile")
    p.add_argument("--dora", action="store_true", help="DoRA (use_dora) instead of plain LoRA, on both sides")
    p.add_argument("--lora-fa", action="store_true", help="peftkit LoRA-FA (adapter.lora_fa) vs peftkit LoRA")
    p.add_argument("--group-by-length", action="store_true", help="peftkit with data.group_by_length vs without, on "
                   "rows of 1 to --words numbers (mixed lengths); --steps is one epoch")
    p.add_argument("--moe", action="store_true", help="a tiny Mixtral (4 experts, 2 a token) of --hidden and --layers, "
                   "with LoRA on its fused experts too (target_parameters), on both sides")
    p.add_argument("--trainable-tokens", type=int, metavar="N", help="also train N rows of the embeddings "
                   "(trainable_token_indices; a tied head uses them too), on both sides")
    args = p.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if args.side:
        workdir = Path(args.workdir)
        recipe = recipe_for(args, workdir, adapter={"lora_fa": args.side == "lora-fa"},
                            training={"compile": args.compile or False}, data={"group_by_length": args.side == "grouped"})
        run_side = {"peftkit": run_peftkit, "peft": run_peft_lora, "lora": run_peftkit_measured,
                    "lora-fa": run_peftkit_measured, "floor": run_floor, "grouped": run_peftkit}[args.side]
        child(recipe, run_side, workdir, args.threads)
        return
    from peftkit.modeling import quiet_transformers

    quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        workdir = Path(tmp)
        build_model(args, workdir, "mixtral" if args.moe else "llama")
        write_data(args, workdir)
        if args.group_by_length and (args.ab or args.lora_fa or args.floor):
            sys.exit("--group-by-length compares peftkit with and without data.group_by_length: not with --ab, "
                     "--lora-fa or --floor")
        if args.ab:
            if args.lora_fa or args.compile:
                sys.exit("--ab times peftkit's LoRA against peft's and the floor: not with --lora-fa or --compile")
            return run_ab(args, recipe_for(args, workdir), peft_lora_model)
        sides = ("lora", "lora-fa") if args.lora_fa else ("grouped", "peftkit") if args.group_by_length else ("peftkit", "peft")
        results = spawn_sides(workdir, args.repeats, args.fixed_mmap_threshold, sides + (("floor",) if args.floor else ()),
                              warm_first=args.device == "cuda")
    kind = ("LoRA vs LoRA-FA" if args.lora_fa else "DoRA" if args.dora else "LoRA") + \
        (", data.group_by_length vs not, rows of mixed length" if args.group_by_length else "") + \
        (f" + {args.trainable_tokens} trainable tokens" if args.trainable_tokens else "") + \
        (" + the experts' fused weights (target_parameters)" if args.moe else "") + \
        (f" (peftkit: training.compile {args.compile})" if args.compile else "")
    shape = f", intermediate {args.intermediate}, vocab {args.vocab}" if args.intermediate else ""
    model = args.model or f"{'mixtral' if args.moe else 'llama'} hidden {args.hidden} x {args.layers} layers{shape}"
    title = (f"{kind} training, {args.device}, weights {args.model_dtype}: {model}, batch {args.batch_size}, rows of {'1-' * args.group_by_length}{args.words} number(s), "
             f"max_length {args.max_length}, r {args.r}{f', dropout {args.dropout}' if args.dropout else ''}, "
             f"{args.steps} steps, "
             f"torch threads {args.threads or torch.get_num_threads()}")
    report(results, args, title, args.device == "cuda")
    if args.group_by_length:
        report_epoch(results, args.warmup)


if __name__ == "__main__":
    main()
