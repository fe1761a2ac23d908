"""``StandardTrainer``: the training loop, in one screen.

Everything that is not training (progress, log.txt, metrics.csv, curves.png, checkpoints, early
stopping, TensorBoard) listens to the events the loop emits (:mod:`cnnkit.training.events`).
The loop keeps its sums on the device and reads them back once per epoch, plus once every
``report_every`` seconds for the progress bar and the divergence check.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.checkpoint import WeightsMeta
from cnnkit.config import TrainConfig
from cnnkit.data.batches import BatchLoader
from cnnkit.errors import CnnkitError, DivergedError, InterruptedRun, UsageError
from cnnkit.evaluate import evaluate
from cnnkit.protocols import DatasetSplits
from cnnkit.training.events import EventBus, Events, default_handlers
from cnnkit.training.optim import build_optimizer, lr_schedule
from cnnkit.training.state import STATE_NAME, TrainerState, load_state, restore_rng

__all__ = ["Run", "RunResult", "StandardTrainer"]


@dataclass
class Run:
    """What the loop shares with its event handlers while it trains."""

    config: TrainConfig
    run_dir: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: DatasetSplits
    device: torch.device
    amp_dtype: torch.dtype | None
    meta: WeightsMeta
    """Template for the weights files' metadata (epoch and metrics filled in when saving)."""
    steps_per_epoch: int
    epoch: int = 0
    """The epoch being trained (1-based); after it completes, the number of epochs done."""
    step: int = 0
    """Optimisation steps taken since the run began."""
    epoch_step: int = 0
    seen: int = 0
    """Training examples seen this epoch."""
    step_losses: torch.Tensor | None = None
    """This epoch's per-step training losses, on the device."""
    lr: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0
    train_examples: int = 0
    saved_epoch: int = 0
    """The epoch the resume point on disk was saved at (kept current by the checkpoint handler)."""
    should_stop: bool = False
    """Set by a handler (early stopping) to end the run after this epoch."""
    error: CnnkitError | None = None

    @property
    def metrics(self) -> dict[str, float]:
        """The last completed epoch's row (empty before the first)."""
        return self.history[-1] if self.history else {}

    def running_loss(self) -> float:
        """Mean training loss so far this epoch (a device sync: call it rarely)."""
        if self.step_losses is None or self.epoch_step == 0:
            return float("nan")
        return float(self.step_losses[: self.epoch_step].mean())

    def state(self) -> TrainerState:
        """The resume point as of now (bookkeeping only; tensors are read when saving)."""
        return TrainerState(self.epoch, self.step, self.best_acc, self.best_epoch, list(self.history))


