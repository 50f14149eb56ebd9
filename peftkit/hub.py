"""Adapters on the Hugging Face hub: an `--adapter` that names no local path but a hub repository (`user/name`, or
`user/name@REVISION` for a branch, tag or commit; `user/name/SUBFOLDER` for one of several in a repository) is
fetched into the Hugging Face cache, its adapter files only (and the tokenizer's saved beside them), and read from
there, as peft's
`PeftModel.from_pretrained("user/name", subfolder=...)` does. Offline (`HF_HUB_OFFLINE=1`) the cache is
read and nothing is downloaded; a repository or revision it lacks is said with what it holds."""

from __future__ import annotations

import re
from pathlib import Path

from peftkit.errors import PeftkitError, did_you_mean

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "peftkit.json",
                 "chat_template.jinja"]
"""What a hub adapter is read from (a legacy .bin is fetched to be named in the error that refuses it; the chat
template it was trained with, where it has one: a peftkit run's with data.chat_template, TRL's); these of the adapters
it holds in subdirectories too (an X-LoRA's experts' copies, `_held_adapters`)."""
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model"]
"""The tokenizer files saved beside a peft adapter (TRL's setup_chat_format, Trainer), which tell the tokens its base
was trained with added (`peftkit.new_tokens.adapter_tokens`). snapshot_download lists the repository's files and
fetches those of these it holds: one it lacks is neither asked for nor said."""
_HUB_ID = re.compile(r"([A-Za-z0-9][\w.-]*/[\w.-]+)(?:/([\w.-]+(?:/[\w.-]+)*))?")
"""user/name, then the subfolder the adapter lies in, if any (a repository of several adapters or checkpoints)."""


def hub_adapter(value: str, tried: str | None = None) -> str | None:
    """The local snapshot directory of the hub adapter `value` names, fetched where not cached; None where `value`
    cannot be a hub id (a path: `./x`, `~/x`, `/x`); `user/name/SUBFOLDER` is the adapter in a subfolder of the
    repository. `tried`: the local path it was looked for at first, for the errors (a recipe's: relative to the
    recipe's directory)."""
    if not hub_shaped(value):
        return None
    name, _, revision = value.partition("@")
    repo_id, subfolder = _HUB_ID.fullmatch(name).groups()
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f" at revision '{revision}'" if revision else ""
    local = f"no such local directory ({tried})" if tried and tried != value else "no such local directory"
    try:
        snapshot = _fetch(repo_id, revision or None, subfolder)
    except LocalEntryNotFoundError:  # offline (or the hub unreachable), and not in the cache
        raise PeftkitError(f"Adapter {value}: {local}, and of hub adapter {repo_id}{at}, "
                           f"{cache_miss(repo_id, revision or None)}") from None
    except GatedRepoError:
        raise PeftkitError(f"Adapter {value}: hub repository {repo_id} is gated; accept its terms on the hub and log in "
                           "(`hf auth login`).") from None
    except RepositoryNotFoundError:
        raise PeftkitError(f"Adapter {value}: {local}, and no hub repository {repo_id} (or a private "
                           "one: log in with `hf auth login`). Check the path or the id.") from None
    except RevisionNotFoundError:
        raise PeftkitError(f"Adapter {value}: hub repository {repo_id} has no revision '{revision}'.") from None
    except (HfHubHTTPError, OSError) as e:
        raise PeftkitError(f"Adapter {value}: could not fetch hub adapter {repo_id}{at} ({e}).") from None
    if subfolder and not Path(snapshot, subfolder).is_dir():  # (offline, or unreachable: the cached snapshot)
        why = ("the local Hugging Face cache holds none, and HF_HUB_OFFLINE is set, so nothing is downloaded"
               if constants.HF_HUB_OFFLINE else "or the hub could not be reached and the cached copy holds none")
        raise PeftkitError(f"Adapter {value}: hub repository {repo_id}{at} has no adapter files in {subfolder}/ "
                           f"({why}).")
    return str(Path(snapshot, subfolder)) if subfolder else snapshot


