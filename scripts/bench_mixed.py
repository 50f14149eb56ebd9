"""Benchmark: N LoRA adapters x B rows each, served as ONE mixed batch vs N separate passes (one per adapter).

    python scripts/bench_mixed.py                               # CPU defaults: ~30 s on 2 cores
    python scripts/bench_mixed.py --adapters 8 --rows 4 --new-tokens 32
    python scripts/bench_mixed.py --device cuda --hidden 1024 --layers 8 --adapters 16 --rows 8 --new-tokens 64

Both sides load the same random-init Llama (built locally, nothing downloaded) with the same N adapters on it by
name (`peftkit.adapters.named`, LoRA all-linear, nonzero B) and greedily generate `--new-tokens` tokens for the
same N x B prompts of `--prompt-len` random tokens:

    mixed      one `generate` of all N x B rows, each row routed to its adapter (`NamedAdapters.routed`)
    separate   N `generate` calls of B rows, `activate(adapter)` before each

Throughput is generated tokens (N x B x new tokens, the rows forced to the full length) per second, the median of
`--repeats` timed runs after a warm-up, the two modes alternating in one process (so that a busy machine slows
both alike); their generated tokens are checked equal. Peak memory comes from one fresh process per mode: CUDA
`max_memory_allocated`, or on CPU the process's peak RSS (`ru_maxrss`) and its rise over the RSS after loading
and a warm-up (the generation's own share).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


MODES = ("mixed", "separate")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=4, help="N: adapters, each with its own rows")
    p.add_argument("--rows", type=int, default=4, help="B: rows per adapter")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--r", type=int, default=8, help="LoRA rank of every adapter")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    # One thread by default on CPU: on a shared machine whose cores are busy, torch's own two threads made a 256x256
    # linear 17x slower (700 vs 40 us measured here), which swamps what is being compared.
    p.add_argument("--threads", type=int, default=1, help="CPU: torch.set_num_threads per side (0: torch's own)")
    p.add_argument("--side", choices=["mixed", "separate", "both"], help=argparse.SUPPRESS)  # set by the parent process
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args()


def build(args, workdir: Path) -> list[tuple[str, str]]:
    """The base model and N saved LoRA adapters with random (nonzero) B, on it."""
    from transformers import AutoModelForCausalLM

    from peftkit.adapters import inject_adapters
    from peftkit.adapters.state_dicts import adapter_state_dict
    from peftkit.methods.lora import LoraConfig
    from peftkit.peft_format import peft_config, save_adapter
    from peftkit.tiny import build_tiny_model

    base = workdir / "base"
    build_tiny_model(base, arch="llama", hidden_size=args.hidden, num_layers=args.layers, seed=0)
    cfg = LoraConfig(r=args.r, alpha=2 * args.r)
    adapters = []
    for i in range(args.adapters):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, use_kernels=False)
        torch.manual_seed(i)
        targets = inject_adapters(model, cfg)
        gen = torch.Generator().manual_seed(100 + i)
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                layer.lora_B.weight.data.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.05)
        save_adapter(workdir / f"a{i}", adapter_state_dict(model, []), peft_config(cfg, targets, str(base), False))
        adapters.append((f"a{i}", str(workdir / f"a{i}")))
    return adapters


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _sync(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def side(args) -> dict:
    """One side in this process: load, warm up, time `--repeats` runs; the result as a dict."""
    from transformers import GenerationConfig

    from peftkit.adapters.named import load_named_model

    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    adapters = json.loads((Path(args.workdir) / "adapters.json").read_text())
    device = torch.device(args.device)
    model, named, tok = load_named_model([tuple(a) for a in adapters], device=device)
    gen = torch.Generator().manual_seed(0)
    n, b = args.adapters, args.rows
    ids = torch.randint(3, model.config.vocab_size, (n * b, args.prompt_len), generator=gen).to(device)
    routes = [name for name, _ in adapters for _ in range(b)]
    # Forced to the full length (no EOS): both sides generate exactly N x B x new tokens.
    config = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    def run(mode: str) -> torch.Tensor:
        with torch.no_grad():
            if mode == "mixed":
                with named.routed(routes):
                    return model.generate(input_ids=ids, generation_config=config)[:, args.prompt_len:]
            outs = []
            for i, (name, _) in enumerate(adapters):
                named.activate(name)
                outs.append(model.generate(input_ids=ids[i * b:(i + 1) * b], generation_config=config)[:, args.prompt_len:])
            return torch.cat(outs)

    if args.side == "both":  # timing: the two modes alternate, so that a busy machine slows both alike
        tokens = {mode: run(mode).cpu().tolist() for mode in MODES}  # warm-up
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                start = _sync(args.device)
                run(mode)
                times[mode].append(_sync(args.device) - start)
        return {mode: {"seconds": statistics.median(times[mode]), "tokens": tokens[mode]} for mode in MODES}
    run(args.side)  # memory: one mode alone in this process, warmed up, then measured over one run
    loaded_rss = _rss_bytes()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run(args.side)
    if args.device == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_mib": peak / 2**20, "rise_mib": max(peak - loaded_rss, 0) / 2**20}


def _side(args, workdir: str, side: str) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--side", side, "--workdir", workdir]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:  # the side's own error, not CalledProcessError's exit status
        sys.exit(f"the {side} side failed (exit status {done.returncode}):\n{done.stderr.strip()[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    if args.side:
        print(json.dumps(side(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "adapters.json").write_text(json.dumps(build(args, Path(tmp))))
        timing = _side(args, tmp, "both")
        memory = {mode: _side(args, tmp, mode) for mode in MODES}
    tokens = args.adapters * args.rows * args.new_tokens
    print(f"{args.adapters} LoRA adapters (r={args.r}, all-linear) x {args.rows} rows, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens greedy; Llama hidden {args.hidden}, {args.layers} layers; {args.device}"
          f"{f', {args.threads} threads' if args.threads and args.device == 'cpu' else ''}; median of {args.repeats}")
    header = "peak MiB (CUDA allocated)" if args.device == "cuda" else "peak RSS MiB | rise over loaded"
    print(f"| side | passes | tokens/s | s per run | {header} |")
    print("|---|---|---|---|---|" + ("" if args.device == "cuda" else "---|"))
    for mode, passes in (("mixed", 1), ("separate", args.adapters)):
        m = memory[mode]
        mem = f"{m['peak_mib']:.0f}" + (f" | {m['rise_mib']:.0f}" if "rise_mib" in m else "")
        print(f"| {mode} | {passes} | {tokens / timing[mode]['seconds']:.0f} | {timing[mode]['seconds']:.3f} | {mem} |")
    same = timing["mixed"]["tokens"] == timing["separate"]["tokens"]
    print(f"mixed / separate throughput: {timing['separate']['seconds'] / timing['mixed']['seconds']:.2f}x; "
          f"generated tokens {'identical' if same else 'DIFFER'} in the two modes")


if __name__ == "__main__":
    main()
