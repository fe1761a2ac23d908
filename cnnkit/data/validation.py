"""The validation split of a run: the dataset's own, else a seeded, stratified share of train.

Every run selects its best checkpoint and stops early on validation, never on test. A dataset that
has a val split (an image folder's ``val/``, or its seeded carve-out) keeps it; for the others
(Fashion-MNIST, COIL-20) :func:`carve_validation` holds out ``fraction`` of each class of the
training split, drawn by ``seed``, so the same (dataset, fraction, seed) always gives the same
split. The held-out examples are never trained on; the run records which they are.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from cnnkit.errors import DataError
from cnnkit.protocols import DatasetSplits, ImageTensors

__all__ = ["carve_validation", "validation_indices", "validation_record"]


def validation_indices(labels: torch.Tensor, classes: tuple[str, ...], fraction: float, seed: int) -> torch.Tensor:
    """Indices into the training split of the examples held out for validation (sorted): at least
    one per class, ``round(n * fraction)`` of a class of n, drawn by ``seed``."""
    generator = torch.Generator().manual_seed(seed + 104_729)  # not the shuffling's stream
    chosen: list[torch.Tensor] = []
    for label, name in enumerate(classes):
        members = (labels == label).nonzero().flatten()
        if len(members) == 0:
            continue
        count = max(1, round(len(members) * fraction))
        if count >= len(members):
            raise DataError(
                f"class '{name}' has {len(members)} training example(s), too few to hold out {count} for "
                "validation and keep one to train on; add examples, or pass --val-fraction 0 (no best checkpoint)"
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return torch.cat(chosen).sort().values if chosen else torch.zeros(0, dtype=torch.long)


def carve_validation(data: DatasetSplits, fraction: float, seed: int) -> tuple[DatasetSplits, torch.Tensor | None]:
    """``data`` with a val split carved from train (``fraction`` > 0 and no val of its own), and the
    indices held out of the loaded training split; else ``data`` as it is and None."""
    if data.val is not None or fraction <= 0:
        return data, None
    held = validation_indices(data.train.labels, data.classes, fraction, seed)
    keep = torch.ones(len(data.train), dtype=torch.bool)
    keep[held] = False
    kept = keep.nonzero().flatten()
    split_files = dict(data.split_files)
    names = split_files.get("train")
    if names is not None and len(names) == len(data.train):
        split_files["train"] = [names[i] for i in kept.tolist()]
        split_files["val"] = [names[i] for i in held.tolist()]
    subset = lambda index: ImageTensors(  # noqa: E731
        torch.index_select(data.train.images, 0, index), torch.index_select(data.train.labels, 0, index)
    )
    return replace(data, train=subset(kept), val=subset(held), split_files=split_files), held


def validation_record(data: DatasetSplits, fraction: float, seed: int, carved: bool) -> dict[str, Any] | None:
    """What config.json and the weights record of the val split (None: the run has none)."""
    if data.val is None:
        return None
    if not carved:
        return {"from": "dataset", "examples": len(data.val)}
    return {"from": "train", "fraction": fraction, "seed": seed, "examples": len(data.val)}
