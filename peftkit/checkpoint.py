"""Resumable checkpoints: `checkpoints/step-N/` holds the adapter, optimizer, scheduler, RNG and loop state.

A checkpoint is written as a whole (temp directory + rename) and closes with `checksums.json`: the sha256 of
every other file in it, and the hashes of the data and base model the run trains on. `--resume` takes the
newest checkpoint whose files match their checksums and load cleanly, says which ones it passed over and
why, and refuses to continue when the data or the base model changed since the run began.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from peftkit import zero
from peftkit.adapters.state_dicts import adapter_state_dict, load_adapter_state_dict
from peftkit.distributed import load_optimizer_state
from peftkit.errors import PeftkitError
from peftkit.fileio import atomic_directory, fsync_path, sha256_file
from peftkit.peft_format import WEIGHTS_NAME

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
TRAINER_STATE = "trainer_state.json"
CHECKSUMS = "checksums.json"
ALSO_AT = "PEFTKIT_CHECKPOINT_ALSO_AT"
"""Set by `peftkit verify` for its re-run (launched processes inherit it): the steps, comma-separated, at which the
recorded run has checkpoints. The re-run writes and keeps one at each of them too, so that each is compared with its
own bit for bit: a stopped and resumed run has one at the step it stopped at, which its save_steps do not make."""


def also_at() -> frozenset[int]:
    """The steps `ALSO_AT` names (none outside a verify re-run)."""
    return frozenset(int(s) for s in os.environ.get(ALSO_AT, "").split(",") if s.isascii() and s.isdecimal())


@dataclass
class LoopState:
    step: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    trimmed_slices: bool = False
    """Each process's slice of the global batch dropped the padding its rows share (`peftkit.distributed.shard`'s
    `trim`): a resume goes on as the run began, and a checkpoint without it (one process, or a run from before the
    trim) goes on untrimmed."""

    def to_json(self) -> str:
        """trainer_state.json's text; `trimmed_slices` only where true, so a run that does not trim writes the bytes
        it wrote before the field existed (`peftkit verify` compares them)."""
        return json.dumps({k: v for k, v in self.__dict__.items() if k != "trimmed_slices" or v})

    @classmethod
    def from_json(cls, text: str) -> LoopState:
        raw = json.loads(text)
        ints = ("step", "tokens", "skipped_steps")
        if not isinstance(raw, dict) or not {*ints, "losses"} <= set(raw) <= {*ints, "losses", "trimmed_slices"}:
            raise ValueError(f"expected the keys {', '.join(sorted((*ints, 'losses')))} (and trimmed_slices)")
        if not all(type(raw[k]) is int and raw[k] >= 0 for k in ints):
            raise ValueError("step, tokens and skipped_steps must be non-negative integers")
        if not isinstance(raw["losses"], list) or not all(type(x) is float for x in raw["losses"]):
            raise ValueError("losses must be a list of numbers")
        if type(raw.get("trimmed_slices", False)) is not bool:
            raise ValueError("trimmed_slices must be true or false")
        return cls(**raw)


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be resumed from; the message says why."""


