"""``WeightAverage``: an exponential moving average of a model's weights, kept on its device.

``torch.optim.swa_utils.AveragedModel`` reads its update counter back from the device twice a step
(``bool(n_averaged == 0)``, ``n_averaged > 0``), a sync per step on CUDA, and lerps BatchNorm's
integer ``num_batches_tracked`` with the floats. This one keeps the counter in Python, averages the
floating parameters and buffers with one fused ``_foreach_lerp_`` and copies the integer buffers.

The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (timm's ModelEmaV3
warm-up), so a short run's average is not dominated by its random initial weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["WeightAverage"]


class WeightAverage:
    """An EMA of ``model`` (parameters and buffers): ``update(model)`` after every optimisation step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), not {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        floats = [(a, b) for a, b in zip(mine, theirs, strict=True) if a.is_floating_point()]
        others = [(a, b) for a, b in zip(mine, theirs, strict=True) if not a.is_floating_point()]
        return [a for a, _ in floats], [b.detach() for _, b in floats], others

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (a bare module, not DDP's wrapper)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averaged, current, others = self._pairs(model)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        for mine, theirs in others:
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        """The average's tensors and the update count (what resuming needs, nothing pickled)."""
        return {"updates": self.updates, "weights": dict(self.module.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["weights"])
