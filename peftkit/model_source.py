"""A base model's source, a local directory or a hub id, checked before transformers reads it.

transformers reports a missing directory, a broken config.json, a hub id it cannot reach or a truncated weights file
without naming the file or the fix; these checks say which file is wrong and what to do. `peftkit.modeling` runs them.
"""

from __future__ import annotations

import json
from pathlib import Path

from peftkit.errors import PeftkitError, did_you_mean
from peftkit.local_or_hub import no_such_directory, path_shaped
from peftkit.manifest import model_directory
from peftkit.recipe import ModelConfig


def check_source(cfg: ModelConfig) -> None:
    """A path that should be a model directory but is not gets a clear message before transformers' own. A name
    meant locally by the directory its first part names (`runs/merged`) was made absolute where it was given (a
    recipe's beside the recipe, `--model`'s here): one still relative is a hub id there, whatever the current
    directory holds."""
    name_or_path = cfg.name_or_path
    path = Path(name_or_path)
    if name_or_path.startswith(".") or path_shaped(name_or_path) or path.is_dir():
        if not path.exists():
            raise no_such_directory(name_or_path, f"model.name_or_path {name_or_path}", "a local directory containing "
                                    "config.json, or a hub id such as 'meta-llama/Llama-3.2-1B'")
        if not (path / "config.json").exists():
            raise PeftkitError(f"{name_or_path} has no config.json; it is not a transformers model directory.")
        check_config_json(path / "config.json", cfg.trust_remote_code)


def check_config_json(file: Path, trust_remote_code: bool) -> None:
    """The mistakes transformers reports without naming the file or the fix: not JSON, not an object, no
    or an unknown `model_type` (transformers says only 'Unrecognized model' or blames its own version)."""
    from transformers import __version__ as transformers_version
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from peftkit.settings_json import read_json_object

    raw = read_json_object(file, "Restore it from where the model came from.")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise PeftkitError(f"{file} has no 'model_type' (the architecture, e.g. \"llama\"), so transformers cannot "
                           "tell which model it is. Restore config.json from where the model came from, or add the key.")
    # Models that ship their own code (auto_map) may use a type transformers does not know.
    if model_type not in CONFIG_MAPPING and not (trust_remote_code and "auto_map" in raw):
        raise PeftkitError(
            f"{file}: model_type {model_type!r} is not an architecture transformers {transformers_version} knows."
            f"{did_you_mean(model_type, CONFIG_MAPPING.keys())} If the model is newer than this transformers, upgrade "
            "it (pip install -U transformers); if it ships its own modelling code, set model.trust_remote_code: true "
            "(peftkit eval, generate, chat: --trust-remote-code)."
        )


def not_loadable(name_or_path: str, error: Exception, revision: str | None = None) -> PeftkitError:
    """A model transformers cannot find or read (a hub id offline, a missing weights file). A name that is not on
    disk but whose first part is a local directory is most likely a mistyped path: said first; then what the local
    Hugging Face cache tells of a hub id (`_hub_problem`), or of a directory without weights."""
    path = Path(name_or_path)
    if not path.exists() and len(path.parts) > 1 and Path(path.parts[0]).is_dir():
        near = sorted(p.name for p in path.parent.iterdir())[:10] if path.parent.is_dir() else []
        return PeftkitError(f"Could not load model {name_or_path}: there is no such local directory (its start, "
                            f"{path.parts[0]}, is one here" + (f"; {path.parent} holds {', '.join(near)}" if near else "")
                            + f"), and as a hub id it could not be loaded either ({str(error).splitlines()[0]}).")
    problem = _no_weights(path) if path.is_dir() else _hub_problem(name_or_path, revision)
    if problem:
        return PeftkitError(f"Could not load model {name_or_path}: {problem}")
    return PeftkitError(f"Could not load model {name_or_path}: {error}\nFor a hub id this needs network access (or a "
                        "cached copy); only safetensors weights are accepted.")


def _no_weights(directory: Path) -> str | None:
    """What a model directory without safetensors weights holds instead, said; None where it has some."""
    if any(directory.glob("*.safetensors")):
        return None
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf"))
    return (f"{directory} holds no .safetensors weights" + (f" (only {', '.join(others)})" if others else "")
            + "; peftkit reads safetensors weights only (loading never unpickles). Use a copy of the model in "
            "safetensors, or save one with transformers' save_pretrained.")


def _hub_problem(name_or_path: str, revision: str | None) -> str | None:
    """Why a hub id could not be loaded, as the local Hugging Face cache tells: a snapshot without safetensors
    weights; offline, a repository or revision the cache does not hold. None where it cannot tell (online, the
    hub's own error says)."""
    from huggingface_hub import constants

    snapshot = model_directory(name_or_path, revision)
    if snapshot is not None:
        return _no_weights(snapshot)
    if not constants.HF_HUB_OFFLINE:
        return None
    from peftkit.hub import cache_miss

    return cache_miss(name_or_path, revision)


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a local model directory: the shards its index names, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return [path / "model.safetensors"] if (path / "model.safetensors").exists() else []
    try:
        shards = sorted(set(json.loads(index.read_bytes())["weight_map"].values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise PeftkitError(f"{index} is not a valid weights index ({type(e).__name__}: {e}). Restore it from where "
                           "the model came from.") from None
    return [path / shard for shard in shards if (path / shard).exists()]  # a missing shard: transformers says so


def check_weight_files(cfg: ModelConfig) -> None:
    """Read the header of every local weights file, so a truncated or overwritten one is named (the error
    safetensors raises mid-load names no file)."""
    from safetensors import SafetensorError, safe_open

    from peftkit.peft_format import unreadable_safetensors

    path = Path(cfg.name_or_path)
    if not path.is_dir():
        return
    for file in _weight_files(path):
        try:
            with safe_open(file, "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise unreadable_safetensors(file, e, "Copy or download the model again") from None
