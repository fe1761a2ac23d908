"""LogFile: appends the run's story to log.txt (its config, one line per epoch, how it ended)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from cnnkit.config import describe_config
from cnnkit.training.events import Events, Handler
from cnnkit.training.handlers.lines import closing_lines, epoch_line

if TYPE_CHECKING:
    from cnnkit.training.context import Run

__all__ = ["LogFile"]


class LogFile:
    """log.txt: the config, one line per epoch, and how the run ended (appended, flushed per line)."""

    def attach(self) -> list[tuple[Events, Handler]]:
        return [
            (Events.STARTED, self.started),
            (Events.EPOCH_COMPLETED, lambda run: self._log(run, epoch_line(run))),
            (Events.COMPLETED, self.completed),
            (Events.INTERRUPTED, self.ended),
            (Events.FAILED, self.ended),
        ]

    def completed(self, run: Run) -> None:
        for line in closing_lines(run):
            self._log(run, line)

    def _log(self, run: Run, line: str) -> None:
        # An append-only log: a kill can at worst cut its last line, never lose earlier ones.
        path = run.dir.log
        try:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}\n")
        except OSError as exc:  # a full disk: name the file (a failed write names none)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc

    def started(self, run: Run) -> None:
        verb = f"resumed after epoch {run.epoch}" if run.resumed else "started"
        self._log(run, f"{verb}: {describe_config(run.config)} · {run.device}")

    def ended(self, run: Run) -> None:
        self._log(run, f"error: {run.error.format_message() if run.error else 'unknown'}")
