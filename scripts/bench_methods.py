"""Benchmark: every adapter method, peftkit vs. transformers `Trainer` + HF `peft`, the same steps on one model.

    python scripts/bench_methods.py                          # CPU defaults: a few minutes on 2 idle cores
    python scripts/bench_methods.py --methods lora,ia3,oft --steps 30
    python scripts/bench_methods.py --device cuda --hidden 1024 --layers 8 --batch-size 8 --steps 60
    python scripts/bench_methods.py --ab 8 --steps 6 --threads 1   # forward + backward, one process: steadier

For each method, both sides train the same random-init Llama (built locally, nothing downloaded) on the same
batches in the same order — bench_train.py's machinery: one fresh subprocess per side, step ends timed the
same way — and the peft side is configured with the adapter_config.json peftkit writes for that recipe (so
both adapt the same modules with the same settings; `peft` below lists the few init keys set on top). The
final eval loss is computed for both sides by the same function (peftkit's `evaluate_loss`, on the same
eval examples). Reported per method: trainable parameters, s/step, peak memory (peak RSS on CPU, CUDA
max_memory_allocated on GPU) and final eval loss, with peftkit/peft ratios.

Each method's learning rate is its own (IA3 and VeRA train vectors and need a larger one), the same on both
sides. AdaLoRA's peft side calls `update_and_allocate` after each optimizer step, as peft's docs say to.

`--ab ROUNDS` times only what the method itself changes, the forward and backward pass, with both models in one
process: each batch runs on both models back to back (alternating which goes first), ROUNDS times over the
`--steps` batches, and the ratio is the median of the pairs' ratios. On a shared machine, where two training runs
of the same side differ by 10 % or more, this is what can tell a 5 % difference (it is how LoKr's recomputed
update was found).
"""

from __future__ import annotations

import statistics
from functools import partial
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import (ab_pairs, common_args, paired_ratio, child, ordered_examples, recipe_for, run_peftkit,  # noqa: E402
                         run_trainer, spawn_sides, summarize, write_data)

# name -> the recipe's adapter section, its learning rate, and peft config keys set on top of the exported one.
BENCH: dict[str, dict] = {
    "lora": {"adapter": {"method": "lora", "r": 8, "alpha": 16}, "lr": 1e-3},
    "dora": {"adapter": {"method": "lora", "r": 8, "alpha": 16, "use_dora": True}, "lr": 1e-3},
    "pissa": {"adapter": {"method": "lora", "r": 8, "alpha": 8, "init": "pissa"}, "lr": 1e-4,
              "peft": {"init_lora_weights": "pissa"}},
    "ia3": {"adapter": {"method": "ia3"}, "lr": 3e-2},
    "loha": {"adapter": {"method": "loha", "r": 8, "alpha": 16}, "lr": 1e-3},
    "lokr": {"adapter": {"method": "lokr", "r": 8, "alpha": 16}, "lr": 1e-3},
    "adalora": {"adapter": {"method": "adalora", "init_r": 12, "target_r": 8, "tinit": 5, "tfinal": 10,
                            "deltaT": 2}, "lr": 1e-3},
    "vera": {"adapter": {"method": "vera", "r": 64}, "lr": 1e-2},
    "oft": {"adapter": {"method": "oft", "oft_block_size": 32}, "lr": 1e-3},
    "llama_adapter": {"adapter": {"method": "llama_adapter", "adapter_len": 10}, "lr": 1e-2},
    "bottleneck": {"adapter": {"method": "bottleneck", "reduction_factor": 16}, "lr": 1e-3},  # no peft side
    "prompt_tuning": {"adapter": {"method": "prompt_tuning", "num_virtual_tokens": 20}, "lr": 3e-2},
    "p_tuning": {"adapter": {"method": "p_tuning", "num_virtual_tokens": 20}, "lr": 1e-3},
    "prefix_tuning": {"adapter": {"method": "prefix_tuning", "num_virtual_tokens": 20}, "lr": 1e-2},
}


NO_PEFT = {"bottleneck"}  # peftkit's own layout: the peft column stays empty


