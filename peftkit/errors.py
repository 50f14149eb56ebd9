"""User-facing errors.

Anything a user can cause (a bad recipe, a missing file, an adapter for another model) raises
`PeftkitError` with a one-paragraph message that says what is wrong, where, and how to fix it. The CLI
prints it without a traceback; a traceback means a bug in peftkit.
"""

import difflib
from collections.abc import Iterable


class PeftkitError(Exception):
    """An error caused by the user's input, with a message meant to be read as is."""

    exit_code = 2  # the CLI's exit status: 2 for a user mistake; a subclass may say otherwise


class PeftkitWarning(UserWarning):
    """Something to know that does not stop the command (a slower or approximate path was taken); the CLI prints it
    as one `warning:` line on stderr, when it happens."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""
