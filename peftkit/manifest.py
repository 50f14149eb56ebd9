"""manifest.json: everything needed to reproduce a run and to check that a rerun gave the same bits.

`build_manifest` writes it at the end of `peftkit train`; `read_manifest` reads it back for `peftkit verify`,
checking the fields verify relies on (`Manifest`), so a damaged or hand-edited manifest is a clear error
rather than a KeyError halfway through a re-run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import re
import sys
import threading
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    field_validator,
)

from peftkit import __version__
from peftkit.errors import PeftkitError
from peftkit.fileio import sha256_file
from peftkit.recipe import Recipe, format_validation_error, is_hub_dataset, recorded

MANIFEST = "manifest.json"
RECIPE_FILE = "recipe.yaml"
METRICS_LOG = "metrics.jsonl"
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]

PACKAGES = ("torch", "transformers", "datasets", "accelerate", "bitsandbytes", "safetensors", "pydantic")


def versions() -> dict[str, str]:
    out = {"peftkit": __version__, "peftkit source": source_digest(), "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 (its first 16 hex digits) of peftkit's own code, every .py file of the package by its path: the version
    number stays while the code changes (a newer checkout, an edit), and `peftkit verify` names this where a re-run's
    differs from the run's, a cause of other bits (a run recorded before it was kept records none)."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
"""The files a tokenizer (and its chat template) is read from: what a run tokenizes its data with."""

GENERATION_CONFIG = "generation_config.json"
"""The base's generation defaults (its end-of-turn token, sampling settings): what eval's answers stop at, and what a
merged model keeps."""

LATER_HASHED = (frozenset(TOKENIZER_FILES) - {"tokenizer.json"}, frozenset({GENERATION_CONFIG}))
"""The base's files hashed since a later version, a set each (the tokenizer's but tokenizer.json since December
2026; generation_config.json since 4 December 2026): a record that holds none of a set's names did not hash them,
which means not hashed, not absent."""


HUB_LATER_HASHED = frozenset({"classes"})
"""A hub dataset's digests recorded since a later version (its ClassLabel columns' names, `rows._hub_rows`: since
December 2026): a record without one did not hash it, and its rows' ids are the same classes."""


def unhashed(recorded: dict[str, str]) -> frozenset[str]:
    """The names of `LATER_HASHED` that a record of the base's hashes was made without."""
    return frozenset().union(*(names for names in LATER_HASHED if not names & recorded.keys()))


