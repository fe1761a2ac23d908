"""``Run``: the driver's run, handed to the trainer (as :class:`~cnnkit.protocols.TrainingRun`) and
to every event handler.

A trainer uses only what ``TrainingRun`` declares (``docs/plugins.md`` documents it)::

    optimizer = run.build_optimizer(model)
    run.start(optimizer)                 # restores the resume point, if any; registers for checkpoints
    lr_at = run.lr_schedule(len(batches))
    for epoch in run.epochs():           # emits EPOCH_STARTED; stops early when a handler asks
        ...                              # train; advance run.step per optimisation step
        run.iteration_completed(seen, loss)     # now and then: progress and the divergence check
        run.epoch_completed({"train_loss": ..., "train_acc": ..., **run.evaluate(model)})
    return run.result()

Where the run is lives in ``run.state`` (a :class:`~cnnkit.training.state.RunState`; its fields
read through as ``run.epoch``, ``run.history`` and so on); the handlers also read the run
directory (``run.dir``), the weights metadata and the environment config.json records. One
process or many is the strategy's business (``run.strategy``): nothing here tests for it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel
from torch import nn

from cnnkit.checkpoint import WeightsMeta
from cnnkit.config import TrainConfig
from cnnkit.errors import DivergedError, UsageError
from cnnkit.protocols import REQUIRED_METRICS, Batches, DatasetSplits, RunResult, Trainer
from cnnkit.rundir import RunDir
from cnnkit.training.events import EventBus, Events
from cnnkit.training.state import ResumePoint, RunState
from cnnkit.training.strategy import SingleDevice, Strategy

if TYPE_CHECKING:
    from cnnkit.data.batches import BatchLoader

__all__ = ["Run", "RunResult", "REQUIRED_METRICS", "diverged"]


def diverged(loss: float, epoch: int, lr: float, step: int | None = None) -> DivergedError:
    """The one-line error of a non-finite loss (exit 5)."""
    where = f"epoch {epoch}, step {step}" if step is not None else f"epoch {epoch}"
    return DivergedError(
        f"loss became {loss} at {where} (lr {lr:.4g}); lower --lr or use --recipe default; best weights are kept"
    )


class _InState:
    """A ``Run`` attribute that reads and writes the field of the same name in ``run.state``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, run: Any, owner: type | None = None) -> Any:
        if run is None:  # looked up on the class
            return self
        return getattr(run.state, self.name)

    def __set__(self, run: Any, value: Any) -> None:
        setattr(run.state, self.name, value)


