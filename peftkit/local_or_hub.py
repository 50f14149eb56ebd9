"""A model's or adapter's name as given (`--model`, `--merged`, `--adapter`, `--base`; a recipe's
`model.name_or_path`, `adapter.init_from`, AdapterFusion's and X-LoRA's adapters): a local path, or a hub id.

A name not on disk goes to the hub as a hub id, and offline huggingface_hub retries the network for ~20 s before it
gives up (seen: 50 s for `peftkit generate --model runs/merged` on a machine without network). A name that can only
be a local path (`meant_locally`) is refused at once instead (`no_such_directory`), saying what is there.
"""

from __future__ import annotations

import os
from pathlib import Path

from peftkit.errors import PeftkitError

SHOWN_ENTRIES = 12
"""The entries of the nearest existing directory an error names (sorted; '...' where it holds more)."""


def meant_locally(value: str, base: Path | None = None, subfolders: bool = False, kind: str = "model") -> bool:
    """Whether `value`, a name that is not on disk, can only be a local path: it starts with `/`, `./`, `../` or `~`,
    ends with a separator, holds more than one `/` (a model's hub id is `user/name`; an adapter's may go on with a
    subfolder, `user/name/SUBFOLDER`, where `subfolders`), or its first part is a directory here (`runs/merged` where
    `runs/` exists: a mistyped run, not user `runs`'s model) and the local Hugging Face cache holds no repository of
    that name (a hub layout mirrored here, `meta-llama/` holding a clone, must not hide the hub's other repositories
    of that user from those who downloaded them).

    Args:
        value: the name as the user wrote it.
        base: the directory a relative name is read from (a recipe's directory); the current one where None.
        subfolders: whether a hub id may name a subfolder (adapters: `peftkit.hub`).
        kind: `model` (adapters too) or `dataset` (a data name without a file's extension: `data/numbers-saved`),
            whose repositories the cache keeps apart.
    """
    if path_shaped(value, subfolders):
        return True
    parts = Path(value).parts
    return len(parts) > 1 and ((base or Path()) / parts[0]).is_dir() and not _cached(parts[0], parts[1], kind)


def path_shaped(value: str, subfolders: bool = False) -> bool:
    """Whether `value` can only be a local path by its form alone, wherever it is read from (`meant_locally` without
    its directory-here rule): it starts with `/`, `./`, `../` or `~`, ends with a separator, or holds more than one `/`
    (where not `subfolders`)."""
    if value.startswith(("/", "./", "../", "~")) or value in (".", "..") or Path(value).is_absolute():
        return True
    return value.endswith(("/", os.sep)) or (not subfolders and value.count("/") > 1)


def _cached(user: str, name: str, kind: str = "model") -> bool:
    """Whether the local Hugging Face cache holds repository `user/name` of `kind` (model or dataset: for a dataset,
    its files in the hub's cache or what `datasets` made of them in its own), any revision."""
    from huggingface_hub import constants

    if kind == "dataset":
        from datasets import config

        return (Path(constants.HF_HUB_CACHE) / f"datasets--{user}--{name}").is_dir() or \
            (Path(config.HF_DATASETS_CACHE) / f"{user}___{name}").is_dir()
    return (Path(constants.HF_HUB_CACHE) / f"models--{user}--{name}").is_dir()


def no_such_directory(value: str, given: str, fix: str, base: Path | None = None) -> PeftkitError:
    """The error of `value`, meant locally (`meant_locally`) and not there: `given` says where it was given (`--model
    runs/merged`, a recipe's line and key), then the nearest directory above it that exists and what it holds, and
    `fix`, what to give instead."""
    path = Path(value).expanduser()
    full = path if path.is_absolute() else (base or Path()) / path
    above = next(parent for parent in full.parents if parent.is_dir())
    held = sorted(p.name + ("/" if p.is_dir() else "") for p in above.iterdir() if not p.name.startswith("."))
    shown = ", ".join(held[:SHOWN_ENTRIES]) + (", ..." if len(held) > SHOWN_ENTRIES else "")
    name = _as_given(above, full, value)
    there = f"{name} holds {shown}" if held else f"{name} is empty"
    if (blocking := above / full.relative_to(above).parts[0]).is_file():  # (where a directory was meant)
        there += f"; {blocking.name} there is a file, not a directory"
    first = Path(value).parts[0]
    said = [str(full)] if str(full) != str(path) or value.startswith("~") else []  # (`~` expanded, the recipe's)
    if value.count("/") == 1 and not value.startswith(("/", "./", "~")) and not value.endswith("/") \
            and ((base or Path()) / first).is_dir():  # the rule a user may not expect: said
        said.append(f"read as a local path, not a hub id: {first}/ is a directory here and the local Hugging Face "
                    "cache holds no such repository; download it there first for the hub's")
    shown_path = f" ({'; '.join(said)})" if said else ""
    return PeftkitError(f"{given}: no such directory{shown_path}; {there}. Give {fix}.")


def _as_given(above: Path, full: Path, value: str) -> str:
    """`above`, a directory above `full`, as the user would name it: the part of `value` it is (`runs/`), else its
    whole path."""
    depth = len(full.parts) - len(above.parts)
    parts = Path(value).parts
    if not Path(value).expanduser().is_absolute() and 0 < depth < len(parts):
        return str(Path(*parts[:len(parts) - depth])) + "/"
    return str(above.resolve()).rstrip("/") + "/"  # (the root: /, not //)
