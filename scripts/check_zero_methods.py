"""Each method under DeepSpeed ZeRO against one plain process: a check too slow for the test suite (two launches
per method), run by hand after changing a method or `peftkit/zero.py`.

    python scripts/check_zero_methods.py --stage 3            # every weight-update and module method
    python scripts/check_zero_methods.py --stage 2 prompt_tuning p_tuning prefix_tuning
    python scripts/check_zero_methods.py --arch qwen2 lora_trainable_tokens trainable_tokens   # a tied head

For each method, its recipes/methods/<name>.yaml adapter trains 6 steps on the tiny Llama (or --arch): once in one process
with batch 4, once in 2 ZeRO processes (gloo on a CPU) with batch 2, every parameter partitioned under ZeRO-3
(persistence threshold 0). Prints the largest difference between the two adapters; above 1e-5 is a failure, said
on its line and in the exit status (1), as a failed run or keys that differ are.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from safetensors.torch import load_file

from peftkit.tiny import build_tiny_model, number_rows, write_jsonl

RECIPES = Path(__file__).parents[1] / "recipes" / "methods"
ZERO3_METHODS = ["lora", "dora", "lora_fa", "ia3", "loha", "lokr", "vera", "oft", "llama_adapter", "bottleneck",
                 "lora_trainable_tokens", "trainable_tokens"]


def _launcher(root: Path, stage: int) -> Path:
    zero = {"stage": stage} | ({"stage3_param_persistence_threshold": 0} if stage == 3 else {})
    config = root / "zero.json"
    config.write_text(json.dumps({"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
                                  "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}))
    launcher = root / "zero.yaml"
    launcher.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {config}\n"
                        "  zero3_init_flag: false\nnum_machines: 1\nnum_processes: 2\n")
    return launcher


def _recipe(method: str, root: Path, batch_size: int, out: Path) -> Path:
    recipe = yaml.safe_load((RECIPES / f"{method}.yaml").read_text())
    recipe["model"]["name_or_path"] = str(root / "model")
    recipe["data"].update(train=str(root / "train.jsonl"), eval=str(root / "eval.jsonl"))
    if "dropout" in recipe["adapter"]:
        recipe["adapter"]["dropout"] = 0.0  # masks are drawn per process
    recipe["training"] = {"max_steps": 6, "batch_size": batch_size, "lr": 1e-2, "seed": 0}
    recipe["eval"] = {"base_model": False, "samples": 0}
    recipe["export"] = {"output_dir": str(out / "run"), "adapter": True, "merged": False, "report": False}
    out.mkdir(parents=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return out / "recipe.yaml"


def check(method: str, root: Path, launcher: Path) -> str:
    """One method: the largest difference between the plain and the ZeRO adapter, or why it failed."""
    adapters = []
    for name, batch_size, launch in (("one", 4, []), ("zero", 2, ["-m", "accelerate.commands.launch",
                                                                  "--config_file", str(launcher)])):
        recipe = _recipe(method, root, batch_size, root / "runs" / method / name)  # not in the working directory:
        # a folder named like a package (bottleneck) would shadow it
        command = [sys.executable, *launch, "-m", "peftkit", "train", str(recipe)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=root)
        if done.returncode:
            errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line or "error:" in line]
            return f"{name} run failed: {errors[:2]}"
        adapters.append(load_file(recipe.parent / "run" / "adapter" / "adapter_model.safetensors"))
    one, two = adapters
    if one.keys() != two.keys():
        return "the adapters' keys differ"
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    return f"max abs difference {worst:.2e}" + (" FAILED (above 1e-5)" if worst > 1e-5 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("methods", nargs="*", help="recipes/methods/<name>.yaml names (default: all for the stage)")
    parser.add_argument("--stage", type=int, choices=(2, 3), default=3)
    parser.add_argument("--arch", choices=("llama", "qwen2", "gpt2", "gemma2"), default="llama", help="the tiny model")
    args = parser.parse_args()
    methods = args.methods or ZERO3_METHODS + (["prompt_tuning", "p_tuning", "prefix_tuning"] if args.stage == 2 else [])
    with tempfile.TemporaryDirectory(prefix="peftkit-zero-") as tmp:
        root = Path(tmp)
        build_tiny_model(root / "model", arch=args.arch, hidden_size=32, num_layers=2, seed=0)
        write_jsonl(root / "train.jsonl", number_rows(64, seed=1))
        write_jsonl(root / "eval.jsonl", number_rows(16, seed=2))
        launcher = _launcher(root, args.stage)
        failed = []
        for method in methods:
            print(f"ZeRO-{args.stage} {method}: {(result := check(method, root, launcher))}", flush=True)
            if "FAILED" in result or "failed" in result or "differ" in result:
                failed.append(method)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
