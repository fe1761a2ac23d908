"""Checkpointer: saves the best and last weights and the resume point after every completed epoch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnnkit.checkpoint import save_weights
from cnnkit.training.events import Events, Handler
from cnnkit.training.process import sigint_deferred
from cnnkit.training.state import save_state

if TYPE_CHECKING:
    from pathlib import Path

    from cnnkit.training.context import Run

__all__ = ["Checkpointer"]


class Checkpointer:
    """best.safetensors when the monitored validation metric improves, last.safetensors and the resume point every epoch.

    Only completed epochs are saved: after Ctrl-C or a kill, ``last`` and ``state`` are the last
    completed epoch, labelled as such, and ``--resume`` redoes the epoch that was cut short.
    """

    def attach(self) -> list[tuple[Events, Handler]]:
        return [(Events.EPOCH_COMPLETED, self.epoch_completed)]

    def _save(self, run: Run, path: Path) -> None:
        averaged = run.config.ema if run.inference_model is not None else None
        meta = run.meta.model_copy(update={"epoch": run.epoch, "metrics": dict(run.metrics), "ema": averaged})
        # With an EMA of the weights, best and last hold the average (what eval and export use); the
        # trained weights themselves travel in the resume point.
        save_weights(path, run.inference_model or run.model, meta)

    def epoch_completed(self, run: Run) -> None:
        # Ctrl-C must not cut the three writes apart: whatever state says, best and last agree.
        with sigint_deferred():
            if run.best_epoch == run.epoch:
                self._save(run, run.dir.best)
            self._save(run, run.dir.last)
            save_state(run.dir.state, run.resume_point())
            run.saved_epoch = run.epoch
