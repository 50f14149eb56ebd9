"""The benchmark scripts in scripts/, which no other test runs: what a user sees when one cannot run here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the scripts would run on it")
@pytest.mark.parametrize("script", ["bench_lora_layer.py", "bench_mixed.py", "bench_train.py", "bench_dpo.py"])
def test_device_cuda_without_cuda_is_one_line_not_a_traceback(script):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--device", "cuda"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert "--device cuda: no CUDA device here" in done.stderr
    assert "Traceback" not in done.stderr


def test_bench_train_table_header_names_each_column(capsys):
    """The ratio column's name (`peftkit/peft+Trainer`, 20 characters) ran into the column before it."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    bench_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_train)
    run = {"step_ends": [0.0, 1.0, 2.0], "tokens_per_step": [10, 10, 10], "peak_mb": 100.0, "base_mb": 50.0,
           "losses": [1.0], "cpu_ends": [0.0, 0.5, 1.0]}
    bench_train.report({"peftkit": [run], "peft": [run]}, argparse.Namespace(json=None, warmup=1, repeats=1),
                       "title", cuda=False)
    lines = capsys.readouterr().out.splitlines()
    header = lines[lines.index("title") + 2]
    assert header.split() == ["peftkit", "peft+Trainer", "peftkit/peft+Trainer"]
    tokens_row = next(line for line in lines if line.startswith("tokens/s"))
    assert len(tokens_row) == len(header)  # the figures sit under their names
    # each side's CPU time at its step ends: 20 tokens in 1.0 s of CPU (2.0 s by the wall clock)
    assert next(line for line in lines if line.startswith("tokens/s by CPU time")).split()[-3:] == ["20", "20", "1.000"]


def test_bench_methods_table_keeps_long_method_names_in_their_column(capsys):
    """`prompt_tuning`, `prefix_tuning` and `llama_adapter` (13 characters) pushed their row's figures right."""
    import importlib.util

    sys.path.insert(0, str(ROOT / "scripts"))  # bench_methods.py imports bench_train.py beside it
    try:
        spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "scripts" / "bench_methods.py")
        bench_methods = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_methods)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    side = {"trainable": 1280, "s_step": 0.1, "peak": 600.0, "eval_loss": 4.5}
    rows = {"lora": {"peftkit": side, "peft": side}, "prompt_tuning": {"peftkit": side, "peft": side}}
    bench_methods.report(rows, None, "title", cuda=False)
    lines = capsys.readouterr().out.splitlines()
    lora, prompt = (next(line for line in lines if line.startswith(name)) for name in rows)
    assert len(prompt) == len(lora) == len(lines[lines.index("title") + 1])
