"""Micro-benchmark: one LoRA layer's forward + backward, as separate modules and as peftkit's fused node, against the
frozen base layer alone.

    python scripts/bench_lora_layer.py                                   # CPU, 1 thread, bench_train.py's shapes
    python scripts/bench_lora_layer.py --device cuda --dtype bfloat16 --tokens 4096 --shapes 4096x4096,4096x14336

For each (in x out) shape, times forward + backward of a batch of `--tokens` rows (gradients for the input and the
LoRA factors; the base frozen) three ways:
- base: the frozen nn.Linear alone, the least any adapter can cost;
- modules: base(x) + B(A(x)) * s as separate nn.Linear products (how peftkit runs LoRA off the CPU, and peft always);
- fused: `peftkit.methods.lowrank._FusedLora`, the one autograd node peftkit uses on CPU (see lowrank.py), called
  directly so that it runs on any device: this is how to find out whether it would pay on a GPU.

Times are medians of `--repeats` rounds of `--iters` calls, after a warm-up, synchronized on CUDA. The fused node's
output and gradients are checked against the modules' first (float rounding apart), so a wrong kernel cannot look fast.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device, iters: int, repeats: int) -> float:
    """Median microseconds per call of `fn` over `repeats` rounds of `iters` calls."""
    for _ in range(max(2, iters // 5)):
        fn()
    rounds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        rounds.append((time.perf_counter() - start) / iters * 1e6)
    return statistics.median(rounds)


def layer_sides(tokens: int, d_in: int, d_out: int, r: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The three sides' forward + backward closures for one shape, after checking the fused node's numbers."""
    from peftkit.methods.lowrank import _FusedLora

    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).to(device, dtype).requires_grad_(False)
    lora_a = nn.Linear(d_in, r, bias=False).to(device, dtype)
    lora_b = nn.Linear(r, d_out, bias=False).to(device, dtype)
    with torch.no_grad():  # non-zero B: the update really contributes
        lora_b.weight.copy_(torch.randn(d_out, r, generator=gen).to(dtype) * 0.02)
    scaling = 2.0
    x = torch.randn(tokens, d_in, generator=gen).to(device, dtype).requires_grad_(True)
    grad = torch.randn(tokens, d_out, generator=gen).to(device, dtype)
    params = (lora_a.weight, lora_b.weight)

    def modules():
        return base(x) + lora_b(lora_a(x)) * scaling

    def fused():
        return _FusedLora.apply(x, base.weight, None, lora_a.weight, lora_b.weight, scaling, None)

    def step(forward, trained=params):
        def run():
            forward().backward(grad)
            x.grad = None
            for p in trained:
                p.grad = None
        return run

    outs = []
    for forward in (modules, fused):
        y = forward()
        y.backward(grad)
        outs.append([y.detach(), x.grad, *(p.grad for p in params)])
        x.grad = None
        for p in params:
            p.grad = None
    for name, a, b in zip(("output", "x.grad", "A.grad", "B.grad"), *outs):
        scale = a.abs().max().item() or 1.0
        if (a - b).abs().max().item() > (2e-2 if dtype != torch.float32 else 1e-5) * scale:
            raise SystemExit(f"fused node disagrees with the modules on {name}: not timing a wrong kernel")
    return {"base": step(lambda: base(x), ()), "modules": step(modules), "fused": step(fused)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--tokens", type=int, default=816, help="rows: batch x sequence (bench_train.py's: 8 x ~102)")
    p.add_argument("--shapes", default="256x256,256x512,512x256", help="comma-separated IN x OUT of the base layer")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="CPU: torch.set_num_threads")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    where = f"{device.type}" + (f", {args.threads} thread(s)" if device.type == "cpu" else f" ({torch.cuda.get_device_name()})")
    print(f"one LoRA layer, forward + backward: {args.tokens} rows, r {args.r}, {args.dtype}, {where}")
    print(f"{'in x out':>12} {'base us':>10} {'modules us':>11} {'fused us':>10} {'modules over':>13} {'fused over':>11}")
    for shape in args.shapes.split(","):
        d_in, d_out = (int(v) for v in shape.lower().split("x"))
        sides = layer_sides(args.tokens, d_in, d_out, args.r, dtype, device)
        t = {name: _timed(fn, device, args.iters, args.repeats) for name, fn in sides.items()}
        over = {k: (t[k] - t["base"]) / t["base"] * 100 for k in ("modules", "fused")}
        print(f"{shape:>12} {t['base']:10.0f} {t['modules']:11.0f} {t['fused']:10.0f} {over['modules']:12.1f}% "
              f"{over['fused']:10.1f}%")


if __name__ == "__main__":
    main()
