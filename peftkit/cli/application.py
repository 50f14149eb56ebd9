"""The Typer application every command registers on, its consoles, and what runs around every command."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console

from peftkit.errors import PeftkitWarning, visible

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


def _print_version(asked: bool) -> None:
    """`peftkit --version`: peftkit's version and the digest of its code (a checkout's edits change the digest, not the
    number), then the versions of what a run depends on and the accelerator, as a run's manifest records them: what
    a bug report needs."""
    if not asked:
        return
    from peftkit.manifest import versions

    found = versions()
    console.print(f"peftkit {found.pop('peftkit')} (source {found.pop('peftkit source')})", highlight=False)
    console.print(", ".join(f"{name} {version}" for name, version in found.items()), highlight=False)
    console.print(f"device: {device_line()}", highlight=False)
    raise typer.Exit()


def device_line() -> str:
    """The accelerator torch sees: a CUDA or ROCm GPU (ROCm's torch answers to torch.cuda, its version in
    torch.version.hip), Apple's MPS, or none."""
    import torch

    if torch.cuda.is_available():
        backend = f"rocm {torch.version.hip}" if torch.version.hip else f"cuda {torch.version.cuda}"
        return f"{backend}, {torch.cuda.get_device_name(0)}"
    if torch.backends.mps.is_available():
        return "mps (Apple GPU)"
    return "no GPU (cpu)"


@app.callback()
def _every_command(ctx: typer.Context, version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version,
        help="Print peftkit's version, its dependencies' and the device, then exit.")) -> None:
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
    several models; in a launch of several processes, by the main one, as `peftkit.said_once.shows_warning` says),
    others as Python does."""
    from rich.text import Text

    from peftkit.said_once import shows_warning

    shown: set[str] = set()

    def show(message, category, *where) -> None:
        if issubclass(category, PeftkitWarning):
            if str(message) not in shown and shows_warning(category):
                shown.add(str(message))
                err_console.print(Text.assemble(("warning:", "yellow"), f" {visible(str(message))}"), highlight=False)
        else:
            show_other(message, category, *where)
    return show


def said_beside(*outputs: Path | None):
    """The console for what a command says besides its output files: stderr where one of them is this process's
    stdout (`--json /dev/stdout | jq .` reads the JSON alone), else stdout."""
    for path in outputs:
        try:
            if path is not None and os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno())):
                return err_console
        except (OSError, ValueError):  # not there yet; a stdout without a file descriptor
            continue
    return console
