"""The `peftkit` command: thin Typer wrappers around plain functions that tests call directly."""

from __future__ import annotations

import atexit
import codecs
import errno
import gc
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from peftkit.errors import PeftkitError, PeftkitWarning, visible

app = typer.Typer(
    help="Parameter-efficient fine-tuning of Hugging Face models from YAML recipes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: flags show as flags (`--resume`), where the rich panels print `--resume <bool>`.
    rich_markup_mode=None,
)
# soft_wrap: a line stays one line in a log file (grep-able), however long; the terminal wraps it on screen.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)  # a warning in a log is one line, as an error is

TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Run modelling code that the model (--model, --base) ships, "
                                               "or that an adapter's base needs (recorded in its peftkit.json).")]
Arrow = Annotated[bool, typer.Option("--arrow", help="Route each token, in every adapted layer, among the NAME=DIR LoRA "
                                     "adapters (Arrow, as peft's create_arrow_model): no training.")]
ArrowTopK = Annotated[Optional[int], typer.Option("--arrow-top-k", min=1, help="--arrow: the adapters each token takes "
                                                  "(default: 3, or fewer adapters' count).")]
ArrowTemperature = Annotated[Optional[float], typer.Option("--arrow-temperature", help="--arrow: the softmax "
                                                           "temperature of the adapters' scores (default 1).")]
General = Annotated[Optional[list[str]], typer.Option("--general", metavar="NAME", help="--arrow: a NAME=DIR adapter of "
                                                      "general knowledge, subtracted from the others (GenKnowSub; "
                                                      "repeatable).")]
Task = Annotated[Optional[int], typer.Option("--task", min=0, help="Multitask prompt tuning: the task id of every "
                                            "prompt and row (default: the data's 'task' column).")]
DataSplit = Annotated[Optional[str], typer.Option("--split", metavar="NAME", help="With --data naming a hub dataset: the split to "
                                                 "read (default: train).")]
DataRevision = Annotated[Optional[str], typer.Option("--data-revision", metavar="REV", help="With --data naming a hub "
                                                     "dataset: the branch, tag or commit to read (data.revision of "
                                                     "the command line).")]
Overrides = Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe key: --set training.lr=2e-4 (repeatable).")]


def _local(path: str) -> str:
    """A CLI argument that exists on disk becomes absolute (relative to the current directory; `~` expanded, as in a
    recipe: `--model=~/m` reaches peftkit unexpanded); else a hub id, or the missing path it names."""
    expanded = Path(path).expanduser()
    return str(expanded.resolve()) if expanded.exists() else str(expanded) if path.startswith("~") else path


def _adapter(value: str) -> str:
    """An --adapter value: a local directory (`_local`), else a hub adapter fetched into the Hugging Face cache
    (`peftkit.hub`: `user/name[@REVISION]`), else the missing path, which loading names."""
    local = _local(value)
    if Path(local).exists():
        return local
    from peftkit.hub import hub_adapter

    return hub_adapter(value) or local


def _expanded(path: Path | None) -> Path | None:
    """An output path flag with `~` expanded (`--json=~/e.json` made a directory named `~`)."""
    return path.expanduser() if path is not None else None


@app.callback()
def _every_command(ctx: typer.Context) -> None:
    # A PeftkitWarning prints as one `warning:` line on stderr when it happens; Python's own settings are back
    # when the command ends (tests run commands in their own process).
    from peftkit.progress import show_work_on

    ctx.with_resource(warnings.catch_warnings())
    warnings.showwarning = _warning_printer(warnings.showwarning)
    warnings.simplefilter("always", PeftkitWarning)
    show_work_on(console)  # tokenizing a dataset, an evaluation: a bar, or a line every 30 s in a log
    ctx.call_on_close(lambda: show_work_on(None))


