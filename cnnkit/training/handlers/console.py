"""Console: shows the run's progress on the terminal (a live bar on stderr, lines on stdout)."""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from cnnkit.config import describe_config
from cnnkit.training.events import Events, Handler
from cnnkit.training.handlers.lines import closing_lines, epoch_line, per_class_lines

if TYPE_CHECKING:
    from cnnkit.training.context import Run

__all__ = ["Console"]


class Console:
    """Progress, decided by the stream each part goes to.

    - A live bar on **stderr** when stderr is a terminal, so ``cnnkit train | tee log`` still shows
      it; it is only on screen during an epoch and erased before the epoch line is printed.
    - One line per epoch on **stdout**; on a terminal it is broken between fields to fit its width.
    - Without a bar (logs, CI): also a progress line every ``log_every`` seconds of a long epoch.
    - Quiet: nothing but the closing lines.
    """

    LOG_EVERY = 30.0
    """Seconds between progress lines in logs."""

    def __init__(self, quiet: bool, log_every: float = LOG_EVERY) -> None:
        from rich.console import Console as RichConsole
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.quiet = quiet
        self.log_every = log_every
        bar_console = RichConsole(stderr=True, highlight=False, markup=False)
        self.live = not quiet and bar_console.is_interactive
        # Warnings (stderr) print above the bar; stdout is left alone so that its lines stay on it.
        self._progress: Any = (
            Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                console=bar_console, transient=True, redirect_stdout=False, redirect_stderr=True,
            )  # fmt: skip
            if self.live
            else None
        )
        self._task: Any = None
        self._started = 0.0
        self._next_line = math.inf

    def attach(self) -> list[tuple[Events, Handler]]:
        return [
            (Events.STARTED, self.started),
            (Events.EPOCH_STARTED, self.epoch_started),
            (Events.ITERATION_COMPLETED, self.iteration_completed),
            (Events.EPOCH_COMPLETED, self.epoch_completed),
            (Events.COMPLETED, self.completed),
            (Events.INTERRUPTED, self.stop),
            (Events.FAILED, self.stop),
        ]

    def _print(self, line: str, separator: str = "  ") -> None:
        for part in _fit_to_terminal(line, separator):
            print(part, flush=True)

    def started(self, run: Run) -> None:
        if self.quiet:
            return
        data = run.data
        where = f"resuming {run.dir} after epoch {run.epoch}" if run.resumed else f"run {run.dir}"
        amp = f" · amp {str(run.amp_dtype).removeprefix('torch.')}" if run.amp_dtype else ""
        self._print(describe_config(run.config), " · ")
        self._print(
            f"{data.name}: {len(data.train)} train / {len(data.val) if data.val is not None else 0} val / "
            f"{len(data.test)} test, {len(data.classes)} classes · "
            f"{run.device}{amp}{' · compiled' if run.config.compile else ''} · {where}",
            " · ",
        )

    def epoch_started(self, run: Run) -> None:
        self._started = time.perf_counter()
        self._next_line = self._started + self.log_every
        if self._progress is not None:
            # No rate or loss until the first report: nothing rather than "loss nan".
            self._task = self._progress.add_task(
                f"epoch {run.epoch}/{run.config.epochs}", total=len(run.data.train), status=""
            )
            self._progress.start()

    def iteration_completed(self, run: Run) -> None:
        now = time.perf_counter()
        rate = run.seen / max(now - self._started, 1e-9)
        loss = f"  loss {run.loss:.3f}" if run.loss is not None else ""
        if self._progress is not None:
            self._progress.update(self._task, completed=run.seen, status=f"{rate:>7.0f} ex/s{loss}")
        elif not self.quiet and now >= self._next_line:
            self._next_line = now + self.log_every
            total = len(run.data.train)
            self._print(
                f"epoch {run.epoch}/{run.config.epochs}  {run.seen}/{total} ({100 * run.seen / max(total, 1):.0f}%)  "
                f"{rate:.0f} ex/s{loss}"
            )

    def epoch_completed(self, run: Run) -> None:
        self.stop(run)
        if not self.quiet:
            self._print(epoch_line(run))

    def completed(self, run: Run) -> None:
        self.stop(run)
        if not self.quiet:
            for line in per_class_lines(run):
                print(line, flush=True)
        for line in closing_lines(run):
            self._print(line)

    def stop(self, run: Run) -> None:
        """Erase the bar (it is transient), so the next line starts on a clean row."""
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
                self._task = None
            self._progress.stop()


def _fit_to_terminal(line: str, separator: str = "  ") -> list[str]:
    """``line`` as it is, or, when stdout is a terminal narrower than it, broken between its fields
    (joined by ``separator``) with continuation lines indented: never a wrap inside a field."""
    try:
        width = os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else 0
    except (AttributeError, ValueError, OSError):  # no real file descriptor (tests, notebooks)
        width = 0
    if width <= 0 or len(line) <= width:
        return [line]
    lines: list[str] = []
    current = ""
    for field in line.split(separator):
        candidate = f"{current}{separator}{field}" if current else field
        if current and len(candidate) > width:
            lines.append(current)
            candidate = f"    {field}"
        current = candidate
    lines.append(current)
    return lines