def model_directory(name_or_path: str, revision: str | None = None) -> Path | None:
    """Where a base model's files lie: a local directory, or a hub id's snapshot of `revision` (its main branch
    when None) in the local Hugging Face cache, where transformers put it; None for a hub id not in the cache (or a
    local directory that is gone). Never the network."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, revision=revision, local_files_only=True))
    except (OSError, ValueError):  # not in the cache (LocalEntryNotFoundError), or no hub id (HFValidationError)
        return None


def hub_commit(name_or_path: str, revision: str | None = None) -> str | None:
    """The commit of a hub id's snapshot in the local cache that `revision` (main when None) names now: what a run
    loaded, taken right after it loaded; None for a local directory, or where the cache does not say."""
    if Path(name_or_path).is_dir():
        return None
    path = model_directory(name_or_path, revision)
    return path.name if path is not None and re.fullmatch(r"[0-9a-f]{40}", path.name) else None


def model_weight_hashes(name_or_path: str, revision: str | None = None, hash_file=sha256_file) -> dict[str, str]:
    """Content hashes of the base model's weight, config, generation config and tokenizer files: those of a local
    directory, or of a hub id's cached snapshot (`model_directory`); {} when neither is there. `hash_file`: a file's
    sha256."""
    path = model_directory(name_or_path, revision)
    if path is None:
        return {}
    return {f.name: hash_file(f) for f in sorted(path.iterdir())
            if f.is_file() and (f.suffix == ".safetensors" or f.name in ("config.json", GENERATION_CONFIG,
                                                                         *TOKENIZER_FILES))}


def remembered_sha256(path: Path) -> str:
    """A file's sha256, kept in the peftkit cache (`file-hashes/`) under its path, size, modification time and inode,
    and read from there while those are unchanged: a warning's check, not a record's (what `verify` and a run's
    manifest hash is always read anew: a time can be set back by hand)."""
    from peftkit.data.cache import cache_root
    from peftkit.fileio import DiskFullError, atomic_write_text

    root = cache_root()
    if root is None:
        return sha256_file(path)
    st = path.stat()
    key = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{st.st_dev}"
    entry = root / "file-hashes" / hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    try:
        if re.fullmatch(r"[0-9a-f]{64}", known := entry.read_text(encoding="utf-8").strip()):
            return known
    except OSError:
        pass
    digest = sha256_file(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(entry, digest)
    except (OSError, DiskFullError):  # a cache that cannot be written only costs the hashing next time (a full disk
        pass  # is a DiskFullError: uncaught, it ended the hashing thread, and the changed base went unsaid)
    return digest


def changed_files(recorded: dict[str, str], now: dict[str, str],
                  unrecorded: frozenset = frozenset()) -> list[tuple[str, str]]:
    """(name, 'changed' | 'is gone' | 'is new') of each file whose hash differs from a record, but those of
    `unrecorded` that the record lacks (they were not hashed then)."""
    names = sorted((recorded.keys() | now.keys()) - (unrecorded - recorded.keys()))
    return [(name, "is gone" if name not in now else "is new" if name not in recorded else "changed")
            for name in names if recorded.get(name) != now.get(name)]


def changed_model_files(recorded: dict[str, str], now: dict[str, str]) -> list[tuple[str, str]]:
    """`changed_files` of the base model's files; a record made before a set of files was hashed (`LATER_HASHED`)
    holds none of them, and those are then not compared. An empty record hashed nothing (a hub id, before December
    2026)."""
    if not recorded:
        return []
    return changed_files(recorded, now, unhashed(recorded))


def base_changes(adapter_dir: str, name_or_path: str, revision: str | None) -> Callable[[], list] | None:
    """A function returning `changed_model_files` between the base hashes recorded by the run that exported
    `adapter_dir` (its run directory's manifest.json) and base `name_or_path` as it is now; None for an adapter outside
    a finished run, a record without hashes, or a hub base not in the cache yet. The files are hashed in a thread
    while the caller loads the model (hashlib and file reads release the GIL; a GB takes about a second here), once:
    then read from the cache while they are unchanged (`remembered_sha256`); the function waits for it."""
    try:
        recorded = json.loads((Path(adapter_dir).parent / MANIFEST).read_text(encoding="utf-8"))["base_model_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(recorded, dict) or not recorded or model_directory(name_or_path, revision) is None:
        return None  # (a hub base not in the cache yet: the load fetches it at the recorded commit)

    def compare() -> list[tuple[str, str]]:
        try:
            return changed_model_files(recorded, model_weight_hashes(name_or_path, revision, remembered_sha256))
        except OSError:  # unreadable: the load says so in its own words
            return []

    found: list[list[tuple[str, str]]] = []
    # A daemon thread: a load stopped by an error or Ctrl-C exits at once, not after hashing GBs.
    thread = threading.Thread(target=lambda: found.append(compare()), name="peftkit-base-hashes", daemon=True)
    thread.start()

    def result() -> list[tuple[str, str]]:
        thread.join()
        return found[0] if found else []
    return result


def source_hashes(source: str, split: str, revision: str | None = None) -> dict[str, str]:
    """`file_hashes` of a data file; for a saved dataset's directory, the files of the splits read
    (`saved.saved_hashes`); for a hub dataset, {"rows": sha256} of the rows this process read of it
    (`rows.HUB_ROWS`), or {} before it read them."""
    from peftkit.data.rows import HUB_ROWS
    from peftkit.data.saved import saved_hashes

    if is_hub_dataset(source):
        return dict(HUB_ROWS.get((source, split, revision), {}))
    return saved_hashes(source, split) if Path(source).is_dir() else file_hashes(source)


def hub_commits(recipe: Recipe) -> dict[str, str]:
    """The commit each hub dataset of the recipe was read at, by split (where `datasets` said)."""
    from peftkit.data.rows import HUB_COMMITS

    data = recipe.data
    found = {key: HUB_COMMITS.get((source, split, data.revision))
             for key, source, split in data.sources() if is_hub_dataset(source)}
    return {key: commit for key, commit in found.items() if commit}


def data_hashes(recipe: Recipe) -> dict[str, dict[str, str]]:
    """sha256 of the recipe's data, by dataset ("train", or "train[0]", "train[1]", ... for a list; and "eval" when
    the recipe has one, or "eval[name]" for each set of a data.eval mapping): `source_hashes`."""
    data = recipe.data
    return {key: source_hashes(source, split, data.revision) for key, source, split in data.sources()}


def output_hashes(run_dir: Path, directories: Iterable[str]) -> dict[str, str]:
    """sha256 of every file under the exported directories of a run, named relative to the run directory."""
    return {f"{directory}/{name}": digest
            for directory in directories for name, digest in file_hashes(run_dir / directory).items()}


def adapter_source_hashes(recipe: Recipe) -> dict[str, dict[str, str]]:
    """sha256 of the files of the adapters the recipe's method is built from (`Method.source_dirs`: X-LoRA's experts,
    AdapterFusion's adapters), by the recipe key naming each; {} for the other methods."""
    from peftkit.methods import method_of

    return {key: file_hashes(path) for key, path in method_of(recipe.adapter).source_dirs(recipe.adapter).items()}


