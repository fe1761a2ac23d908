"""Datasets held in memory as uint8 tensors, and the whole-batch pipeline that feeds the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnkit.data.batches import BatchLoader
from cnnkit.data.cache import cached_splits, dataset_statistics, source_key
from cnnkit.protocols import DatasetSplits

__all__ = ["BatchLoader", "cached_splits", "dataset_statistics", "load_dataset", "source_key"]


def load_dataset(name: str, data: str | Path | None = None, **options: Any) -> DatasetSplits:
    """Both splits of the registered dataset ``name``, from ``data`` or its default location."""
    from cnnkit.registry import DATASETS

    return DATASETS.get(name).load(Path(data) if data is not None else None, **options)