def hub_shaped(value: str) -> bool:
    """Whether `value` can name a hub adapter (`hub_adapter`): `user/name`, then a subfolder and `@REVISION` if any;
    not a path (`./x`, `~/x`, `/x`, `..` in a subfolder, a name the hub refuses)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    name, _, revision = value.partition("@")
    if not (match := _HUB_ID.fullmatch(name)) or (revision and not re.fullmatch(r"[\w./-]+", revision)):
        return False
    repo_id, subfolder = match.groups()
    if subfolder and any(part in (".", "..") for part in subfolder.split("/")):
        return False  # (a path: a subfolder stays inside its repository's snapshot)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:  # `--` or `..` in it, a name too long: no hub id, a path
        return False
    return True


def _fetch(repo_id: str, revision: str | None, subfolder: str | None) -> str:
    """The snapshot directory of `repo_id` at `revision` holding the adapter files of `subfolder` (the top level where
    None) and of the adapters that adapter holds in subdirectories of its own (X-LoRA's experts' copies, `0/`, `1/`:
    its peftkit.json `experts`), fetched at one commit where not cached (offline: the cached snapshot)."""
    from huggingface_hub import snapshot_download

    inside = f"{subfolder}/" if subfolder else ""
    snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=[
        f"{inside}{f}" for f in ADAPTER_FILES + TOKENIZER_FILES])
    if held := _held_adapters(Path(snapshot, inside)):  # (at the commit just read: another push may have come since)
        snapshot = snapshot_download(repo_id, revision=Path(snapshot).name, allow_patterns=[
            f"{inside}{directory}/{f}" for directory in held for f in ADAPTER_FILES])
    return snapshot


def _held_adapters(directory: Path) -> list[str]:
    """The subdirectories of adapter directory `directory` that hold adapters it is built from: its peftkit.json's
    `experts` (an X-LoRA export's copies of its experts), relative paths inside it only; [] for others."""
    import json

    try:
        experts = json.loads((directory / "peftkit.json").read_text(encoding="utf-8")).get("experts")
    except (OSError, ValueError, AttributeError):
        return []  # (no record, or one that does not read: said when the adapter is read)
    if not isinstance(experts, dict):
        return []
    return [path for path in experts.values() if isinstance(path, str) and path and not Path(path).is_absolute()
            and ".." not in Path(path).parts]


def cache_miss(repo_id: str, revision: str | None) -> str:
    """Why the local Hugging Face cache cannot give model repository `repo_id` at `revision` (main when None), where
    nothing can be downloaded: the repository is not there (with a did-you-mean), or not that revision (with those
    it holds)."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    offline = constants.HF_HUB_OFFLINE
    why = "HF_HUB_OFFLINE is set, so nothing is downloaded" if offline else "the hub could not be reached"
    if not repo.is_dir():
        held = [p.name.removeprefix("models--").replace("--", "/") for p in cache.glob("models--*")]
        fix = "unset HF_HUB_OFFLINE to download it" if offline else "download it where the hub can be reached"
        return f"it is not in the local Hugging Face cache ({cache}), and {why}.{did_you_mean(repo_id, held)} " \
               f"Check the id, or {fix}."
    fix = "unset HF_HUB_OFFLINE to download this one" if offline else "download it where the hub can be reached"
    if re.fullmatch(r"[0-9a-f]{40}", revision or ""):  # (a run's pin, `pinned_reference`: another revision is no fix)
        return (f"commit {revision} is not in the local Hugging Face cache ({repo}), which holds "
                f"{_held_revisions(repo)}, and {why}. Only that commit has the files pinned: {fix}, or copy its "
                "snapshot into this cache.")
    return (f"revision '{revision or 'main'}' is not in the local Hugging Face cache ({repo}), which holds "
            f"{_held_revisions(repo)}, and {why}. Ask for a revision it holds, or {fix}.")


def _held_revisions(repo: Path) -> str:
    """The branches and tags (quoted) and the commits the cached repository `repo` holds, the first 8."""
    refs = sorted(f"'{p.relative_to(repo / 'refs')}'" for p in (repo / "refs").rglob("*") if p.is_file())
    commits = sorted(p.name for p in (repo / "snapshots").iterdir()) if (repo / "snapshots").is_dir() else []
    return ", ".join([*refs, *commits][:8]) or "no revision"


def fetch_pinned(value: str, named: str) -> str:
    """The local snapshot of hub adapter `value` as a run records it (`user/name[/SUBFOLDER]@COMMIT`: `named`, the
    record and key, says where), fetched where not cached (`hub_adapter`). Offline, a cache without that commit is
    said as such: only that commit reproduces the run, so another one it holds is no fix."""
    from huggingface_hub import constants

    repo_id, commit, _ = pinned_commit(value)
    repo = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    if constants.HF_HUB_OFFLINE and not (repo / "snapshots" / commit).is_dir():
        held = f"it holds {_held_revisions(repo)}" if repo.is_dir() else "it holds no revision of it"
        raise PeftkitError(f"{named} is hub adapter {value}: the run read {repo_id} at commit {commit}, which the "
                           f"local Hugging Face cache ({repo}) lacks ({held}), and HF_HUB_OFFLINE is set, so nothing "
                           "is downloaded. Only that commit reproduces the run: unset HF_HUB_OFFLINE to fetch it (the "
                           "network), or copy its snapshot into this cache.")
    try:
        return hub_adapter(value) or value
    except PeftkitError as e:  # (online: no such repository or commit, gated, unreachable)
        raise PeftkitError(f"{named} is hub adapter {value}, the commit the run read: {e}") from None


def cached_adapter(path: str | Path) -> tuple[str, str, str | None] | None:
    """(repository, commit, subfolder or None) of the hub adapter whose snapshot in the local Hugging Face cache is
    `path` (as `hub_adapter` gives it); None for a directory elsewhere."""
    from huggingface_hub import constants

    try:
        parts = Path(path).resolve().relative_to(Path(constants.HF_HUB_CACHE).resolve()).parts
    except (OSError, ValueError):
        return None
    if len(parts) < 3 or not parts[0].startswith("models--") or parts[1] != "snapshots":
        return None
    return parts[0].removeprefix("models--").replace("--", "/"), parts[2], "/".join(parts[3:]) or None


def pinned_reference(path: str) -> str | None:
    """`user/name[/SUBFOLDER]@COMMIT`, the hub reference pinned to the commit read, of the hub adapter whose snapshot is
    `path`: in the local Hugging Face cache (`hub_adapter`'s answer), or, where `path` is gone, in another machine's
    (`.../models--user--name/snapshots/COMMIT[/SUBFOLDER]`, as a run made there before 6 December 2026 recorded it);
    None for another path or a hub id. What a run records of a hub adapter (`peftkit.recipe.recorded`): the
    snapshot's path is one machine's only."""
    if (cached := cached_adapter(path)) is None and not Path(path).exists():
        cached = _snapshot_elsewhere(Path(path).parts)
    if cached is None or not re.fullmatch(r"[0-9a-f]{40}", cached[1]) or not _HUB_ID.fullmatch(cached[0]):
        return None
    repo_id, commit, subfolder = cached
    return f"{repo_id}{'/' + subfolder if subfolder else ''}@{commit}"


def _snapshot_elsewhere(parts: tuple[str, ...]) -> tuple[str, str, str | None] | None:
    """(repository, commit, subfolder or None) of a path laid out as a snapshot of a Hugging Face cache wherever that
    lies, `.../models--user--name/snapshots/COMMIT[/SUBFOLDER]` (split in `parts`); None for another path."""
    for i in range(len(parts) - 2):
        folder, snapshots, commit = parts[i:i + 3]
        if folder.startswith("models--") and snapshots == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", commit):
            return folder.removeprefix("models--").replace("--", "/"), commit, "/".join(parts[i + 3:]) or None
    return None


def pinned_commit(value: str) -> tuple[str, str, str | None] | None:
    """(repository, commit, subfolder or None) of a hub adapter pinned to a commit: its reference as a run records it
    (`user/name[/SUBFOLDER]@COMMIT`, 40 hex digits), or its snapshot in the local cache (as runs recorded it before,
    and as a recipe resolves it); None for anything else."""
    name, at, commit = value.partition("@")
    if at and re.fullmatch(r"[0-9a-f]{40}", commit) and (match := _HUB_ID.fullmatch(name)):
        return match[1], commit, match[2]
    return cached_adapter(value)


def cached_refs(repo_id: str) -> dict[str, str]:
    """The branches and tags of hub model repository `repo_id` the local Hugging Face cache holds, and the commit
    each pointed to when last fetched: {'main': COMMIT, ...}; {} for a repository it does not hold."""
    from huggingface_hub import constants

    refs = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs"
    if not refs.is_dir():
        return {}
    return {str(p.relative_to(refs)): p.read_text().strip() for p in sorted(refs.rglob("*")) if p.is_file()}


def tokenizer_fetch(path: str | Path) -> str | None:
    """What to do about a hub adapter's snapshot at `path` that holds no tokenizer files (one cached before
    `hub_adapter` fetched them with the adapter's): fetch them once, by this command without HF_HUB_OFFLINE or by
    `hf download` of those files; None where `path` is no cached hub adapter."""
    from huggingface_hub import constants

    if (cached := cached_adapter(path)) is None:
        return None
    repo_id, commit, subfolder = cached
    inside = f"{subfolder}/" if subfolder else ""
    patterns = dict.fromkeys(f"'{inside}tokenizer*'" if name.startswith("tokenizer") else f"{inside}{name}"
                             for name in TOKENIZER_FILES)
    command = f"hf download {repo_id} --revision {commit} " + " ".join(f"--include {p}" for p in patterns)
    why = ("HF_HUB_OFFLINE is set, so nothing is fetched now" if constants.HF_HUB_OFFLINE else
           "the hub repository holds none beside the adapter, or could not be reached")
    return (f"It is hub adapter {repo_id}'s snapshot {commit} in the local Hugging Face cache, which holds only the "
            f"files fetched when it was cached (before peftkit fetched the tokenizer's with an adapter's), and {why}. "
            f"Fetch them once: run this command again with HF_HUB_OFFLINE=0 (peftkit fetches them beside the adapter), "
            f"or `{command}`.")


def hub_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """One file of hub model repository `repo_id` at `revision` (the cache offline), or None where the repository
    holds none, cannot be reached, or `repo_id` is no hub id: an optional record beside a model (its peftkit.json)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError

    from peftkit.push import network_errors

    if not _HUB_ID.fullmatch(repo_id) or repo_id.count("/") != 1:
        return None
    try:  # (not there, offline and not cached, no such repository or revision: OSErrors, as the hub's HTTP errors)
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except (EntryNotFoundError, HFValidationError, OSError, ValueError, *network_errors()):
        return None
