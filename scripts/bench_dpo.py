"""Benchmark: peftkit DPO (training.objective: dpo) vs. TRL's DPOTrainer on a peft LoRA, on the same pairs; or KTO
(--objective kto) vs. TRL's KTOTrainer, on the pairs' answers unpaired; or a reward model (--objective reward) vs.
TRL's RewardTrainer, on the same pairs.

    python scripts/bench_dpo.py --threads 1 --repeats 3          # CPU: hidden 256 x 4 layers, batch 8 pairs
    python scripts/bench_dpo.py --objective kto --threads 1 --repeats 3    # batch 8 answers, each with its mismatched
    python scripts/bench_dpo.py --objective reward --threads 1 --repeats 3  # batch 8 pairs, a one-output classifier
    python scripts/bench_dpo.py --device cuda --model-dtype bfloat16 --hidden 2048 --layers 16 --intermediate 5632 \
        --vocab 32000 --words 8 --max-length 512 --batch-size 8 --steps 30     # a ~1.2B Llama shape

Builds a random-init Llama-architecture model and preference pairs (a number in lowercase words chosen, the same
words in capitals rejected; --words numbers a row) in a temp dir, nothing downloaded, and trains LoRA by DPO twice
with the same settings: r, alpha, all-linear targets, lr, cosine schedule without warmup, grad clip 1.0, beta 0.1,
seed. TRL gets the pairs in the order peftkit's loop takes them (sequential sampling), so both sides see the same
batches, and tokenizes them as peftkit does (the prompt, then the answer and EOS). Each side runs in a fresh
subprocess (`bench_train.spawn_sides`).

The sides differ in where the reference's log-probabilities come from: TRL runs the reference (the model with its
adapter disabled) forward on every batch; peftkit computes them once, before training, for every pair (one
forward a pair, batched by eval.batch_size), and each step runs the policy alone. So the steps' times, timed as
bench_train.py times them (the end of each optimizer step; the first --warmup steps left out), leave peftkit's
reference pass out: `end to end` is each side's whole training call (data, model, reference, steps; not the
imports), which puts it back in. Over one epoch the reference pass costs one forward a pair, as TRL's per-step
reference forwards do; over several it is paid once.

KTO (--objective kto): each pair gives two rows, its chosen answer desirable and its rejected one not, a batch
--batch-size of them; each row comes with its mismatched example (KTO's KL estimate), so a batch holds as many
sequences as DPO's. TRL's KTOTrainer (its default sequential sampling, its reference log-probabilities computed per
batch, not precomputed) runs the policy and the reference on the rows and on the mismatched examples each step;
peftkit runs the policy's forward of both, the reference's computed once before training.

Reward model (--objective reward): the same model as a sequence classifier of one output (its new `score` head drawn
from the same seed on both sides, the pad token set), peft's SEQ_CLS LoRA (the head in modules_to_save, trained in
full) on TRL's RewardTrainer against peftkit's model.task sequence_classification, training.objective reward, on the
same pairs in the same order, with the centring term on (reward_center 0.01, TRL's center_rewards_coefficient). There
is no reference model: each step is one forward of the batch's chosen and rejected rows on both sides, so `end to
end` differs from the steps by loading and tokenizing only.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import (_sync, build_model, child, common_args, peft_lora_model, recipe_for,  # noqa: E402
                         report, run_peftkit, spawn_sides, step_timer)

REWARD_CENTER = 0.01  # --objective reward: the centring term's weight (recipes/reward.yaml's), on both sides


def write_pairs(args, workdir: Path) -> None:
    """--steps x --batch-size pairs (one epoch: both sides walk it without wrapping), --words numbers each; for KTO,
    their answers as rows, the chosen desirable (--steps x --batch-size of them)."""
    from peftkit.tiny import preference_rows, write_jsonl

    rows = preference_rows(args.steps * args.batch_size * args.words, seed=1)
    joined = [{"prompt": "Write the numbers in words.\n" + " ".join(r["prompt"].split("\n")[1] for r in group) + "\n",
               "chosen": ", ".join(r["chosen"] for r in group), "rejected": ", ".join(r["rejected"] for r in group)}
              for group in (rows[i:i + args.words] for i in range(0, len(rows), args.words))]
    if args.objective == "kto":
        joined = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
                  for r in joined for k in ("chosen", "rejected")][:args.steps * args.batch_size]
    write_jsonl(workdir / "train.jsonl", joined)


def objective_recipe(args, workdir: Path):
    if args.objective == "kto":
        return recipe_for(args, workdir, data={"format": "unpaired"}, training={"objective": "kto", "kto_beta": 0.1})
    if args.objective == "reward":
        return recipe_for(args, workdir, model={"task": "sequence_classification"}, data={"format": "preference"},
                          training={"objective": "reward", "reward_center": REWARD_CENTER})
    return recipe_for(args, workdir, data={"format": "preference"}, training={"objective": "dpo", "dpo_beta": 0.1})


def ordered_pairs(recipe) -> tuple[object, list[dict], list[int]]:
    """(tokenizer, the rows in the order peftkit's loop takes their pairs (KTO: answers), each pair's token count
    (KTO: an answer's and its mismatched example's))."""
    from peftkit.data import epoch_batches
    from peftkit.data.preference import load_pairs
    from peftkit.data.rows import load_rows
    from peftkit.data.unpaired import load_unpaired
    from peftkit.modeling import load_tokenizer

    tok = load_tokenizer(recipe.model)
    if recipe.training.objective == "kto":
        pairs, _ = load_unpaired(tok, recipe.data.train, None, recipe.data, recipe.training.batch_size,
                                 cache=False)
    else:
        pairs, _ = load_pairs(tok, recipe.data.train, None, recipe.data, cache=False)
    rows = load_rows(recipe.data.train, None, "error")[0]
    order = [i for b in epoch_batches(len(pairs), recipe.training.batch_size, recipe.training.seed, 0, True) for i in b]
    return tok, [rows[i] for i in order], [len(pairs[i][0].input_ids) + len(pairs[i][1].input_ids) for i in order]


def run_peftkit_dpo(recipe, workdir: Path) -> dict:
    started = _sync(recipe.model.device)
    result = run_peftkit(recipe, workdir)
    return result | {"total_s": _sync(recipe.model.device) - started}


def trl_trainer(objective: str, t) -> tuple[type, type, dict]:
    """(TRL's config class, its trainer, the config's objective settings) for `objective`; t: recipe.training."""
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, RewardConfig, RewardTrainer

    if objective == "kto":
        return KTOConfig, KTOTrainer, {"beta": t.kto_beta}
    if objective == "reward":
        return RewardConfig, RewardTrainer, {"center_rewards_coefficient": t.reward_center or None}
    return DPOConfig, DPOTrainer, {"beta": t.dpo_beta}


def run_trl(recipe, workdir: Path) -> dict:
    """TRL's DPOTrainer (KTO: KTOTrainer; reward: RewardTrainer) on peft's LoRA of the recipe
    (bench_train.peft_lora_model), fed the pairs (answers) sequentially."""
    import torch
    from datasets import Dataset

    Config, Trainer, objective_args = trl_trainer(recipe.training.objective, recipe.training)

    t, cuda = recipe.training, recipe.model.device == "cuda"
    timer, ends, losses = step_timer(recipe.model.device)

    started = _sync(recipe.model.device)
    tok, rows, _ = ordered_pairs(recipe)
    args = Config(
        output_dir=str(workdir / "trl-run"), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        learning_rate=t.lr, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=t.max_grad_norm, seed=t.seed,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, train_sampling_strategy="sequential",
        use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(), max_length=None, **objective_args,
        optim="adamw_torch_fused" if cuda else "adamw_torch", dataloader_pin_memory=cuda,
        # (TRL turns activation checkpointing on by default: off, as peftkit's training.gradient_checkpointing)
        activation_checkpointing=t.gradient_checkpointing, activation_checkpointing_kwargs={"use_reentrant": False},
    )
    trainer = Trainer(model=peft_lora_model(recipe), args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, callbacks=[timer])
    trainer.train()
    return {"step_ends": ends, "losses": losses, "total_s": _sync(recipe.model.device) - started}


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, help="MLP width: with it (and --vocab) a Llama of real proportions "
                   "(bench_train.build_llama); without, peftkit's tiny Llama")
    p.add_argument("--vocab", type=int, default=32000, help="with --intermediate: embedding/lm_head rows")
    p.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--objective", choices=["dpo", "kto", "reward"], default="dpo",
                   help="kto: KTO on the answers unpaired; reward: a reward model on the pairs")
    args = p.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if args.side:
        recipe = objective_recipe(args, Path(args.workdir))
        child(recipe, {"peftkit": run_peftkit_dpo, "peft": run_trl}[args.side], Path(args.workdir), args.threads,
              lengths=lambda r: ordered_pairs(r)[2], imports=("trl",))
        return
    from peftkit.modeling import quiet_transformers

    quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        workdir = Path(tmp)
        build_model(args, workdir)
        write_pairs(args, workdir)
        results = spawn_sides(workdir, args.repeats, args.fixed_mmap_threshold, warm_first=args.device == "cuda")
    shape = f", intermediate {args.intermediate}, vocab {args.vocab}" if args.intermediate else ""
    model = args.model or f"llama hidden {args.hidden} x {args.layers} layers{shape}"
    name, what, trainer = {"kto": ("KTO", "answers", "KTOTrainer"), "dpo": ("DPO", "pairs", "DPOTrainer"),
                           "reward": (f"reward-model (reward_center {REWARD_CENTER})", "pairs", "RewardTrainer")
                           }[args.objective]
    title = (f"LoRA {name} training, {args.device}: {model}, batch {args.batch_size} {what} of {args.words} number(s), "
             f"r {args.r}, {args.steps} steps, torch threads {args.threads or torch.get_num_threads()} "
             f"(peft+Trainer: TRL's {trainer} on peft's LoRA)")
    report(results, args, title, args.device == "cuda")
    total = {side: sorted(r["total_s"] for r in rs)[len(rs) // 2] for side, rs in results.items()}
    call = "the whole training call" + (", reference pass included" if args.objective != "reward" else "")
    print(f"end to end ({call}; median): peftkit {total['peftkit']:.2f} s, "
          f"TRL {total['peft']:.2f} s, ratio {total['peftkit'] / total['peft']:.3f}")


if __name__ == "__main__":
    main()
