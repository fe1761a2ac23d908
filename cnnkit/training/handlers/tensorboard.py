"""TensorBoard: writes each epoch's metrics as TensorBoard scalars (optional tensorboard package)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cnnkit.errors import UsageError
from cnnkit.training.events import Events, Handler

if TYPE_CHECKING:
    from cnnkit.training.context import Run

__all__ = ["TensorBoard"]


class TensorBoard:
    """Scalars per epoch under the run's ``tb/`` folder (needs the optional tensorboard package)."""

    def __init__(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise UsageError(
                "--tensorboard needs the tensorboard package: pip install 'cnnkit[tensorboard]' (or drop --tensorboard)"
            ) from exc
        self._writer_class = SummaryWriter
        self._writer: Any = None

    def attach(self) -> list[tuple[Events, Handler]]:
        return [
            (Events.STARTED, self.started),
            (Events.EPOCH_COMPLETED, self.epoch_completed),
            *[(event, self.close) for event in (Events.COMPLETED, Events.INTERRUPTED, Events.FAILED)],
        ]

    def started(self, run: Run) -> None:
        self._writer = self._writer_class(log_dir=str(run.dir.tensorboard))

    def epoch_completed(self, run: Run) -> None:
        for key, value in run.metrics.items():
            if key != "epoch":
                self._writer.add_scalar(key, value, int(run.metrics["epoch"]))
        self._writer.flush()

    def close(self, run: Run) -> None:
        if self._writer is not None:
            self._writer.close()
