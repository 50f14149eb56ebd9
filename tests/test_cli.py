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
    assert device == (f"device: cuda {torch.version.cuda}, {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
                      else "device: no GPU (cpu)")
