"""What a run shows while it trains, and while other long work runs (tokenizing a dataset, an evaluation): rich's
live bar on a terminal, plain lines everywhere else.

A live bar redraws one line in place; written to a file (nohup, a cluster job, CI) it appears once, at the
end, and a 20-minute run's log holds nothing in between. So when the console is not a terminal, progress is
a plain line every `interval_s` seconds or every tenth of the run, whichever comes first, plus the first and
the last step: about a dozen lines for a short run, one every 30 s for a long one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta

from rich.console import Console


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _train_bar_class():
    """The live bar's class: rich.progress is imported only on a terminal."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class TrainBar(Progress):
        """`train ━━━ 120/1000 loss 1.2345  lr 2.00e-04  3,210 tok/s 0:01:02 ETA 0:07:35` on one line where the
        terminal is wide enough; on a narrower one (a split pane, ~70 columns for 1000 steps) the figures move to a
        line of their own under the bar. One line cut to fit cropped every column alike: `120/…`, `0:01…`."""

        MIN_BAR = 5  # columns of bar worth showing

        def __init__(self, console: Console) -> None:
            self.figures_column = TextColumn("{task.fields[figures]}")
            self.one_line = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), self.figures_column,
                             TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            super().__init__(*self.one_line, console=console, transient=False)

        def get_renderables(self):
            if not self.tasks:  # (rich renders once before the task is added)
                yield from super().get_renderables()
                return
            task = self.tasks[0]
            figures = task.fields["figures"]
            total = f"{task.total:.0f}"
            # train, bar, 1000/1000, figures, elapsed, ETA and its time (H:MM:SS), 6 gaps
            needed = len("train") + self.MIN_BAR + 2 * len(total) + 1 + len(figures) + 7 + len("ETA") + 7 + 6
            self.columns = self.one_line if needed <= self.console.width else tuple(
                c for c in self.one_line if c is not self.figures_column)
            yield self.make_tasks_table(self.tasks)
            if self.columns is not self.one_line:
                yield Text(f"  {figures}", no_wrap=True, overflow="ellipsis")

    return TrainBar


