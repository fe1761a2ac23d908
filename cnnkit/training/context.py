"""``Run``: the object the run driver owns and hands to the trainer and to every event handler.

A trainer uses a handful of its members (the contract ``docs/plugins.md`` documents)::

    optimizer = build_optimizer(model, config)
    run.start(optimizer)                 # restores the resume point, if any; registers for checkpoints
    for epoch in run.epochs():           # emits EPOCH_STARTED; stops early when a handler asks
        ...                              # train; advance run.step per optimisation step
        run.iteration_completed(seen, loss)     # now and then: progress and the divergence check
        run.epoch_completed({"train_loss": ..., "train_acc": ..., **run.evaluate(model)})
    return run.result()

Everything else here is for the driver and the handlers: the directory, the weights metadata, the
history and best epoch, the reason a run stopped.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel
from torch import nn

from cnnkit.checkpoint import WeightsMeta
from cnnkit.config import TrainConfig
from cnnkit.errors import CnnkitError, DivergedError, UsageError
from cnnkit.protocols import DatasetSplits
from cnnkit.training.state import TrainerState

if TYPE_CHECKING:
    from cnnkit.data.batches import BatchLoader
    from cnnkit.training.events import EventBus, Events

__all__ = ["Run", "RunResult", "REQUIRED_METRICS"]

REQUIRED_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")
"""What a trainer reports for every epoch; ``lr``, ``examples_per_s`` and ``epoch_seconds`` are
filled in by the driver when a trainer leaves them out."""


@dataclass(frozen=True)
class RunResult:
    """What a fit returns: where the run is and how it went."""

    run_dir: Path
    history: list[dict[str, float]]
    """One metrics row per completed epoch (what metrics.csv holds)."""
    best_acc: float
    best_epoch: int
    examples_per_s: float
    """Training examples per second over the whole run (d2l's figure)."""
    device: str
    stopped_early: bool

    @property
    def final(self) -> dict[str, float]:
        """The last epoch's metrics."""
        return self.history[-1] if self.history else {}


@dataclass(eq=False)
class Run:
    """One training run, as the driver, the trainer and the event handlers share it."""

    config: TrainConfig
    run_dir: Path
    model: nn.Module
    """The model being trained (on ``device``); checkpoints save it."""
    data: DatasetSplits
    device: torch.device
    options: BaseModel
    """The trainer's own options (``-t key=value``), validated by its ``options`` model."""
    events: EventBus
    meta: WeightsMeta
    """Template for the weights files' metadata (epoch and metrics filled in when saving)."""
    amp_dtype: torch.dtype | None = None
    """bf16 or fp16 when mixed precision is on for this device (``config.amp``), else None."""
    resume_from: TrainerState | None = None
    """The saved point ``start`` restores (``--resume``); None for a fresh run."""
    rank: int = 0
    """This process's rank in a distributed run (torchrun); 0 otherwise. Only rank 0 writes files."""
    world_size: int = 1
    """Processes training together (each on its shard of every global batch); 1 when not distributed."""
    backend: str | None = None
    """The process group's backend (``nccl`` or ``gloo``) in a distributed run, else None."""
    optimizer: torch.optim.Optimizer | None = None
    epoch: int = 0
    """The epoch being trained (1-based); after it completes, the number of epochs done."""
    step: int = 0
    """Optimisation steps since the run began: the trainer advances it, the driver saves it."""
    seen: int = 0
    """Training examples seen this epoch (as last reported)."""
    loss: float | None = None
    """Mean training loss so far this epoch (as last reported; None before the first report)."""
    lr: float = math.nan
    history: list[dict[str, float]] = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0
    train_examples: int = 0
    saved_epoch: int = 0
    """The epoch the files on disk (last, state) hold; kept current by the checkpoint handler."""
    should_stop: bool = False
    """Set by a handler (early stopping) to end the run after this epoch."""
    error: CnnkitError | None = None
    """Why the run ended early (set before FAILED or INTERRUPTED is emitted)."""
    started: bool = False
    _epoch_started_at: float = 0.0

    # -- for trainers ----------------------------------------------------------------------------
    def start(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Register the optimiser (its state is checkpointed) and restore the resume point into the
        model and the optimiser. Call once, before :meth:`epochs`."""
        self.optimizer = optimizer
        saved = self.resume_from
        if saved is not None and saved.optimizer and optimizer is not None:
            optimizer.load_state_dict(saved.optimizer)
        self.started = True

    def epochs(self) -> Iterator[int]:
        """The epochs still to train (after the resume point), emitting EPOCH_STARTED before each and
        stopping after an epoch in which a handler set ``should_stop``."""
        from cnnkit.training.events import Events

        if not self.started:
            raise UsageError(
                f"trainer '{self.config.trainer}' iterated run.epochs() before run.start(optimizer); "
                "see docs/plugins.md"
            )
        for epoch in range(self.epoch + 1, self.config.epochs + 1):
            self.epoch, self.seen, self.loss = epoch, 0, None
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
        """Report progress mid-epoch (call it now and then, not every step: it may sync the device)."""
        from cnnkit.training.events import Events

        self.seen, self.loss = seen, float(loss)
        if not math.isfinite(self.loss):
            raise DivergedError(
                f"loss became {self.loss} in epoch {self.epoch} (lr {self.lr:.4g}); lower --lr or use "
                "--recipe default; best weights are kept"
            )
        self.events.emit(Events.ITERATION_COMPLETED, self)

    def epoch_completed(self, metrics: Mapping[str, float], examples: int | None = None) -> None:
        """Record the epoch's metrics (at least :data:`REQUIRED_METRICS`) and emit EPOCH_COMPLETED, on
        which the checkpoints, metrics.csv, curves, log and early stopping act. ``examples``: how many
        training examples the epoch saw (default: the last report's, else the whole split)."""
        from cnnkit.training.events import Events

        if self.world_size > 1:
            metrics, examples = self._reduce_train_metrics(metrics, examples)
        missing = [key for key in REQUIRED_METRICS if key not in metrics]
        if missing:
            raise UsageError(
                f"trainer '{self.config.trainer}' reported epoch {self.epoch} without {', '.join(missing)}; "
                f"run.epoch_completed needs {', '.join(REQUIRED_METRICS)}"
            )
        if not math.isfinite(float(metrics["train_loss"])):
            raise DivergedError(
                f"loss became {float(metrics['train_loss'])} in epoch {self.epoch}; lower --lr or use "
                "--recipe default; best weights are kept"
            )
        seconds = float(metrics.get("epoch_seconds", time.perf_counter() - self._epoch_started_at))
        seen = examples if examples is not None else (self.seen or len(self.data.train))
        self.seen = seen
        row = {
            "epoch": self.epoch,
            **{key: float(metrics[key]) for key in REQUIRED_METRICS},
            "lr": float(metrics.get("lr", self._current_lr())),
            "examples_per_s": float(metrics.get("examples_per_s", seen / max(seconds, 1e-9))),
            "epoch_seconds": seconds,
        }
        self.history.append(row)
        self.train_seconds += seconds
        self.train_examples += seen
        if row["test_acc"] > self.best_acc:
            self.best_acc, self.best_epoch = row["test_acc"], self.epoch
        self.events.emit(Events.EPOCH_COMPLETED, self)

    def _reduce_train_metrics(self, metrics: Mapping[str, float], examples: int | None) -> tuple[dict[str, float], int]:
        """Every rank reports its own shard: the means of train_loss and train_acc weighted by each
        rank's examples, the examples and the throughput summed. Test metrics come from
        :meth:`evaluate`, already reduced."""
        from cnnkit.training.distributed import sum_over_ranks

        local = examples if examples is not None else (self.seen or -(-len(self.data.train) // self.world_size))
        seconds = float(metrics.get("epoch_seconds", time.perf_counter() - self._epoch_started_at))
        rate = float(metrics.get("examples_per_s", local / max(seconds, 1e-9)))
        present = [key for key in ("train_loss", "train_acc") if key in metrics]
        sums = sum_over_ranks([float(metrics[key]) * local for key in present] + [local, rate])
        total = int(round(sums[-2]))
        reduced = {**metrics, **{key: value / max(total, 1) for key, value in zip(present, sums, strict=False)}}
        reduced["examples_per_s"] = sums[-1]
        return reduced, total

    def _current_lr(self) -> float:
        if math.isfinite(self.lr) or self.optimizer is None or not self.optimizer.param_groups:
            return self.lr
        return float(self.optimizer.param_groups[0]["lr"])

    def loader(self, split: Literal["train", "test"]) -> BatchLoader:
        """Batches of ``split`` prepared on the device at the config's input size and normalisation;
        the training split shuffled and (if the config says so) augmented, reproducibly per epoch."""
        from cnnkit.data.batches import BatchLoader

        config = self.config
        common: dict[str, Any] = {
            "image_size": config.input_size,
            "mean": self.meta.mean,
            "std": self.meta.std,
            "device": self.device,
            "channels_last": self.channels_last,
            # Distributed: each rank yields its part of every global batch (batch_size is global).
            "shard": (self.rank, self.world_size),
        }
        if split == "train":
            # Every rank must take every step: a last batch too small to give each rank an example
            # is left out of this epoch (its examples come in other epochs' permutations).
            tail = len(self.data.train) % config.batch_size
            return BatchLoader(
                self.data.train, batch_size=config.batch_size, augment=config.augment, shuffle=True,
                seed=config.seed, drop_last=0 < tail < self.world_size, **common,
            )  # fmt: skip
        return BatchLoader(self.data.test, batch_size=2 * config.batch_size, **common)

    def evaluate(self, net: nn.Module, loader: BatchLoader | None = None) -> dict[str, float]:
        """``{"test_loss", "test_acc"}`` of ``net`` on the test split (eval mode, under AMP if on)."""
        from cnnkit.evaluate import evaluate

        batches = loader if loader is not None else self.loader("test")
        dtype = self.amp_dtype or torch.bfloat16
        autocast = torch.autocast(self.device.type, dtype=dtype, enabled=self.amp_dtype is not None)
        if self.world_size == 1:
            with autocast:
                result = evaluate(net, batches.epoch(0), len(self.data.classes))
            return {"test_loss": result.loss, "test_acc": result.top1}
        from cnnkit.training.distributed import broadcast_buffers, sum_over_ranks, unwrap

        # Each rank evaluates its shard with the bare module (a DDP forward would wait for the
        # other ranks, whose shards may have one batch fewer) and rank 0's BatchNorm statistics,
        # the ones the checkpoint saves; the sums are then added over the ranks.
        bare = unwrap(net)
        broadcast_buffers(bare)
        batch_iter = batches.epoch(0)
        first = next(batch_iter, None)
        loss_sum = correct = count = 0.0
        if first is not None:
            with autocast:
                result = evaluate(bare, itertools.chain([first], batch_iter), len(self.data.classes))
            count = float(result.examples)
            loss_sum, correct = result.loss * count, float(result.confusion.diagonal().sum())
        loss_sum, correct, count = sum_over_ranks([loss_sum, correct, count])
        return {"test_loss": loss_sum / max(count, 1.0), "test_acc": correct / max(count, 1.0)}

    def result(self) -> RunResult:
        """What the trainer returns from ``fit``."""
        seconds = max(self.train_seconds, 1e-9)
        return RunResult(
            self.run_dir, list(self.history), self.best_acc, self.best_epoch, self.train_examples / seconds,
            str(self.device), self.should_stop,
        )  # fmt: skip

    # -- for the driver and the handlers ---------------------------------------------------------
    @property
    def channels_last(self) -> bool:
        """channels_last memory format: the config's choice, else on for CUDA."""
        chosen = self.config.channels_last
        return chosen if chosen is not None else self.device.type == "cuda"

    @property
    def distributed_environment(self) -> dict[str, Any]:
        """What config.json records of the processes: world size, backend, torchrun's run id."""
        from cnnkit.training.distributed import elastic_run_id

        return {"world_size": self.world_size, "backend": self.backend, "torchelastic_run_id": elastic_run_id()}

    @property
    def metrics(self) -> dict[str, float]:
        """The last completed epoch's row (empty before the first)."""
        return self.history[-1] if self.history else {}

    def emit(self, event: Events) -> None:
        """Call every handler of ``event`` with this run."""
        self.events.emit(event, self)

    def state(self) -> TrainerState:
        """The resume point as of now (bookkeeping only; tensors are read when saving)."""
        return TrainerState(self.epoch, self.step, self.best_acc, self.best_epoch, list(self.history))
