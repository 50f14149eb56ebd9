"""Benchmark: what --stop costs `peftkit generate` per new token, as answers grow long.

    python scripts/bench_stop.py                                   # CPU defaults: ~1 min on 2 cores
    python scripts/bench_stop.py --new-tokens 500 1000 2000 4000 --repeats 5

A random-init 2-layer Llama (hidden 32, the character tokenizer; built locally, nothing downloaded) greedily answers
4 prompts in one batch (`generate_texts`), `--new-tokens` tokens each, without a stop string and with one its
answers never hold (so every row runs to the end and the stop check runs at every step). Each figure is the median
of `--repeats` runs, the two alternating so that a busy machine slows both alike; the answers are checked equal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["hi", "count: 1 2 3 4 5 6 7 8 9", "### Instruction:\nadd 12 and 30\n\n### Response:\n", "abc"]
NEVER = "~never~"  # no answer of the tiny model holds it


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.data.prompts import text_prompt
    from peftkit.decoding import Sampling, generate_texts
    from peftkit.tiny import build_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[250, 1000, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_model(tmp, arch="llama", hidden_size=32, num_layers=2, seed=0,
                         max_position_embeddings=max(args.new_tokens) + 64)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(tmp)
    prompts = [text_prompt(tok, p) for p in PROMPTS]
    print(f"{'new tokens':>10}  {'no --stop':>14}  {'--stop':>14}  {'--stop costs':>12}")
    for n in args.new_tokens:
        times: dict[tuple, list[float]] = {(): [], (NEVER,): []}
        answers = {}
        for _ in range(args.repeats):
            for stop in times:
                start = time.perf_counter()
                answers[stop] = generate_texts(model, tok, prompts, Sampling(max_new_tokens=n, stop=stop),
                                               batch_size=len(prompts))
                times[stop].append(time.perf_counter() - start)
        assert answers[()] == answers[(NEVER,)], "--stop changed an answer"
        plain, stopped = (statistics.median(t) * 1000 / n for t in times.values())
        print(f"{n:>10}  {plain:>9.2f} ms/tok  {stopped:>9.2f} ms/tok  {stopped / plain - 1:>+11.0%}")


if __name__ == "__main__":
    main()
