"""`peftkit verify RUN_DIR`: check a recorded run's files, then re-run it and check it gives the same bits.

The recipe, seed and expected hashes come from RUN_DIR/manifest.json. First the files in RUN_DIR are
hashed against the manifest (every exported file, and recipe.yaml), so an artifact changed after the run
is reported whatever the re-run says. Then the recipe is re-run in a temporary directory (never RUN_DIR)
and the report names what differs: the environment (package versions, device), the data or base-model
hashes, the first step whose loss diverges, each exported file whose bytes differ, and the results, log lines
and checkpoints the re-run does not repeat (`peftkit.reproduced`). With a
tolerance, losses and adapter weights are compared numerically instead (for runs on another machine,
where bit equality is not expected); a file in RUN_DIR that no longer matches its recorded hash is still
reported, so a tolerance cannot hide a change.

verify never runs code because a manifest says so: a recorded `model.trust_remote_code: true` needs the
user's own `--trust-remote-code`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from peftkit import start_eval
from peftkit.checkpoint import ALSO_AT, CHECKPOINTS, checkpoint_dirs
from peftkit.errors import PeftkitError
from peftkit.fileio import DiskFullError, resolved, sha256_file
from peftkit.manifest import (
    HUB_LATER_HASHED,
    MANIFEST,
    METRICS_LOG,
    RECIPE_FILE,
    Manifest,
    RecordedEnvironment,
    changed_files,
    changed_model_files,
    data_hashes,
    file_hashes,
    hub_commit,
    model_directory,
    model_weight_hashes,
    output_hashes,
    read_manifest,
)
from peftkit.recipe import Recipe, fetch_recorded, is_hub_dataset
from peftkit.reproduced import differences
from peftkit.rundir import moved_project
from peftkit.scratch import held_locks, remove_stale_directories, scratch_directory


@dataclass
class VerifyReport:
    run_dir: Path
    ok: bool
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify(run_dir: str | Path, tolerance: float = 0.0, console: Console | None = None,
           trust_remote_code: bool = False) -> VerifyReport:
    """Check RUN_DIR's files against its manifest, re-run its recipe in a temporary directory and compare.

    Args:
        run_dir: a finished run directory (with manifest.json).
        tolerance: 0 demands identical bits; > 0 compares losses and adapter weights with this absolute
            tolerance (re-run files may then differ in their bytes; RUN_DIR's own files never may).
        console: where the re-run's progress goes.
        trust_remote_code: allow re-running a recipe that records `model.trust_remote_code: true`.
    """
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise PeftkitError(f"--tolerance {tolerance}: must be a finite number >= 0 (0 demands identical bits; "
                           "e.g. 1e-4 for a run made on another machine).")
    console = console or Console()
    run_dir = resolved(run_dir, "RUN_DIR")
    manifest = read_manifest(run_dir)
    _check_remote_code(manifest.recipe, trust_remote_code, run_dir / MANIFEST)
    # its hub adapters, recorded as user/name@COMMIT: that commit fetched (offline: from the cache), wherever this runs
    manifest.recipe = fetch_recorded(manifest.recipe, str(run_dir / MANIFEST))
    report = VerifyReport(run_dir=run_dir, ok=True)
    manifest.recipe, moved = moved_project(manifest.recipe, run_dir)
    report.notes += [f"{key}: {old} is not there; read at {new}, which lies where it did relative to the run "
                     "directory (a project moved with its run): its files' hashes decide" for key, (old, new) in moved.items()]
    on_disk = _exported_hashes(run_dir, manifest)
    changed = _changed_files(run_dir, manifest, on_disk)
    report.differences += changed
    report.differences += _input_differences(manifest)
    report.notes += _hub_source_notes(manifest)
    intact = {name for name, digest in manifest.outputs_sha256.items() if on_disk.get(name) == digest}
    rerun = _rerun(run_dir, manifest, intact, tolerance, console, report,
                   {now: before for before, now in moved.values()})
    if changed and not rerun:
        report.notes.append(f"the recipe still reproduces the recorded run; only the files in {run_dir} differ from it")
    report.differences += rerun
    report.ok = not report.differences
    return report


def _check_remote_code(recipe: Recipe, allowed: bool, manifest_path: Path) -> None:
    """Refuse, before anything is loaded, to run model code because a (possibly foreign) manifest asks to."""
    if recipe.model.trust_remote_code and not allowed:
        raise PeftkitError(
            f"{manifest_path} records model.trust_remote_code: true, so re-running it would execute the modelling "
            f"code that ships with {recipe.model.name_or_path}. verify does not run code because a manifest asks for "
            "it: if you trust that code, pass --trust-remote-code to `peftkit verify`."
        )


# ---------------------------------------------------------------------------- the files in RUN_DIR


def _changed_files(run_dir: Path, manifest: Manifest, on_disk: dict[str, str]) -> list[str]:
    """What in RUN_DIR no longer matches the manifest: recipe.yaml, and each file of the exported dirs."""
    out = _symlinks(run_dir, manifest)
    if manifest.recorded_recipe_sha256 != manifest.recipe_sha256:
        out.append(f"{MANIFEST}: its recipe does not hash to its recipe_sha256; the manifest was edited after the run")
    recipe_file = run_dir / RECIPE_FILE
    if not recipe_file.is_file():
        out.append(f"{RECIPE_FILE} is missing from {run_dir}")
    elif (now := _sha256(recipe_file)) != manifest.recipe_sha256:
        out.append(_changed(RECIPE_FILE, run_dir, now, manifest.recipe_sha256))
    log = run_dir / METRICS_LOG  # (a missing one: said with the re-run's, which also compares a log without a hash)
    if manifest.log_sha256 and log.is_file() and (now := _sha256(log)) != manifest.log_sha256:
        out.append(_changed(METRICS_LOG, run_dir, now, manifest.log_sha256))
    recorded = manifest.outputs_sha256
    for directory in sorted({"adapter", "merged"} - set(manifest.exported_dirs)):  # eval/generate would load it
        if (run_dir / directory).exists():
            out.append(f"{directory}/ in {run_dir} is not in the manifest (the run exported none); it was added after "
                       "the run")
    missing_dirs = [d for d in manifest.exported_dirs if not (run_dir / d).is_dir()]
    for directory in missing_dirs:  # one line for the directory, not one per file in it
        count = sum(name.startswith(f"{directory}/") for name in recorded)
        out.append(f"{directory}/ is missing from {run_dir} (the manifest records {count} files in it)")
    for name in sorted(recorded.keys() | on_disk.keys()):
        if on_disk.get(name) == recorded.get(name) or name.split("/")[0] in missing_dirs:
            continue
        if name not in on_disk:
            out.append(f"{name} is missing from {run_dir}")
        elif name not in recorded:
            out.append(f"{name} in {run_dir} is not in the manifest; it was added after the run")
        else:
            out.append(_changed(name, run_dir, on_disk[name], recorded[name]))
    return out


def _symlinks(run_dir: Path, manifest: Manifest) -> list[str]:
    """The symbolic links among the files verify checks: a run writes files, never links, so a link there replaced
    what the run wrote, and its bytes are another file's, which can change without RUN_DIR changing (a link to a
    copy hashes the same). The run's top files, the exported directories' entries and the checkpoints' files."""
    top = [MANIFEST, RECIPE_FILE, METRICS_LOG, CHECKPOINTS, *sorted({"adapter", "merged", *manifest.exported_dirs})]
    links = [run_dir / name for name in top if (run_dir / name).is_symlink()]
    special = []  # a named pipe, socket or device among them: no hash sees it (reading a pipe would wait for ever)
    for directory in (run_dir / name for name in top[3:]):
        if directory.is_dir() and not directory.is_symlink():
            for root, dirs, files in os.walk(directory):  # (os.walk follows no link to a directory)
                if Path(root) != run_dir / CHECKPOINTS:  # (a link among the checkpoints: `leftovers` says it)
                    links += [Path(root, name) for name in dirs + files if Path(root, name).is_symlink()]
                    special += [Path(root, name) for name in files
                                if not (Path(root, name).is_symlink() or Path(root, name).is_file())]
    return [f"{link.relative_to(run_dir).as_posix()} in {run_dir} is a symbolic link (to {os.readlink(link)}); the run "
            "wrote no link: it was replaced after the run, and what it holds can change without the run changing"
            for link in sorted(links)] + \
        [f"{entry.relative_to(run_dir).as_posix()} in {run_dir} is not a regular file (a named pipe, socket or device); "
         "the run wrote none: it was added after the run" for entry in sorted(special)]


