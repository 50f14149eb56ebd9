"""How the `peftkit` process runs a command: user errors as one clear message (never a traceback), Ctrl-C and
SIGTERM as an interruption, output a terminal cannot encode as escapes."""

from __future__ import annotations

import atexit
import codecs
import errno
import gc
import os
import signal
import sys

import typer

from peftkit.cli.application import app, err_console
from peftkit.errors import PeerFailed, PeftkitError, Terminated, visible


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
    raise Terminated


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
    click_error = _click_exception()
    try:
        code = app(standalone_mode=False)
        if code == INTERRUPTED:  # typer's status for a KeyboardInterrupt in a command, which it does not say
            err_console.print("interrupted")
        if isinstance(code, int) and code:
            sys.exit(code)
    except PeftkitError as e:
        _error(str(e), stopped=isinstance(e, PeerFailed))
        sys.exit(e.exit_code)
    except PermissionError as e:  # a file or directory of the user's that this user may not read or write
        what = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
        said = (f"{what}: permission denied. Check that the user running peftkit may read it (inputs) or write there "
                "(outputs), or choose another path.")
        _error(said)
        sys.exit(2)
    except OSError as e:
        if e.errno != errno.EROFS:
            raise
        said = f"{e.filename}: read-only file system. Choose an output on writable storage."
        _error(said)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(INTERRUPTED)
    except click_error as e:  # usage errors: unknown option, missing argument
        e.show()
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)


def _error(text: str, stopped: bool = False) -> None:
    """Print `text` as one `error:` line, once for the processes of a launch (`peftkit.said_once.say_error`: a
    process whose error the main process said exits with its status, quietly; `stopped`, a process that another's
    failure stopped: `peftkit.said_once.say_stopped`)."""
    from rich.markup import escape

    from peftkit.said_once import say_error, say_stopped

    # escape(): messages quote user text such as regexes ('[qk]_proj'), which is not rich markup.
    markup = f"[bold red]error:[/] {escape(visible(text))}"
    (say_stopped if stopped else say_error)(lambda: err_console.print(markup, highlight=False, soft_wrap=True), text)
