"""What every process of a launch says, said once. The processes that `accelerate launch`, `torchrun` or `peftkit train
--num-processes N` start (torch's launcher sets RANK, WORLD_SIZE and the address of its own store) each read the same
recipe, data and model, so they warn alike and most often fail alike. Only the main process (rank 0) shows a warning,
but one about its own machine's state (`peftkit.errors.LocalWarning`), and an error is shown once: by the main
process, and by another only where it is not the error the main process said (`say_error`), so that an error one
process alone meets is never hidden. Under `--num-processes` peftkit's launcher filters the processes' stderr as well
(`peftkit.launch`); under accelerate's and torch's launchers nothing but the processes themselves can. A process
whose collective broke because another process failed says one line in place of that collective's traceback, once
(`stopped_by_another`, `say_stopped`), after the failed process said its own error."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable

from peftkit.errors import PeerFailed

SAME_ERROR_WAIT_S = 10.0
"""How long a process other than the main one, stopped by a user error, waits for the main process's error before it
says its own: processes reach the same point some seconds apart (the main process alone opens the run directory
and writes what the others wait for)."""

_ERROR_KEY = "peftkit/error/"
"""The key in the launcher's store under which the main process leaves its error, per restart of the launch."""

PEER_ERROR_WAIT_S = 10.0
"""How long a process stopped by another's failure (`say_stopped`) waits before it ends: the launcher stops it
(SIGTERM) once the failed process has said its error and ended, so that error comes first and the launcher's summary
names that process as the first failure. (A launcher on another machine stops only its own processes.)"""

_FAILED_KEY = "peftkit/failed/"
"""The key in the launcher's store under which the first process of a launch to fail leaves its rank, per restart."""


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
    process ended, or SIGINT, a Ctrl-C, where it raised KeyboardInterrupt with a traceback: it looks once more and
    then decides). Only an error the main process has said is left unsaid, so one that a single process meets (its
    machine's files, a different failure) is always shown. Outside a launch of several processes, or where the
    store cannot be reached: shown."""
    key = _ERROR_KEY + _restart()
    if main_process():
        show()  # first: once the others read it, they end, and the launcher stops this process
        if (store := _launch_store()) is not None:
            _leave(store, key, text)
    elif (store := _launch_store()) is None or _main_error(store, key) != text:
        show()


def stopped_by_another(error: BaseException) -> PeerFailed | None:
    """The one-line error to say in place of `error` where another process of the launch failed first and `error`
    is a RuntimeError, what a collective raises when a peer leaves (gloo's 'Connection closed by peer', NCCL's
    DistBackendError, a timeout); None otherwise, `error` to be said as it is. Every process of a launch whose run
    stops calls it before it leaves the process group (`distributed.close`), and the first to call it leaves its rank
    in the launcher's store: the others' collectives break only once a failed process has left, so each of them
    finds that process there. A collective that broke with no failure before it (a network or NCCL fault) is the
    first failure, and its traceback is shown. Outside a launch of several processes: None."""
    if (store := _launch_store()) is None:
        return None
    rank = os.environ["RANK"]
    try:  # compare_set sets the key only where it is not set yet, atomically: the first failure's rank stays
        first = store.compare_set(_FAILED_KEY + _restart(), "", rank).decode()
    except RuntimeError:  # the launcher went
        return None
    if first == rank or not isinstance(error, RuntimeError):
        return None
    # The error's own words, kept short: gloo's first sentence without its source location ('[.../pair.cc:553] ').
    said = re.sub(r"^\[[^\]]*\] ", "", (str(error).strip().splitlines() or [""])[0]).split(". ")[0][:200]
    return PeerFailed(f"process {rank} stopped: process {first} failed, and its error is shown by it (process "
                      f"{rank} met {type(error).__name__}: {said}).")


def say_stopped(show: Callable[[], None], text: str) -> None:
    """Show `text`, a `PeerFailed` line, once for the processes of a launch: by the main process (another that it
    stopped says nothing: the main process failed, its error shown, or says this), after the failed process said its
    error and ended. Each waits for the launcher to stop it (SIGTERM), up to PEER_ERROR_WAIT_S; the main process
    first leaves `text` where a failed process waiting for its error (`say_error`) reads that it is another. A Ctrl-C
    (SIGINT) ends the wait as SIGTERM does: the line is said, and the process exits as a stopped one (PeerFailed's
    status), where it raised KeyboardInterrupt with a traceback."""
    with _sigterm_noted(signal.SIGINT) as stopped:
        if main_process() and (store := _launch_store()) is not None:
            _leave(store, _ERROR_KEY + _restart(), text)
        deadline = time.monotonic() + PEER_ERROR_WAIT_S
        while not stopped and time.monotonic() < deadline:
            time.sleep(0.05)
    if main_process():
        show()


def _restart() -> str:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")


@contextlib.contextmanager
def _sigterm_noted(*also: int):
    """SIGTERM (the launcher stopping this process because another one ended), and the signals `also` (SIGINT: a
    Ctrl-C), appended to the list yielded, not obeyed."""
    stopped: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _: stopped.append(signum))
                for signum in (signal.SIGTERM, *also)}
    try:
        yield stopped
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
    deadline = time.monotonic() + SAME_ERROR_WAIT_S
    try:
        with _sigterm_noted(signal.SIGINT) as stopped:
            while not stopped and time.monotonic() < deadline and not store.check([key]):
                time.sleep(0.05)
        return store.get(key).decode("utf-8", "replace") if store.check([key]) else None
    except RuntimeError:  # the store's connection broke: the launcher went
        return None
