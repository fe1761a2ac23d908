"""``StandardTrainer``: the training loop, in one screen.

It is written against the public :class:`~cnnkit.protocols.Trainer` protocol exactly as a plugin
trainer is: the run driver (:mod:`cnnkit.training.run`) has already built the model, loaded the
data, made the run directory and attached every handler (progress, log.txt, metrics.csv,
curves.png, checkpoints, early stopping, TensorBoard) to the events ``run`` emits. The loop keeps
its sums on the device and reads them back once per epoch, plus once every ``report_every``
seconds for the progress bar and the divergence check.

Distributed (torchrun), nothing changes here but one factor: ``model`` arrives wrapped in DDP,
``run.loader`` yields this rank's part of every global batch, and ``run.epoch_completed`` and
``run.evaluate`` reduce the figures over the ranks. DDP averages the ranks' gradients, which is the
global batch's mean gradient when the parts are equal; the loss of an unequal part (only a last,
partial batch) is weighted so that it still is.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cnnkit.config import TrainConfig
from cnnkit.protocols import DatasetSplits, RunResult, TrainingRun
from cnnkit.training.context import diverged

__all__ = ["StandardOptions", "StandardTrainer"]


class StandardOptions(BaseModel):
    """Options of the standard trainer (``-t key=value``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    report_every: float = Field(
        0.5, gt=0, description="Seconds between mid-epoch progress reports (the only device syncs inside an epoch)."
    )


class StandardTrainer:
    """Mini-batch SGD/AdamW with a per-step schedule, AMP, and evaluation after every epoch."""

    name = "standard"
    summary = "SGD/AdamW loop with AMP, per-step schedules, label smoothing and per-epoch evaluation"
    options = StandardOptions

    def fit(self, model: nn.Module, data: DatasetSplits, config: TrainConfig, run: TrainingRun) -> RunResult:
        """Train for ``config.epochs`` (from the resume point), evaluating on the val split each epoch."""
        options = cast(StandardOptions, run.options)
        device = run.device
        optimizer = run.build_optimizer(model)
        run.start(optimizer)
        # torch.compile returns a callable wrapper; it is used like the module it wraps.
        net = cast(nn.Module, torch.compile(model)) if config.compile else model
        train = run.loader("train")
        steps_per_epoch = len(train)
        lr_at = run.lr_schedule(steps_per_epoch)
        scaler = torch.amp.GradScaler(device.type, enabled=run.amp_dtype is torch.float16)
        # Without AMP no autocast context at all: entering a disabled one still costs ~7 us a step.
        autocast = (
            torch.autocast(device.type, dtype=run.amp_dtype) if run.amp_dtype is not None else contextlib.nullcontext()
        )
        for epoch in run.epochs():
            step_losses = torch.zeros(steps_per_epoch, device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            steps = seen = 0
            sizes: list[float] = []
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
                # This process's weight in the global batch (1 except in an uneven last batch).
                share = train.part_weight(steps, labels.shape[0])
                # Backward and step (the scaler is a pass-through unless fp16).
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss if share == 1 else loss * share).backward()
                scaler.step(optimizer)
                scaler.update()
                # Accumulate on the device: no .item(), no sync.
                step_losses[steps] = loss.detach()
                correct += (logits.argmax(dim=1) == labels).sum()
                run.step, steps, seen = run.step + 1, steps + 1, seen + labels.shape[0]
                sizes.append(float(labels.shape[0]))
                if time.perf_counter() >= next_report:  # throttled: the one mid-epoch sync
                    _check_finite(run, step_losses[:steps], lr_at)
                    run.iteration_completed(seen, float(step_losses[:steps].mean()))
                    next_report = time.perf_counter() + options.report_every
            # End of the epoch: one sync for the training sums, then evaluate on the val split.
            _check_finite(run, step_losses[:steps], lr_at)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            weights = torch.tensor(sizes, device=device, dtype=torch.float32)
            train_loss = float((step_losses[:steps] * weights).sum()) / seen
            # Checkpoints, metrics.csv, curves, progress and early stopping all listen to this
            # (distributed: this rank's figures, which run.epoch_completed reduces over the ranks).
            run.epoch_completed(
                {"train_loss": train_loss, "train_acc": int(correct) / seen, **run.evaluate(net),
                 "lr": run.lr, "examples_per_s": seen / seconds, "epoch_seconds": seconds},
                examples=seen,
            )  # fmt: skip
        return run.result()


def _check_finite(run: TrainingRun, losses: torch.Tensor, lr_at: Callable[[int], float]) -> None:
    """DivergedError naming the first non-finite step of this epoch, if there was one."""
    bad = (~torch.isfinite(losses)).nonzero()
    if bad.numel():
        step = int(bad[0, 0]) + 1
        lr = lr_at(run.step - losses.shape[0] + step - 1)
        raise diverged(float(losses[step - 1]), run.epoch, lr, step)
