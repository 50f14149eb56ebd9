"""What every process of a launch says, said once. The processes that `accelerate launch`, `torchrun` or `peftkit train
--num-processes N` start (torch's launcher sets RANK, WORLD_SIZE and the address of its own store) each read the same
recipe, data and model, so they warn alike and most often fail alike. Only the main process (rank 0) shows a warning,
but one about its own machine's state (`peftkit.errors.LocalWarning`), and an error is shown once: by the main
process, and by another only where it is not the error the main process said (`say_error`), so that an error one
process alone meets is never hidden. Under `--num-processes` peftkit's launcher filters the processes' stderr as well
(`peftkit.launch`); under accelerate's and torch's launchers nothing but the processes themselves can."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

SAME_ERROR_WAIT_S = 10.0
"""How long a process other than the main one, stopped by a user error, waits for the main process's error before it
says its own: processes reach the same point some seconds apart (the main process alone opens the run directory
and writes what the others wait for)."""

_ERROR_KEY = "peftkit/error/"
"""The key in the launcher's store under which the main process leaves its error, per restart of the launch."""


def main_process() -> bool:
    """Whether this process is a launch's main process (rank 0), or runs alone."""
    return os.environ.get("RANK", "0") == "0"


def shows_warning(category: type[Warning]) -> bool:
    """Whether this process shows a PeftkitWarning of `category`: the main process shows all; the others, which say
    what it says, only those about their own machine (a cache, a hub dataset's local copy), which may be theirs
    alone."""
    from peftkit.errors import LocalWarning

    return main_process() or issubclass(category, LocalWarning)


def say_error(show: Callable[[], None], text: str) -> None:
    """Show a user error (`show()` prints it; `text`, its words) once for the processes of a launch. The main process
    shows it and leaves `text` in the launcher's store; another process shows its own unless the main process's is
    the very same text, waiting up to SAME_ERROR_WAIT_S for it (on SIGTERM, the launcher stopping it because another
    process ended, it looks once more and then decides). Only an error the main process has said is left unsaid, so
    one that a single process meets (its machine's files, a different failure) is always shown. Outside a launch of
    several processes, or where the store cannot be reached: shown."""
    key = _ERROR_KEY + os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if main_process():
        show()  # first: once the others read it, they end, and the launcher stops this process
        if (store := _launch_store()) is not None:
            _leave(store, key, text)
    elif (store := _launch_store()) is None or _main_error(store, key) != text:
        show()


def _launch_store():
    """A client of the store torch's launcher (its agent) keeps for this launch's processes; None outside a launch of
    several processes or where it does not answer."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    from torch.distributed import TCPStore

    try:
        return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                        timeout=timedelta(seconds=5), wait_for_workers=False)
    except (KeyError, ValueError, RuntimeError):
        return None


def _leave(store, key: str, text: str) -> None:
    try:
        store.set(key, text)
    except RuntimeError:  # the launcher went: no process is left to compare
        pass


def _main_error(store, key: str) -> str | None:
    """The main process's error text, waited for as `say_error` says; None when it said none."""
    stopped: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _: stopped.append(signum))
    deadline = time.monotonic() + SAME_ERROR_WAIT_S
    try:
        while not stopped and time.monotonic() < deadline and not store.check([key]):
            time.sleep(0.05)
        return store.get(key).decode("utf-8", "replace") if store.check([key]) else None
    except RuntimeError:  # the store's connection broke: the launcher went
        return None
    finally:
        signal.signal(signal.SIGTERM, previous)