def _warning_printer(show_other):
    """warnings.showwarning that prints a PeftkitWarning as one `warning:` line on stderr (once: a comparison loads
    several models), others as Python does."""
    from rich.text import Text

    shown: set[str] = set()

    def show(message, category, *where) -> None:
        if issubclass(category, PeftkitWarning):
            if str(message) not in shown:
                shown.add(str(message))
                err_console.print(Text.assemble(("warning:", "yellow"), f" {visible(str(message))}"), highlight=False)
        else:
            show_other(message, category, *where)
    return show


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in export.output_dir.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a different run found in export.output_dir.")] = False,
    num_processes: Annotated[int, typer.Option("--num-processes", min=1, help=(
        "Train data-parallel in N processes (one per GPU; gloo on CPU) through accelerate's launcher; the "
        "global batch is training.batch_size x grad_accum x N."))] = 1,
    no_cache: Annotated[bool, typer.Option("--no-cache", help=(
        "Tokenize the data anew, neither reading nor keeping the tokenized-data cache (PEFTKIT_CACHE names its "
        "directory; PEFTKIT_CACHE=off turns it off everywhere)."))] = False,
) -> None:
    """Fine-tune: data → model → adapter → training → export, as the recipe says."""
    from peftkit.recipe import load_recipe
    from peftkit.train import train as run_train

    cfg = load_recipe(recipe, overrides or [])  # a recipe mistake shows here, once, before any process starts
    from peftkit.rundir import check_recipe_file

    check_recipe_file(recipe, Path(cfg.export.output_dir), cfg.to_yaml())
    if num_processes > 1 and "LOCAL_RANK" not in os.environ:
        from peftkit.distributed import launch

        argv = ["train", str(recipe), *(f"--set={o}" for o in overrides or []), *(["--resume"] if resume else []),
                *(["--overwrite"] if overwrite else []), *(["--no-cache"] if no_cache else [])]
        raise typer.Exit(launch(num_processes, argv))
    from peftkit.distributed import close

    try:
        run_train(cfg, resume=resume, overwrite=overwrite, console=console, cache=not no_cache)
    finally:
        close()