class TrainProgress:
    """Progress of the training loop from `start_step` to `total` optimizer steps.

    Args:
        console: where it goes; `console.is_terminal` picks the live bar or plain lines.
        interval_s: the longest gap between two plain lines.
    """

    def __init__(self, console: Console, total: int, start_step: int = 0, interval_s: float = 30.0) -> None:
        self.console, self.total, self.start_step, self.interval_s = console, total, start_step, interval_s
        self.every = max(1, -(-total // 10))  # a tenth of the run, rounded up
        self.started = self.last_line = time.monotonic()
        self.latest: tuple | None = None  # the last update's figures, and whether a plain line showed them
        self.bar = None
        if console.is_terminal:
            self.bar = _train_bar_class()(console)
            # Until a step ends there are no figures to show (a loss of nan would read as a diverged run).
            self.task = self.bar.add_task("train", total=total, completed=start_step, figures="first step running")

    def __enter__(self) -> TrainProgress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        """Called at each logged step."""
        if self.bar is not None:
            self.bar.update(self.task, completed=step, figures=f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s")
            return
        now = time.monotonic()
        due = (step == self.start_step + 1 or step == self.total or step % self.every == 0
               or now - self.last_line >= self.interval_s)
        self.latest = (step, loss, lr, tokens_per_s, due)
        if due:
            self._line(step, loss, lr, tokens_per_s, now)

    def skipped(self, step: int) -> None:
        """A step skipped for a non-finite loss (training.nan_policy: skip_step; a line of its own says so): the bar
        moves on with it, or stayed a step short of the end when the last step was the one skipped."""
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def _line(self, step: int, loss: float, lr: float, tokens_per_s: float, now: float) -> None:
        self.last_line = now
        elapsed = now - self.started
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else 0.0
        self.console.print(
            f"step {step}/{self.total} ({100 * step / self.total:.0f}%)  loss {loss:.4f}  lr {lr:.2e}  "
            f"{tokens_per_s:,.0f} tok/s  elapsed {_clock(elapsed)}  ETA {_clock(eta)}", highlight=False, soft_wrap=True)

    def stopped(self) -> None:
        """The run ends before its last planned step (early stopping): a log gets the last step's line too."""
        if self.bar is None and self.latest is not None and not self.latest[-1]:
            self._line(*self.latest[:-1], time.monotonic())
            self.latest = None

    def note(self, text: str) -> None:
        """A line of its own (an evaluation's result), above the live bar when there is one."""
        self.console.print(text, highlight=False, soft_wrap=True)


_WORK_CONSOLE: Console | None = None


def show_work_on(console: Console | None) -> None:
    """Where `work` shows its progress (the CLI's console); None: nowhere (the library, called from Python)."""
    global _WORK_CONSOLE
    _WORK_CONSOLE = console


@contextlib.contextmanager
def work(label: str, total: int, unit: str, interval_s: float = 30.0) -> Iterator[Callable[[int], None]]:
    """Progress of `total` units of work other than training; yields `advance(n=1)`. On a terminal, a bar that
    goes when the work ends; elsewhere a plain line every `interval_s` seconds (none for work that ends sooner).
    Only the main process of several shows it. Inside another live display (a status line) rich 15 stacks the bar
    under it; an older rich refuses two at once, and then the status line alone says what is going on."""
    console = _WORK_CONSOLE
    if console is None or total <= 0 or os.environ.get("RANK", "0") != "0":
        yield lambda n=1: None
        return
    if console.is_terminal:
        from rich.errors import LiveError
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        bar = Progress(TextColumn(label.replace("[", r"\[")), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)
        task = bar.add_task(label, total=total)
        try:
            bar.start()
        except LiveError:  # rich < 15, inside another live display
            yield lambda n=1: None
            return
        try:
            yield lambda n=1: bar.advance(task, n)
        finally:
            bar.stop()
        return
    started = last = time.monotonic()
    done = 0

    def advance(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last >= interval_s and done < total:
            last = now
            eta = (now - started) / done * (total - done)
            console.print(f"{label}: {done:,}/{total:,} {unit} ({100 * done / total:.0f}%)  elapsed "
                          f"{_clock(now - started)}  ETA {_clock(eta)}", highlight=False, markup=False, soft_wrap=True)

    yield advance


PHASE_INTERVAL_S = 30.0
"""The longest a log goes without a line during a `phase`."""


def counted(n: int, noun: str) -> str:
    """`n` things in words a label can hold: "1 sample", "2 samples" (`eval.samples: 1` printed "1 samples")."""
    return f"{n:,} {noun}{'s' * (n != 1)}"


@contextlib.contextmanager
def phase(label: str, console: Console | None = None) -> Iterator[None]:
    """A stretch of work with nothing to count (loading a model, generating samples, a merge): on a terminal, a
    spinner with `label`; elsewhere a line every PHASE_INTERVAL_S seconds while it lasts (none for work that ends
    sooner), so that a log is never silent for minutes. `console`: default `work`'s (the CLI's)."""
    console, interval_s = console or _WORK_CONSOLE, PHASE_INTERVAL_S
    if console is None or os.environ.get("RANK", "0") != "0":
        yield
        return
    if console.is_terminal:
        from rich.errors import LiveError
        from rich.text import Text

        status = console.status(Text(label))  # a label holds paths: `[...]` in one is no markup
        try:
            status.start()
        except LiveError:  # rich < 15, inside another live display: that one says what is going on
            yield
            return
        try:
            yield
        finally:
            status.stop()
        return
    ended, started = threading.Event(), time.monotonic()

    def beat() -> None:
        while not ended.wait(interval_s):
            console.print(f"{label} (still running, {_clock(time.monotonic() - started)})", highlight=False,
                          markup=False, soft_wrap=True)

    thread = threading.Thread(target=beat, name="peftkit-phase", daemon=True)
    thread.start()
    try:
        yield
    finally:
        ended.set()
        thread.join()
