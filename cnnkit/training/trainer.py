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

The recipe kit: augmentation, random erasing, mixup and cutmix happen in the loader (the labels of
a mixed batch arrive as probabilities, which ``F.cross_entropy`` takes as they are); here are
gradient accumulation (``accum_steps`` batches per optimisation step, the schedule counting
steps), gradient clipping, class weights in the loss and the EMA of the weights, whose average is
what the run evaluates and saves (``run.inference_model``) and whose state resumes with the run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from cnnkit.config import TrainConfig
from cnnkit.protocols import DatasetSplits, RunResult, TrainingRun
from cnnkit.training.averaging import WeightAverage
from cnnkit.training.context import diverged
from cnnkit.training.losses import balanced_class_weights

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
    summary = "SGD/AdamW loop with AMP, per-step schedules, accumulation, clipping, class weights and an EMA"
    options = StandardOptions

    def __init__(self) -> None:
        self.average: WeightAverage | None = None

    def state_dict(self) -> dict[str, Any]:
        """The EMA of the weights, when on (saved with every epoch; see the Trainer protocol)."""
        return {"ema": self.average.state_dict()} if self.average is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.average is not None and "ema" in state:
            self.average.load_state_dict(state["ema"])

    def fit(self, model: nn.Module, data: DatasetSplits, config: TrainConfig, run: TrainingRun) -> RunResult:
        """Train for ``config.epochs`` (from the resume point), evaluating on the val split each epoch."""
        options = cast(StandardOptions, run.options)
        device = run.device
        bare = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        optimizer = run.build_optimizer(model)
        self.average = WeightAverage(bare, config.ema) if config.ema else None
        run.start(optimizer)  # restores the optimiser's and the EMA's state when resumed
        run.inference_model = self.average.module if self.average is not None else None
        # torch.compile returns a callable wrapper; it is used like the module it wraps.
        net = cast(nn.Module, torch.compile(model)) if config.compile else model
        train = run.loader("train")
        batches, accum = len(train), config.accum_steps
        lr_at = run.lr_schedule(-(-batches // accum))  # the schedule counts optimisation steps
        weight = balanced_class_weights(data.train.labels, data.classes).to(device) \
            if config.class_weights == "balanced" else None  # fmt: skip
        no_sync = getattr(net, "no_sync", None)  # DDP's (through torch.compile's wrapper too)
        scaler = torch.amp.GradScaler(device.type, enabled=run.amp_dtype is torch.float16)
        # Without AMP no autocast context at all: entering a disabled one still costs ~7 us a step.
        autocast = (
            torch.autocast(device.type, dtype=run.amp_dtype) if run.amp_dtype is not None else contextlib.nullcontext()
        )
        for epoch in run.epochs():
            step_losses = torch.zeros(batches, device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            steps = seen = 0
            first_step = run.step
            sizes: list[float] = []
            net.train()
            started = next_report = time.perf_counter()
            # Shuffle and augment: the loader permutes and transforms whole batches on the device,
            # reproducibly for (seed, epoch), so a resumed run sees the same batches.
            for images, labels in train.epoch(epoch):
                # Batches steps - steps % accum ... make one optimisation step (fewer at the epoch's end).
                group = min(accum, batches - steps + steps % accum)
                stepping = (steps + 1) % accum == 0 or steps + 1 == batches
                if steps % accum == 0:
                    run.lr = lr_at(run.step)
                    for param_group in optimizer.param_groups:
                        param_group["lr"] = run.lr
                    optimizer.zero_grad(set_to_none=True)
                # DDP: gradients of the batches before the group's last stay local (no all-reduce).
                sync = contextlib.nullcontext() if stepping or not callable(no_sync) else no_sync()
                with sync:
                    # Forward and loss (in bf16/fp16 under AMP; the loss itself in float32).
                    with autocast:
                        logits = net(images)
                        loss = F.cross_entropy(logits.float(), labels, weight=weight,
                                               label_smoothing=config.label_smoothing)  # fmt: skip
                    # This process's weight in the global batch (1 except in an uneven last batch),
                    # shared over the batches of one step.
                    share = train.part_weight(steps, labels.shape[0]) / group
                    scaler.scale(loss if share == 1 else loss * share).backward()
                if stepping:  # the step (the scaler is a pass-through unless fp16)
                    if config.clip_grad:
                        scaler.unscale_(optimizer)
                        # Parameters without a gradient (frozen ones) are skipped by clip_grad_norm_.
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    if self.average is not None:
                        self.average.update(bare)
                    run.step += 1
                # Accumulate on the device: no .item(), no sync.
                step_losses[steps] = loss.detach()
                hard = labels if labels.ndim == 1 else labels.argmax(dim=1)  # mixed: the larger share
                correct += (logits.argmax(dim=1) == hard).sum()
                steps, seen = steps + 1, seen + labels.shape[0]
                sizes.append(float(labels.shape[0]))
                if time.perf_counter() >= next_report:  # throttled: the one mid-epoch sync
                    _check_finite(run, step_losses[:steps], lr_at, first_step, accum)
                    run.iteration_completed(seen, float(step_losses[:steps].mean()))
                    next_report = time.perf_counter() + options.report_every
            # End of the epoch: one sync for the training sums, then evaluate on the val split.
            _check_finite(run, step_losses[:steps], lr_at, first_step, accum)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - started
            weights = torch.tensor(sizes, device=device, dtype=torch.float32)
            train_loss = float((step_losses[:steps] * weights).sum()) / seen
            evaluated = net if self.average is None else self.average.module
            # Checkpoints, metrics.csv, curves, progress and early stopping all listen to this
            # (distributed: this rank's figures, which run.epoch_completed reduces over the ranks).
            run.epoch_completed(
                {"train_loss": train_loss, "train_acc": int(correct) / seen, **run.evaluate(evaluated),
                 "lr": run.lr, "examples_per_s": seen / seconds, "epoch_seconds": seconds},
                examples=seen,
            )  # fmt: skip
        return run.result()


def _check_finite(
    run: TrainingRun, losses: torch.Tensor, lr_at: Callable[[int], float], first_step: int, accum: int
) -> None:
    """DivergedError naming the first non-finite batch of this epoch, if there was one."""
    bad = (~torch.isfinite(losses)).nonzero()
    if bad.numel():
        batch = int(bad[0, 0])
        raise diverged(float(losses[batch]), run.epoch, lr_at(first_step + batch // accum), batch + 1)
