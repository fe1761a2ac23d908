"""Loss weights a config asks for (``--class-weights balanced``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cnnkit.errors import DataError

__all__ = ["balanced_class_weights"]


def balanced_class_weights(labels: torch.Tensor, classes: Sequence[str]) -> torch.Tensor:
    """``n / (k * n_c)`` per class (scikit-learn's "balanced"): each class weighs as much in the loss
    as if the classes were equally frequent. A class without training images cannot be weighed:
    DataError (exit 3) naming it."""
    counts = torch.bincount(labels.flatten().long(), minlength=len(classes)).double()
    empty = [classes[i] for i in (counts == 0).nonzero().flatten().tolist()]
    if empty:
        shown = ", ".join(repr(name) for name in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(
            f"--class-weights balanced: class {shown} has no training image; add images or use --class-weights none"
        )
    return (counts.sum() / (len(classes) * counts)).float()
