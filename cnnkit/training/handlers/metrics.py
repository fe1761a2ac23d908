"""MetricsCSV: writes metrics.csv, the table of per-epoch metrics."""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING

from cnnkit.fs import write_text
from cnnkit.training.events import Events, Handler

if TYPE_CHECKING:
    from cnnkit.training.context import Run

__all__ = ["METRIC_COLUMNS", "MetricsCSV"]

METRIC_COLUMNS = (
    "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "examples_per_s", "epoch_seconds",
)  # fmt: skip
"""The columns of metrics.csv, in order."""


class MetricsCSV:
    """metrics.csv: one row per completed epoch, rewritten whole (so a resumed run stays complete)."""

    def attach(self) -> list[tuple[Events, Handler]]:
        return [(Events.EPOCH_COMPLETED, self.write)]

    def write(self, run: Run) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in run.history:
            writer.writerow({k: (int(row[k]) if k == "epoch" else f"{row[k]:.6g}") for k in METRIC_COLUMNS})
        write_text(run.dir.metrics, buffer.getvalue())