def loss_digest(losses: list[float]) -> str:
    """sha256 of the per-step losses as Python writes them: one string that says whether two runs' losses agree."""
    return hashlib.sha256(repr(losses).encode()).hexdigest()


def build_manifest(recipe: Recipe, out: Path, summary: dict, exported: list[Path], device: torch.device,
                   losses: list[float], data_sha256: dict | None = None, base_model_sha256: dict | None = None,
                   init_from_sha256: dict | None = None, distributed: dict | None = None,
                   base_model_commit: str | None = None, dtype: str | None = None,
                   examples_sha256: dict | None = None, sources_sha256: dict | None = None,
                   data_form: str | None = None) -> dict:
    """manifest.json's content. `data_sha256` / `base_model_sha256` / `init_from_sha256`: the hashes taken when
    the run began (what it trained on, and no second read of a multi-GB base); computed here when not given.
    `distributed`: the processes that trained (`peftkit.distributed.describe`); default one. `dtype`: the base's
    weights as they loaded (model.dtype `auto` resolved to the checkpoint's dtype); default the recipe's setting.
    `examples_sha256`: the digests of the examples the data became (`peftkit.data.stored.examples_digest`).
    `sources_sha256`: the files of the adapters the method is built from (`Method.source_dirs`), by recipe key.
    `data_form`: preference pairs' or KTO's rows' form (`Run.data_form`), recorded where given."""
    data = data_sha256 if data_sha256 is not None else data_hashes(recipe)
    outputs = output_hashes(out, [directory.name for directory in exported])
    record = recorded(recipe)  # (as recipe.yaml: hub adapters pinned)
    log = out / METRICS_LOG
    return {
        "peftkit_manifest": 1,
        "command": " ".join(sys.argv),
        "environment": environment(device),
        "distributed": distributed or {"processes": 1, "backend": None, "type": "NO"},
        "dtype": dtype or recipe.model.dtype,
        "seed": recipe.training.seed,
        "recipe": record.model_dump(mode="json"),
        "recipe_sha256": record.sha256(),
        # the JSON file sorts keys: a data.eval mapping's order, whose first set is the primary one, is kept apart
        **({"eval_sets": list(recipe.data.eval)} if isinstance(recipe.data.eval, dict) else {}),
        "data_sha256": data,
        "data_commits": hub_commits(recipe),
        "examples_sha256": examples_sha256 or {},
        **({"data_form": data_form} if data_form else {}),
        "base_model_sha256": (base_model_sha256 if base_model_sha256 is not None
                              else model_weight_hashes(recipe.model.name_or_path, recipe.model.revision)),
        "base_model_commit": base_model_commit,
        "init_from_sha256": (init_from_sha256 if init_from_sha256 is not None
                             else file_hashes(recipe.adapter.init_from) if recipe.adapter.init_from else {}),
        "sources_sha256": sources_sha256 if sources_sha256 is not None else adapter_source_hashes(recipe),
        "losses": losses,
        "loss_digest": loss_digest(losses),
        "metrics": summary,
        "outputs_sha256": outputs,
        # complete: the run's last line (its final eval) is written; nothing appends to it after the manifest
        "log_sha256": sha256_file(log) if log.is_file() else None,
    }


# ------------------------------------------------------------------------------------- reading back


