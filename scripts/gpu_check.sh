#!/usr/bin/env bash
# The GPU checks of one session, in one call (a lent GPU machine is short of time, not of memory):
#   bash scripts/gpu_check.sh OUT_DIR [SECONDS] [STEPS]   (STEPS: names to run, comma-separated; default all)
# Runs, each under its own time limit and in this order, stopping new steps past SECONDS (default 480):
#   1. the tests on the GPU, in two steps: `tests` (FSDP2, FSDP2 + QLoRA, FSDP2 with aLoRA and trained token rows;
#      DeepSpeed ZeRO-2/3, one process per GPU; QLoRA with the paged optimizer; training, crash safety, verify) and
#      `tests_methods` (tests/test_cuda.py: each method's CUDA run against its CPU run; then generation, the prompt
#      family, AdaLoRA, KaSA, aLoRA, target_parameters, token rows, MoE, packing);
#   2. bench_lora_layer.py: one LoRA layer as modules and as the fused node (CPU-only in peftkit) at 1B and 8B layer
#      shapes, bf16: whether the fused node would pay on a GPU (seconds);
#   3. bench_train.py: LoRA at a ~1.2B Llama shape in bf16, with the frozen-base floor (one repeat: each is 3
#      processes loading the model);
#   4. bench_train.py --compile inductor at the ~1.2B shape (training.compile: the step is one graph);
#   5. bench_qlora.py at the same shape (NF4 + DQ, paged 8-bit AdamW, gradient checkpointing);
#   6. bench_dpo.py at the ~1.2B shape (DPO: peftkit against TRL's DPOTrainer; needs trl's wheel in .whl/);
#   7. bench_train.py at an 8B Llama layer shape (hidden 4096, MLP 14336, vocab 128256; 4 layers).
# A session's 15 minutes of device time hold one call of about 480 s plus the machine's start (about 35 s on an H200).
# A preflight first (a tiny model trains two steps on the GPU, seconds) stops the call when every load would fail.
# Carried wheels (.whl/) that do not import beside the machine's packages are dropped for the machine's own versions.
# OUT_DIR gets two files, so that a device that returns few files returns them all, even from a run cut short:
# summary.log and gpu_check.tar.gz (every step's log and raw JSON, and env.log; re-packed after each step). A summary
# is printed last. Packages are expected as wheels in .whl/ (the device notes say how to download them for its Python
# 3.12). On 2026-12-04 the H200 image lacked bitsandbytes, datasets (+ dill, multiprocess), pydantic (+ pydantic_core,
# annotated_types, typing_inspection) and deepspeed (+ hjson; `DS_BUILD_OPS=0 pip wheel --no-deps deepspeed` builds
# it), and its transformers 5.17 was older than CI's: transformers 5.25 travelled with huggingface_hub 2.4, httpx2,
# httpcore2, truststore, click, kernels, tomlkit and regex, and peft and accelerate at CI's versions. bitsandbytes'
# wheel fits the 64 MiB a call carries once its other CUDA versions' libraries are deleted from it (`zip -d WHEEL
# 'bitsandbytes/libbitsandbytes_cuda1[12]*' 'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*'`
# keeps cuda130 for the image's torch cu130).
set -u
out=${1:?usage: gpu_check.sh OUT_DIR [SECONDS]}
budget=${2:-480}
only=${3:-}
mkdir -p "$out"
work=$(mktemp -d)  # the logs, packed into $out after each step
pack() { tar -czf "$out/gpu_check.tar.gz" -C "$work" .; }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
export PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  # Carried versions that do not import beside the machine's own packages: keep only what the machine lacks.
  if ! python3 -c "import transformers, peft, accelerate, datasets, bitsandbytes, pydantic, peftkit.train" \
      >"$work/imports.log" 2>&1; then
    echo "== carried stack does not import (imports.log); using the machine's transformers, hub, peft, accelerate" \
      | tee -a "$out/summary.log"
    tail -n 5 "$work/imports.log"
    (cd /tmp/site && rm -rf transformers* huggingface_hub* peft* accelerate* httpx2* httpcore2* kernels* click* regex*)
  fi
fi
python3 - <<'EOF' 2>&1 | tee "$work/env.log"
import importlib, torch
print("gpu", torch.cuda.get_device_name(0), "torch", torch.__version__)
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "datasets", "pydantic", "deepspeed"):
    print(name, importlib.import_module(name).__version__)
EOF
# Preflight, seconds: a tiny model trains two steps on the GPU. Something that breaks every load (as transformers' hub
# kernels did, offline, on 2026-12-04) stops the call here instead of failing every step.
if ! timeout 120 python3 - >"$work/preflight.log" 2>&1 <<'EOF'
import tempfile
from pathlib import Path

import torch
import yaml

from peftkit.recipe import load_recipe
from peftkit.tiny import build_tiny_model, write_jsonl
from peftkit.train import train

