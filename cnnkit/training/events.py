"""The events the training loop emits, and everything that listens to them.

Like pytorch-ignite: the loop calls ``events.emit(Events.X, run)`` at a few named points and
never does anything else; each feature of a run is a handler attached to the events it needs:

| handler        | listens to                                   | writes                        |
|----------------|----------------------------------------------|-------------------------------|
| RunFiles       | STARTED                                      | config.json, split_*.txt      |
| Checkpointer   | EPOCH_COMPLETED                              | best/last.safetensors, state  |
| MetricsCSV     | EPOCH_COMPLETED                              | metrics.csv                   |
| CurvesPlot     | EPOCH_COMPLETED                              | curves.png                    |
| LogFile        | all but ITERATION_COMPLETED                  | log.txt                       |
| EarlyStopping  | EPOCH_COMPLETED                              | (sets ``run.should_stop``)    |
| TensorBoard    | STARTED, EPOCH_COMPLETED, the ends           | tb/ event files               |
| Console        | all                                          | progress bar or plain lines   |

Every file except the append-only log.txt is replaced atomically (``atomic_write``). The run
driver (:mod:`cnnkit.training.run`) attaches them, so every trainer gets all of them.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import platform
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cnnkit.checkpoint import BEST_NAME, LAST_NAME, atomic_write, save_weights
from cnnkit.errors import UsageError
from cnnkit.training.state import STATE_NAME, save_state

if TYPE_CHECKING:
    from cnnkit.config import TrainConfig
    from cnnkit.training.context import Run

__all__ = [
    "Events",
    "EventBus",
    "Handler",
    "Feature",
    "METRIC_COLUMNS",
    "default_handlers",
    "RunFiles",
    "Checkpointer",
    "MetricsCSV",
    "CurvesPlot",
    "LogFile",
    "EarlyStopping",
    "TensorBoard",
    "Console",
    "closing_lines",
]

METRIC_COLUMNS = (
    "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "examples_per_s", "epoch_seconds",
)  # fmt: skip
"""The columns of metrics.csv, in order."""


class Events(Enum):
    """The points in a run where handlers are called."""

    STARTED = "started"
    """Once, before the first epoch (also when resuming)."""
    EPOCH_STARTED = "epoch_started"
    ITERATION_COMPLETED = "iteration_completed"
    """Mid-epoch progress, as often as the trainer reports it (the standard one: every
    ``report_every`` seconds, not every step)."""
    EPOCH_COMPLETED = "epoch_completed"
    """After the epoch's evaluation; ``run.metrics`` holds its row."""
    COMPLETED = "completed"
    """The run finished (all epochs, or stopped early)."""
    INTERRUPTED = "interrupted"
    """Ctrl-C; the driver then exits 130 (the files already hold the last completed epoch)."""
    FAILED = "failed"
    """An expected error (e.g. divergence) ends the run; ``run.error`` holds it."""


Handler = Callable[["Run"], None]


class Feature(Protocol):
    """Something that hangs off a run's events (a checkpointer, a progress bar, ...)."""

    def attach(self) -> list[tuple[Events, Handler]]:
        """The (event, handler) pairs to register, in order."""
        ...


class EventBus:
    """Calls the handlers registered for an event, in the order they were given."""

    def __init__(self, handlers: Iterable[tuple[Events, Handler]] = ()) -> None:
        self._handlers: dict[Events, list[Handler]] = {event: [] for event in Events}
        for event, handler in handlers:
            self.on(event, handler)

    def on(self, event: Events, handler: Handler) -> None:
        """Call ``handler(run)`` whenever ``event`` is emitted."""
        self._handlers[event].append(handler)

    def emit(self, event: Events, run: Run) -> None:
        """Call every handler of ``event`` with ``run``."""
        for handler in self._handlers[event]:
            handler(run)


def _write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write)