class RecordedEnvironment(BaseModel):
    """The machine and packages a run was made with (`environment()`); other keys are kept as they are."""

    model_config = ConfigDict(strict=True, extra="allow")
    versions: dict[str, str]
    device: str
    machine: str
    torch_threads: int
    gpu: str | None = None  # CUDA runs only


class Manifest(BaseModel):
    """The fields of manifest.json that `peftkit verify` relies on; the others are for people to read.

    strict: a manifest is written by peftkit, never by hand, so a string where a number belongs means
    damage, not a YAML-style shorthand to coerce.
    """

    model_config = ConfigDict(strict=True, extra="allow")
    peftkit_manifest: Literal[1] = 1
    recipe: Recipe  # validated by the recipe models themselves: a recorded recipe obeys today's rules
    recipe_sha256: Sha256
    losses: list[float]
    data_sha256: dict[str, dict[str, Sha256]]
    data_commits: dict[str, str] = {}
    """The commit each hub dataset was read at, by split (where `datasets` said); {} for local files."""
    examples_sha256: dict[str, Sha256] = {}
    """The digests of the examples data.train and data.eval became; {} in manifests from before it was recorded."""
    data_form: Literal["chat", "completion"] | None = None
    """Preference pairs' or KTO's rows' form in data.train (`chat`: conversations, `completion`: text), which
    `generate --prompt` reads to warn where a run trained on conversations (a hub dataset's rows it cannot read
    offline); None for other data, and in manifests from before 7 December 2026."""
    eval_sets: list[str] = []
    """The names of a data.eval mapping in the recipe's order (the first is the primary set), which the file's sorted
    keys lose; [] for one data.eval path."""
    base_model_sha256: dict[str, Sha256]
    base_model_commit: str | None = None
    """The commit of a hub id's snapshot the run loaded (`hub_commit`); None for a local directory, and in records
    from before it was kept."""
    init_from_sha256: dict[str, Sha256] = {}
    """The files of the adapter the run started from (`adapter.init_from`); {} without one."""
    sources_sha256: dict[str, dict[str, Sha256]] = {}
    """The files of the adapters the method is built from (X-LoRA's experts, AdapterFusion's adapters), by the recipe
    key naming each (`adapter.adapters['0']`); {} for other methods, and in manifests from before 6 December 2026."""
    environment: RecordedEnvironment
    outputs_sha256: dict[str, Sha256]
    log_sha256: Sha256 | None = None
    """sha256 of metrics.jsonl as the run ended, which `peftkit verify` checks the file against before comparing it with
    the re-run's (a tolerance, or the timings no re-run repeats, hid an edit there); None in manifests from before
    5 December 2026, whose metrics.jsonl is compared with the re-run's only."""
    distributed: dict = {}
    """The processes that trained (`processes`, `backend`); {} for manifests from before it was recorded: one."""
    # sha256 of the recipe as recorded, before today's schema added its new defaults: what recipe_sha256 hashed.
    _recorded_recipe_sha256: str = PrivateAttr("")

    @property
    def recorded_recipe_sha256(self) -> str:
        return self._recorded_recipe_sha256

    @field_validator("outputs_sha256")
    @classmethod
    def _inside_exported_dirs(cls, outputs: dict[str, str]) -> dict[str, str]:
        # verify reads RUN_DIR/<name>: a name must not lead out of the run directory ('../../etc/passwd').
        for name in outputs:
            parts = PurePosixPath(name).parts
            if PurePosixPath(name).is_absolute() or ".." in parts or len(parts) < 2:
                raise ValueError(f"{name!r} is not a file inside an exported directory (like adapter/adapter_config.json)")
        return outputs

    @property
    def exported_dirs(self) -> list[str]:
        """The run's exported directories (adapter, merged), as the recorded output names show them."""
        return sorted({PurePosixPath(name).parts[0] for name in self.outputs_sha256})


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def read_manifest(run_dir: Path) -> Manifest:
    """Read and check RUN_DIR/manifest.json; a missing, unreadable or malformed one raises PeftkitError.

    Args:
        run_dir: the run directory (a recipe's export.output_dir).
    """
    path = run_dir / MANIFEST
    if not run_dir.is_dir():
        raise PeftkitError(f"{run_dir} is not a directory. Give the run directory of a finished `peftkit train` "
                           "(its export.output_dir, which holds manifest.json).")
    if not path.is_file() and (run_dir.parent / MANIFEST).is_file():  # a run's adapter/, merged/ or report/
        raise PeftkitError(f"{run_dir} is the {run_dir.name}/ of a run, not the run directory: pass {run_dir.parent}.")
    if not path.is_file():
        from peftkit.rundir import checkpoint_names

        finish = ("finish it with `peftkit train RECIPE --resume`" if checkpoint_names(run_dir / "checkpoints") else
                  "it stopped before its first checkpoint: train it again with `peftkit train RECIPE`")
        raise PeftkitError(f"{run_dir} has no {MANIFEST}; it is not a finished peftkit run directory (train writes "
                           f"{MANIFEST} last, so an interrupted run has none: {finish}).")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PeftkitError(f"{path} cannot be read ({e.strerror}).") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise PeftkitError(f"{path} is not valid JSON ({e}); {_RESTORE}") from None
    if not isinstance(raw, dict):
        raise PeftkitError(f"{path} holds {_JSON_TYPES.get(type(raw), type(raw).__name__)}, not the JSON object "
                           f"`peftkit train` writes; {_RESTORE}")
    _recipe_eval_order(raw)
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        problems = list(dict.fromkeys(_manifest_problem(err, raw, path) for err in e.errors()))
        raise PeftkitError(f"{path} is not a valid peftkit manifest ({len(problems)} problem"
                           f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems) + f"\n{_RESTORE}") from None
    # Recipe.to_yaml() of the recipe as it was run: today's dump, in the schema's key order (the JSON file sorts
    # keys), limited to the keys recorded, so that a key added to the schema since does not change the hash.
    as_run = _recorded_keys(manifest.recipe.model_dump(mode="json"), raw["recipe"])
    manifest._recorded_recipe_sha256 = hashlib.sha256(yaml.safe_dump(as_run, sort_keys=False).encode()).hexdigest()
    return manifest