@app.command()
def validate(recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")], overrides: Overrides = None) -> None:
    """Check a recipe and print it fully resolved (every default, absolute paths), or its errors."""
    from rich.markup import escape

    from peftkit.recipe import load_recipe

    missing: list[str] = []
    resolved = load_recipe(recipe, overrides or [], missing_adapters=missing)
    console.print(f"# {recipe}: valid", style="green", markup=False)
    # A value the recipe's rules take for a local path (not a hub id) should be there: train would stop at it. A
    # warning, not an error: the recipe may be meant for another machine.
    adapter = resolved.adapter
    fused = [(f"adapter.fuse[{i}]", value) for i, value in enumerate(getattr(adapter, "fuse", None) or [])]
    for key, value in (("model.name_or_path", resolved.model.name_or_path), ("data.train", resolved.data.train),
                       ("data.eval", resolved.data.eval), *fused,
                       ("adapter.source_adapter", getattr(adapter, "source_adapter", None))):
        if value and Path(value).is_absolute() and not Path(value).exists() and not any(key in m for m in missing):
            err_console.print(f"[yellow]warning:[/] {key} {escape(value)} does not exist here (a relative path is resolved "
                              "against the recipe's directory); train would stop at it.", highlight=False)
    for message in missing:  # a path that could be a hub id too: why neither is there
        err_console.print(f"[yellow]warning:[/] {escape(message)} Train would stop at it.", highlight=False)
    print(resolved.to_yaml(), end="")


@app.command()
def merge(
    adapter: Annotated[list[str], typer.Option("--adapter", metavar="DIR", help="PEFT adapter directory (or hub id user/name[@REV]); repeat it, with --weights "
                                               "and --method, to combine several.")],
    output: Annotated[str, typer.Option("--output", help="Directory for the merged model (or combined adapter).")],
    base: Annotated[Optional[str], typer.Option("--base", help="Base model; default: the adapter's base_model_name_or_path.")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32 | bfloat16 | float16; default: the base's dtype.")] = None,
    requantize: Annotated[Optional[str], typer.Option("--requantize", help="nf4 or fp4: also save OUTPUT-nf4 (OUTPUT-fp4), re-quantized (lossy).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUTPUT (never the base or the adapter).")] = False,
    weights: Annotated[Optional[str], typer.Option("--weights", help="Combining: one weight per --adapter, e.g. "
                                                   "0.7,0.3; a negative weight subtracts that adapter.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="Combining: linear | cat | svd | ties | ties_svd | "
                                                  "dare_linear | dare_ties | dare_linear_svd | dare_ties_svd | "
                                                  "magnitude_prune | magnitude_prune_svd.")] = None,
    density: Annotated[Optional[float], typer.Option("--density", help="Pruning methods: fraction kept, in (0, 1].")] = None,
    svd_rank: Annotated[Optional[int], typer.Option("--svd-rank", help="SVD methods: rank of the result; default: "
                                                    "the largest input rank.")] = None,
    svd_clamp: Annotated[Optional[float], typer.Option("--svd-clamp", help="SVD methods: clip the factors at this "
                                                       "quantile of their values.")] = None,
    majority_sign: Annotated[str, typer.Option("--majority-sign", help="TIES methods: total | frequency.")] = "total",
    seed: Annotated[int, typer.Option("--seed", help="DARE methods: seed of the random pruning.")] = 0,
    into_base: Annotated[bool, typer.Option("--into-base", help="Combining: fold the result into the base and save "
                                            "a plain model, instead of a LoRA adapter.")] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Fold one adapter into its base (a 4-bit base is dequantized first) and save a plain model; or combine
    several adapters (--weights, --method) into one LoRA adapter, or with --into-base into the base."""
    from peftkit.merge import merge_adapter
    from peftkit.progress import phase

    output = str(Path(output).expanduser())

    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise PeftkitError(f"--dtype {dtype!r}: use float32, bfloat16 or float16.")
    if requantize is not None and requantize not in ("nf4", "fp4"):
        raise PeftkitError(f"--requantize {requantize!r}: use nf4 (or fp4).")
    if len(adapter) > 1 or weights is not None or method is not None:
        _combine(adapter, output, base, dtype, requantize, overwrite, weights, method, density, svd_rank, svd_clamp,
                 majority_sign, seed, into_base, trust_remote_code)
        return
    combining = {"--into-base": into_base, "--density": density is not None, "--svd-rank": svd_rank is not None,
                 "--svd-clamp": svd_clamp is not None, "--majority-sign": majority_sign != "total", "--seed": seed != 0}
    if given := next((flag for flag, set_ in combining.items() if set_), None):
        raise PeftkitError(f"{given} is for combining several adapters (--adapter repeated, with --weights and "
                           f"--method); one --adapter is merged into its base as it is. Remove {given}.")
    if requantize:
        err_console.print(f"[yellow]warning:[/] --requantize {requantize} rounds the merged weights to 4 bits again; "
                          "its outputs differ slightly from the trained model's. The full-precision merge is kept too.")
    with phase(f"Merging {adapter[0]} into its base..."):
        out = merge_adapter(_adapter(adapter[0]), output, _local(base) if base else None, dtype, requantize,
                            overwrite, trust_remote_code)
    console.print(f"Merged model written to {out}", markup=False, highlight=False)


def _combine(adapters: list[str], output: str, base: str | None, dtype: str | None, requantize: str | None,
             overwrite: bool, weights: str | None, method: str | None, density: float | None, svd_rank: int | None,
             svd_clamp: float | None, majority_sign: str, seed: int, into_base: bool, trust_remote_code: bool) -> None:
    """`peftkit merge` with several --adapter: parse the combination and hand it to `combine_adapters`."""
    from peftkit.combine_adapters import combine_adapters
    from peftkit.combine_inputs import Combination

    if weights is None or method is None:
        missing = " and ".join(f for f, v in (("--weights", weights), ("--method", method)) if v is None)
        one = (" (or drop --weights and --method to merge the one adapter into its base)" if len(adapters) == 1
               else "")
        raise PeftkitError(f"Combining adapters needs {missing}: --weights one per adapter (e.g. "
                           f"{','.join(['0.5'] * len(adapters))}), --method how (e.g. linear, cat or svd){one}.")
    if requantize is not None:
        raise PeftkitError("--requantize is for the single-adapter merge; merge the combined adapter with "
                           "--into-base, then load it quantized.")
    if dtype is not None and not into_base:
        raise PeftkitError("--dtype is the dtype of a merged model: add --into-base, or leave --dtype out (a combined "
                           "adapter is saved in fp32).")
    try:
        parsed = tuple(float(w) for w in weights.split(","))
    except ValueError:
        raise PeftkitError(f"--weights {weights!r}: give numbers separated by commas, e.g. --weights 0.7,0.3.") from None
    combination = Combination(method, parsed, density, svd_rank, svd_clamp, majority_sign, seed)
    out = combine_adapters([_adapter(a) for a in adapters], combination, output, into_base, _local(base) if base else None,
                           dtype, overwrite, trust_remote_code)
    what = "Merged model" if into_base else f"Combined adapter ({method})"
    console.print(f"{what} written to {out}", markup=False, highlight=False)


@app.command("eval")
def eval_cmd(
    recipe: Annotated[Optional[Path], typer.Argument(help="A recipe, or a run directory (its recipe.yaml; its adapter/ "
                                                     "is the default --adapter). Flags override its settings.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Model directory or hub id (base or merged).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Data file or hub dataset id; default: data.eval.")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="alpaca | chat | completion | text | classification; "
                                               "default: the recipe's, else alpaca.")] = None,
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", metavar="[NAME=]DIR", help="PEFT adapter directory (or hub id user/name[@REV]) to apply. Repeat "
                                                         "as NAME=DIR to compare several with the base.")] = None,
    merged: Annotated[Optional[list[str]], typer.Option("--merged", metavar="NAME=DIR", help="NAME=DIR: a merged model to add to the "
                                                        "comparison (repeatable).")] = None,
    max_length: Annotated[Optional[int], typer.Option(min=1, help="Truncate examples to this many tokens; default: "
                                                      "data.max_length (512).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Examples per batch; default: eval.batch_size (8).")] = None,
    on_bad_rows: Annotated[Optional[str], typer.Option("--on-bad-rows", help="error | skip; default: the recipe's, "
                                                       "else error.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the metrics as JSON here.")] = None,
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="Comma-separated: loss, perplexity (default), "
                                                   "exact_match, token_f1, rouge_l (generated answers vs the data's "
                                                   "targets).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(min=1, help="Generation metrics: longest answer, in "
                                                          "tokens; default: eval.max_new_tokens (64).")] = None,
    normalize: Annotated[Optional[str], typer.Option(help="Before exact_match / token_f1: squad (lowercase, no "
                                                     "punctuation or articles), strip, or none; default: "
                                                     "eval.normalize (squad).")] = None,
    predictions: Annotated[Optional[Path], typer.Option("--predictions", help="Write one JSON line per row "
                                                        "(prompt, prediction, reference) here; in a comparison, a "
                                                        "directory (NAME.jsonl each).")] = None,
    arrow: Arrow = False,
    arrow_top_k: ArrowTopK = None,
    arrow_temperature: ArrowTemperature = None,
    general: General = None,
    task: Task = None,
    split: DataSplit = None,
    data_revision: DataRevision = None,
    overrides: Overrides = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Loss, perplexity and token count of a base model, a base + adapter, or a merged model, counted on the
    same target tokens as in training; with --metrics, task metrics of its greedy answers too."""
    from peftkit.compare import split_named
    from peftkit.evaluate import eval_job, evaluate
    from peftkit.fileio import atomic_write_json

    adapters, merged = adapter or [], merged or []
    json_out, predictions = _expanded(json_out), _expanded(predictions)
    comparing = len(adapters) > 1 or bool(merged) or any(split_named(a) for a in adapters)
    settings = _arrow_settings(arrow, arrow_top_k, arrow_temperature, general, len(adapters))
    if settings is not None and not (comparing and adapters):
        raise PeftkitError("--arrow routes among named adapters: pass them as --adapter NAME=DIR.")
    for path, flag in ((json_out, "--json"), (None if comparing else predictions, "--predictions")):
        if path is not None:
            _check_json_out(path, flag)
    single = _adapter(adapters[0]) if adapters and not comparing else None
    job = eval_job(recipe, overrides or [], _local(model) if model else None, _local(data) if data else None, fmt,
                   single, max_length, batch_size, on_bad_rows, trust_remote_code, metrics, max_new_tokens, normalize,
                   predictions, task, comparing=comparing, split=split, data_revision=data_revision)
    if comparing:
        _compare(job, adapters, merged, predictions, json_out, settings, general or [])
        return
    result = evaluate(job)
    shown = []
    if "perplexity" in result:
        shown.append(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  tokens {result['num_tokens']}")
    elif "loss" in result:  # a classifier: cross-entropy per row, accuracy and macro_f1 follow
        shown.append(f"loss {result['loss']:.4f}  rows {result['num_examples']}")
    shown += [f"{name} {result[name]:.4f}" for name in job.metrics if name in result and name not in ("loss", "perplexity")]
    if "num_rows" in result:
        shown.append(f"rows {result['num_rows']}")
    _said_beside(json_out, predictions).print("  ".join(shown))
    if json_out:
        atomic_write_json(json_out, result)


def _compare(job, adapters: list[str], merged: list[str], predictions: Path | None, json_out: Path | None,
             arrow=None, general: list[str] = ()) -> None:
    """`peftkit eval` with several --adapter NAME=DIR (and --merged NAME=DIR): one table against the base; with
    `arrow` (ArrowSettings), a row of Arrow routing among them too (`general`: GenKnowSub's)."""
    from peftkit.compare import ARROW, compare, comparison_jobs, comparison_table, parse_named
    from peftkit.fileio import atomic_write_json
    from peftkit.rundir import make_writable_dir

    named = [(n, _adapter(p)) for n, p in parse_named(adapters, "--adapter")]
    named_merged = [(n, _local(p)) for n, p in parse_named(merged, "--merged", [n for n, _ in named])]
    if missing := next((n for n in general if n not in [name for name, _ in named]), None):
        raise PeftkitError(f"--general {missing} names none of the --adapter NAME=DIR adapters.")
    if arrow is not None and ARROW in [n for n, _ in named + named_merged]:
        raise PeftkitError(f"--arrow adds a row named {ARROW!r} to the comparison: name that adapter otherwise.")
    routing = (arrow, [n for n, _ in named if n not in general], list(general)) if arrow is not None else None
    made = predictions is not None and not predictions.exists()
    if predictions is not None:
        if predictions.suffix.lower() in (".jsonl", ".json") and not predictions.is_dir():
            raise PeftkitError(f"--predictions {predictions}: a comparison writes one NAME.jsonl per model, into a "
                               f"directory; give a directory (e.g. --predictions {predictions.with_suffix('')}).")
        make_writable_dir(predictions, "--predictions (in a comparison, a directory)")
    try:
        results = compare(comparison_jobs(job, named, named_merged), predictions, routing)
    except BaseException:  # an error or Ctrl-C before any model's predictions: no empty directory left behind
        if made and not any(predictions.iterdir()):
            predictions.rmdir()
        raise
    _said_beside(json_out).print(comparison_table(results, job.metrics))
    if json_out:
        atomic_write_json(json_out, results)


def _said_beside(*outputs: Path | None):
    """The console for what a command says besides its output files: stderr where one of them is this process's
    stdout (`--json /dev/stdout | jq .` reads the JSON alone), else stdout."""
    for path in outputs:
        try:
            if path is not None and os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno())):
                return err_console
        except (OSError, ValueError):  # not there yet; a stdout without a file descriptor
            continue
    return console


def _arrow_settings(arrow: bool, top_k: int | None, temperature: float | None, general: list[str] | None,
                    adapters: int):
    """--arrow's settings (None without it), its flags checked: the top_k default is 3, or the task adapters' count."""
    from peftkit.adapters.arrow import ArrowSettings

    if not arrow and (top_k is not None or temperature is not None):
        raise PeftkitError(f"--arrow-{'top-k' if top_k is not None else 'temperature'} sets Arrow routing: pass "
                           "--arrow too.")
    if general and len(set(general)) < len(general):
        raise PeftkitError(f"--general names {', '.join(general)}: each adapter once.")
    if not arrow:
        return None
    tasks = max(adapters - len(general or []), 1)
    return ArrowSettings(top_k=top_k or min(3, tasks), temperature=1.0 if temperature is None else temperature)


def _adapter_flags(adapters: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """--adapter values: (one plain DIR, or None; the NAME=DIR pairs when several are given or any is named)."""
    from peftkit.compare import parse_named, split_named

    if len(adapters) == 1 and not split_named(adapters[0]):
        return _adapter(adapters[0]), []
    return None, [(n, _adapter(p)) for n, p in parse_named(adapters, "--adapter")]


def _check_json_out(path: Path, flag: str = "--json") -> None:
    """An output file flag must name a file we can write: checked before minutes of evaluation, not after."""
    from peftkit.fileio import special_file
    from peftkit.rundir import make_writable_dir

    if special_file(path):  # /dev/stdout, a pipe: written as it is
        return
    if path.is_dir():
        name = "predictions.jsonl" if flag == "--predictions" else "eval.json"
        raise PeftkitError(f"{flag} {path} is a directory; give a file name, e.g. {flag} {path / name}.")
    make_writable_dir(path.parent, f"{flag}'s directory", create=False)  # made when written: a refused run leaves none


@app.command()
def generate(
    recipe: Annotated[Optional[Path], typer.Argument(help="A recipe, or a run directory (its recipe.yaml; its adapter/ "
                                                     "is the default --adapter). Without --prompt or --data, the "
                                                     "prompts of its data.eval.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Model directory or hub id (base or merged).")] = None,
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", metavar="[NAME=]DIR", help="PEFT adapter directory (or hub id user/name[@REV]) to apply. Repeat "
                                                         "as NAME=DIR to load several, picked per row by --route.")] = None,
    route: Annotated[Optional[str], typer.Option("--route", help="With --data and NAME=DIR adapters: the column naming "
                                                 "each row's adapter (empty or 'base': the base model); all rows "
                                                 "generate in mixed batches.")] = None,
    arrow: Arrow = False,
    arrow_top_k: ArrowTopK = None,
    arrow_temperature: ArrowTemperature = None,
    general: General = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", metavar="TEXT", help="A prompt (repeatable).")] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="Generate for each row's prompt (the prompt training "
                                                "used); the row's target is kept as the reference.")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="alpaca | chat | completion; default: the recipe's, "
                                               "else alpaca.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap each --prompt as a user turn in the chat template.")] = False,
    limit: Annotated[Optional[int], typer.Option(min=1, help="--data: only the first N rows.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Stop after this many new tokens (or at EOS).")] = 128,
    temperature: Annotated[float, typer.Option(help="0 (the default): greedy; > 0: sample.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Sampling: nucleus cut, in (0, 1].")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling: the seed.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch (left-padded).")] = 8,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write [{prompt, completion, reference}, ...] here instead "
                                                     "of printing.")] = None,
    task: Task = None,
    split: DataSplit = None,
    data_revision: DataRevision = None,
    overrides: Overrides = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Generate completions with a base model, a base + adapter, or a merged model: greedy unless
    --temperature > 0, stopping at EOS."""
    from rich.markup import escape
    from rich.text import Text

    from peftkit.fileio import atomic_write_json
    from peftkit.generate import Sampling, generate_job, run_generate

    json_out = _expanded(json_out)
    if json_out is not None:
        _check_json_out(json_out)
    single, named = _adapter_flags(adapter or [])
    prompts = [_typed(text) for text in prompt or []]
    settings = _arrow_settings(arrow, arrow_top_k, arrow_temperature, general, len(named))
    job = generate_job(recipe, overrides or [], _local(model) if model else None, single, prompts,
                       _local(data) if data else None, fmt, chat, limit, Sampling(max_new_tokens, temperature, top_p, seed),
                       batch_size, trust_remote_code, task, named, route, split, data_revision, settings, general)

    def show(prompts, completions) -> None:
        for p, c in zip(prompts, completions, strict=True):
            console.print(Text.assemble((visible(p.text), "dim"), visible(c)), highlight=False)  # no markup in Text
            console.rule(style="dim", characters="─" if console.encoding.startswith("utf") else "-")

    results = run_generate(job, on_batch=None if json_out else show)
    if json_out:
        atomic_write_json(json_out, results)
        _said_beside(json_out).print(f"{len(results)} completions written to {escape(str(json_out))}")


@app.command()
def chat(
    recipe: Annotated[Optional[Path], typer.Argument(help="A recipe, or a run directory (its model; its adapter/ is "
                                                     "the default --adapter).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Model directory or hub id (base or merged).")] = None,
    adapter: Annotated[Optional[str], typer.Option("--adapter", help="PEFT adapter directory (or hub id user/name[@REV]) to apply.")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="A system message opening the conversation.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest reply, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 (the default): greedy; > 0: sample.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Sampling: nucleus cut, in (0, 1].")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling: the seed.")] = 0,
    task: Task = None,
    overrides: Overrides = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Chat with a model in the terminal (its chat template), replies streamed; /reset, /exit."""
    import torch

    from peftkit.chat import chat_loop
    from peftkit.data.checks import guard_token_ids
    from peftkit.data.prompts import chat_prompt
    from peftkit.generate import Sampling
    from peftkit.inference import model_source
    from peftkit.task_ids import resolve_tasks

    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    sampling.check()
    source, _ = model_source(recipe, overrides or [], _local(model) if model else None,
                             _adapter(adapter) if adapter else None, trust_remote_code, "chat")
    tok = source.tokenizer()
    system = _typed(system) if system else None
    opening = [{"role": "system", "content": system}] if system else []
    # No template, or one that refuses a system message: said before the model loads.
    chat_prompt(tok, [*opening, {"role": "user", "content": "probe"}],
                "peftkit chat needs one. Use a model whose tokenizer has a template, or `peftkit generate --prompt "
                "TEXT` to continue plain text")
    task = resolve_tasks(source, task, [None], None)[0]  # and a missing --task
    loaded = source.load()
    guard_token_ids(loaded, tok)
    torch.manual_seed(seed)
    chat_loop(loaded, tok, sampling, read=lambda asked: _typed(input(asked)), system=system, task=task)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (finished or not).")],
    log_scale: Annotated[bool, typer.Option("--log-scale", help="Loss on a log scale.")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", help="Write the report directory here instead of "
                                                  "RUN_DIR/report (a run on read-only storage).")] = None,
) -> None:
    """Write RUN_DIR/report/report.html (self-contained) and its plots as PNGs: loss, learning rate, grad norm,
    tokens/s, peak memory, base vs fine-tuned eval, the recipe and the environment."""
    from rich.markup import escape

    from peftkit.report import write_report

    console.print(f"wrote {escape(str(write_report(run_dir, log_scale, _expanded(output))))}")


