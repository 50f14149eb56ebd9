"""The options several commands share (and `peftkit eval`'s many), and how a command reads its path and text
arguments."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from peftkit.errors import PeftkitError

TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run modelling code that the model (--model) ships, "
                                               "or that an adapter's base needs (recorded in its peftkit.json).")]
# merge has no --model: its base is --base, else the one the adapter records.
MergeTrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run modelling code that the base (--base, "
                                                    "else the adapter's recorded base) ships, as an adapter's base "
                                                    "may need (recorded in its peftkit.json).")]
Arrow = Annotated[bool, typer.Option("--arrow", help="Route each token, in every adapted layer, among the NAME=DIR LoRA "
                                     "adapters (Arrow, as peft's create_arrow_model): no training.")]
ArrowTopK = Annotated[Optional[int], typer.Option("--arrow-top-k", min=1, help="--arrow: the adapters each token takes "
                                                  "(default: 3, or fewer adapters' count).")]
ArrowTemperature = Annotated[Optional[float], typer.Option("--arrow-temperature", help="--arrow: the softmax "
                                                           "temperature of the adapters' scores (default 1).")]
General = Annotated[Optional[list[str]], typer.Option("--general", metavar="NAME", help="--arrow: a NAME=DIR adapter of "
                                                      "general knowledge, subtracted from the others (GenKnowSub; "
                                                      "repeatable).")]
Task = Annotated[Optional[int], typer.Option("--task", min=0, help="Multitask prompt tuning, Poly: the task id "
                                            "of every prompt and row (default: the data's 'task' column).")]
DataSplit = Annotated[Optional[str], typer.Option("--split", metavar="NAME", help="With --data naming a hub dataset: the split to "
                                                 "read (default: train); a local file's slice, as 'train[95%:]'.")]
DataRevision = Annotated[Optional[str], typer.Option("--data-revision", metavar="REV", help="With --data naming a hub "
                                                     "dataset: the branch, tag or commit to read (data.revision of "
                                                     "the command line).")]
TopK = Annotated[int, typer.Option("--top-k", metavar="K", help="Sampling: only the K most likely tokens; 0 (the default): "
                                   "no cut.")]
MinP = Annotated[float, typer.Option("--min-p", metavar="P", help="Sampling: only tokens at least P times as likely as the "
                                     "most likely one, in [0, 1]; 0 (the default): no cut.")]
RepetitionPenalty = Annotated[float, typer.Option("--repetition-penalty", metavar="R", help="Above 1: discourage tokens "
                                                  "the prompt or the answer holds already (greedy decoding too); 1 "
                                                  "(the default): none.")]
Stop = Annotated[Optional[list[str]], typer.Option("--stop", metavar="TEXT", help="End each answer before the first "
                                                  "TEXT it holds, left out of it (repeatable).")]
Overrides = Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe key: --set training.lr=2e-4 (repeatable).")]

# peftkit eval's own (model_commands.eval_cmd): its flags and help, apart from its body
EvalRecipe = Annotated[Optional[Path], typer.Argument(help="A recipe, or a run directory (its recipe.yaml; its adapter/ "
                                                      "is the default --adapter). Flags override its settings.")]
EvalModel = Annotated[Optional[str], typer.Option("--model", help="Model directory or hub id (base or merged).")]
EvalData = Annotated[Optional[str], typer.Option("--data", help="Data file or hub dataset id; default: data.eval.")]
EvalFormat = Annotated[Optional[str], typer.Option("--format", help="alpaca | chat | completion | text | classification | "
                                                   "preference | unpaired | tokenized; default: the recipe's, else alpaca.")]
EvalAdapters = Annotated[Optional[list[str]], typer.Option("--adapter", metavar="[NAME=]DIR", help="PEFT adapter directory (or hub id user/name[@REV]) to apply. Repeat "
                                                           "as NAME=DIR to compare several with the base.")]
EvalMerged = Annotated[Optional[list[str]], typer.Option("--merged", metavar="NAME=DIR", help="NAME=DIR: a merged model to add to the "
                                                         "comparison (repeatable).")]
EvalMaxLength = Annotated[Optional[int], typer.Option("--max-length", min=1, help="Truncate examples to this many tokens; default: "
                                                      "data.max_length (512).")]
EvalBatchSize = Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Examples per batch; default: eval.batch_size (8).")]
EvalOnBadRows = Annotated[Optional[str], typer.Option("--on-bad-rows", help="error | skip; default: the recipe's, "
                                                      "else error.")]
EvalJson = Annotated[Optional[Path], typer.Option("--json", help="Also write the metrics as JSON here.")]
EvalMetrics = Annotated[Optional[str], typer.Option("--metrics", help="Comma-separated: loss, perplexity (default), "
                                                    "exact_match, token_f1, rouge_l (generated answers vs the data's "
                                                    "targets).")]
EvalMaxNewTokens = Annotated[Optional[int], typer.Option("--max-new-tokens", min=1, help="Generation metrics: longest answer, in "
                                                         "tokens; default: eval.max_new_tokens (64).")]
EvalNormalize = Annotated[Optional[str], typer.Option("--normalize", help="Before exact_match / token_f1: squad (Unicode NFKC, "
                                                      "lowercase, no punctuation or articles), strip (NFC, no "
                                                      "surrounding space), or none; default: eval.normalize "
                                                      "(squad).")]
EvalPredictions = Annotated[Optional[Path], typer.Option("--predictions", help="Write one JSON line per row "
                                                         "(prompt, prediction, reference) here; in a comparison, a "
                                                         "directory (NAME.jsonl each); of several data.eval sets, a "
                                                         "file each, the set's name before the suffix "
                                                         "(p.SET.jsonl, NAME.SET.jsonl).")]


def local_path(path: str) -> str:
    """A CLI argument that exists on disk becomes absolute (relative to the current directory; `~` expanded, as in a
    recipe: `--model=~/m` reaches peftkit unexpanded); else a hub id, or the missing path it names."""
    try:
        expanded = Path(path).expanduser()
    except RuntimeError:  # `~name/x` of no user here (a typo of `~/name/x`): pathlib's bare "Could not determine ..."
        user = path.split("/", 1)[0]
        raise PeftkitError(f"{path}: there is no user {user[1:]!r} here, whose home directory {user} would be; give "
                           f"~/{path[1:]} for one in your own home directory, or the full path.") from None
    return str(expanded.resolve()) if expanded.exists() else str(expanded) if path.startswith("~") else path


def data_path(value: str) -> str:
    """A --data value: `local_path`; one without a data file's extension that can only be a local path and is not there
    (`peftkit.local_or_hub`: `data/saved` where data/ exists, not a hub dataset of that name in the cache) is refused
    at once, not asked of the hub."""
    from peftkit.local_or_hub import meant_locally, no_such_directory
    from peftkit.recipe import DATA_EXTENSIONS

    local = local_path(value)
    if not Path(local).exists() and Path(value).suffix.lower() not in DATA_EXTENSIONS and \
            meant_locally(value, kind="dataset"):
        raise no_such_directory(value, f"--data {value}", "a data file (" + ", ".join(DATA_EXTENSIONS) + "), a "
                                "directory datasets' save_to_disk wrote, or a hub dataset id user/name")
    return local


def model_path(value: str | None, flag: str = "--model") -> str | None:
    """A --model (--base, --merged NAME=) value: `local_path`; one that can only be a local path and is not there
    (`peftkit.local_or_hub`: `runs/merged` where runs/ exists) is refused at once, not asked of the hub."""
    from peftkit.local_or_hub import meant_locally, no_such_directory

    if value is None:
        return None
    local = local_path(value)
    if not Path(local).exists() and meant_locally(value):
        raise no_such_directory(value, f"{flag} {value}", "a model's directory (config.json and weights), or a hub "
                                "id user/name")
    return local


def adapter_path(value: str, given: str | None = None) -> str:
    """An --adapter value: a local directory (`local_path`; a run directory's adapter/: `run_adapter`), else a hub adapter fetched into the Hugging Face cache
    (`peftkit.hub`: `user/name[@REVISION]`). A missing path that is no hub id (`./x/`, `a..b/c`), or one shaped as a
    hub id that can only be a local path (`runs/x` where runs/ is a directory here: `peftkit.local_or_hub`), is
    refused at once, not asked of the hub; `given`: how the error names it (default `--adapter VALUE`)."""
    from peftkit.hub import hub_adapter, hub_shaped
    from peftkit.local_or_hub import meant_locally, no_such_directory
    from peftkit.peft_format import run_adapter

    local = local_path(value)
    if Path(local).exists():
        return run_adapter(local)
    if not hub_shaped(value) or meant_locally(value, subfolders=True):  # (`./x/`, `a..b/c`: no hub id either)
        raise no_such_directory(value, given or f"--adapter {value}", "an adapter's directory (adapter_config.json), "
                                "a run directory, or a hub id user/name[@REV]")

    return hub_adapter(value) or local


def user_path(path: Path | None) -> Path | None:
    """An output path flag with `~` expanded (`--json=~/e.json` made a directory named `~`)."""
    return path.expanduser() if path is not None else None


def typed(text: str) -> str:
    """A text argument (a prompt) as typed. Where the locale could not decode its bytes (a non-UTF-8 locale: Python
    keeps them as lone surrogates, which a tokenizer refuses with a TypeError), they are read as UTF-8."""
    if not any("\udc80" <= c <= "\udcff" for c in text):
        return text
    return os.fsencode(text).decode("utf-8", errors="replace")


def arrow_settings(arrow: bool, top_k: int | None, temperature: float | None, general: list[str] | None,
                   adapters: int, task: int | None = None):
    """--arrow's settings (None without it), its flags checked: the top_k default is 3, or the task adapters' count.
    `task`: --task, which picks a multitask prompt tuning or Poly adapter's task; Arrow routes LoRA adapters only."""
    from peftkit.adapters.arrow import ArrowSettings

    if not arrow and (top_k is not None or temperature is not None):
        raise PeftkitError(f"--arrow-{'top-k' if top_k is not None else 'temperature'} sets Arrow routing: pass "
                           "--arrow too.")
    if general and len(set(general)) < len(general):
        raise PeftkitError(f"--general names {', '.join(general)}: each adapter once.")
    if not arrow:
        return None
    if task is not None:
        raise PeftkitError(f"--task {task} picks the task of a multitask prompt tuning or Poly adapter, and --arrow routes LoRA "
                           "adapters, which read no task ids: drop --task.")
    tasks = adapters - len(general or [])
    if general and tasks < 1:
        raise PeftkitError(f"--general names {len(general)} of the {adapters} --adapter NAME=DIR adapters: Arrow routes "
                           "each token among the task adapters, those not --general, so leave at least one out of "
                           "--general.")
    tasks = max(tasks, 1)  # no NAME=DIR adapter at all: check_arrow says to name them
    # Said before anything loads (NamedAdapters.arrow says it too, after loading the base and every adapter).
    if top_k is not None and top_k > tasks:
        raise PeftkitError(f"--arrow-top-k {top_k}: takes 1 to {tasks}, the task adapters (the NAME=DIR adapters "
                           "other than --general ones).")
    if temperature is not None and not 0 < temperature < math.inf:
        raise PeftkitError(f"--arrow-temperature {temperature}: give a finite number above 0.")
    return ArrowSettings(top_k=top_k or min(3, tasks), temperature=1.0 if temperature is None else temperature)


def check_merged(merged: list[tuple[str, str]]) -> None:
    """`eval --merged NAME=DIR` values: each a model directory (config.json), said before anything loads, as an
    --adapter's errors are. A value that is no path on disk and is not one for sure (`user/name`: `meant_locally`) is
    a hub id."""
    from peftkit.local_or_hub import meant_locally, no_such_directory

    for name, value in merged:
        path = Path(value).expanduser()
        given = f"--merged {name}={value}"
        if path.is_dir() and (path / "config.json").is_file():
            continue
        if path.is_dir() and (path / "adapter_config.json").is_file():
            raise PeftkitError(f"{given}: {value} is an adapter directory, not a merged model. Compare it as "
                               f"--adapter {name}={value}, or merge it first (peftkit merge --adapter {value} --output "
                               "DIR).")
        if path.exists():
            raise PeftkitError(f"{given}: {value} has no config.json, so it is not a model directory. Give a merged "
                               "model's directory (peftkit merge --output writes one).")
        if meant_locally(value):
            raise no_such_directory(value, given, "a merged model's directory (peftkit merge --output writes one), or "
                                    "a hub id user/name")


def adapter_flags(adapters: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """--adapter values as given: (one plain DIR, or None; the NAME=DIR pairs when several are given or any is
    named). `fetched` then resolves them: check the flags in between, before a hub adapter is downloaded."""
    from peftkit.compare import parse_named, split_named

    if len(adapters) == 1 and not split_named(adapters[0]):
        return adapters[0], []
    return None, parse_named(adapters, "--adapter")


def fetched(single: str | None, named: list[tuple[str, str]]) -> tuple[str | None, list[tuple[str, str]]]:
    """`adapter_flags`' values as local directories (`adapter_path`: a hub adapter is fetched into the cache)."""
    return adapter_path(single) if single else None, [(n, adapter_path(p, f"--adapter {n}={p}")) for n, p in named]


Inputs = list[tuple[str, "str | Path | None"]]
"""A command's inputs, (what it is, its path): the data, the recipe or run, the model, the adapters."""


def command_inputs(recipe: Path | None = None, model: str | None = None, data: str | None = None,
                   adapters: list[str] = (), merged: list[str] = ()) -> Inputs:
    """What a command reads, as `check_json_out` compares its outputs against (hub ids are skipped there). Of a run
    directory, the run's own entries: an output beside them (`RUN/eval.json`) is the user's to keep there."""
    from peftkit.rundir import RUN_ENTRIES

    run = recipe is not None and Path(recipe).is_dir()
    read = [(f"the run's {entry}", Path(recipe) / entry) for entry in RUN_ENTRIES] if run else [("the recipe", recipe)]
    return (read + [("the model", model), ("the data", data)] + [("the adapter", a) for a in adapters]
            + [("the merged model", m) for m in merged])


def job_inputs(job) -> Inputs:
    """What an eval or generate job reads as it was resolved: a recipe's model and data.eval, a run's adapter/."""
    source = job.source
    return command_inputs(model=source.model.name_or_path if source.model else None, data=job.data,
                          adapters=[source.adapter] if source.adapter else [])


def check_not_input(path: Path, flag: str, inputs: Inputs, shown: str | None = None) -> None:
    """Refuse an output `path` that is one of the command's `inputs`, or inside one (a data file, the recipe, a run,
    model or adapter directory): writing it would replace what the command reads, or add to it. Paths not on disk
    (hub ids) are skipped; `shown`: how the error names the output (default: `path`)."""
    out = path.expanduser().resolve()
    for label, given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        held = Path(given).expanduser().resolve()
        if out == held:
            raise PeftkitError(f"{flag} {shown or path} is {label} ({held}), an input of this command: writing it would "
                               f"overwrite it. Give {flag} another path.")
        if held in out.parents:
            raise PeftkitError(f"{flag} {shown or path} is inside {label} ({held}), an input of this command: writing there "
                               f"would change it. Give {flag} a path outside it.")


def check_json_out(path: Path, flag: str = "--json", inputs: Inputs = (), example: str = "eval.json") -> None:
    """An output file flag must name a file we can write, and none of the command's `inputs` (`check_not_input`):
    checked before minutes of evaluation, not after. `example`: the file name a directory given is told to hold."""
    from peftkit.fileio import special_file
    from peftkit.rundir import make_writable_dir

    if special_file(path):  # /dev/stdout, a pipe: written as it is
        return
    check_not_input(path, flag, inputs)
    if path.is_dir():
        name = "predictions.jsonl" if flag == "--predictions" else example
        raise PeftkitError(f"{flag} {path} is a directory; give a file name, e.g. {flag} {path / name}.")
    make_writable_dir(path.parent, f"{flag}'s directory", create=False)  # made when written: a refused run leaves none