def _recipe_eval_order(raw: dict) -> None:
    """Put the recorded recipe's data.eval mapping back in the recipe's order (`eval_sets`), which the JSON file's
    sorted keys lost; a manifest whose names do not fit is left as it is (its recipe then fails its hash)."""
    order, recipe = raw.get("eval_sets"), raw.get("recipe")
    data = recipe.get("data") if isinstance(recipe, dict) else None
    sets = data.get("eval") if isinstance(data, dict) else None
    if isinstance(order, list) and isinstance(sets, dict) and sorted(map(str, order)) == sorted(sets):
        data["eval"] = {name: sets[name] for name in order}


def _recorded_keys(today: object, recorded: object) -> object:
    """`today` (a dump in schema order) without the keys `recorded` lacks, recursively: in lists too (data.train's
    entries, which took a `format` after runs were recorded)."""
    if isinstance(today, dict) and isinstance(recorded, dict):
        return {k: _recorded_keys(v, recorded[k]) for k, v in today.items() if k in recorded}
    if isinstance(today, list) and isinstance(recorded, list) and len(today) == len(recorded):
        return [_recorded_keys(v, r) for v, r in zip(today, recorded, strict=True)]
    return today


_RESTORE = ("peftkit writes manifest.json at the end of a run and never edits it: restore it from a copy of the run, "
            "or train the recipe again to get a new one.")


def _manifest_problem(err: dict, raw: dict, path: Path) -> str:
    """One problem of a manifest, named by its key; the recorded recipe's own in the recipe's words."""
    loc = err["loc"]
    if loc[0] == "recipe" and len(loc) > 1 and isinstance(raw["recipe"], dict):
        inner = {**err, "loc": loc[1:]}
        return format_validation_error(inner, raw["recipe"], f"recipe in {path.name}", {}, set())
    dotted = ".".join(map(str, loc))
    if err["type"] == "missing":
        return f"missing key '{dotted}'"
    given = err["input"]
    shown = _JSON_TYPES[type(given)] if isinstance(given, dict | list) else repr(given)[:80]
    if err["type"] == "string_pattern_mismatch":  # Sha256 is the manifest's only pattern
        return f"'{dotted}' = {shown}: must be a sha256 digest (64 lowercase hex digits)"
    return f"'{dotted}' = {shown}: {err['msg'].removeprefix('Value error, ').replace('Input should be', 'must be')}"
