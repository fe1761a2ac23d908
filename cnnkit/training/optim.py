"""Optimiser, learning-rate schedule and weight initialisation named by a :class:`TrainConfig`.

The schedule is a pure function of the global step, so resuming needs nothing but the step
count, and the loop sets ``lr`` on each parameter group itself (no scheduler object to save).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from cnnkit.config import TrainConfig

__all__ = ["build_optimizer", "lr_schedule", "xavier_init"]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; weight decay applies to weight matrices and kernels, not to biases or norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(
        groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0
    )


def lr_schedule(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """``step -> lr`` over ``config.epochs * steps_per_epoch`` steps.

    - ``constant``: ``lr`` (after an optional linear warm-up from 0),
    - ``cosine``: linear warm-up from 0, then cosine from ``lr`` down to 0,
    - ``onecycle``: torch's OneCycleLR shape: up from ``lr/25`` over ``warmup`` epochs (30% of the
      run when 0), then cosine down to ``lr/25e4``.
    """
    total = max(1, config.epochs * steps_per_epoch)
    peak = config.lr
    if config.schedule == "onecycle":
        rise = max(1, round(config.warmup * steps_per_epoch) if config.warmup else round(0.3 * total))
        start, end = peak / 25, peak / 25e4

        def onecycle(step: int) -> float:
            if step < rise:
                return start + (peak - start) * step / rise
            progress = min(1.0, (step - rise) / max(1, total - rise))
            return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))

        return onecycle

    warm = round(config.warmup * steps_per_epoch)
    cosine = config.schedule == "cosine"

    def warmup_then(step: int) -> float:
        if step < warm:
            return peak * (step + 1) / warm
        if not cosine:
            return peak
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return peak * 0.5 * (1 + math.cos(math.pi * progress))

    return warmup_then


def xavier_init(model: nn.Module) -> None:
    """d2l's initialisation: Xavier-uniform weights for every convolution and linear layer."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
