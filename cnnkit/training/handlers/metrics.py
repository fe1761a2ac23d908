"""MetricsCSV: writes metrics.csv, the table of per-epoch metrics."""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING

from cnnkit.fs import write_text
from cnnkit.training.events import Events, Handler

if TYPE_CHECKING:
    from cnnkit.training.context import Run

__all__ = ["METRIC_COLUMNS", "MetricsCSV", "metric_columns"]

METRIC_COLUMNS = (
    "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "examples_per_s",
    "epoch_seconds",
)  # fmt: skip
"""The columns metrics.csv may have, in order: val_* when the run has a val split, test_* with
--test-every-epoch (and in runs from before validation splits)."""


def metric_columns(history: list[dict[str, float]]) -> list[str]:
    """The columns of ``history``'s rows, in :data:`METRIC_COLUMNS` order."""
    present = set().union(*history) if history else set()
    return [column for column in METRIC_COLUMNS if column in present]


class MetricsCSV:
    """metrics.csv: one row per completed epoch, rewritten whole (so a resumed run stays complete)."""

    def attach(self) -> list[tuple[Events, Handler]]:
        return [(Events.EPOCH_COMPLETED, self.write)]

    def write(self, run: Run) -> None:
        buffer = io.StringIO()
        columns = metric_columns(run.history)
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in run.history:
            writer.writerow({k: (int(row[k]) if k == "epoch" else f"{row[k]:.6g}") if k in row else "" for k in columns})
        write_text(run.dir.metrics, buffer.getvalue())