@dataclass(eq=False)
class Run:
    """One training run, as the driver, the trainer and the event handlers share it."""

    config: TrainConfig
    dir: RunDir
    model: nn.Module
    """The bare model being trained (on ``device``); checkpoints save it."""
    data: DatasetSplits
    device: torch.device
    options: BaseModel
    """The trainer's own options (``-t key=value``), validated by its ``options`` model."""
    events: EventBus
    meta: WeightsMeta
    """Template for the weights files' metadata (epoch and metrics filled in when saving)."""
    strategy: Strategy = field(default_factory=lambda: SingleDevice(torch.device("cpu")))
    amp_dtype: torch.dtype | None = None
    """bf16 or fp16 when mixed precision is on for this device (``config.amp``), else None."""
    resume_from: ResumePoint | None = None
    """The saved point ``start`` restores (``--resume``); None for a fresh run."""
    trainer: Trainer | None = None
    """The trainer fitting this run (its optional ``state_dict`` goes into the resume point)."""
    environment: dict[str, Any] = field(default_factory=dict)
    """What config.json records of the environment (the driver fills it in before STARTED)."""
    state: RunState = field(default_factory=RunState)
    inference_model: nn.Module | None = None
    """Set by the trainer when the run's result is not the trained module (an EMA): checkpoints save it."""
    optimizer: torch.optim.Optimizer | None = None
    started: bool = False
    _epoch_started_at: float = 0.0
    _local_seen: int = 0
    _loaders: dict[str, BatchLoader] = field(default_factory=dict)
    resumes: tuple[Any, ...] = ()
    """Each resume that extended the run or restarted its rate (``cnnkit.training.optim.Resume``)."""
    replanned: bool = False
    """This resume added one: the plan is printed when the schedule is first asked for."""
    test_report: dict[str, Any] = field(default_factory=dict)
    """Test metrics of the final and the best weights, measured once the training is over."""

    epoch = _InState()
    step = _InState()
    lr = _InState()
    history = _InState()
    best_acc = _InState()
    best_epoch = _InState()
    saved_epoch = _InState()
    should_stop = _InState()
    error = _InState()
    seen = _InState()
    loss = _InState()
    train_seconds = _InState()
    train_examples = _InState()

    # -- for trainers (cnnkit.protocols.TrainingRun) ----------------------------------------------
    @property
    def resumed(self) -> bool:
        return self.resume_from is not None

    @property
    def rank(self) -> int:
        return self.strategy.rank

    @property
    def first_epoch(self) -> int:
        return (self.resume_from.epoch if self.resume_from is not None else 0) + 1

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        from cnnkit.training.optim import build_optimizer

        return build_optimizer(model, self.config)

    def lr_schedule(self, steps_per_epoch: int) -> Callable[[int], float]:
        from cnnkit.training.optim import describe_plan, lr_schedule

        if self.replanned and self.strategy.is_main and not self.config.quiet:
            # Said once, where the steps per epoch are first known: how the rest of the run anneals.
            print(describe_plan(self.config, steps_per_epoch, self.resumes), flush=True)
            self.replanned = False
        return lr_schedule(self.config, steps_per_epoch, self.resumes)

    def start(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer
        saved = self.resume_from
        if saved is not None:
            if saved.optimizer and optimizer is not None:
                optimizer.load_state_dict(saved.optimizer)
            load = getattr(self.trainer, "load_state_dict", None)
            if saved.trainer and callable(load):
                load(saved.trainer)
        self.started = True

    def epochs(self) -> Iterator[int]:
        if not self.started:
            raise UsageError(
                f"trainer '{self.config.trainer}' iterated run.epochs() before run.start(optimizer); "
                "see docs/plugins.md"
            )
        for epoch in range(self.epoch + 1, self.config.epochs + 1):
            self.epoch, self.seen, self.loss, self._local_seen = epoch, 0, None, 0
            self._epoch_started_at = time.perf_counter()
            self.events.emit(Events.EPOCH_STARTED, self)
            yield epoch
            if len(self.history) < epoch:
                raise UsageError(
                    f"trainer '{self.config.trainer}' finished epoch {epoch} without run.epoch_completed(metrics)"
                )
            if self.should_stop:
                break

    def iteration_completed(self, seen: int, loss: float) -> None:
        self._local_seen = seen
        self.seen, self.loss = self.strategy.whole_job(seen), float(loss)
        if not math.isfinite(self.loss):
            raise diverged(self.loss, self.epoch, self.lr)
        self.events.emit(Events.ITERATION_COMPLETED, self)

    @property
    def required_metrics(self) -> tuple[str, ...]:
        """What every epoch's metrics hold: the training figures and what :meth:`evaluate` returns."""
        return (*REQUIRED_METRICS, *self._evaluated_keys())

    def _evaluated_keys(self) -> tuple[str, ...]:
        keys: tuple[str, ...] = ("val_loss", "val_acc") if self.data.val is not None else ()
        return keys + (("test_loss", "test_acc") if self.config.test_every_epoch else ())

    def epoch_completed(self, metrics: Mapping[str, float], examples: int | None = None) -> None:
        metrics, examples = self._reduce_train_metrics(metrics, examples)
        required = self.required_metrics
        missing = [key for key in required if key not in metrics]
        if missing:
            raise UsageError(
                f"trainer '{self.config.trainer}' reported epoch {self.epoch} without {', '.join(missing)}; "
                f"run.epoch_completed needs {', '.join(required)} (pass **run.evaluate(model))"
            )
        if not math.isfinite(float(metrics["train_loss"])):
            raise diverged(float(metrics["train_loss"]), self.epoch, self._current_lr())
        seconds = float(metrics.get("epoch_seconds", time.perf_counter() - self._epoch_started_at))
        self.seen = examples
        row = {
            "epoch": self.epoch,
            **{key: float(metrics[key]) for key in required},
            "lr": float(metrics.get("lr", self._current_lr())),
            "examples_per_s": float(metrics.get("examples_per_s", examples / max(seconds, 1e-9))),
            "epoch_seconds": seconds,
        }
        self.history.append(row)
        self.train_seconds += seconds
        self.train_examples += examples
        if self.data.val is not None and self._better(row):
            self.best_acc, self.best_epoch = row["val_acc"], self.epoch
        self.events.emit(Events.EPOCH_COMPLETED, self)

    def _better(self, row: Mapping[str, float]) -> bool:
        """Whether ``row`` beats the best epoch so far on the monitored validation metric."""
        if self.best_epoch == 0 or self.best_epoch > len(self.history):
            return True
        best = self.history[self.best_epoch - 1].get(self.config.monitor)
        if best is None:  # the best epoch of a run resumed from before validation splits
            return True
        value = row[self.config.monitor]
        return value < best if self.config.monitor == "val_loss" else value > best

    def _reduce_train_metrics(self, metrics: Mapping[str, float], examples: int | None) -> tuple[dict[str, float], int]:
        """Every process reports its own part: the strategy combines them (one process: as given)."""
        if examples is None:
            examples = self._local_seen or self.strategy.local_share(len(self.data.train))
        seconds = float(metrics.get("epoch_seconds", time.perf_counter() - self._epoch_started_at))
        rate = float(metrics.get("examples_per_s", examples / max(seconds, 1e-9)))
        means = {key: float(metrics[key]) for key in ("train_loss", "train_acc") if key in metrics}
        means, total, rate = self.strategy.reduce_epoch(means, examples, rate)
        return {**metrics, **means, "examples_per_s": rate}, total

    def _current_lr(self) -> float:
        if math.isfinite(self.lr) or self.optimizer is None or not self.optimizer.param_groups:
            return float(self.lr)
        return float(self.optimizer.param_groups[0]["lr"])

    def loader(self, split: Literal["train", "val", "test"]) -> BatchLoader:
        from cnnkit.data.batches import BatchLoader

        if split in self._loaders:
            return self._loaders[split]
        config = self.config
        common: dict[str, Any] = {
            "image_size": config.input_size,
            "mean": self.meta.mean,
            "std": self.meta.std,
            "device": self.device,
            "channels_last": self.channels_last,
            "shard": self.strategy.shard(),  # this process's part of every global batch
        }
        if split == "train":
            from cnnkit.data.augment import Augmentation

            loader = BatchLoader(
                self.data.train, batch_size=config.batch_size, shuffle=True,
                augmentation=Augmentation.from_config(config, len(self.data.classes)),
                seed=config.seed, drop_last=self.strategy.drop_last(len(self.data.train), config.batch_size),
                **common,
            )  # fmt: skip
        else:
            part = self.data.val if split == "val" else self.data.test
            if part is None:
                raise UsageError(f"this run has no {split} split (--val-fraction 0)")
            loader = BatchLoader(part, batch_size=2 * config.batch_size, **common)
        self._loaders[split] = loader
        return loader

    def evaluate(self, net: nn.Module, loader: Batches | None = None) -> dict[str, float]:
        # ``loader``: trainers written for earlier versions passed run.loader("test"); the run now
        # evaluates its own splits (val; test too with --test-every-epoch), whatever is passed.
        metrics: dict[str, float] = {}
        for split in ("val", "test"):
            if f"{split}_loss" in self._evaluated_keys():
                loss, accuracy, _ = self.evaluate_split(net, split)
                metrics |= {f"{split}_loss": loss, f"{split}_acc": accuracy}
        return metrics

    def evaluate_split(self, net: nn.Module, split: Literal["val", "test"]) -> tuple[float, float, torch.Tensor]:
        """(mean loss, top-1, confusion matrix) of ``net`` on ``split`` over every process."""
        dtype = self.amp_dtype or torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp_dtype is not None):
            return self.strategy.evaluate(net, self.loader(split).epoch(0), len(self.data.classes))

    def result(self) -> RunResult:
        seconds = max(self.train_seconds, 1e-9)
        return RunResult(
            self.dir.path, list(self.history), self.best_acc, self.best_epoch, self.train_examples / seconds,
            str(self.device), self.should_stop,
        )  # fmt: skip

    # -- for the driver and the handlers ---------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        """The run directory's path (``run.dir`` has its files)."""
        return self.dir.path

    @property
    def channels_last(self) -> bool:
        """channels_last memory format: the config's choice, else on for CUDA."""
        chosen = self.config.channels_last
        return chosen if chosen is not None else self.device.type == "cuda"

    @property
    def metrics(self) -> dict[str, float]:
        """The last completed epoch's row (empty before the first)."""
        return self.history[-1] if self.history else {}

    def emit(self, event: Events) -> None:
        """Call every handler of ``event`` with this run."""
        self.events.emit(event, self)

    def resume_point(self) -> ResumePoint:
        """The resume point as of now: the state, the model's, optimiser's and trainer's tensors, the RNG."""
        own = getattr(self.trainer, "state_dict", None)
        return self.state.resume_point(self.model, self.optimizer, own() if callable(own) else None)
