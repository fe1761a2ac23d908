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
        self._mine: tuple[list[int], list[int], list[torch.Tensor], list[torch.Tensor]] | None = None

    def _split(self) -> tuple[list[int], list[int], list[torch.Tensor], list[torch.Tensor]]:
        """Positions of the floating and the other tensors among parameters-then-buffers, and the
        average's own tensors of each kind: the average's module is private, so these are made
        once (building them every step was most of an update's 250 us on BN-LeNet). ``module`` is
        the average's own: nothing moves or converts it after the first update."""
        if self._mine is None:
            mine = [*self.module.parameters(), *self.module.buffers()]
            floats = [i for i, a in enumerate(mine) if a.is_floating_point()]
            others = [i for i, a in enumerate(mine) if not a.is_floating_point()]
            self._mine = (floats, others, [mine[i] for i in floats], [mine[i] for i in others])
        return self._mine

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (a bare module, not DDP's wrapper)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        floats, others, averaged, copied = self._split()
        # The model's tensors are looked up on every update, not cached: moving or converting a
        # module replaces its buffers with new tensors.
        theirs = [*model.parameters(), *model.buffers()]
        if len(theirs) != len(floats) + len(others):
            raise ValueError(f"the model has {len(theirs)} parameters and buffers, its average {len(floats) + len(others)}")
        if averaged:
            torch._foreach_lerp_(averaged, [theirs[i] for i in floats], 1.0 - decay)
        for mine, i in zip(copied, others, strict=True):
            mine.copy_(theirs[i])

    def state_dict(self) -> dict[str, Any]:
        """The average's tensors and the update count (what resuming needs, nothing pickled)."""
        return {"updates": self.updates, "weights": dict(self.module.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["weights"])
