#!/usr/bin/env bash
# The GPU checks of one session, in one call (a lent GPU machine is short of time, not of memory):
#   bash scripts/gpu_check.sh OUT_DIR [SECONDS]
# Runs, each under its own time limit and in this order, stopping new steps past SECONDS (default 480):
#   1. tests/test_sharded.py (FSDP2, FSDP2 + QLoRA), tests/test_deepspeed.py (ZeRO-2/3, one process per GPU) and
#      the CUDA-relevant test files, on the GPU;
#   2. bench_lora_layer.py: one LoRA layer as modules and as the fused node (CPU-only in peftkit) at 1B and 8B layer
#      shapes, bf16: whether the fused node would pay on a GPU (seconds);
#   3. bench_train.py: LoRA at a ~1.2B Llama shape in bf16, with the frozen-base floor (one repeat: each is 3
#      processes loading the model);
#   4. bench_qlora.py at the same shape (NF4 + DQ, paged 8-bit AdamW, gradient checkpointing);
#   5. bench_train.py at an 8B Llama layer shape (hidden 4096, MLP 14336, vocab 128256; 4 layers);
#   6. bench_train.py --compile inductor at the ~1.2B shape (training.compile: the step is one graph).
# OUT_DIR gets two files, so that a device that returns few files returns them all, even from a run cut short:
# summary.log and gpu_check.tar.gz (every step's log and raw JSON, and env.log; re-packed after each step). A summary
# is printed last. Packages the machine lacks are expected as wheels in .whl/ (see the device notes: the H200 image
# lacked bitsandbytes, datasets, pydantic and deepspeed); torch, transformers, peft and accelerate are its own.
set -u
out=${1:?usage: gpu_check.sh OUT_DIR [SECONDS]}
budget=${2:-480}
mkdir -p "$out"
work=$(mktemp -d)  # the logs, packed into $out after each step
pack() { tar -czf "$out/gpu_check.tar.gz" -C "$work" .; }
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 - <<'EOF' 2>&1 | tee "$work/env.log"
import importlib, torch
print("gpu", torch.cuda.get_device_name(0), "torch", torch.__version__)
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "datasets", "pydantic", "deepspeed"):
    print(name, importlib.import_module(name).__version__)
EOF

step() {  # step NAME LIMIT COMMAND...: run it unless the budget is spent; log to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  if (( SECONDS + 30 > budget )); then echo "== $name: skipped (budget)" | tee -a "$out/summary.log"; return; fi
  (( limit > budget - SECONDS )) && limit=$(( budget - SECONDS ))
  local t0=$SECONDS
  timeout "$limit" "$@" >"$work/$name.log" 2>&1
  echo "== $name: exit $? in $(( SECONDS - t0 )) s" | tee -a "$out/summary.log"
  pack
}

step tests 200 python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_sharded.py tests/test_deepspeed.py tests/test_qlora.py \
  tests/test_train.py tests/test_crash_safety.py tests/test_generate.py tests/test_prompt_methods.py tests/test_adalora.py \
  tests/test_loss.py tests/test_verify.py "tests/test_methods.py::test_a_training_step_reads_nothing_on_the_host_beyond_the_base_model"
step lora_layer 40 python3 scripts/bench_lora_layer.py --device cuda --dtype bfloat16 --tokens 4096 \
  --shapes 2048x2048,2048x5632,5632x2048,4096x4096,4096x14336,14336x4096 --iters 50
step bench_train 150 python3 scripts/bench_train.py --device cuda --model-dtype bfloat16 --hidden 2048 --layers 16 \
  --intermediate 5632 --vocab 32000 --words 12 --max-length 512 --batch-size 8 --steps 30 --repeats 1 --floor \
  --json "$work/bench_train.json"
step bench_qlora 90 python3 scripts/bench_qlora.py --device cuda --hidden 2048 --layers 16 --intermediate 5632 \
  --vocab 32000 --words 12 --max-length 512 --batch-size 8 --steps 25 --gradient-checkpointing \
  --json "$work/bench_qlora.json"
step bench_8b 90 python3 scripts/bench_train.py --device cuda --model-dtype bfloat16 --hidden 4096 --layers 4 \
  --intermediate 14336 --vocab 128256 --words 12 --max-length 512 --batch-size 4 --steps 20 --floor \
  --json "$work/bench_8b.json"
step bench_compile 150 python3 scripts/bench_train.py --device cuda --model-dtype bfloat16 --hidden 2048 --layers 16 \
  --intermediate 5632 --vocab 32000 --words 12 --max-length 512 --batch-size 8 --steps 40 --warmup 15 \
  --compile inductor --json "$work/bench_compile.json"

for f in tests lora_layer bench_train bench_qlora bench_8b bench_compile; do
  [ -f "$work/$f.log" ] && { echo "---- $f"; tail -n 22 "$work/$f.log"; }
done
cat "$out/summary.log"
