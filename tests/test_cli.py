"""The `peftkit` command itself, apart from any one command: `peftkit --version`."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import torch

import peftkit
from peftkit.manifest import source_digest


def test_version_names_peftkit_its_code_and_what_a_run_depends_on():
    """What a bug report needs, as a run's manifest records it: the version and the digest of the code (which an
    edited checkout changes), the libraries' versions as installed, the device; then exit 0 without a command."""
    out = subprocess.run([sys.executable, "-m", "peftkit", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, libraries, device = out.stdout.splitlines()
    assert first == f"peftkit {peftkit.__version__} (source {source_digest()})"
    for name in ("torch", "transformers", "datasets", "accelerate", "bitsandbytes", "safetensors", "pydantic"):
        assert f"{name} {metadata.version(name)}" in libraries.split(", ")
    if torch.cuda.is_available():
        backend = f"rocm {torch.version.hip}" if torch.version.hip else f"cuda {torch.version.cuda}"
        assert device == f"device: {backend}, {torch.cuda.get_device_name(0)}"
    else:
        assert device == ("device: mps (Apple GPU)" if torch.backends.mps.is_available() else "device: no GPU (cpu)")


def test_version_names_a_rocm_gpu_as_rocm_and_apple_s_as_mps(monkeypatch):
    """ROCm's torch answers to torch.cuda with torch.version.cuda None (the line said `cuda None`), and a Mac's GPU is
    torch.backends.mps (it said `no GPU`). (The two devices, which CI lacks, are stood in for by torch's own probes.)"""
    from peftkit.cli.application import device_line

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "AMD Instinct MI300X")
    monkeypatch.setattr(torch.version, "hip", "6.4.43482")
    assert device_line() == "rocm 6.4.43482, AMD Instinct MI300X"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert device_line() == "mps (Apple GPU)"
