"""Datasets held in memory (or memory-mapped) as uint8 tensors, and the whole-batch pipeline that
feeds the trainer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cnnkit.data.batches import BatchLoader
from cnnkit.data.cache import cached_splits, dataset_statistics, source_key
from cnnkit.errors import DataError, UsageError
from cnnkit.protocols import DatasetSplits

__all__ = ["BatchLoader", "cached_splits", "dataset_statistics", "load_dataset", "load_recorded", "source_key"]


def _with_size(
    spec: Any, options: dict[str, Any], input_size: int | None, val_fraction: float | None = None
) -> dict[str, Any]:
    """A dataset whose options declare ``image_size`` decodes at the run's input size, and one that
    declares ``val_fraction`` carves the run's validation share itself, unless told otherwise."""
    fields = getattr(spec.options, "model_fields", {})
    for key, value in (("image_size", input_size), ("val_fraction", val_fraction)):
        if value is not None and key in fields and key not in options:
            options = {**options, key: value}
    return options


def load_dataset(
    name: str, data: str | Path | None = None, *, input_size: int | None = None, val_fraction: float | None = None,
    **options: Any,
) -> DatasetSplits:  # fmt: skip
    """The splits of the registered dataset ``name``, from ``data`` or its default location.

    ``input_size``: the side the run feeds the model; a dataset with an ``image_size`` option (image
    folders) decodes at it, once, instead of at the images' native size. ``val_fraction``: the run's
    validation share, for a dataset with a ``val_fraction`` option (it then carves val itself)."""
    from cnnkit.registry import DATASETS

    spec = DATASETS.get(name)
    folder = Path(data) if data is not None else None
    try:
        return spec.load(folder, **_with_size(spec, dict(options), input_size, val_fraction))
    except DataError as exc:
        _suggest_image_folder(name, folder, exc)
        raise


def load_recorded(
    name: str, data: str | Path | None, split_files: Mapping[str, Sequence[str]], classes: Sequence[str],
    *, input_size: int | None = None, val_fraction: float | None = None, **options: Any,
) -> DatasetSplits:  # fmt: skip
    """Exactly the files a run recorded in each split, for datasets that can (``load_recorded``); the
    others load as :func:`load_dataset` does (their splits are fixed by their files or a seed)."""
    from cnnkit.registry import DATASETS

    spec = DATASETS.get(name)
    folder = Path(data) if data is not None else None
    reload = getattr(spec, "load_recorded", None)
    if not callable(reload):
        return load_dataset(name, data, input_size=input_size, val_fraction=val_fraction, **options)
    return reload(folder, split_files, classes, **_with_size(spec, dict(options), input_size, val_fraction))  # type: ignore[no-any-return]


def _suggest_image_folder(name: str, data: Path | None, exc: DataError) -> None:
    """``--data`` pointing at the user's own images with another dataset: say to use image-folder (exit 2)."""
    if name == "image-folder" or data is None or not data.exists():
        return
    from cnnkit.data.layouts import find_layout

    try:
        layout = find_layout(data)
    except DataError:
        return
    raise UsageError(
        f"--data {data} holds your own images ({layout.kind}, {len(layout.classes)} classes), not {name}'s "
        f"files; add --dataset image-folder"
    ) from exc
