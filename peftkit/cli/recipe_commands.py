"""The commands of a recipe and its run: train, validate, report, verify, preview."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from peftkit.cli.application import app, console, err_console
from peftkit.cli.options import Overrides, user_path


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
    from peftkit.recipe import load_recipe, recorded
    from peftkit.train import train as run_train

    cfg = load_recipe(recipe, overrides or [])  # a recipe mistake shows here, once, before any process starts
    from peftkit.rundir import check_recipe_file

    check_recipe_file(recipe, Path(cfg.export.output_dir), recorded(cfg).to_yaml())
    if num_processes > 1 and "LOCAL_RANK" not in os.environ:
        from peftkit.launch import launch

        argv = ["train", str(recipe), *(f"--set={o}" for o in overrides or []), *(["--resume"] if resume else []),
                *(["--overwrite"] if overwrite else []), *(["--no-cache"] if no_cache else [])]
        raise typer.Exit(launch(num_processes, argv))
    from peftkit.distributed import close
    from peftkit.said_once import stopped_by_another

    try:
        run_train(cfg, resume=resume, overwrite=overwrite, console=console, cache=not no_cache)
    except BaseException as e:
        stopped = stopped_by_another(e)  # (before close: the others' collectives break once this process leaves)
        close(finished=False)  # the others may be in a collective this process left: no waiting for them
        if stopped is None:
            raise
        raise stopped from None  # another process failed first: one line here, its error said by it
    close()


@app.command()
def validate(recipe: Annotated[Path, typer.Argument(help="The recipe YAML file.")], overrides: Overrides = None) -> None:
    """Check a recipe and print it fully resolved (every default, absolute paths) as a run's recipe.yaml records it (hub
    adapters pinned to a commit), or its errors. Where its model is here (a local directory, or a hub id in the local
    Hugging Face cache), also train's refusals that its config.json, tokenizer and an empty model decide, reading no
    weight."""
    from rich.markup import escape

    from peftkit.errors import PeftkitError
    from peftkit.model_checks import check_model, memory_line, unavailable
    from peftkit.recipe import load_recipe, recorded
    from peftkit.recipe.loader import located

    missing: list[str] = []
    resolved = load_recipe(recipe, overrides or [], missing_adapters=missing)
    absent = _absent_paths(resolved, missing)
    # The adapters a recipe starts from (fused ones, a source) are read by the checks: missing, they are skipped.
    skipped = next((f"{key} is not here" for key, _ in absent if key.startswith("adapter.")), None) \
        or unavailable(resolved)
    try:
        checked = check_model(resolved) if skipped is None else None
        memory = memory_line(resolved) if checked else None
    except PeftkitError as e:  # train's words, at the line (or --set) of the key they name, as the recipe's errors
        placed = PeftkitError(located(recipe, overrides or [], str(e)))
        placed.exit_code = e.exit_code  # (a subclass's own status)
        raise placed from None
    console.print(f"# {recipe}: valid", style="green", markup=False)
    if checked:  # a YAML comment, as the line above: what is printed stays the recipe
        console.print(f"# model checks (no weight read): {checked}", markup=False, highlight=False, soft_wrap=True)
        if memory:
            console.print(f"# {memory}", markup=False, highlight=False, soft_wrap=True)
    else:
        err_console.print(f"[yellow]note:[/] model checks skipped: {escape(skipped)}.", highlight=False)
    for _, warning in absent:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    print(recorded(resolved).to_yaml(), end="")  # as train writes it: hub adapters pinned, not this cache's paths


def _absent_paths(resolved, missing: list[str]) -> list[tuple[str, str]]:
    """(key, warning) for each path of the recipe that is not here: train would stop at it. A warning, not an error:
    the recipe may be meant for another machine. `missing`: load_recipe's messages of adapters that could be hub ids
    too (why neither is there)."""
    adapter = resolved.adapter
    # The adapters a method is built from: AdapterFusion's, X-LoRA's experts.
    sources = [(f"adapter.fuse[{i}]", value) for i, value in enumerate(getattr(adapter, "fuse", None) or [])]
    sources += [(f"adapter.adapters.{name}", value)  # (as load_recipe's messages name them)
                for name, value in (adapter.adapters.items() if adapter.method == "xlora" else ())]
    data = [(f"data.{key}", source) for key, source, _ in resolved.data.sources()]
    absent = []
    for key, value in (("model.name_or_path", resolved.model.name_or_path), *data, *sources,
                       ("adapter.source_adapter", getattr(adapter, "source_adapter", None))):
        # A value the recipe's rules take for a local path (not a hub id) should be there.
        if value and Path(value).is_absolute() and not Path(value).exists() and not any(key in m for m in missing):
            absent.append((key, (f"{key} {value} does not exist here (a relative path is resolved against the "
                                 "recipe's directory); train would stop at it.")))
    adapters = [key for key, _ in sources] + ["adapter.source_adapter"]
    return absent + [(next((key for key in adapters if key in m), "adapter"), f"{m} Train would stop at it.")
                     for m in missing]


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

    console.print(f"wrote {escape(str(write_report(run_dir, log_scale, user_path(output))))}")


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
