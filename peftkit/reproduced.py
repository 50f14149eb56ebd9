"""Whether a re-run reproduced a recorded run, record by record: the losses, each exported file, manifest.json's
results, metrics.jsonl line by line and each checkpoint (whole, and file by file). Bit for bit; with a tolerance,
numbers and adapter weights within it. `peftkit.verify` runs the re-run and reads the report."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

from peftkit.checkpoint import CHECKSUMS
from peftkit.errors import PeftkitError
from peftkit.manifest import (
    MANIFEST,
    METRICS_LOG,
    Manifest,
    changed_model_files,
    loss_digest,
    unhashed,
)
from peftkit.model_card import CARD_NAME
from peftkit.recipe import Recipe


def differences(manifest: Manifest, rerun: Manifest, run_dir: Path, tmp: Path, intact: set[str],
                tolerance: float) -> list[str]:
    """What of the run recorded in `run_dir` the re-run in `tmp` did not reproduce; `intact`: the exported files
    of `run_dir` that still match their recorded hash."""
    return (_examples_differences(manifest, rerun)
            + _compare(manifest, rerun, run_dir, tmp, intact, tolerance) + _result_differences(manifest, rerun, tolerance)
            + _record_differences(manifest, rerun)
            + _log_differences(run_dir, tmp, tolerance)
            + _checkpoint_differences(run_dir, tmp, tolerance, (manifest.metrics or {}).get("steps"), manifest.recipe))


def _examples_differences(manifest: Manifest, rerun: Manifest) -> list[str]:
    """Where the re-run made other examples of the same data files (their digests differ, the files' do not): the
    cause of every difference after it, said first. A manifest from before the digests were recorded says nothing."""
    out = []
    for split in dict.fromkeys(["train", "eval", *manifest.examples_sha256]):  # and eval[name], data.eval's sets
        recorded, now = manifest.examples_sha256.get(split), rerun.examples_sha256.get(split)
        same_rows = {k: v for k, v in manifest.data_sha256.items() if k.startswith(split)} == \
            {k: v for k, v in rerun.data_sha256.items() if k.startswith(split)}
        if recorded and now and recorded != now and same_rows:
            out.append(f"data.{split}: the re-run made other examples of the same rows (their tokens or labels "
                       "differ): what turns rows into tokens changed, the tokenizer's files, data.chat_template, or "
                       "the transformers or peftkit version (the environment notes say which differ); what differs "
                       "below follows from it")
    return out


def _compare(manifest: Manifest, rerun: Manifest, run_dir: Path, tmp: Path, intact: set[str],
             tolerance: float) -> list[str]:
    """The re-run's losses and outputs against the recorded ones; `intact`: RUN_DIR files matching their hash."""
    out = []
    skipped = bool((getattr(manifest, "metrics", None) or {}).get("skipped_steps"))
    if divergence := _first_divergence(manifest.losses, rerun.losses, tolerance, skipped):
        out.append(divergence)
    recorded, now = manifest.outputs_sha256, rerun.outputs_sha256
    for name in sorted(recorded.keys() | now.keys()):
        if recorded.get(name) == now.get(name):
            continue
        if name not in now:
            out.append(f"output {name}: recorded, but the re-run did not write it")
        elif name not in recorded:
            # (a run from before peftkit wrote the card records none; the same code as the re-run's wrote one)
            if not name.endswith(f"/{CARD_NAME}") or same_code(manifest, rerun):
                out.append(f"output {name}: written by the re-run, but not recorded")
        elif tolerance == 0:
            out.append(f"output {name}: sha256 {recorded[name][:12]}… recorded, {now[name][:12]}… now")
        elif name.endswith(f"/{CARD_NAME}"):  # its figures: rounded from the metrics, which are compared on their own
            if name in intact and _card_words(run_dir / name) != _card_words(tmp / name):
                out.append(f"output {name}: its text differs from the re-run's (beyond the figures in it)")
        # RUN_DIR's copy is compared only when intact: a changed one is already reported, and may not even parse.
        elif not name.endswith(".safetensors"):  # settings and tokenizer files: the same, but for the versions
            if name in intact and not _same_settings(run_dir / name, tmp / name):
                out.append(f"output {name}: its content differs from the re-run's (beyond the library versions it "
                           "records)")
        elif name in intact and \
                (problem := _weights_close(name, run_dir / name, tmp / name, tolerance)):
            out.append(problem)
    return out


def _card_words(path: Path) -> str:
    """A model card's text with each number in it as `#`: what a run made elsewhere, whose figures round otherwise,
    must still match (its base, data, settings and how to load it; the whole card was left out under a tolerance).
    The peftkit version it was trained with is an environment note, whatever its shape (`0.2.0.dev3+g1a2b`)."""
    text = re.sub(r"(Trained with peftkit )\S+( on )", r"\1#\2", _text(path))
    return re.sub(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", "#", text)


_ENVIRONMENT_FIELDS = ("peftkit_version", "transformers_version", "quantized_on")
"""What an exported settings file records of the machine and libraries that wrote it: under --tolerance (a run made
elsewhere) the environment notes say those; every other field must match."""


def _same_settings(recorded: Path, rerun: Path) -> bool:
    """Whether two exported files are the same: JSON compared as values without `_ENVIRONMENT_FIELDS`, others byte
    for byte (a tokenizer's files)."""
    a, b = recorded.read_bytes(), rerun.read_bytes()
    if a == b or recorded.suffix != ".json":
        return a == b
    try:
        a, b = json.loads(a), json.loads(b)
    except (ValueError, RecursionError):
        return False
    if isinstance(a, dict) and isinstance(b, dict):
        a, b = ({k: v for k, v in d.items() if k not in _ENVIRONMENT_FIELDS} for d in (a, b))
    return _same_json(a, b)


def _same_json(a, b) -> bool:
    """Two JSON values equal, a boolean no number (Python's True == 1: an adapter_config.json with use_rslora false
    edited to 0 passed), as `_differ` has it for the manifest's records; an int and a float of one value load the same
    and are equal. Unlike `_differ`, no key is skipped and no tolerance applies: settings match exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    return isinstance(a, bool) == isinstance(b, bool) and a == b


VARYING = ("elapsed_s", "peak_mem_mb", "tokens_per_s", "resumed_at_step")
"""What a run records that no re-run repeats: wall-clock time, speed and peak memory, and where a resumed run's
process started (its time and memory are that process's)."""

CHECKED_APART = {"command", "environment", "recipe", "recipe_sha256", "losses", "loss_digest", "data_sha256",
                 "examples_sha256", "data_commits", "base_model_sha256", "base_model_commit", "init_from_sha256",
                 "sources_sha256",
                 "outputs_sha256", "log_sha256"}
"""manifest.json's fields that verify checks on their own (the command line, which names verify's own re-run, and
the environment are notes; log_sha256 hashes the timings too, which no re-run repeats); every other field must equal
the re-run's."""
PUBLISHED = {"pushed_to_hub"}
"""manifest.json's record of what the run's end published (export.push_to_hub's commit), which a re-run never does:
not compared."""


def _result_differences(manifest: Manifest, rerun: Manifest, tolerance: float) -> list[str]:
    """manifest.json's results (its metrics, seed, dtype, processes and any other field) against the re-run's,
    and its loss_digest against its own losses."""
    recorded, now = manifest.model_dump(), rerun.model_dump()
    out = []
    if recorded.get("loss_digest") != loss_digest(manifest.losses):
        out.append(f"{MANIFEST}: its loss_digest does not match its losses; the manifest was edited after the run")
    for key in sorted((recorded.keys() | now.keys()) - CHECKED_APART - PUBLISHED):
        if key == "dtype" and recorded.get(key) == "auto" == manifest.recipe.model.dtype:  # (before December 2026
            # the setting, not what it resolved to)
            continue
        if key == "data_form" and recorded.get(key) is None:  # (not recorded before 7 December 2026; by the same
            continue  # code, `_unrecorded_by_the_same_code` says so)
        out += [f"{MANIFEST}: {problem}" for problem in _differ(key, recorded.get(key), now.get(key), tolerance)]
    return out


def _record_differences(manifest: Manifest, rerun: Manifest) -> list[str]:
    """manifest.json's records of the run's inputs against the re-run's, where the checks of the inputs themselves
    (`peftkit.verify`'s, before and after the re-run) pass a record by: an empty or pruned one hashes nothing there,
    so an edit to it went unseen, and `peftkit eval` stopped warning of a changed base. Records of older versions
    (a hub base's empty one, one without the tokenizer's files) stand."""
    from peftkit.recipe import is_hub_dataset

    recipe, out = manifest.recipe, []
    edited = "; the manifest was edited after the run"
    local_base = Path(recipe.model.name_or_path).is_absolute()
    recorded, now = manifest.base_model_sha256, rerun.base_model_sha256
    if recorded != now and not changed_model_files(recorded, now):  # (a change of the files: said on its own)
        older = (not recorded and not local_base) or bool(recorded and unhashed(recorded))
        if not older:
            out.append(f"{MANIFEST}: base_model_sha256 records {len(recorded)} files of the base, the re-run hashed "
                       f"{len(now)}{edited}")
    if manifest.base_model_commit != rerun.base_model_commit and (local_base or not changed_model_files(recorded, now)):
        out.append(f"{MANIFEST}: base_model_commit is {manifest.base_model_commit!r} recorded, "
                   f"{rerun.base_model_commit!r} in the re-run{edited}")
    sources = {key: source for key, source, _ in recipe.data.sources()}
    if local := sorted(split for split in manifest.data_commits if not is_hub_dataset(sources.get(split) or "")):
        out.append(f"{MANIFEST}: data_commits records a hub commit for data.{local[0]}, which is not a hub "
                   f"dataset{edited}")
    if manifest.init_from_sha256 and not recipe.adapter.init_from:
        out.append(f"{MANIFEST}: init_from_sha256 records files, and the recipe has no adapter.init_from{edited}")
    if manifest.sources_sha256 and manifest.sources_sha256.keys() != rerun.sources_sha256.keys():  # ({}: older)
        out.append(f"{MANIFEST}: sources_sha256 records {', '.join(sorted(manifest.sources_sha256))}, the re-run "
                   f"hashed {', '.join(sorted(rerun.sources_sha256)) or 'none'}{edited}")
    return out + _unrecorded_by_the_same_code(manifest, rerun)


def same_code(manifest: Manifest, rerun: Manifest) -> bool:
    """Whether the re-run ran the peftkit code the run did (the same `peftkit source` digest; a run made before it was
    recorded has none): that code records what the re-run records, so nothing is missing as from a run made before."""
    recorded = manifest.environment.versions.get("peftkit source")
    return recorded is not None and recorded == rerun.environment.versions.get("peftkit source")


def _unrecorded_by_the_same_code(manifest: Manifest, rerun: Manifest) -> list[str]:
    """manifest.json's records that a run made before they were kept lacks (log_sha256, examples_sha256, ...), absent
    or null where the same code's re-run records them: taken for an older run's, such a manifest passed with the file
    they hash edited (a timing in metrics.jsonl, with log_sha256 null)."""
    if not same_code(manifest, rerun):
        return []
    later = {name for name, field in Manifest.model_fields.items() if not field.is_required()}  # (older: lacking)
    recorded = {key for key in manifest.model_fields_set if getattr(manifest, key) is not None}
    missing = sorted(key for key in (rerun.model_fields_set & later) - recorded if getattr(rerun, key) is not None)
    return [f"{MANIFEST}: it records no {key}, which the re-run by the same peftkit code (peftkit source "
            f"{manifest.environment.versions['peftkit source']}) records; the manifest was edited after the run"
            for key in missing]


def _differ(where: str, recorded, now, tolerance: float) -> list[str]:
    """Where `recorded` and `now` (JSON values) differ, numbers within `tolerance` (a boolean is no number); VARYING
    keys are skipped, and with a tolerance so are generated texts (`samples`: another machine may decode another
    token)."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        skip = set(VARYING) | ({"samples"} if tolerance > 0 else set())
        return [problem for key in sorted((recorded.keys() | now.keys()) - skip)
                for problem in _differ(f"{where}.{key}" if where else key, recorded.get(key), now.get(key), tolerance)]
    if isinstance(recorded, list) and isinstance(now, list) and len(recorded) == len(now):
        # item by item: each number within the tolerance, and no boolean for a number
        same = not any(_differ(where, a, b, tolerance) for a, b in zip(recorded, now))
        return [] if same else [f"{where} is {recorded!r} recorded, {now!r} now"]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (recorded, now))
    if isinstance(recorded, bool) != isinstance(now, bool):  # Python's False == 0: a seed edited to false passed
        return [f"{where} is {recorded!r} recorded, {now!r} now"]
    if recorded == now or (numbers and tolerance > 0 and math.isclose(recorded, now, rel_tol=0, abs_tol=tolerance)):
        return []
    return [f"{where} is {recorded!r} recorded, {now!r} now"]


def _log_differences(run_dir: Path, tmp: Path, tolerance: float) -> list[str]:
    """RUN_DIR's metrics.jsonl against the re-run's, line by line (the first difference)."""
    recorded = _log_rows(run_dir / METRICS_LOG)
    if isinstance(recorded, str):
        return [recorded]
    now = _log_rows(tmp / METRICS_LOG)
    for i, (a, b) in enumerate(zip(recorded, now), start=1):
        if problems := _differ("", a, b, tolerance):
            return [f"{METRICS_LOG} line {i}: {problems[0]}"]
    if len(recorded) != len(now):
        return [f"{METRICS_LOG} has {len(recorded)} lines recorded, {len(now)} now"]
    return []


def _log_rows(path: Path) -> list[dict] | str:
    """The rows of a metrics.jsonl, or what is wrong with it."""
    if not path.is_file():
        return f"{METRICS_LOG} is missing from {path.parent}"
    rows = []
    for i, line in enumerate(_text(path).splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except ValueError:
            return f"{METRICS_LOG} line {i} in {path.parent} is not JSON; it was changed after the run"
    return rows


def _checkpoint_differences(run_dir: Path, tmp: Path, tolerance: float, steps: object = None,
                            recipe: Recipe | None = None) -> list[str]:
    """RUN_DIR's checkpoints: each whole (its files match its checksums.json, and it holds no other) and, file by
    file, the re-run's of the same step (bit for bit; with a tolerance, numbers within it) with the same inputs
    recorded (a resume checks the data and base against them). The re-run checkpoints at every step RUN_DIR has one
    (`peftkit.checkpoint.ALSO_AT`: a stopped and resumed run's at its stop too), so one it lacks is a difference;
    one only the re-run has is not (RUN_DIR's may have been pruned or deleted). One past the run's last step
    (`steps`, the manifest's) was made after the run (`--resume` would take it up), as were the leftovers of
    interrupted writes that the next `peftkit train` there would restore (`leftovers`)."""
    out = leftovers(run_dir)
    recorded, now = _checkpoints(run_dir), _checkpoints(tmp)
    for name in sorted(recorded):
        where = f"checkpoints/{name}"
        if isinstance(steps, int) and int(name.rpartition("-")[2]) > steps:
            out.append(f"{where} in {run_dir}: a checkpoint past the run's {steps} steps; it was added after the run")
        elif isinstance(recorded[name], str):
            out.append(f"{where} in {run_dir}: {recorded[name]}; it was changed after the run")
        elif name not in now:
            out.append(f"{where} in {run_dir}: the re-run, which checkpoints at each of the run's checkpoint steps, "
                       "made none at this step")
        elif isinstance(now[name], dict):
            if _inputs_differ(recorded[name]["inputs"], now[name]["inputs"], recipe):
                out.append(f"{where}/{CHECKSUMS}: the data and base-model hashes it records (which --resume checks "
                           "the inputs against) differ from the re-run's; it was changed after the run")
            files, rerun_files = recorded[name]["files"], now[name]["files"]
            for file in sorted(files.keys() | rerun_files.keys()):
                a, b = files.get(file), rerun_files.get(file)
                if a == b:
                    continue
                if tolerance == 0 or a is None or b is None:
                    out.append(f"{where}/{file}: sha256 {(a or 'none')[:12]}… recorded, {(b or 'none')[:12]}… now")
                elif problem := _close(f"{where}/{file}", run_dir / where / file, tmp / where / file, tolerance):
                    out.append(problem)
    return out


def _inputs_differ(recorded: dict, now: dict, recipe: Recipe | None) -> bool:
    """Whether a checkpoint's record of its inputs differs from the re-run's, as `--resume` compares them (a record
    from before the tokenizer's files were hashed holds none of them), beyond that: no input may be missing, and
    only a hub source's may be empty (nothing was hashed of one before December 2026)."""
    from peftkit.checkpoint import changed_input
    from peftkit.recipe import is_hub_dataset

    def hub(key: str) -> bool:
        if recipe is None:
            return False
        if key == "model.name_or_path":
            return not Path(recipe.model.name_or_path).is_absolute()
        source = {f"data.{key}": source for key, source, _ in recipe.data.sources()}.get(key)
        return bool(source) and is_hub_dataset(source)

    return (recorded.keys() != now.keys() or any(not hashes and not hub(key) for key, hashes in recorded.items())
            or changed_input(recorded, now) is not None)


def leftovers(run_dir: Path) -> list[str]:
    """What in RUN_DIR and its checkpoints/ no finished run holds: the temp entries of an interrupted write, which the
    next `peftkit train` there restores (a `.NAME.old`: it would stand in for NAME) or removes, and anything in
    checkpoints/ but checkpoint directories."""
    from peftkit.checkpoint import CHECKPOINTS
    from peftkit.rundir import is_step, is_temp_name

    out = [f"{entry.name} in {run_dir}: left by an interrupted write, which the next `peftkit train` there would "
           "act on; no finished run holds it" for entry in sorted(run_dir.iterdir()) if is_temp_name(entry.name)]
    folder = run_dir / CHECKPOINTS
    if folder.exists() and not folder.is_dir() and not folder.is_symlink():  # (a link: `verify._symlinks` says it)
        out.append(f"{CHECKPOINTS} in {run_dir}: not a directory, where a run keeps its checkpoints; it was added after "
                   "the run")
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if re.fullmatch(r"\.step-\d+\.old", entry.name):
                out.append(f"{CHECKPOINTS}/{entry.name} in {run_dir}: a checkpoint left by an interrupted replace, "
                           f"which `--resume` would restore as {entry.name[1:-4]}; no finished run holds it")
            elif is_temp_name(entry.name, is_step):
                out.append(f"{CHECKPOINTS}/{entry.name} in {run_dir}: left by an interrupted write, which the next "
                           "`peftkit train` there would remove; no finished run holds it")
            elif not (is_step(entry.name) and entry.is_dir() and not entry.is_symlink()):
                out.append(f"{CHECKPOINTS}/{entry.name} in {run_dir}: not a checkpoint directory; it was added after "
                           "the run")
    return out


def _checkpoints(out: Path) -> dict[str, dict | str]:
    """{checkpoint directory: its checksums.json}, or why the checkpoint is not whole."""
    from peftkit.checkpoint import DamagedCheckpoint, checked_record, checkpoint_dirs

    found: dict[str, dict | str] = {}
    for path in checkpoint_dirs(out):
        try:
            found[path.name] = checked_record(path)
        except DamagedCheckpoint as e:
            found[path.name] = str(e)
    return found


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PeftkitError(f"{path} cannot be read ({e}); verify reads every file it checks.") from None


def _first_divergence(expected: list[float], actual: list[float], tolerance: float, skipped: bool = False) -> str | None:
    """Where the losses part; `skipped`: the run skipped steps (nan_policy: skip_step), which record no loss, so the
    n-th loss is not step n's."""
    for i, (a, b) in enumerate(zip(expected, actual)):
        if not (a == b or (tolerance > 0 and math.isclose(a, b, rel_tol=0, abs_tol=tolerance))):
            where = f"loss {i + 1} of those recorded (skipped steps record none)" if skipped else f"step {i + 1}"
            return f"loss diverges first at {where}: {a!r} recorded, {b!r} now"
    if len(expected) != len(actual):
        return f"{len(expected)} {'losses' if skipped else 'steps'} recorded, {len(actual)} now"
    return None


def _close(name: str, recorded: Path, rerun: Path, tolerance: float) -> str | None:
    """A checkpoint's file against the re-run's, numerically (`tolerance` > 0): adapter weights, the optimizer's and
    scheduler's state (torch.load's restricted unpickler; floating tensors and numbers within the tolerance, the rest
    equal; the loss scaler's only where the recorded checkpoint has it), JSON numbers; None if they agree. The
    generators' states are left out: another machine's differ by design (a GPU run records its CUDA generators, a CPU
    run none), and a different draw shows in the losses."""
    if name.endswith(".safetensors"):
        return _weights_close(name, recorded, rerun, tolerance)
    try:
        if name.endswith(".json"):
            a, b = json.loads(_text(recorded)), json.loads(_text(rerun))
            problems = _differ("", a, b, tolerance)
            return f"{name}: {problems[0]}" if problems else None
        if name.endswith(".pt"):
            import torch

            from peftkit import zero

            with torch.serialization.safe_globals(zero.safe_globals()):
                a, b = ({k: v for k, v in torch.load(path, weights_only=True, map_location="cpu").items()
                         if k not in ("rng", "rng_ranks")} for path in (recorded, rerun))
            if "scaler" not in a:  # fp16's loss scale, saved since December 2026: an older checkpoint has none
                b.pop("scaler", None)
            return None if (where := _state_difference(a, b, tolerance)) is None else f"{name}: {where}"
    except (ValueError, RecursionError, RuntimeError, OSError, pickle.UnpicklingError) as e:
        return f"{name}: cannot be compared ({type(e).__name__}: {str(e)[:120]})"
    return f"{name}: its bytes differ from the re-run's"


def _state_difference(a, b, tolerance: float, where: str = "") -> str | None:
    """Where two loaded states differ (floating tensors and floats by more than `tolerance`), or None."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where or 'its keys'}: {sorted(map(str, a.keys() ^ b.keys()))[:3]} in one only"
        return next((found for key in a if (found := _state_difference(a[key], b[key], tolerance,
                                                                         f"{where}.{key}" if where else str(key)))), None)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: {len(a)} items recorded, {len(b)} now"
        return next((found for i, (x, y) in enumerate(zip(a, b))
                     if (found := _state_difference(x, y, tolerance, f"{where}[{i}]"))), None)
    if torch.is_tensor(a) and torch.is_tensor(b):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{where}: {a.dtype} {tuple(a.shape)} recorded, {b.dtype} {tuple(b.shape)} now"
        if not a.is_floating_point():
            return None if torch.equal(a, b) else f"{where}: its values differ"
        diff = _max_difference(a, b)  # (in chunks, NaN against NaN the same: as a weights file's tensors)
        return None if diff <= tolerance else f"{where}: max abs diff {diff:.3g} > {tolerance}"
    if isinstance(a, float) and isinstance(b, float):
        return None if math.isclose(a, b, rel_tol=0, abs_tol=tolerance) else f"{where}: {a!r} recorded, {b!r} now"
    return None if a == b else f"{where}: {a!r} recorded, {b!r} now"


def _weights_close(name: str, recorded: Path, rerun: Path, tolerance: float) -> str | None:
    """Whether two safetensors files hold the same tensors within `tolerance`, read one tensor at a time (a merged
    model's 5 GB shard was read whole, twice, before the first comparison)."""
    from safetensors import safe_open

    with safe_open(recorded, "pt") as x, safe_open(rerun, "pt") as y:
        keys = list(x.keys())
        shapes = {k: (x.get_slice(k).get_shape(), y.get_slice(k).get_shape()) for k in keys if k in set(y.keys())}
        if set(keys) != set(y.keys()) or any(a != b for a, b in shapes.values()):
            return f"output {name}: different tensors (names or shapes) recorded and now"
        if retyped := next((k for k in keys if x.get_slice(k).get_dtype() != y.get_slice(k).get_dtype()), None):
            return (f"output {name}: {retyped} is {x.get_tensor(retyped).dtype} recorded, "  # (the values, as floats,
                    f"{y.get_tensor(retyped).dtype} now")  # may agree)
        if not keys:
            return None
        worst = max((_max_difference(x.get_tensor(k), y.get_tensor(k)), k) for k in keys)
    return None if worst[0] <= tolerance else f"output {name}: max abs diff {worst[0]:.3g} at {worst[1]} > {tolerance}"


DIFFERENCE_CHUNK = 1 << 22
"""Elements compared at a time in float64 (`_max_difference`): about 200 MB of temporaries, where a whole 128k x 4096
embedding took some 25 GB."""


def _max_difference(a, b) -> float:
    """The largest |a - b| of two tensors of one shape; a NaN where the other holds a number (or another infinity) is an
    infinite difference. (A NaN difference passed: max() of (NaN, name) pairs keeps whichever came first, so a NaN in
    any tensor but the first was within every tolerance.) In float64, DIFFERENCE_CHUNK elements at a time."""
    a, b = a.reshape(-1), b.reshape(-1)
    worst = 0.0
    for start in range(0, a.numel(), DIFFERENCE_CHUNK):
        x, y = a[start:start + DIFFERENCE_CHUNK].double(), b[start:start + DIFFERENCE_CHUNK].double()
        same = (x == y) | (x.isnan() & y.isnan())
        worst = max(worst, (x - y).abs().nan_to_num(nan=math.inf).masked_fill(same, 0.0).max().item())
    return worst