class RunFiles:
    """config.json (the resolved config and the environment it ran in) and the split files."""

    def attach(self) -> list[tuple[Events, Handler]]:
        return [(Events.STARTED, self.started)]

    def started(self, run: Run) -> None:
        import torch

        import cnnkit
        from cnnkit.registry import DATASETS, MODELS, TRAINERS

        plugins = sorted(
            {f"{e.distribution} {e.version}".strip() for r in (MODELS, DATASETS, TRAINERS) for e in r.entries().values()}
            - {f"cnnkit {cnnkit.__version__}"}
        )
        record = {
            "config": run.config.model_copy(update={"out": str(run.run_dir)}).model_dump(mode="json"),
            "environment": {
                "cnnkit": cnnkit.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "device": str(run.device),
                "amp": str(run.amp_dtype).removeprefix("torch.") if run.amp_dtype else None,
                "plugins": plugins,
                "dataset_source": str(run.data.source),
                "train_examples": len(run.data.train),
                "test_examples": len(run.data.test),
                "classes": list(run.data.classes),
            },
        }
        # A killed run can leave hidden temp files of unfinished writes; they are never read.
        for stale in run.run_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        _write_text(run.run_dir / "config.json", json.dumps(record, indent=2) + "\n")
        for split, files in run.data.split_files.items():
            _write_text(run.run_dir / f"split_{split}.txt", "".join(f"{name}\n" for name in files))


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Let a save finish when Ctrl-C is pressed during it, then raise KeyboardInterrupt (main thread
    only: signals live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


class Checkpointer:
    """best.safetensors when test accuracy improves, last.safetensors and the resume point every epoch.

    Only completed epochs are saved: after Ctrl-C or a kill, ``last`` and ``state`` are the last
    completed epoch, labelled as such, and ``--resume`` redoes the epoch that was cut short.
    """

    def attach(self) -> list[tuple[Events, Handler]]:
        return [(Events.EPOCH_COMPLETED, self.epoch_completed)]

    def _save(self, run: Run, name: str) -> None:
        meta = run.meta.model_copy(update={"epoch": run.epoch, "metrics": dict(run.metrics)})
        save_weights(run.run_dir / name, run.model, meta)

    def epoch_completed(self, run: Run) -> None:
        # Ctrl-C must not cut the three writes apart: whatever state says, best and last agree.
        with _sigint_deferred():
            if run.best_epoch == run.epoch:
                self._save(run, BEST_NAME)
            self._save(run, LAST_NAME)
            save_state(run.run_dir / STATE_NAME, run.model, run.optimizer, run.state())
            run.saved_epoch = run.epoch


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
        _write_text(run.run_dir / "metrics.csv", buffer.getvalue())


class CurvesPlot:
    """curves.png: training loss, training and test accuracy per epoch, as d2l plots them."""

    def __init__(self) -> None:
        # Imported before training, so that Ctrl-C never lands inside matplotlib's import.
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        self._figure, self._locator = Figure, MaxNLocator

    def attach(self) -> list[tuple[Events, Handler]]:
        return [(Events.EPOCH_COMPLETED, self.plot)]

    def plot(self, run: Run) -> None:
        Figure, MaxNLocator = self._figure, self._locator

        epochs = [row["epoch"] for row in run.history]
        figure = Figure(figsize=(4.5, 3.2), dpi=120)
        axes = figure.add_subplot()
        for key, label, style in (
            ("train_loss", "train loss", "-"), ("train_acc", "train acc", "--"),
            ("test_acc", "test acc", "-."), ("test_loss", "test loss", ":"),
        ):  # fmt: skip
            axes.plot(epochs, [row[key] for row in run.history], style, marker=".", label=label)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlim(1, max(run.config.epochs, 2))
        axes.grid(True, alpha=0.3)
        axes.legend()
        axes.set_title(f"{run.config.model} on {run.config.dataset}", fontsize=9)
        figure.tight_layout()
        atomic_write(run.run_dir / "curves.png", lambda tmp: figure.savefig(tmp, format="png"))


def _epoch_line(run: Run) -> str:
    m = run.metrics
    return (
        f"epoch {int(m['epoch'])}/{run.config.epochs}  loss {m['train_loss']:.3f}  train acc {m['train_acc']:.3f}  "
        f"test loss {m['test_loss']:.3f}  test acc {m['test_acc']:.3f}  lr {m['lr']:.3g}  "
        f"{m['examples_per_s']:.0f} ex/s  {m['epoch_seconds']:.1f}s"
    )


def closing_lines(run: Run) -> list[str]:
    """d2l's closing lines, then where the run, curves and weights are."""
    m = run.metrics
    examples_per_s = run.train_examples / max(run.train_seconds, 1e-9)
    lines = [
        f"loss {m['train_loss']:.3f}, train acc {m['train_acc']:.3f}, test acc {m['test_acc']:.3f}",
        f"{examples_per_s:.1f} examples/sec on {run.device}",
    ]
    if run.should_stop:
        lines.append(
            f"stopped early after epoch {run.epoch}: no better test acc for {run.config.patience} epochs"
        )
    folder = run.run_dir
    lines.append(
        f"run {folder}  curves {folder / 'curves.png'}  best weights {folder / BEST_NAME} "
        f"(epoch {run.best_epoch}, test acc {run.best_acc:.3f})"
    )
    return lines


class LogFile:
    """log.txt: the config, one line per epoch, and how the run ended (appended, flushed per line)."""

    def attach(self) -> list[tuple[Events, Handler]]:
        return [
            (Events.STARTED, self.started),
            (Events.EPOCH_COMPLETED, lambda run: self._log(run, _epoch_line(run))),
            (Events.COMPLETED, self.completed),
            (Events.INTERRUPTED, self.ended),
            (Events.FAILED, self.ended),
        ]

    def completed(self, run: Run) -> None:
        for line in closing_lines(run):
            self._log(run, line)

    def _log(self, run: Run, line: str) -> None:
        # An append-only log: a kill can at worst cut its last line, never lose earlier ones.
        with open(run.run_dir / "log.txt", "a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}\n")

    def started(self, run: Run) -> None:
        from cnnkit.config import describe_config

        verb = f"resumed after epoch {run.epoch}" if run.epoch else "started"
        self._log(run, f"{verb}: {describe_config(run.config)} · {run.device}")

    def ended(self, run: Run) -> None:
        self._log(run, f"error: {run.error.format_message() if run.error else 'unknown'}")


class EarlyStopping:
    """Stops the run after ``patience`` epochs without a better test accuracy."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def attach(self) -> list[tuple[Events, Handler]]:
        return [(Events.EPOCH_COMPLETED, self.check)]

    def check(self, run: Run) -> None:
        if run.epoch - run.best_epoch >= self.patience:
            run.should_stop = True


class TensorBoard:
    """Scalars per epoch under ``run_dir/tb`` (needs the optional tensorboard package)."""

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
        self._writer = self._writer_class(log_dir=str(run.run_dir / "tb"))

    def epoch_completed(self, run: Run) -> None:
        for key, value in run.metrics.items():
            if key != "epoch":
                self._writer.add_scalar(key, value, int(run.metrics["epoch"]))
        self._writer.flush()

    def close(self, run: Run) -> None:
        if self._writer is not None:
            self._writer.close()


class Console:
    """Progress on stdout: a rich bar on a terminal, one plain line per epoch otherwise, nothing if quiet.

    The closing lines are printed even when quiet.
    """

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console as RichConsole

        self.quiet = quiet
        self.console = RichConsole(highlight=False, markup=False)
        self.live = not quiet and self.console.is_terminal
        self._progress: Any = None
        self._task: Any = None
        self._started = 0.0

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

    def _print(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line)
        else:
            print(line, flush=True)

    def started(self, run: Run) -> None:
        if self.quiet:
            return
        from cnnkit.config import describe_config

        data = run.data
        where = f"resuming {run.run_dir} after epoch {run.epoch}" if run.epoch else f"run {run.run_dir}"
        amp = f" · amp {str(run.amp_dtype).removeprefix('torch.')}" if run.amp_dtype else ""
        self._print(describe_config(run.config))
        self._print(
            f"{data.name}: {len(data.train)} train / {len(data.test)} test, {len(data.classes)} classes · "
            f"{run.device}{amp}{' · compiled' if run.config.compile else ''} · {where}"
        )
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>7.0f} ex/s  loss {task.fields[loss]:.3f}"), TimeRemainingColumn(),
                console=self.console, transient=True,
            )  # fmt: skip
            self._progress.start()

    def epoch_started(self, run: Run) -> None:
        self._started = time.perf_counter()
        if self._progress is not None:
            self._task = self._progress.add_task(
                f"epoch {run.epoch}/{run.config.epochs}", total=len(run.data.train), rate=0.0, loss=float("nan")
            )

    def iteration_completed(self, run: Run) -> None:
        if self._progress is not None:
            rate = run.seen / max(time.perf_counter() - self._started, 1e-9)
            self._progress.update(self._task, completed=run.seen, rate=rate, loss=run.loss)

    def epoch_completed(self, run: Run) -> None:
        if self._progress is not None:
            self._progress.remove_task(self._task)
        if not self.quiet:
            self._print(_epoch_line(run))

    def completed(self, run: Run) -> None:
        self.stop(run)
        for line in closing_lines(run):
            print(line, flush=True)

    def stop(self, run: Run) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def default_handlers(config: TrainConfig) -> list[Feature]:
    """cnnkit's handlers for ``config``, in the order they must run (files before the console).

    Made before the run directory exists, so a missing optional package is reported first.
    """
    features: list[Feature] = [RunFiles(), Checkpointer(), MetricsCSV(), CurvesPlot(), LogFile()]
    if config.patience is not None:
        features.append(EarlyStopping(config.patience))
    if config.tensorboard:
        features.append(TensorBoard())
    features.append(Console(config.quiet))
    return features
