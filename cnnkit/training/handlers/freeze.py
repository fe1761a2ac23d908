"""Freezer: ``--freeze backbone`` trains only the model's head, and ``--freeze-epochs N`` unfreezes
the whole model when epoch N+1 starts (a resumed run past N starts unfrozen)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnnkit.errors import UsageError
from cnnkit.training.events import Events, Handler
from cnnkit.training.finetune import Frozen, freeze_backbone

if TYPE_CHECKING:
    from cnnkit.training.context import Run

__all__ = ["Freezer"]


class Freezer:
    """Freezes all but ``head`` at the start (the frozen part's BatchNorm in eval mode), unfreezes after ``epochs``."""

    def __init__(self, model: str, head: str | None, epochs: int | None, quiet: bool) -> None:
        if head is None:
            raise UsageError(f"--freeze backbone needs model '{model}' to say where its head is, and its spec does not")
        self.head = head
        self.epochs = epochs
        self.quiet = quiet
        self.frozen: Frozen | None = None

    def attach(self) -> list[tuple[Events, Handler]]:
        return [(Events.STARTED, self.started), (Events.EPOCH_STARTED, self.epoch_started)]

    def _say(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)

    def started(self, run: Run) -> None:
        if self.epochs is not None and run.first_epoch > self.epochs:
            return  # resumed after the unfreezing
        self.frozen = frozen = freeze_backbone(run.model, self.head)
        until = f" for {self.epochs} epoch{'' if self.epochs == 1 else 's'}, then the whole model" if self.epochs is not None else ""
        self._say(
            f"backbone frozen: training head '{self.head}' only ({frozen.trainable:,} of {frozen.total:,} "
            f"parameters){until}; {len(frozen.hooks)} frozen BatchNorm layers kept in eval mode"
        )

    def epoch_started(self, run: Run) -> None:
        if self.frozen is None or self.epochs is None or run.epoch <= self.epochs:
            return
        self.frozen.release()
        self._say(f"epoch {run.epoch}: backbone unfrozen, the whole model trains ({self.frozen.total:,} parameters)")
        self.frozen = None
