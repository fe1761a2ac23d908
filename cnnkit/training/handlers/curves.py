"""CurvesPlot: draws the loss and accuracy curves of the epochs so far (curves.png)."""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Any

from cnnkit.fs import atomic_write
from cnnkit.training.events import Events, Handler
from cnnkit.training.process import sigint_deferred

if TYPE_CHECKING:
    from cnnkit.training.context import Run

__all__ = ["CurvesPlot"]


class CurvesPlot:
    """curves.png: loss (left) and accuracy (right) per epoch, train, val (and test when measured), the best epoch marked.

    Two panels, because a loss of 50 and an accuracy of 0.9 share no useful scale; the loss axis
    turns logarithmic when the loss spans more than a factor of 20 (a wild first epoch).
    """

    LOG_SCALE_RATIO = 20.0

    def __init__(self) -> None:
        # Imported before training, so that Ctrl-C never lands inside matplotlib's import. The
        # object API with the Agg canvas draws without pyplot, so no global backend is set.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        self._figure, self._canvas, self._locator = Figure, FigureCanvasAgg, MaxNLocator

    def attach(self) -> list[tuple[Events, Handler]]:
        return [(Events.EPOCH_COMPLETED, self.plot)]

    def plot(self, run: Run) -> None:
        # A figure is a web of reference cycles whose weakref callbacks run whenever the garbage
        # collector gets to it, at any later moment; a Ctrl-C landing in one is only printed, and
        # the run would go on. So the figure is drawn, saved and freed while Ctrl-C waits, with
        # the collector paused so that it stays young: collecting the youngest generation then
        # frees all of it in about 10 ms (a full collection of a torch process takes ~170 ms).
        automatic = gc.isenabled()
        gc.disable()
        try:
            with sigint_deferred():
                self._save(run)
                gc.collect(0)  # the figure, unreachable once _save returns
        finally:
            if automatic:
                gc.enable()

    def _save(self, run: Run) -> None:
        figure = self.figure(run)
        atomic_write(run.dir.curves, lambda tmp: figure.savefig(tmp, format="png"))
        figure.clear()

    def figure(self, run: Run) -> Any:
        """The figure of ``run.history`` (a matplotlib ``Figure`` on an Agg canvas)."""
        Figure, MaxNLocator = self._figure, self._locator

        history = run.history
        epochs = [int(row["epoch"]) for row in history]
        figure = Figure(figsize=(8.0, 3.4), dpi=120, layout="constrained")
        self._canvas(figure)
        loss_axes, acc_axes = figure.subplots(1, 2, sharex=True)
        # The splits differ in colour, line style and marker, so the plot survives greyscale.
        styles = {"train": {"color": "C0", "linestyle": "-", "marker": "o"},
                  "val": {"color": "C2", "linestyle": "-.", "marker": "^"},
                  "test": {"color": "C1", "linestyle": "--", "marker": "s"}}  # fmt: skip
        shown = [split for split in styles if history and all(f"{split}_loss" in row for row in history)]
        for split in shown:
            style = styles[split]
            loss_axes.plot(epochs, [row[f"{split}_loss"] for row in history], markersize=3, label=split, **style)
            acc_axes.plot(epochs, [row[f"{split}_acc"] for row in history], markersize=3, label=split, **style)

        losses = [row[f"{split}_loss"] for row in history for split in shown if row[f"{split}_loss"] > 0]
        if losses and max(losses) / min(losses) > self.LOG_SCALE_RATIO:
            loss_axes.set_yscale("log")
            loss_axes.set_ylabel("loss (log scale)")
        else:
            loss_axes.set_ylabel("loss")
        acc_axes.set_ylabel("accuracy")
        accuracies = [row[f"{split}_acc"] for row in history for split in shown]
        acc_axes.set_ylim(max(0.0, min(accuracies) - 0.05), min(1.0, max(accuracies) + 0.05) + 0.005)

        if run.best_epoch:
            for axes in (loss_axes, acc_axes):
                axes.axvline(run.best_epoch, color="0.5", linestyle=":", linewidth=1, zorder=0)
            acc_axes.plot([run.best_epoch], [run.best_acc], marker="*", markersize=12, color="C3", linestyle="none",
                          label=f"best val {run.best_acc:.3f} (epoch {run.best_epoch})")  # fmt: skip

        last = max(run.config.epochs, epochs[-1] if epochs else 1, 2)
        for axes in (loss_axes, acc_axes):
            axes.set_xlabel("epoch")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_xlim(0.7, last + 0.3)
            axes.grid(True, alpha=0.3)
        for axes in (loss_axes, acc_axes):
            axes.legend(loc="best", fontsize=8)
        figure.suptitle(f"{run.config.model} on {run.config.dataset}", fontsize=10)
        return figure
