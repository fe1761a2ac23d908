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
| Console        | all                                          | bar (stderr), lines (stdout)  |

Every file except the append-only log.txt is replaced atomically (``atomic_write``). The run
driver (:mod:`cnnkit.training.run`) attaches them, so every trainer gets all of them.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cnnkit.checkpoint import BEST_NAME, LAST_NAME, save_weights
from cnnkit.errors import UsageError
from cnnkit.fs import atomic_write
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
                **run.distributed_environment,  # world_size, backend, torchelastic_run_id
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
    """curves.png: loss (left) and accuracy (right) per epoch, train and test, the best epoch marked.

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
            with _sigint_deferred():
                self._save(run)
                gc.collect(0)  # the figure, unreachable once _save returns
        finally:
            if automatic:
                gc.enable()

    def _save(self, run: Run) -> None:
        figure = self.figure(run)
        atomic_write(run.run_dir / "curves.png", lambda tmp: figure.savefig(tmp, format="png"))
        figure.clear()

    def figure(self, run: Run) -> Any:
        """The figure of ``run.history`` (a matplotlib ``Figure`` on an Agg canvas)."""
        Figure, MaxNLocator = self._figure, self._locator

        history = run.history
        epochs = [int(row["epoch"]) for row in history]
        figure = Figure(figsize=(8.0, 3.4), dpi=120, layout="constrained")
        self._canvas(figure)
        loss_axes, acc_axes = figure.subplots(1, 2, sharex=True)
        # Train and test differ in colour, line style and marker, so the plot survives greyscale.
        styles = {"train": {"color": "C0", "linestyle": "-", "marker": "o"},
                  "test": {"color": "C1", "linestyle": "--", "marker": "s"}}  # fmt: skip
        for split, style in styles.items():
            loss_axes.plot(epochs, [row[f"{split}_loss"] for row in history], markersize=3, label=split, **style)
            acc_axes.plot(epochs, [row[f"{split}_acc"] for row in history], markersize=3, label=split, **style)

        losses = [row[key] for row in history for key in ("train_loss", "test_loss") if row[key] > 0]
        if losses and max(losses) / min(losses) > self.LOG_SCALE_RATIO:
            loss_axes.set_yscale("log")
            loss_axes.set_ylabel("loss (log scale)")
        else:
            loss_axes.set_ylabel("loss")
        acc_axes.set_ylabel("accuracy")
        accuracies = [row[key] for row in history for key in ("train_acc", "test_acc")]
        acc_axes.set_ylim(max(0.0, min(accuracies) - 0.05), min(1.0, max(accuracies) + 0.05) + 0.005)

        if run.best_epoch:
            for axes in (loss_axes, acc_axes):
                axes.axvline(run.best_epoch, color="0.5", linestyle=":", linewidth=1, zorder=0)
            acc_axes.plot([run.best_epoch], [run.best_acc], marker="*", markersize=12, color="C3", linestyle="none",
                          label=f"best test {run.best_acc:.3f} (epoch {run.best_epoch})")  # fmt: skip

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
        path = run.run_dir / "log.txt"
        try:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {line}\n")
        except OSError as exc:  # a full disk: name the file (a failed write names none)
            raise OSError(exc.errno, exc.strerror, str(path)) from exc

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
    """Progress, decided by the stream each part goes to.

    - A live bar on **stderr** when stderr is a terminal, so ``cnnkit train | tee log`` still shows
      it; it is only on screen during an epoch and erased before the epoch line is printed.
    - One line per epoch on **stdout**; on a terminal it is broken between fields to fit its width.
    - Without a bar (logs, CI): also a progress line every ``log_every`` seconds of a long epoch.
    - Quiet: nothing but the closing lines.
    """

    LOG_EVERY = 30.0
    """Seconds between progress lines in logs."""

    def __init__(self, quiet: bool, log_every: float = LOG_EVERY) -> None:
        from rich.console import Console as RichConsole
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.quiet = quiet
        self.log_every = log_every
        bar_console = RichConsole(stderr=True, highlight=False, markup=False)
        self.live = not quiet and bar_console.is_interactive
        # Warnings (stderr) print above the bar; stdout is left alone so that its lines stay on it.
        self._progress: Any = (
            Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                console=bar_console, transient=True, redirect_stdout=False, redirect_stderr=True,
            )  # fmt: skip
            if self.live
            else None
        )
        self._task: Any = None
        self._started = 0.0
        self._next_line = math.inf

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

    def _print(self, line: str, separator: str = "  ") -> None:
        for part in _fit_to_terminal(line, separator):
            print(part, flush=True)

    def started(self, run: Run) -> None:
        if self.quiet:
            return
        from cnnkit.config import describe_config

        data = run.data
        where = f"resuming {run.run_dir} after epoch {run.epoch}" if run.epoch else f"run {run.run_dir}"
        amp = f" · amp {str(run.amp_dtype).removeprefix('torch.')}" if run.amp_dtype else ""
        self._print(describe_config(run.config), " · ")
        self._print(
            f"{data.name}: {len(data.train)} train / {len(data.test)} test, {len(data.classes)} classes · "
            f"{run.device}{amp}{' · compiled' if run.config.compile else ''} · {where}",
            " · ",
        )

    def epoch_started(self, run: Run) -> None:
        self._started = time.perf_counter()
        self._next_line = self._started + self.log_every
        if self._progress is not None:
            # No rate or loss until the first report: nothing rather than "loss nan".
            self._task = self._progress.add_task(
                f"epoch {run.epoch}/{run.config.epochs}", total=len(run.data.train), status=""
            )
            self._progress.start()

    def iteration_completed(self, run: Run) -> None:
        now = time.perf_counter()
        rate = run.seen / max(now - self._started, 1e-9)
        loss = f"  loss {run.loss:.3f}" if run.loss is not None else ""
        if self._progress is not None:
            self._progress.update(self._task, completed=run.seen, status=f"{rate:>7.0f} ex/s{loss}")
        elif not self.quiet and now >= self._next_line:
            self._next_line = now + self.log_every
            total = len(run.data.train)
            self._print(
                f"epoch {run.epoch}/{run.config.epochs}  {run.seen}/{total} ({100 * run.seen / max(total, 1):.0f}%)  "
                f"{rate:.0f} ex/s{loss}"
            )

    def epoch_completed(self, run: Run) -> None:
        self.stop(run)
        if not self.quiet:
            self._print(_epoch_line(run))

    def completed(self, run: Run) -> None:
        self.stop(run)
        for line in closing_lines(run):
            self._print(line)

    def stop(self, run: Run) -> None:
        """Erase the bar (it is transient), so the next line starts on a clean row."""
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
                self._task = None
            self._progress.stop()


def _fit_to_terminal(line: str, separator: str = "  ") -> list[str]:
    """``line`` as it is, or, when stdout is a terminal narrower than it, broken between its fields
    (joined by ``separator``) with continuation lines indented: never a wrap inside a field."""
    try:
        width = os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else 0
    except (AttributeError, ValueError, OSError):  # no real file descriptor (tests, notebooks)
        width = 0
    if width <= 0 or len(line) <= width:
        return [line]
    lines: list[str] = []
    current = ""
    for field in line.split(separator):
        candidate = f"{current}{separator}{field}" if current else field
        if current and len(candidate) > width:
            lines.append(current)
            candidate = f"    {field}"
        current = candidate
    lines.append(current)
    return lines


def default_handlers(config: TrainConfig) -> list[Feature]:
    """cnnkit's handlers for ``config``, in the order they must run (files before the console).

    Made before the run directory exists, so a missing optional package is reported first.
    """
    # metrics.csv before the resume point (Checkpointer): a kill between them leaves the epoch
    # unsaved, so --resume redoes it and rewrites metrics.csv whole; never a saved final epoch
    # whose row is missing (only curves.png, drawn after, can lag one epoch behind a kill).
    features: list[Feature] = [RunFiles(), MetricsCSV(), Checkpointer(), CurvesPlot(), LogFile()]
    if config.patience is not None:
        features.append(EarlyStopping(config.patience))
    if config.tensorboard:
        features.append(TensorBoard())
    features.append(Console(config.quiet))
    return features