@dataclass(frozen=True)
class RunResult:
    """What :meth:`StandardTrainer.fit` returns: where the run is and how it went."""

    run_dir: Path
    history: list[dict[str, float]]
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


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the device has it, else fp16 (with a GradScaler); None: full precision."""
    if not (config.amp if config.amp is not None else device.type == "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@contextlib.contextmanager
def _first_ctrl_c_only() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt once; repeats while the run saves and exits are ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[bool] = []

    def on_sigint(signum: int, frame: Any) -> None:
        if not pressed:
            pressed.append(True)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _determinism(on: bool, device: torch.device) -> Iterator[None]:
    """torch.use_deterministic_algorithms for the run only; cudnn.benchmark otherwise (on CUDA)."""
    was = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    # Only when it changes: the call imports torch._inductor, seconds of start-up on a CPU.
    if on != was[0]:
        torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not on
    try:
        yield
    finally:
        if on != was[0]:
            torch.use_deterministic_algorithms(was[0])
        torch.backends.cudnn.benchmark = was[1]


class StandardTrainer:
    """Mini-batch training with per-epoch evaluation, checkpoints and early stopping."""

    name = "standard"
    summary = "SGD/AdamW loop with AMP, schedules, checkpoints, resume and early stopping"
    report_every = 0.5
    """Seconds between mid-epoch reports (the only syncs inside an epoch)."""

    def __init__(self) -> None:
        self._extra: list[tuple[Events, Callable[[Run], None]]] = []

    def add_event_handler(self, event: Events, handler: Callable[[Run], None]) -> None:
        """Call ``handler(run)`` on ``event``, after cnnkit's own handlers (like ignite's)."""
        self._extra.append((event, handler))

    def fit(
        self, model: nn.Module, data: DatasetSplits, config: TrainConfig, *, run_dir: Path | None = None,
        resume: bool = False,
    ) -> RunResult:  # fmt: skip
        """Train ``model`` on ``data.train`` for ``config.epochs``, evaluating on ``data.test`` each epoch.

        Files go to ``run_dir`` (default ``config.out``); with ``resume`` the run continues from
        ``run_dir/state.safetensors``. Raises DivergedError on a non-finite loss and
        InterruptedRun on Ctrl-C, after the handlers have saved what they save.
        """
        from cnnkit.device import resolve_device

        device = resolve_device(config.device)
        folder = Path(run_dir or config.out or ".")
        with _determinism(config.deterministic, device), _first_ctrl_c_only():
            run, net = self._setup(model, data, config, device, folder, resume)
            events = EventBus(default_handlers(run) + self._extra)
            try:
                self._loop(run, net, events)
            except KeyboardInterrupt:
                run.error = InterruptedRun(
                    f"interrupted in epoch {run.epoch}, step {run.epoch_step}; saved {folder / 'last.safetensors'}; "
                    f"continue from the end of epoch {run.saved_epoch} with: cnnkit train --resume {folder}"
                )
                events.emit(Events.INTERRUPTED, run)
                raise run.error from None
            except CnnkitError as exc:
                run.error = exc
                events.emit(Events.FAILED, run)
                raise
        seconds = max(run.train_seconds, 1e-9)
        return RunResult(
            folder, run.history, run.best_acc, run.best_epoch, run.train_examples / seconds, str(device),
            run.should_stop,
        )  # fmt: skip

    def _loop(self, run: Run, net: nn.Module, events: EventBus) -> None:
        config, optimizer, device = run.config, run.optimizer, run.device
        train, test = _loaders(run)
        lr_at = lr_schedule(config, run.steps_per_epoch)
        scaler = torch.amp.GradScaler(device.type, enabled=run.amp_dtype is torch.float16)
        autocast = torch.autocast(device.type, dtype=run.amp_dtype or torch.bfloat16, enabled=run.amp_dtype is not None)
        events.emit(Events.STARTED, run)
        for epoch in range(run.epoch + 1, config.epochs + 1):
            run.epoch, run.epoch_step, run.seen = epoch, 0, 0
            run.step_losses = torch.zeros(run.steps_per_epoch, device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            events.emit(Events.EPOCH_STARTED, run)
            net.train()
            started = next_report = time.perf_counter()
            # Shuffle and augment: the loader permutes and transforms whole batches on the device,
            # reproducibly for (seed, epoch), so a resumed run sees the same batches.
            for images, labels in train.epoch(epoch):
                run.lr = lr_at(run.step)
                for group in optimizer.param_groups:
                    group["lr"] = run.lr
                # Forward and loss (in bf16/fp16 under AMP; the loss itself in float32).
                with autocast:
                    logits = net(images)
                    loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
                # Backward and step (the scaler is a pass-through unless fp16).
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                # Accumulate on the device: no .item(), no sync.
                run.step_losses[run.epoch_step] = loss.detach()
                correct += (logits.argmax(dim=1) == labels).sum()
                run.step, run.epoch_step, run.seen = run.step + 1, run.epoch_step + 1, run.seen + labels.shape[0]
                if time.perf_counter() >= next_report:  # throttled: the one mid-epoch sync
                    _check_finite(run, lr_at)
                    events.emit(Events.ITERATION_COMPLETED, run)
                    next_report = time.perf_counter() + self.report_every
            # End of the epoch: one sync for the training sums, then evaluate on the test split.
            _check_finite(run, lr_at)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            run.train_seconds, run.train_examples = run.train_seconds + seconds, run.train_examples + run.seen
            sizes = torch.tensor(_batch_sizes(run.seen, config.batch_size), device=device, dtype=torch.float32)
            train_loss = float((run.step_losses[: run.epoch_step] * sizes).sum()) / run.seen
            with autocast:
                result = _evaluate(net, test, len(run.data.classes))
            run.history.append({
                "epoch": epoch, "train_loss": train_loss, "train_acc": int(correct) / run.seen,
                "test_loss": result.loss, "test_acc": result.top1, "lr": run.lr,
                "examples_per_s": run.seen / seconds, "epoch_seconds": seconds,
            })  # fmt: skip
            if result.top1 > run.best_acc:
                run.best_acc, run.best_epoch = result.top1, epoch
            # Checkpoints, metrics.csv, curves, progress and early stopping all listen here.
            events.emit(Events.EPOCH_COMPLETED, run)
            if run.should_stop:
                break
        events.emit(Events.COMPLETED, run)

    def _setup(
        self, model: nn.Module, data: DatasetSplits, config: TrainConfig, device: torch.device, folder: Path,
        resume: bool,
    ) -> tuple[Run, nn.Module]:  # fmt: skip
        """Place the model, build the optimiser, restore a resume point; returns the run and the net to call."""
        channels_last = config.channels_last if config.channels_last is not None else device.type == "cuda"
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, config)
        normalized = config.normalize
        meta = WeightsMeta(
            model=config.model, model_options=dict(config.model_options), in_channels=data.channels,
            num_classes=len(data.classes), input_size=config.input_size, classes=list(data.classes),
            dataset=config.dataset, dataset_options=dict(config.dataset_options),
            mean=list(data.mean) if normalized else None, std=list(data.std) if normalized else None,
        )  # fmt: skip
        batch = config.batch_size
        run = Run(
            config, folder, model, optimizer, data, device, _amp_dtype(config, device), meta,
            steps_per_epoch=(len(data.train) + batch - 1) // batch,
        )  # fmt: skip
        if resume:
            saved = load_state(folder / STATE_NAME)
            if saved.epoch >= config.epochs:
                raise UsageError(
                    f"{folder} has already trained {saved.epoch} of {config.epochs} epochs; "
                    f"pass --epochs N with N > {saved.epoch} to train it longer"
                )
            model.load_state_dict(saved.model)
            optimizer.load_state_dict(saved.optimizer)
            restore_rng(saved.rng)
            run.epoch, run.step, run.history = saved.epoch, saved.step, saved.history
            run.best_acc, run.best_epoch = saved.best_acc, saved.best_epoch
        else:
            # Dropout draws from the global generator: start it from the seed too.
            torch.manual_seed(config.seed)
        # torch.compile returns a callable wrapper; it is used like the module it wraps.
        net = cast(nn.Module, torch.compile(model)) if config.compile else model
        return run, net


def _loaders(run: Run) -> tuple[Any, Any]:
    """Training batches (shuffled, augmented) and test batches, both prepared on the device."""
    config, data = run.config, run.data
    common: dict[str, Any] = {
        "image_size": config.input_size,
        "mean": run.meta.mean,
        "std": run.meta.std,
        "device": run.device,
        "channels_last": config.channels_last if config.channels_last is not None else run.device.type == "cuda",
    }
    train = BatchLoader(
        data.train, batch_size=config.batch_size, augment=config.augment, shuffle=True, seed=config.seed, **common
    )
    test = BatchLoader(data.test, batch_size=2 * config.batch_size, **common)
    return train, test


def _evaluate(net: nn.Module, loader: Any, num_classes: int) -> Any:
    return evaluate(net, loader.epoch(0), num_classes)


def _batch_sizes(total: int, batch: int) -> list[float]:
    full, rest = divmod(total, batch)
    return [float(batch)] * full + ([float(rest)] if rest else [])


def _check_finite(run: Run, lr_at: Callable[[int], float]) -> None:
    """DivergedError naming the first non-finite step of this epoch, if there was one."""
    assert run.step_losses is not None
    losses = run.step_losses[: run.epoch_step]
    bad = (~torch.isfinite(losses)).nonzero()
    if bad.numel():
        step = int(bad[0, 0]) + 1
        lr = lr_at(run.step - run.epoch_step + step - 1)
        raise DivergedError(
            f"loss became {float(losses[step - 1])} at epoch {run.epoch}, step {step} "
            f"(lr {lr:.4g}); lower --lr or use --recipe default; best weights are kept"
        )
