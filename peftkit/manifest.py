"""manifest.json: everything needed to reproduce a run and to check that a rerun gave the same bits."""

from __future__ import annotations

import hashlib
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

from peftkit import __version__
from peftkit.fileio import sha256_file
from peftkit.recipe import Recipe

PACKAGES = ("torch", "transformers", "datasets", "accelerate", "bitsandbytes", "safetensors", "pydantic")


def versions() -> dict[str, str]:
    out = {"peftkit": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def environment(device: torch.device) -> dict:
    env = {"versions": versions(), "platform": platform.platform(), "machine": platform.machine(),
           "device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def file_hashes(path: str | Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a directory (relative names), or {} for a hub id."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    if path.is_dir():
        return {str(f.relative_to(path)): sha256_file(f) for f in sorted(path.rglob("*")) if f.is_file()}
    return {}


def model_weight_hashes(name_or_path: str) -> dict[str, str]:
    """Content hashes of the base model's weight and config files (local directories only)."""
    path = Path(name_or_path)
    if not path.is_dir():
        return {}
    return {f.name: sha256_file(f) for f in sorted(path.iterdir())
            if f.is_file() and (f.suffix == ".safetensors" or f.name in ("config.json", "tokenizer.json"))}


def build_manifest(recipe: Recipe, out: Path, summary: dict, exported: list[Path], device: torch.device,
                   losses: list[float]) -> dict:
    data = {"train": file_hashes(recipe.data.train)}
    if recipe.data.eval:
        data["eval"] = file_hashes(recipe.data.eval)
    outputs = {}
    for directory in exported:
        for name, digest in file_hashes(directory).items():
            outputs[f"{directory.name}/{name}"] = digest
    return {
        "peftkit_manifest": 1,
        "command": " ".join(sys.argv),
        "environment": environment(device),
        "dtype": recipe.model.dtype,
        "seed": recipe.training.seed,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_sha256": recipe.sha256(),
        "data_sha256": data,
        "base_model_sha256": model_weight_hashes(recipe.model.name_or_path),
        "losses": losses,
        "loss_digest": hashlib.sha256(repr(losses).encode()).hexdigest(),
        "metrics": summary,
        "outputs_sha256": outputs,
    }
