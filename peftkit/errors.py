"""User-facing errors.

Anything a user can cause (a bad recipe, a missing file, an adapter for another model) raises
`PeftkitError` with a one-paragraph message that says what is wrong, where, and how to fix it. The CLI
prints it without a traceback; a traceback means a bug in peftkit.
"""

import difflib
import re
from collections.abc import Iterable


class PeftkitError(Exception):
    """An error caused by the user's input, with a message meant to be read as is."""

    exit_code = 2  # the CLI's exit status: 2 for a user mistake; a subclass may say otherwise


class Stopped(PeftkitError):
    """A run stopped as asked (SIGINT, SIGTERM), after saving a checkpoint to go on from."""


class PeerFailed(PeftkitError):
    """A process of a launch stopped because another one failed (a collective broke as that process left): that
    process says its own error, and this one a line (`peftkit.said_once.stopped_by_another`) in place of the broken
    collective's traceback."""

    exit_code = 1  # a failure, not a user mistake of this process's


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C is (`peftkit.cli.run`): what stops a reply at a Ctrl-C (chat) still ends on it."""


class PeftkitWarning(UserWarning):
    """Something to know that does not stop the command (a slower or approximate path was taken); the CLI prints it
    as one `warning:` line on stderr, when it happens."""


class LocalWarning(PeftkitWarning):
    """A PeftkitWarning about this machine's own state (its tokenized-data cache, its copy of a hub dataset), not
    about the recipe or the data: the tokenized-data cache does not keep it with the examples to say again
    (`peftkit.data.cache.kept_warnings`), and every process of a launch shows it, where the main process alone shows
    the others, which every process says alike (`peftkit.said_once`)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """`text` to print on a terminal, with its control characters shown as `\\x1b`, not obeyed: text from a file
    (a path or name in an adapter's config, a dataset row, a generated answer) could clear the screen, or move the
    cursor to write a fake line over an error. Newlines and tabs stay (a carriage return rich drops itself)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
