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
@pytest.mark.parametrize("script", ["bench_lora_layer.py", "bench_mixed.py", "bench_train.py"])
def test_device_cuda_without_cuda_is_one_line_not_a_traceback(script):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--device", "cuda"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 1
    assert "--device cuda: no CUDA device here" in done.stderr
    assert "Traceback" not in done.stderr
