"""Benchmark: peftkit QLoRA vs. transformers + peft + bitsandbytes (the QLoRA reference recipe).

    python scripts/bench_qlora.py                        # CPU defaults (small model): ~40 s on 2 idle cores
    python scripts/bench_qlora.py --ab 4 --steps 6 --floor   # forward + backward only, all sides in one process
    # memory of the lean k-bit preparation vs peft's fp32 upcast (slow: bf16 matmuls on a CPU without AVX512-BF16)
    python scripts/bench_qlora.py --model-dtype bfloat16 --vocab 32000 --fixed-mmap-threshold --steps 25
    # ~0.85B parameters (TinyLlama's shape with 16 of its 22 layers; --layers 22 gives its 1.1B) on one GPU:
    python scripts/bench_qlora.py --device cuda --hidden 2048 --layers 16 --intermediate 5632 --vocab 32000 \
        --batch-size 8 --max-length 512 --steps 30 --gradient-checkpointing

A random-init Llama-architecture model of the given shape is saved with `save_pretrained` in a temp dir
(nothing is downloaded) and fine-tuned twice with one recipe: NF4 with double quantization, compute dtype
float32 on CPU / bfloat16 on CUDA, LoRA r/alpha on all linear layers, paged 8-bit AdamW, cosine schedule
without warmup, grad clip 1.0, optional gradient checkpointing (non-reentrant on both sides).

- peftkit: `peftkit.train.train` with `quantization: {method: nf4, double_quant: true, compute_dtype: ...}`
  and `optimizer: paged_adamw_8bit`.
- reference: `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,
  bnb_4bit_compute_dtype=...)`, `prepare_model_for_kbit_training`, `get_peft_model`, and `Trainer` with
  `optim='paged_adamw_8bit'`.

Both see the same batches in the same order, and each runs in a fresh subprocess. `--floor` adds a third side
(bench_train.py's): the frozen 4-bit base's forward and backward on the same batches, no adapter, no optimizer. Measured: tokens/s and
s/step from step-end timestamps after `--warmup` skipped steps (see bench_train.py for the exact method),
and peak memory: `torch.cuda.max_memory_allocated` on CUDA (reset after imports), the subprocess's peak
RSS on CPU (bitsandbytes has no paged memory on CPU, so there the optimizer's paging saves nothing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

# bench_train.py (same directory, so on sys.path when run as a script) holds the shared harness.
from bench_train import (build_llama, child, common_args, ordered_examples, recipe_for, report, run_ab, run_floor,
                         run_peftkit, run_trainer, spawn_sides, write_data)


def build_model(args, path: Path) -> None:
    """A random-init LlamaForCausalLM of the requested shape, saved in the compute dtype, plus a char tokenizer."""
    build_llama(args, path, model_dtype(args))


def model_dtype(args) -> str:
    """dtype of the checkpoint and of the non-quantized weights (embeddings, norms, lm_head): the compute dtype
    unless --model-dtype says otherwise."""
    return args.model_dtype or compute_dtype(args)


def compute_dtype(args) -> str:
    return "bfloat16" if args.device == "cuda" else "float32"


def qlora_recipe(args, workdir: Path):
    dtype = compute_dtype(args)
    return recipe_for(
        args, workdir, dtype=model_dtype(args),
        quantization=dict(method="nf4", double_quant=True, compute_dtype=dtype),
        training=dict(optimizer="paged_adamw_8bit", gradient_checkpointing=args.gradient_checkpointing),
    )


def peft_qlora_model(recipe):
    """The QLoRA reference: NF4 + double quant by transformers, prepare_model_for_kbit_training, peft's LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peftkit.runtime import seed_everything

    dtype = getattr(torch, recipe.quantization.compute_dtype)
    load_dtype = getattr(torch, recipe.model.dtype)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    cuda = recipe.model.device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, quantization_config=bnb, dtype=load_dtype,
                                                 device_map={"": 0} if cuda else None, use_kernels=False)
    model.config.use_cache = False
    # The reference recipe; note it upcasts every non-quantized parameter (embeddings, norms, lm_head) to fp32.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.training.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    a = recipe.adapter
    seed_everything(recipe.training.seed, deterministic_cuda=False)  # as peftkit, right before injection
    config = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def run_peft_qlora(recipe, workdir: Path) -> dict:
    tok, ordered = ordered_examples(recipe)
    return run_trainer(peft_qlora_model(recipe), tok, ordered, recipe, workdir, optim="paged_adamw_8bit")


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688, help="MLP width (Llama: ~2.7 x hidden)")
    p.add_argument("--vocab", type=int, default=2048, help="embedding/lm_head rows (the tokenizer uses ~100)")
    p.add_argument("--model-dtype", choices=["float32", "bfloat16"],
                   help="dtype of the non-quantized weights (default: the compute dtype); bfloat16 on CPU shows what "
                        "prepare_model_for_kbit_training's fp32 upcast costs")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    args = p.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if args.side:
        workdir = Path(args.workdir)
        run_side = {"peftkit": run_peftkit, "peft": run_peft_qlora, "floor": run_floor}[args.side]
        child(qlora_recipe(args, workdir), run_side, workdir, args.threads)
        return
    from peftkit.modeling import quiet_transformers

    quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="bench_qlora_") as tmp:
        workdir = Path(tmp)
        if not args.model:
            build_model(args, workdir / "model")
        write_data(args, workdir)
        if args.ab:
            return run_ab(args, qlora_recipe(args, workdir), peft_qlora_model)
        sides = ("peftkit", "peft") + (("floor",) if args.floor else ())
        results = spawn_sides(workdir, args.repeats, args.fixed_mmap_threshold, sides, warm_first=args.device == "cuda")
    title = (f"QLoRA (nf4 + double quant, compute {compute_dtype(args)}, weights {model_dtype(args)}, paged_adamw_8bit), {args.device}: "
             f"{args.model or f'llama hidden {args.hidden} x {args.layers} layers, intermediate {args.intermediate}, vocab {args.vocab}'}, batch "
             f"{args.batch_size}, max_length {args.max_length}, r {args.r}, gradient checkpointing "
             f"{args.gradient_checkpointing}{f', dropout {args.dropout}' if args.dropout else ''}, {args.steps} steps, "
             f"torch threads {args.threads or torch.get_num_threads()}")
    report(results, args, title, args.device == "cuda")


if __name__ == "__main__":
    main()