def checkpoint_dirs(out: Path) -> list[Path]:
    """The checkpoints of a run, oldest first."""
    found = [p for p in (out / CHECKPOINTS).glob("step-*[0-9]")
             if p.name[5:].isdecimal() and p.name[5:].isascii() and p.is_dir()]  # not a user's `step-x9`, nor a file
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(out: Path, model, modules_to_save: list[str], optimizer, scheduler, state: LoopState,
                    inputs: dict, keep: int, method_trainer=None, selection=None, rng: list[dict] | None = None,
                    gathered: tuple[dict, dict] | None = None) -> Path:
    """Write checkpoints/step-N/ as a whole, then remove the oldest beyond `keep`.

    Args:
        inputs: hashes of the data and base model (`run_inputs`), recorded to refuse a resume on others.
        method_trainer: the method's `MethodTrainer`, if it has one: its state is kept beside the optimizer's; or,
            for one whose state differs by process (`per_process`), every process's `state_dict()`, by rank.
        selection: the run's `peftkit.selection.Selection` (early stopping, export.best), if it has one.
        rng: every process's RNG states, by rank (`peftkit.distributed.rng_states`); default this process's.
        gathered: (adapter weights, optimizer state) already gathered by every process (FSDP); default read here.
    """
    from safetensors.torch import save_file

    path = out / CHECKPOINTS / f"step-{state.step:08d}"
    fsync_path(out / "metrics.jsonl")  # the lines up to this step are on disk before the checkpoint is
    weights, optimizer_state = gathered or (adapter_state_dict(model, modules_to_save), optimizer.state_dict())
    with atomic_directory(path) as tmp:
        save_file(weights, tmp / WEIGHTS_NAME)
        if rng is None:
            rng = [{"cpu": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state_all()}
                                                     if torch.cuda.is_available() else {})]
        blob = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng[0]}
        if len(rng) > 1:
            blob["rng_ranks"] = rng
        if isinstance(method_trainer, list):
            blob["method_trainer"] = method_trainer[0]
            if len(method_trainer) > 1:
                blob["method_trainer_ranks"] = method_trainer
        elif method_trainer is not None:
            blob["method_trainer"] = method_trainer.state_dict()
        if (scaler := getattr(optimizer, "scaler", None)) is not None:  # fp16's loss scaler, which accelerate gave it
            blob["scaler"] = scaler.state_dict()  # its scale: a resume from the first scale skipped other steps
        _save_state(blob, tmp / STATE_FILE)
        (tmp / TRAINER_STATE).write_text(state.to_json(), encoding="utf-8")
        if selection is not None:
            selection.save(tmp)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
        (tmp / CHECKSUMS).write_text(json.dumps({"files": files, "inputs": inputs}, indent=2, sort_keys=True),
                                     encoding="utf-8")
    for old in checkpoint_dirs(out)[:-keep]:
        if int(old.name[5:]) not in also_at():
            _remove_checkpoint(old)
    return path


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint: renamed first (one step), so that a kill midway leaves no half-deleted `step-N` but a
    temp entry, which the next start removes (`peftkit.rundir.recover_and_tidy`)."""
    doomed = path.with_name(f".{path.name}.pruned.tmp")
    try:
        os.replace(path, doomed)
    except OSError:
        return  # (already gone, or not this user's to move: left as it is)
    shutil.rmtree(doomed, ignore_errors=True)


def _recorded(path: Path) -> dict:
    """checksums.json, after checking every file against it."""
    try:
        if (path / CHECKSUMS).exists() and not (path / CHECKSUMS).is_file():  # a FIFO would block the read for ever
            raise TypeError
        recorded = json.loads((path / CHECKSUMS).read_text(encoding="utf-8"))
        files, inputs = recorded["files"], recorded["inputs"]
        if not isinstance(files, dict) or not isinstance(inputs, dict):
            raise TypeError
    except FileNotFoundError:
        raise DamagedCheckpoint(f"it has no {CHECKSUMS} (incomplete)") from None
    except (ValueError, KeyError, TypeError, RecursionError):  # (JSON nested thousands deep: RecursionError)
        raise DamagedCheckpoint(f"its {CHECKSUMS} is unreadable") from None
    for name in (WEIGHTS_NAME, STATE_FILE, TRAINER_STATE):
        if name not in files:
            raise DamagedCheckpoint(f"{CHECKSUMS} does not list {name}")
    for name, digest in files.items():
        if not (path / name).is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        if sha256_file(path / name) != digest:
            raise DamagedCheckpoint(f"{name} does not match its checksum (truncated or modified)")
    return recorded


def checked_record(path: Path) -> dict:
    """A checkpoint's checksums.json ({"files": their sha256, "inputs": `run_inputs`}), each file checked against it
    (DamagedCheckpoint if one does not match), and no other file in the checkpoint."""
    recorded = _recorded(path)
    if unlisted := sorted(f.name for f in path.iterdir() if f.name != CHECKSUMS and f.name not in recorded["files"]):
        raise DamagedCheckpoint(f"it holds {unlisted[0]}, which its {CHECKSUMS} does not list")
    return recorded


def load_checkpoint(path: Path, model, optimizer, scheduler, method_trainer=None,
                    selection=None, rank: int = 0, world: int | None = None) -> tuple[LoopState, dict, int]:
    """Restore a checkpoint into the model, optimizer, scheduler, RNG, the method's trainer and the run's
    selection (if any); returns (loop state, its inputs, the number of processes that wrote it). With `world`, a
    checkpoint written by another number of processes restores nothing (the caller refuses it, saying so): a ZeRO
    optimizer state split over them would fail to load, which passed the checkpoint over as damaged.

    Raises DamagedCheckpoint when its files fail their checksums or do not load.
    """
    from safetensors.torch import load_file

    recorded = _recorded(path)
    try:
        state = LoopState.from_json((path / TRAINER_STATE).read_text(encoding="utf-8"))
        weights = load_file(path / WEIGHTS_NAME)
        # weights_only: the restricted unpickler (tensors, dicts, numbers), never arbitrary objects.
        with torch.serialization.safe_globals(zero.safe_globals()):  # a ZeRO optimizer state's own classes
            blob = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
        ranks = blob.get("rng_ranks", [blob["rng"]])
        if world is not None and len(ranks) != world:
            return state, recorded["inputs"], len(ranks)
        if method_trainer is not None:  # first: P-tuning's encoder must be back before its output is loaded
            trainers = blob.get("method_trainer_ranks", [])  # (a per-process state: this process's)
            method_trainer.load_state_dict(trainers[rank] if rank < len(trainers) else blob["method_trainer"])
        with zero.gathered(model, modify=True):  # ZeRO-3: whole while written, then partitioned again
            load_adapter_state_dict(model, weights, encoder_restored=method_trainer is not None)
        load_optimizer_state(model, optimizer, blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        if (scaler := getattr(optimizer, "scaler", None)) is not None and "scaler" in blob:
            scaler.load_state_dict(blob["scaler"])
        if selection is not None:
            selection.load(path)
        rng = ranks[rank] if rank < len(ranks) else blob["rng"]  # this process's (dropout differs by rank)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():  # one state per GPU the run saw; a resume may see fewer
            for index, cuda_state in enumerate(rng["cuda"][:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(cuda_state, index)
    except Exception as e:  # noqa: BLE001 - whatever fails to load makes the checkpoint unusable, nothing else
        # torch's own text goes on to advise weights_only=False: never here
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            raise DamagedCheckpoint(f"its {STATE_FILE} holds objects other than tensors and numbers, which peftkit "
                                    "never unpickles (it would run code a file names)") from None
        raise DamagedCheckpoint(f"it does not load ({type(e).__name__}: {str(e)[:200]})") from None
    return state, recorded["inputs"], len(ranks)


def changed_input(recorded: dict, now: dict) -> str | None:
    """The first data or base-model file whose hash differs between a checkpoint and now, described."""
    from peftkit.manifest import HUB_LATER_HASHED, changed_files, changed_model_files

    for key in sorted(set(recorded) | set(now)):
        if not recorded.get(key):  # nothing hashed then: a hub dataset before December 2026
            continue
        if key == "model.name_or_path":
            changed = changed_model_files(recorded.get(key, {}), now.get(key, {}))
        else:
            changed = changed_files(recorded.get(key, {}), now.get(key, {}), HUB_LATER_HASHED)
        if changed:
            name, state = changed[0]
            hub = {"rows": "the rows read from the hub", "classes": "the ClassLabel names read from the hub"}
            return f"{key}: {hub[name]} {state}" if name in hub else f"{key} file {name} {state}"
    return None


def resume(out: Path, model, optimizer, scheduler, inputs: dict, console: Console,
           method_trainer=None, selection=None, rank: int = 0, world: int = 1,
           hub_model: str | None = None, sources: dict[str, str] | None = None) -> tuple[Path, LoopState]:
    """Load the newest intact checkpoint of `out`, written by as many processes as `world`; passing over damaged
    ones is said on the console. `hub_model`: the base's hub id, where it is one (a changed base is then a branch
    that moved, not a file to restore). `sources`: the adapter directories the run reads, by recipe key
    (`read_adapters`: a hub adapter's changed files are then a branch that moved, `_moved_hub_source`)."""
    for path in reversed(checkpoint_dirs(out)):
        try:
            state, recorded, writers = load_checkpoint(path, model, optimizer, scheduler, method_trainer, selection,
                                                       rank, world)
        except DamagedCheckpoint as e:
            console.print(f"[yellow]warning:[/] checkpoint {path.name} is damaged: {escape(str(e))}; trying an older one.")
            continue
        if writers != world:  # the global batch, the data's order and the schedule's length all depend on it
            flag = f"--num-processes {writers}" if writers > 1 else "no --num-processes (one process)"
            raise PeftkitError(
                f"--resume: checkpoint {path.name} was written by {writers} process{'es' * (writers > 1)}, and this "
                f"run has {world}. Its global batch, data order and schedule depend on the number, so resume with "
                f"{flag}, or run without --resume and with --overwrite to start afresh.")
        if changed := changed_input(recorded, inputs):
            fix = ("A hub dataset's branch moved on: run without --resume and with --overwrite to start afresh (pin "
                   "data.revision to a commit so that a resume reads the rows it began with)" if "from the hub" in changed
                   else f"The branch or tag of {hub_model} that model.revision names moved on: set model.revision to "
                   "the commit the run began with (a finished run records it as base_model_commit), or run without "
                   "--resume and with --overwrite to start afresh" if hub_model and changed.startswith("model.")
                   else _moved_hub_source(changed, out, sources or {})
                   or "Restore the original, or run without --resume and with --overwrite to start afresh")
            raise PeftkitError(f"--resume: {changed} since checkpoint {path.name} was written. Resuming would continue "
                               f"training on other inputs than the run began with. {fix}.")
        return path, state
    raise PeftkitError(f"--resume: no intact checkpoint in {out / CHECKPOINTS} (each one is damaged, see above). "
                       "Run without --resume and with --overwrite to start again.")


def _moved_hub_source(changed: str, out: Path, sources: dict[str, str]) -> str | None:
    """The fix where the changed input `changed` is an adapter the run reads that the recipe names by its hub id
    (adapter.init_from, X-LoRA's expert `user/name`, resolved to its snapshot in the local Hugging Face cache): its
    branch or tag moved to another commit since the run began, which the run's recipe.yaml names (`user/name@COMMIT`;
    a run made before they were pinned names the commit's snapshot). None otherwise."""
    from peftkit.hub import cached_adapter, pinned_commit

    key = next((k for k in sources if changed.startswith(f"{k} ")), None)
    if key is None or (now := cached_adapter(sources[key])) is None:
        return None
    repo, commit, subfolder = now
    began = _recorded_sources(out).get(key)
    before = pinned_commit(began) if began else None
    pin = (f"set {key} to {repo}{'/' + subfolder if subfolder else ''}@{before[1]}, the commit the run began with"
           if before and before[0] == repo else "pin it to the commit the run began with (its recipe.yaml names "
           "it)")
    return (f"{key} is hub adapter {repo}, now at commit {commit}"
            + (f" (the run began at {before[1]})" if before and before[0] == repo else "")
            + f": the branch or tag it names moved on. {pin[0].upper()}{pin[1:]}, or run without --resume and with "
            "--overwrite to start afresh")


def _recorded_sources(out: Path) -> dict[str, str]:
    """The adapter directories the run in `out` read (`read_adapters` of its recipe.yaml, whose paths are resolved and
    hub adapters pinned, `user/name@COMMIT`), by recipe key; {} where it does not read."""
    import yaml
    from pydantic import ValidationError

    from peftkit.recipe import Recipe

    try:
        recipe = Recipe.model_validate(yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8")))
    except (OSError, ValueError, yaml.YAMLError, ValidationError):
        return {}
    return read_adapters(recipe.adapter)


def read_adapters(adapter) -> dict[str, str]:
    """The adapter directories a run of the recipe section `adapter` reads and records as inputs (`run_inputs`), by
    recipe key: adapter.init_from, and those the method is built from (`Method.source_dirs`)."""
    from peftkit.methods import method_of

    started = {"adapter.init_from": adapter.init_from} if adapter.init_from else {}
    return started | method_of(adapter).source_dirs(adapter)


def _save_state(blob: dict, path: Path) -> None:
    """torch.save, with the same bytes wherever the run directory is: torch names the archive inside the file after
    the file for an ASCII path, and "archive" for any other (it writes through Python then), so a run under a
    directory named in another script never verified. Such a path is reached through an ASCII one: its directory's
    descriptor in /proc/self/fd (Linux; elsewhere the bytes differ, not the contents)."""
    if not str(path).isascii() and path.name.isascii() and os.path.isdir("/proc/self/fd"):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            torch.save(blob, f"/proc/self/fd/{fd}/{path.name}")
        finally:
            os.close(fd)
        return
    torch.save(blob, path)


def run_inputs(recipe) -> dict:
    """Content hashes of the files a run trains on, by recipe key: the data (local files; a hub dataset's rows, as
    read), the base model's weights (a hub id's in the local cache: taken after the model loaded), the adapter a
    run starts from (`adapter.init_from`) and those the method is built from (`Method.source_dirs`: X-LoRA's
    experts, `adapter.adapters['0']`, ...)."""
    from peftkit.manifest import adapter_source_hashes, data_hashes, file_hashes, model_weight_hashes

    inputs = {f"data.{split}": hashes for split, hashes in data_hashes(recipe).items()}
    inputs["model.name_or_path"] = model_weight_hashes(recipe.model.name_or_path, recipe.model.revision)
    if recipe.adapter.init_from:
        inputs["adapter.init_from"] = file_hashes(recipe.adapter.init_from)
    return inputs | adapter_source_hashes(recipe)