def _changed(name: str, run_dir: Path, now: str, recorded: str) -> str:
    return f"{name} in {run_dir} was changed after the run: sha256 {now[:12]}… now, {recorded[:12]}… recorded"


def _exported_hashes(run_dir: Path, manifest: Manifest) -> dict[str, str]:
    """sha256 of every file now under RUN_DIR's exported directories (those the manifest names)."""
    try:
        return output_hashes(run_dir, manifest.exported_dirs)
    except OSError as e:
        raise PeftkitError(f"{e.filename} cannot be read ({e.strerror}); verify reads every exported file.") from None


def _sha256(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise PeftkitError(f"{path} cannot be read ({e.strerror}); verify reads every file it checks.") from None


# ----------------------------------------------------------------------------- inputs and the re-run


def _input_differences(manifest: Manifest) -> list[str]:
    """Data and base-model files whose content changed since the run (a re-run then cannot match)."""
    recipe, out = manifest.recipe, []
    now, recorded = data_hashes(recipe), manifest.data_sha256
    paths = {key: source for key, source, _ in recipe.data.sources()}
    for split in sorted(now.keys() | recorded.keys()):
        path = paths.get(split)
        if now.get(split) == recorded.get(split) or (path and is_hub_dataset(path)):  # a hub one's: after the re-run
            continue
        if now.get(split) == {}:
            out.append(f"data.{split}: {path} no longer exists (it was hashed when the run was made)")
        else:
            out.append(f"data.{split}: the content of {path} differs from the recorded one")
    if Path(recipe.model.name_or_path).is_absolute():  # a hub id's: after the re-run, which resolves its revision
        out += _base_model_difference(manifest.base_model_sha256, model_weight_hashes(recipe.model.name_or_path), recipe)
    if recipe.adapter.init_from and file_hashes(recipe.adapter.init_from) != manifest.init_from_sha256:
        out.append(f"adapter.init_from: the files of {recipe.adapter.init_from} differ from the recorded ones")
    return out + _source_differences(manifest)


def _source_differences(manifest: Manifest) -> list[str]:
    """The adapters the method is built from (X-LoRA's experts, AdapterFusion's adapters) whose files changed since
    the run: the re-run would be built from others (and under a tolerance might pass). A manifest from before they
    were recorded (no sources_sha256) says nothing here: the re-run's outputs still show a change."""
    from peftkit.methods import method_of

    recipe, out = manifest.recipe, []
    if not manifest.sources_sha256:
        return out
    for key, path in method_of(recipe.adapter).source_dirs(recipe.adapter).items():
        if (now := file_hashes(path)) == manifest.sources_sha256.get(key):
            continue
        out.append(f"{key}: {path} no longer exists (it was hashed when the run was made)" if not now else
                   f"{key}: the files of {path} differ from the recorded ones")
    return out


def _name_as_recorded(tmp: Path, rerun: Manifest, moved: dict[str, str]) -> None:
    """Write the recorded paths back in the re-run's exported JSON files that name a moved input by its new path
    (adapter_config.json's base_model_name_or_path), and their hashes in its manifest: the run wrote the paths the
    inputs had then, and a move is no difference of the bits."""
    for name in rerun.outputs_sha256 if moved else []:
        path = tmp / name
        if path.suffix != ".json":
            continue
        data = original = path.read_bytes()
        for now, before in moved.items():  # (whole JSON strings only: not a path that begins with a moved one)
            data = data.replace(json.dumps(now).encode(), json.dumps(before).encode())
        if data != original:
            path.write_bytes(data)
            rerun.outputs_sha256[name] = sha256_file(path)


def _hub_source_notes(manifest: Manifest) -> list[str]:
    """The adapters the method is built from that the run read from a hub adapter's snapshot (an X-LoRA expert the
    recipe named `user/name`; its recipe.yaml pins the commit read, `user/name@COMMIT`): the re-run reads that commit,
    and a branch or tag of the repository the local cache holds that has moved to another commit since is said."""
    from peftkit.hub import cached_adapter, cached_refs
    from peftkit.methods import method_of

    recipe, out = manifest.recipe, []
    for key, path in method_of(recipe.adapter).source_dirs(recipe.adapter).items():
        if (cached := cached_adapter(path)) is None:
            continue
        repo, commit, subfolder = cached
        if moved := [f"{ref} points to {now}" for ref, now in cached_refs(repo).items() if now != commit]:
            out.append(f"{key}: hub adapter {repo} was read at commit {commit}, as the re-run reads it; the local "
                       f"cache's {', '.join(moved)} now, which a recipe naming it trains on (pin "
                       f"{repo}{'/' + subfolder if subfolder else ''}@{commit} for the run's expert)")
    return out


def _base_model_difference(recorded: dict[str, str], now: dict[str, str], recipe: Recipe,
                           commit: str | None = None) -> list[str]:
    """The base model's changed files, said; for a hub id at a branch or tag, the fix: pin the run's `commit`."""
    model = recipe.model
    if not (changed := changed_model_files(recorded, now)):
        return []
    files = ", ".join(f"{name} {state}" for name, state in changed)
    revision = model.revision or "main"
    pin = f" ({commit} is the run's)" if commit else ""
    hub = "" if Path(model.name_or_path).is_absolute() else f"; the re-run loaded revision '{revision}' from the hub" + (
        "" if re.fullmatch(r"[0-9a-f]{40}", revision)
        else f", a branch or tag that has moved: pin model.revision to a commit{pin}")
    return [f"base model: its files differ from the recorded ones ({model.name_or_path}: {files}){hub}"]


def _rerun(run_dir: Path, manifest: Manifest, intact: set[str], tolerance: float, console: Console,
           report: VerifyReport, moved: dict[str, str]) -> list[str]:
    """Train the recorded recipe again in a temporary directory; the differences from the recorded run. `moved`: the
    recorded paths of the inputs read elsewhere (`rundir.moved_project`), by their new paths."""
    recipe = manifest.recipe.model_copy(deep=True)
    if note := _pin_unchanged_base(recipe, manifest):
        report.notes.append(note)
    _remove_stale_reruns(console)
    with scratch_directory() as scratch:
        # The recorded output_dir is usually RUN_DIR itself: the re-run must never write there. Its run directory is one
        # inside the scratch directory, whose lock this process holds while it lives (`peftkit.scratch`): the lock the
        # re-run takes of its own directory (its report's, `locked_directory`) would have waited on that one for ever.
        tmp = str(Path(scratch) / "run")
        recipe.export.output_dir = tmp
        recipe.export.push_revision, recipe.export.push_private = None, False  # (set without push_to_hub: refused)
        recipe.export.push_to_hub = None  # a re-run checks the run's bits: it never publishes them
        console.print(f"Re-running the recipe recorded in {run_dir} in a temporary directory (deleted afterwards) ...",
                      markup=False,
                      soft_wrap=True)
        try:
            with _checkpoints_where(run_dir), _environ(start_eval.AS_BASE, _bare_base_before(manifest)):
                _train_again(recipe, manifest.distributed, console)
        except PeftkitError as e:
            raise _rerun_failed(e, tmp, run_dir, report) from None
        rerun = read_manifest(Path(tmp))
        _name_as_recorded(Path(tmp), rerun, moved)
        # the re-run's own record: under several processes, the launched ones' (cpu:0, 1 thread each), not this one's
        report.notes += _env_differences(manifest.environment, rerun.environment)
        out = differences(manifest, rerun, run_dir, Path(tmp), intact, tolerance)
        if not Path(recipe.model.name_or_path).is_absolute():  # a hub id: the files the re-run loaded
            out = _base_model_difference(manifest.base_model_sha256, rerun.base_model_sha256, recipe,
                                         manifest.base_model_commit) + out
        return _hub_data_differences(manifest, rerun, recipe) + out


def _remove_stale_reruns(console: Console) -> None:
    """Delete the re-run directories that verify processes killed before they could (`peftkit.scratch`), saying so."""
    from peftkit.inspect_text import size_text

    if removed := remove_stale_directories():
        listed = ", ".join(f"{path.name} ({size_text(size)})" for path, size in removed)
        console.print(f"note: removed {len(removed)} re-run director{'ies' if len(removed) > 1 else 'y'} of verify "
                      f"processes that ended without deleting {'them' if len(removed) > 1 else 'it'} (killed), in "
                      f"{removed[0][0].parent}: {listed}", markup=False, soft_wrap=True)


def _bare_base_before(manifest: Manifest) -> str:
    """`start_eval.AS_BASE` for the re-run: "1" for an adapter.init_from run whose manifest records no `start_eval_`
    figure, a run from before 7 December 2026, which evaluated the bare base before training (as `base_eval_`, its
    samples' `base` answers): the re-run does the same, so that its figures, samples and card are the run's."""
    metrics = getattr(manifest, "metrics", None) or {}
    return "1" if manifest.recipe.adapter.init_from and start_eval.prefix(metrics) != start_eval.START else "0"


@contextmanager
def _checkpoints_where(run_dir: Path) -> Iterator[None]:
    """The re-run inside also checkpoints (and keeps a checkpoint) at each step RUN_DIR has one (`ALSO_AT`): a
    stopped run's checkpoint at its stop is compared bit for bit as the scheduled ones are."""
    with _environ(ALSO_AT, ",".join(path.name[5:] for path in checkpoint_dirs(run_dir))):
        yield


@contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """The environment variable `name` set to `value` inside (for the re-run's processes too), as it was after."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def _pin_unchanged_base(recipe: Recipe, manifest: Manifest) -> str | None:
    """A hub base at a branch or tag that has moved since the run to a commit with the same files (a README edit):
    the re-run loads the run's commit (pinned in `recipe`), and the note says so. The exported adapter records the
    commit its base loaded, so a re-run at the branch's new commit would differ in that alone."""
    model, commit = recipe.model, manifest.base_model_commit
    revision = model.revision or "main"
    if commit is None or Path(model.name_or_path).is_absolute() or re.fullmatch(r"[0-9a-f]{40}", revision):
        return None
    now = hub_commit(model.name_or_path, model.revision)
    if now in (None, commit) or model_directory(model.name_or_path, commit) is None or \
            changed_model_files(manifest.base_model_sha256, model_weight_hashes(model.name_or_path, model.revision)):
        return None  # (other files: the re-run at the branch reports them)
    model.revision = commit
    return (f"model.revision '{revision}' of {model.name_or_path} has moved from the run's commit {commit} to {now}, "
            f"which has the same weight, config and tokenizer files: the re-run loaded {commit}, as the run did "
            "(pin model.revision to it to say so in the recipe)")


def _hub_data_differences(manifest: Manifest, rerun: Manifest, recipe: Recipe) -> list[str]:
    """The hub datasets whose rows, as the re-run read them, differ from the recorded digest (a record without one,
    from before December 2026, is not compared; nor ClassLabel names a record lacks, `HUB_LATER_HASHED`), with the
    commits each read where recorded."""
    recorded, now = manifest.data_sha256, rerun.data_sha256
    run_commits, rerun_commits = manifest.data_commits, rerun.data_commits
    out = []
    for split, source, _ in recipe.data.sources():
        if is_hub_dataset(source) and recorded.get(split) and changed_files(recorded[split], now.get(split, {}),
                                                                             HUB_LATER_HASHED):
            revision = recipe.data.revision or "main"
            read = "".join(f", {who} commit {commits[split]}" for who, commits in
                           (("the run read", run_commits), ("the re-run", rerun_commits)) if split in commits)
            pin = ("" if re.fullmatch(r"[0-9a-f]{40}", revision) else
                   ", a branch that has moved: pin data.revision to a commit"
                   + (f" ({run_commits[split]} is the run's)" if split in run_commits else ""))
            out.append(f"data.{split}: the rows the re-run read from hub dataset '{source}' (revision '{revision}'"
                       f"{read}) differ from the recorded ones{pin}")
    return out


def _train_again(recipe: Recipe, distributed: dict, console: Console) -> None:
    """Train `recipe` as the recorded run did (`distributed`: its manifest's): in this process, or in as many
    processes as it had (launched), sharded if it was (FSDP, DeepSpeed at its ZeRO stage; even in one process:
    sharding changes the arithmetic's order), each process's slice trimmed if the run's was (`trimmed_slices`; a
    manifest without it: untrimmed, as runs were before the trim). A DeepSpeed config's other settings are not
    recorded: DeepSpeed's defaults stand in for them."""
    from peftkit.distributed import TRIMMED
    from peftkit.train import train

    processes, kind, stage = distributed.get("processes", 1), distributed.get("type"), distributed.get("zero_stage", 2)
    if processes == 1 and kind not in ("FSDP", "DEEPSPEED"):
        train(recipe, console=console, show_summary=False, cache=False)  # the data tokenized anew: no cache vouches
        return
    from peftkit.launch import launch

    how = {"FSDP": "FSDP2-sharded ", "DEEPSPEED": f"DeepSpeed ZeRO-{stage} "}.get(kind, "")
    console.print(f"The recorded run trained in {processes} {how}process{'es' if processes > 1 else ''}; so does the re-run.")
    with scratch_directory("recipe") as recipe_dir:
        recipe_file = Path(recipe_dir) / "recipe.yaml"
        recipe_file.write_text(recipe.to_yaml(), encoding="utf-8")
        with _environ(TRIMMED, "1" if distributed.get("trimmed_slices") else "0"):
            # (the launcher holds this process's scratch locks too: killed, its re-run's folders stay while it lives)
            code = launch(processes, ["train", str(recipe_file), "--no-cache"], kind or "MULTI_GPU", stage,
                          inherit=held_locks())
        if code:
            raise PeftkitError(f"the {processes}-process re-run failed (exit status {code}; its output is above)")


def _rerun_failed(error: PeftkitError, tmp: str, run_dir: Path, report: VerifyReport) -> PeftkitError:
    """The re-run's own error, its temporary paths (deleted by now) named as such, plus what was found before."""
    message = str(error).replace(tmp, "<verify's temporary directory>")
    if isinstance(error, DiskFullError):  # the re-run's own advice (free space, --resume) is about a directory gone by now
        message = (f"{message.split('. ')[0]}. verify re-runs in {Path(tmp).parent.parent} (the system's temporary directory, "
                   "TMPDIR): free space there, or point TMPDIR at a directory with room for the run.")
    found = "".join(f"\n  {difference}" for difference in report.differences)
    return PeftkitError(f"verify could not re-run the recipe recorded in {run_dir / MANIFEST}: {message}"
                        + (f"\nBefore the re-run it found:{found}" if found else ""))


def _env_differences(recorded: RecordedEnvironment, current: RecordedEnvironment) -> list[str]:
    out = [f"environment: {name} {version} recorded, {current.versions.get(name)} now"
           for name, version in recorded.versions.items() if current.versions.get(name) != version]
    for key in ("device", "machine", "torch_threads", "gpu"):
        if getattr(recorded, key) != getattr(current, key):
            out.append(f"environment: {key} {getattr(recorded, key)} recorded, {getattr(current, key)} now")
    return out
