"""EarlyStopping: ends the run after ``patience`` epochs without a better validation metric (``config.monitor``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnnkit.training.events import Events, Handler

if TYPE_CHECKING:
    from cnnkit.training.context import Run

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Stops the run after ``patience`` epochs without a better validation metric (``config.monitor``)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def attach(self) -> list[tuple[Events, Handler]]:
        return [(Events.EPOCH_COMPLETED, self.check)]

    def check(self, run: Run) -> None:
        if run.epoch - run.best_epoch >= self.patience:
            run.should_stop = True