root = Path(tempfile.mkdtemp())
build_tiny_model(root / "m", arch="llama", hidden_size=32, num_layers=2, seed=0)
write_jsonl(root / "d.jsonl", [{"instruction": "Say it.", "input": str(i), "output": f"n{i}"} for i in range(16)])
recipe = {"model": {"name_or_path": str(root / "m"), "device": "cuda"}, "adapter": {"r": 4},
          "data": {"train": str(root / "d.jsonl"), "eval": str(root / "d.jsonl"), "format": "alpaca"},
          "training": {"max_steps": 2, "batch_size": 4}, "eval": {"samples": 0},
          "export": {"output_dir": str(root / "run"), "report": False}}
(root / "r.yaml").write_text(yaml.safe_dump(recipe))
train(load_recipe(root / "r.yaml"))
assert torch.cuda.max_memory_allocated() > 0
print("preflight: trained 2 steps on", torch.cuda.get_device_name(0))
EOF
then
  echo "== preflight failed: nothing else runs (preflight.log)" | tee -a "$out/summary.log"
  tail -n 15 "$work/preflight.log"
  pack
  exit 1
fi
echo "== preflight: ok" | tee -a "$out/summary.log"

step() {  # step NAME LIMIT COMMAND...: run it unless the budget is spent; log to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  [[ -n $only && ",$only," != *",$name,"* ]] && return
  if (( SECONDS + 30 > budget )); then echo "== $name: skipped (budget)" | tee -a "$out/summary.log"; return; fi
  (( limit > budget - SECONDS - 20 )) && limit=$(( budget - SECONDS - 20 ))
  local t0=$SECONDS
  # SIGINT first: pytest cut short still prints its summary (which tests failed, and why); then SIGKILL.
  timeout -s INT -k 20 "$limit" "$@" >"$work/$name.log" 2>&1
  echo "== $name: exit $? in $(( SECONDS - t0 )) s" | tee -a "$out/summary.log"
  pack
}

# The tests in two groups, each under its own limit (on the H200 the whole list took over 240 s with 12 workers).
pytest=(python3 -m pytest -q -n 12 -p no:cacheprovider -p no:benchmark --tb=short -rfE --durations=10 --timeout=150)
step tests 200 "${pytest[@]}" tests/test_sharded.py tests/test_deepspeed.py tests/test_qlora.py tests/test_train.py \
  tests/test_crash_safety.py tests/test_verify.py tests/test_loss.py tests/test_preference.py \
  "tests/test_methods.py::test_a_training_step_reads_nothing_on_the_host_beyond_the_base_model"
step tests_methods 200 "${pytest[@]}" tests/test_cuda.py tests/test_generate.py tests/test_prompt_methods.py \
  tests/test_adalora.py tests/test_kasa.py tests/test_alora.py tests/test_target_parameters.py tests/test_trainable_tokens.py \
  tests/test_expert_lists.py tests/test_packing.py
step lora_layer 40 python3 scripts/bench_lora_layer.py --device cuda --dtype bfloat16 --tokens 4096 \
  --shapes 2048x2048,2048x5632,5632x2048,4096x4096,4096x14336,14336x4096 --iters 50
step bench_train 150 python3 scripts/bench_train.py --device cuda --model-dtype bfloat16 --hidden 2048 --layers 16 \
  --intermediate 5632 --vocab 32000 --words 12 --max-length 512 --batch-size 8 --steps 30 --repeats 1 --floor \
  --json "$work/bench_train.json"
step bench_compile 150 python3 scripts/bench_train.py --device cuda --model-dtype bfloat16 --hidden 2048 --layers 16 \
  --intermediate 5632 --vocab 32000 --words 12 --max-length 512 --batch-size 8 --steps 40 --warmup 15 \
  --compile inductor --json "$work/bench_compile.json"
step bench_qlora 90 python3 scripts/bench_qlora.py --device cuda --hidden 2048 --layers 16 --intermediate 5632 \
  --vocab 32000 --words 12 --max-length 512 --batch-size 8 --steps 25 --gradient-checkpointing \
  --json "$work/bench_qlora.json"
step bench_dpo 90 python3 scripts/bench_dpo.py --device cuda --model-dtype bfloat16 --hidden 2048 --layers 16 \
  --intermediate 5632 --vocab 32000 --words 8 --max-length 512 --batch-size 8 --steps 20 --warmup 4 \
  --json "$work/bench_dpo.json"
step bench_8b 90 python3 scripts/bench_train.py --device cuda --model-dtype bfloat16 --hidden 4096 --layers 4 \
  --intermediate 14336 --vocab 128256 --words 12 --max-length 512 --batch-size 4 --steps 20 --floor \
  --json "$work/bench_8b.json"

for f in tests tests_methods lora_layer bench_train bench_compile bench_qlora bench_dpo bench_8b; do
  [ -f "$work/$f.log" ] && { echo "---- $f"; tail -n "$([[ $f = tests* ]] && echo 40 || echo 22)" "$work/$f.log"; }
done
cat "$out/summary.log"