@app.command()
def verify(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (with manifest.json).")],
    tolerance: Annotated[float, typer.Option(help="0: identical bits; > 0: compare losses and weights numerically.")] = 0.0,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow re-running a recipe that "
                                                    "records model.trust_remote_code: true (runs the model's own code).")] = False,
) -> None:
    """Check RUN_DIR's files against its manifest, then re-run it in a temporary directory; exit 0 if all
    match, 1 with a report if not."""
    from rich.markup import escape

    from peftkit.verify import verify as run_verify

    report = run_verify(run_dir, tolerance, console, trust_remote_code=trust_remote_code)
    # escape(): the lines quote paths and file names, which are not rich markup; soft_wrap: one line each, greppable.
    for note in report.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    if report.ok:
        console.print(f"[green]verified:[/] {escape(str(report.run_dir))} reproduces"
                      + (" bit for bit." if tolerance == 0 else f" within {tolerance}."), soft_wrap=True)
        return
    for diff in report.differences:
        console.print(f"[red]differs:[/] {escape(diff)}", soft_wrap=True)
    console.print(f"[red]not verified:[/] {escape(str(report.run_dir))}", soft_wrap=True)
    raise typer.Exit(1)


@app.command()
def preview(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")],
    overrides: Overrides = None,
    n: Annotated[int, typer.Option("--n", min=1, help="How many examples to show: the first N rows of data.train.")] = 3,
    show_ids: Annotated[bool, typer.Option("--show-ids", help="Print each token's id after it (shows token boundaries).")] = False,
) -> None:
    """Show the first training examples the way the model sees them: after formatting, the chat template and
    the cut at data.max_length, masked tokens (no loss) apart from trained ones, then the counts training would
    print. Loads the tokenizer, not the model."""
    from peftkit.preview import preview as run_preview
    from peftkit.recipe import load_recipe

    run_preview(load_recipe(recipe, overrides or []), n, console, show_ids=show_ids)