def bench_recipe(args, workdir: Path, name: str):
    """The recipe of method `name`: bench_train's, with the method's adapter, lr and the eval split."""
    recipe = recipe_for(args, workdir, training={"lr": BENCH[name]["lr"]})
    adapter = dict(BENCH[name]["adapter"])
    if name == "adalora":  # its warm-up and final phases cut to fit a short run (--ab runs few steps), as peftkit needs
        steps = recipe.training.max_steps  # tinit + tfinal below it, and the final allocation after step 1
        adapter["tfinal"] = min(adapter["tfinal"], max(steps - 2, 0) // 2)
        adapter["tinit"] = min(adapter["tinit"], max(steps - 1 - adapter["tfinal"], 0))
    recipe.adapter = adapter
    recipe.data.eval = str(workdir / "eval.jsonl")
    return recipe


def available(args, workdir: Path, names: list[str]) -> list[str]:
    """The methods of `names` this peftkit has (a recipe that does not validate is left out, and said)."""
    from pydantic import ValidationError

    found = []
    for name in names:
        try:
            bench_recipe(args, workdir, name)
            found.append(name)
        except ValidationError as e:
            print(f"skipping {name}: peftkit does not take its recipe ({e.errors()[0]['msg']})")
    return found


def load_base(recipe):
    """The recipe's base model in fp32 on its device, without a KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(recipe.model.name_or_path, dtype=torch.float32, use_kernels=False)
    model.config.use_cache = False
    return model.to(recipe.model.device)


def both_models(recipe, name: str):
    """(peftkit's model, peft's model) of method `name`, each injected right after the same seeding; peft's is
    configured by the adapter_config.json peftkit writes for `recipe`, plus BENCH's `peft` keys."""
    from peft import PeftConfig, get_peft_model

    from peftkit.adapters import inject_adapters
    from peftkit.methods import method_of
    from peftkit.peft_format import peft_config
    from peftkit.runtime import seed_everything

    seed_everything(recipe.training.seed, deterministic_cuda=False)  # deterministic kernels, as peftkit's train
    ours = load_base(recipe)
    config = peft_config(recipe.adapter, inject_adapters(ours, recipe.adapter), recipe.model.name_or_path, False,
                         "llama", model_config=ours.config)
    config = {k: v for k, v in config.items() if k != "peft_type"} | {"inference_mode": False}  # trainable
    config |= BENCH[name].get("peft", {})
    if name == "adalora":  # at least one step past its warm-up and final phases, which peft requires (--ab runs few)
        config["total_step"] = max(recipe.training.max_steps, config["tinit"] + config["tfinal"] + 1)
    seed_everything(recipe.training.seed, deterministic_cuda=False)  # as peftkit: the same seed before injection
    theirs = get_peft_model(load_base(recipe),
                            PeftConfig.from_peft_type(peft_type=method_of(recipe.adapter).peft_type, **config))
    return ours, theirs


def run_peft_method(recipe, workdir: Path, name: str) -> dict:
    """transformers Trainer + peft, configured by the adapter_config.json peftkit writes for `recipe`."""
    from transformers import TrainerCallback

    from peftkit.data import load_examples
    from peftkit.evaluate import evaluate_loss

    tok, ordered = ordered_examples(recipe)
    _, model = both_models(recipe, name)

    class Allocate(TrainerCallback):  # AdaLoRA: after optimizer.step, before the gradients are zeroed
        def on_optimizer_step(self, _args, state, *_, **__):
            model.base_model.update_and_allocate(state.global_step)

    result = run_trainer(model, tok, ordered, recipe, workdir, callbacks=[Allocate()] if name == "adalora" else (),
                         optim="adamw_torch_fused" if recipe.model.device == "cuda" else "adamw_torch")
    evals, _ = load_examples(tok, recipe.data.eval, recipe.data.eval_split, recipe.data)
    result["eval_loss"] = evaluate_loss(RealTokens(model), evals, recipe.eval.batch_size, tok.pad_token_id)["loss"]
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return result


class RealTokens:
    """A peft model whose logits are cut to the real tokens' (the prompt family's peft model returns the virtual
    tokens' too), so one loss function scores both sides."""

    def __new__(cls, model):
        import torch

        class Cut(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(self, input_ids, **kwargs):
                out = self.inner(input_ids=input_ids, **kwargs)
                out.logits = out.logits[:, -input_ids.shape[1]:]
                return out

        return Cut()


def report_methods_ab(rows: dict[str, dict[str, list[float]]], title: str) -> None:
    print(f"\n{title}")
    print(f"{'method':14}{'s/step':>9}{'peft':>9}{'ratio':>7}")
    for name, t in rows.items():
        print(f"{name:14}{statistics.median(t['peftkit']):>9.4f}{statistics.median(t['peft']):>9.4f}"
              f"{paired_ratio(t['peftkit'], t['peft']):>7.3f}")
    print("forward + backward only (no optimizer, no data loading); s/step: medians; ratio: peftkit / peft, the "
          "median over batches of the two times on one batch (< 1: faster for peftkit)")


def report(rows: dict[str, dict[str, dict]], args, title: str, cuda: bool) -> None:
    mem = "peak MiB" if cuda else "peak RSS MiB"
    print(f"\n{title}")
    print(f"{'method':14}{'trainable':>12}{'s/step':>9}{'peft':>9}{'ratio':>7}{mem:>14}{'peft':>8}{'ratio':>7}"
          f"{'eval loss':>11}{'peft':>8}")
    for name, s in rows.items():
        ours, theirs = s["peftkit"], s.get("peft")
        if theirs is None:  # peft has no such method
            print(f"{name:14}{ours['trainable']:>12,}{ours['s_step']:>9.4f}{'—':>9}{'':>7}{ours['peak']:>14,.0f}"
                  f"{'—':>8}{'':>7}{ours['eval_loss']:>11.4f}{'—':>8}")
            continue
        same = "" if ours["trainable"] == theirs["trainable"] else f" (peft {theirs['trainable']:,})"
        print(f"{name:14}{ours['trainable']:>12,}{ours['s_step']:>9.4f}{theirs['s_step']:>9.4f}"
              f"{ours['s_step'] / theirs['s_step']:>7.2f}{ours['peak']:>14,.0f}{theirs['peak']:>8,.0f}"
              f"{ours['peak'] / theirs['peak']:>7.2f}{ours['eval_loss']:>11.4f}{theirs['eval_loss']:>8.4f}{same}")
    print("ratio = peftkit / peft: < 1 is faster or smaller for peftkit")


def main() -> None:
    p = common_args(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--methods", default=",".join(BENCH), help=f"comma-separated, of: {', '.join(BENCH)}")
    p.add_argument("--method", help="(internal) the method a side runs")
    args = p.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if args.side:
        workdir = Path(args.workdir)
        run_side = run_peftkit if args.side == "peftkit" else partial(run_peft_method, name=args.method)
        child(bench_recipe(args, workdir, args.method), run_side, workdir, args.threads)
        return
    from peftkit.modeling import quiet_transformers
    from peftkit.tiny import build_tiny_model, number_rows, write_jsonl

    quiet_transformers()
    unknown = [m for m in args.methods.split(",") if m not in BENCH]
    if unknown:
        sys.exit(f"--methods: {', '.join(unknown)} not among {', '.join(BENCH)}")
    if args.floor:
        sys.exit("--floor: the frozen base's forward + backward is the same for every method; "
                 "scripts/bench_train.py --floor times it")
    rows: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_methods_") as tmp:
        workdir = Path(tmp)
        if not args.model:  # --model: recipe_for reads that one
            build_tiny_model(workdir / "model", arch="llama", hidden_size=args.hidden, num_layers=args.layers, seed=0)
        write_data(args, workdir)
        write_jsonl(workdir / "eval.jsonl", number_rows(64, seed=2))
        if args.ab:
            if args.threads:
                torch.set_num_threads(args.threads)
            names = [n for n in available(args, workdir, args.methods.split(",")) if n not in NO_PEFT]
            rows = {}
            for name in names:
                recipe = bench_recipe(args, workdir, name)
                ours, theirs = both_models(recipe, name)
                rows[name] = ab_pairs(recipe, {"peftkit": ours.train(), "peft": RealTokens(theirs.train())},
                                      args.ab)[0]  # (by the wall clock)
                del ours, theirs
                t = rows[name]  # as each method ends: a stopped benchmark keeps what it measured
                print(f"{name}: peftkit / peft {paired_ratio(t['peftkit'], t['peft']):.3f}", flush=True)
            title = (f"Methods, {args.device}, one process: {_model(args)}, batch {args.batch_size}, {args.steps} "
                     f"batches x {args.ab} rounds, torch threads {torch.get_num_threads()}")
            report_methods_ab(rows, title)
            _write_json(args, title, rows)
            return
        for name in available(args, workdir, args.methods.split(",")):
            print(f"{name} ...", flush=True)
            sides = ("peftkit",) if name in NO_PEFT else ("peftkit", "peft")
            results = spawn_sides(workdir, args.repeats, args.fixed_mmap_threshold, sides=sides, extra=("--method", name))
            rows[name] = {side: _medians([summarize(r, args.warmup) | _extra(r) for r in rs])
                          for side, rs in results.items()}
    title = (f"Methods, {args.device}: {_model(args)}, batch {args.batch_size}, "
             f"max_length {args.max_length}, {args.steps} steps (first {max(args.warmup, 1)} untimed), "
             f"{args.repeats} run(s) per side, torch threads {args.threads or torch.get_num_threads()}")
    report(rows, args, title, args.device == "cuda")
    _write_json(args, title, rows)


def _model(args) -> str:
    return args.model or f"llama hidden {args.hidden} x {args.layers} layers"


def _write_json(args, title: str, rows: dict) -> None:
    """--json: the table's figures (per method and side), for a note or a later comparison."""
    if args.json:
        import json

        Path(args.json).write_text(json.dumps({"title": title, "rows": rows}, indent=1))


def _extra(result: dict) -> dict:
    return {"eval_loss": result["eval_loss"], "trainable": result["trainable"]}


def _medians(runs: list[dict]) -> dict:
    return {k: statistics.median(run[k] for run in runs) for k in runs[0]}


if __name__ == "__main__":
    main()
