"""cnnkit's handlers: each feature of a run, attached to the events it needs.

The loop only emits :class:`~cnnkit.training.events.Events`; everything a run leaves behind is
done by one handler of this package, one handler a module:

| handler        | module         | listens to                         | writes                        |
|----------------|----------------|------------------------------------|-------------------------------|
| RunFiles       | files          | STARTED, COMPLETED                 | config.json, split_*, test.json |
| Checkpointer   | checkpoints    | EPOCH_COMPLETED                    | best/last.safetensors, state  |
| MetricsCSV     | metrics        | EPOCH_COMPLETED                    | metrics.csv                   |
| CurvesPlot     | curves         | EPOCH_COMPLETED                    | curves.png                    |
| LogFile        | log            | all but ITERATION_COMPLETED        | log.txt                       |
| EarlyStopping  | early_stopping | EPOCH_COMPLETED                    | (sets ``run.should_stop``)    |
| Freezer        | freeze         | STARTED, EPOCH_STARTED             | (freezes, then unfreezes)     |
| TensorBoard    | tensorboard    | STARTED, EPOCH_COMPLETED, the ends | tb/ event files               |
| Console        | console        | all                                | bar (stderr), lines (stdout)  |

The wording of the epoch and closing lines, which the console and the log share, is
:mod:`~cnnkit.training.handlers.lines`'s. Handlers get what they need from the run: its folder
(``run.dir``, a :class:`~cnnkit.rundir.RunDir`, which owns every file name), the environment the
driver recorded, the resume point. Every file except the append-only log.txt is replaced
atomically (:func:`cnnkit.fs.atomic_write`). The run driver (:mod:`cnnkit.training.run`) attaches
:func:`default_handlers`, so every trainer gets all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnnkit.training.handlers.checkpoints import Checkpointer
from cnnkit.training.handlers.console import Console
from cnnkit.training.handlers.curves import CurvesPlot
from cnnkit.training.handlers.early_stopping import EarlyStopping
from cnnkit.training.handlers.files import RunFiles
from cnnkit.training.handlers.freeze import Freezer
from cnnkit.training.handlers.lines import closing_lines, epoch_line
from cnnkit.training.handlers.log import LogFile
from cnnkit.training.handlers.metrics import METRIC_COLUMNS, MetricsCSV
from cnnkit.training.handlers.tensorboard import TensorBoard

if TYPE_CHECKING:
    from cnnkit.config import TrainConfig
    from cnnkit.training.events import Feature

__all__ = [
    "default_handlers",
    "RunFiles",
    "Checkpointer",
    "MetricsCSV",
    "METRIC_COLUMNS",
    "CurvesPlot",
    "LogFile",
    "EarlyStopping",
    "Freezer",
    "TensorBoard",
    "Console",
    "epoch_line",
    "closing_lines",
]


def default_handlers(config: TrainConfig) -> list[Feature]:
    """cnnkit's handlers for ``config``, in the order they must run (files before the console).

    Made before the run directory exists, so a missing optional package is reported first.
    """
    # metrics.csv before the resume point (Checkpointer): a kill between them leaves the epoch
    # unsaved, so --resume redoes it and rewrites metrics.csv whole; never a saved final epoch
    # whose row is missing. log.txt's line right after the resume point, before the slow plot:
    # log.txt is only appended to, so a line a kill skips there (torchrun stops the other ranks
    # as soon as one fails) is missing for good; only curves.png, drawn after, can lag one epoch
    # behind a kill, and it is redrawn whole at the next epoch.
    features: list[Feature] = [RunFiles(), MetricsCSV(), Checkpointer(), LogFile(), CurvesPlot()]
    if config.patience is not None:
        features.append(EarlyStopping(config.patience))
    if config.tensorboard:
        features.append(TensorBoard())
    if config.freeze != "none":  # before the console: its lines come before the epoch's bar
        from cnnkit.training.finetune import head_of

        features.append(Freezer(config.model, head_of(config), config.freeze_epochs, config.quiet))
    features.append(Console(config.quiet))
    return features