@app.command("inspect")
def inspect_cmd(
    adapter_dir: Annotated[str, typer.Argument(help="A PEFT-format adapter directory (peftkit's or peft's), or a hub id user/name[@REV].")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the facts as one JSON object.")] = False,
) -> None:
    """Describe an adapter from its files: method, base model, targets, ranks, parameters, dtype, size,
    quantization, and whether vLLM would serve it (and why not). Loads no model."""
    import json

    from rich.text import Text

    from peftkit.inspect import describe, inspect_adapter

    info = inspect_adapter(Path(_adapter(adapter_dir)))  # (a str: typer's Path drops the `./` of `./x`)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for line in describe(info):
        console.print(Text(visible(line)), highlight=False)


def _click_exception() -> type:
    """ClickException of the click that Typer runs on: recent Typer vendors its own copy."""
    try:
        from typer._click.exceptions import ClickException
    except ImportError:
        from click.exceptions import ClickException
    return ClickException


INTERRUPTED = 130
"""The exit status of a command stopped by Ctrl-C, or by SIGTERM outside the steps of a training loop."""


def _stop_on_sigterm(_signum, _frame) -> None:
    """SIGTERM outside a training loop's steps (loading, evaluation, export, other commands) stops the command as
    Ctrl-C does, its cleanups run and a word said; it killed the process silently. (The loop's own handler,
    `peftkit.train.StopRequest`, finishes the step and saves a checkpoint.)"""
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: user errors print as one clear message (exit 2), never as a traceback."""
    # Whatever a command leaves (torch's, transformers' and a model's objects) is the OS's to free at exit: frozen,
    # it is passed over by the interpreter's last garbage collections, which took 1.2-1.5 s of every command's end.
    atexit.register(gc.freeze)
    _printable_output()
    if "LOCAL_RANK" in os.environ:  # a launched worker keeps the default: one blocked in a collective must die
        _run_command()
        return
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        _run_command()
    finally:  # (main called in a process that goes on: a test's)
        signal.signal(signal.SIGTERM, previous)


def _typed(text: str) -> str:
    """A text argument (a prompt) as typed. Where the locale could not decode its bytes (a non-UTF-8 locale: Python
    keeps them as lone surrogates, which a tokenizer refuses with a TypeError), they are read as UTF-8."""
    if not any("\udc80" <= c <= "\udcff" for c in text):
        return text
    return os.fsencode(text).decode("utf-8", errors="replace")


def _printable_output() -> None:
    """Where stdout or stderr cannot encode every character (a non-UTF-8 locale, PYTHONIOENCODING=ascii, a Windows
    console), print what they cannot as `\\xe9`-style escapes: a character in a message, a path or a generated text
    crashed the command with UnicodeEncodeError, after the work was done. The bytes of a file name the locale could
    not decode (kept as lone surrogates) are written back as they were."""
    codecs.register_error("peftkit", _escape_unprintable)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") not in ("utf8", "utf16"):
            stream.reconfigure(errors="peftkit")


def _escape_unprintable(error: UnicodeError) -> tuple[str | bytes, int]:
    """The `peftkit` codec error handler: surrogateescape's bytes for lone surrogates, else backslashreplace."""
    text = error.object[error.start:error.end]
    if isinstance(error, UnicodeEncodeError) and all("\udc80" <= c <= "\udcff" for c in text):
        return bytes(ord(c) - 0xDC00 for c in text), error.end
    return codecs.backslashreplace_errors(error)


def _run_command() -> None:
    from rich.markup import escape

    click_error = _click_exception()
    try:
        code = app(standalone_mode=False)
        if code == INTERRUPTED:  # typer's status for a KeyboardInterrupt in a command, which it does not say
            err_console.print("interrupted")
        if isinstance(code, int) and code:
            sys.exit(code)
    except PeftkitError as e:
        # escape(): messages quote user text such as regexes ('[qk]_proj'), which is not rich markup.
        err_console.print(f"[bold red]error:[/] {escape(visible(str(e)))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except PermissionError as e:  # a file or directory of the user's that this user may not read or write
        what = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        err_console.print(f"[bold red]error:[/] {escape(what)}: permission denied. Check that the user running "
                          "peftkit may read it (inputs) or write there (outputs), or choose another path.",
                          highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(e.filename))}: read-only file system. Choose an output "
                          "on writable storage.", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(INTERRUPTED)
    except click_error as e:  # usage errors: unknown option, missing argument
        e.show()
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)


if __name__ == "__main__":
    main()
