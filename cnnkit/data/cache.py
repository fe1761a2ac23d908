"""Decoded datasets cached as safetensors in ``$CNNKIT_CACHE``, keyed by their source files.

The key hashes every source file's path, size and modification time together with the load
options, so editing, adding or removing a file makes a new entry; an unreadable cache file is
ignored and rebuilt. Nothing is ever written next to the data.

The cache is best effort: a cache folder that cannot be created or written (read-only, full,
file too large) costs the next run a decode and prints one warning; it never fails a load.
Entries are written atomically under random temp names, so processes filling the same entry at
once each replace it with a complete file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cnnkit.data.locate import decoded_cache
from cnnkit.errors import DataError
from cnnkit.protocols import DatasetSplits, ImageTensors

__all__ = ["cached_splits", "source_key", "dataset_statistics"]

_FORMAT = 1


def source_key(dataset: str, files: Iterable[Path], options: dict[str, Any]) -> str:
    """A digest of the files' identity (path, size, mtime) and the options that shape the tensors."""
    digest = hashlib.sha256(f"{_FORMAT}|{dataset}|{json.dumps(options, sort_keys=True, default=str)}".encode())
    for file in sorted(files):
        try:
            stat = file.stat()
        except OSError as exc:
            raise DataError(f"{file} cannot be read ({exc.strerror}); replace or remove it") from exc
        # fsencode: file names need not be UTF-8 (a Latin-1 name arrives with surrogate escapes).
        digest.update(b"|" + os.fsencode(file.resolve()) + f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def dataset_statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation on the 0..1 scale, in float64 for accuracy."""
    x = images.transpose(0, 1).reshape(images.shape[1], -1).to(torch.float64).div_(255)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def cached_splits(key: str, dataset: str, source: Path, build: Callable[[], DatasetSplits]) -> DatasetSplits:
    """The cached splits for ``key``, or ``build()`` them and cache the result atomically."""
    from cnnkit.fs import atomic_write

    path = decoded_cache() / f"{dataset}-{key}.safetensors"
    if path.is_file():
        try:
            return _read(path, dataset, source)
        except Exception:  # a damaged or foreign cache entry is rebuilt, never an error
            pass
    splits = build()
    tensors = {
        "train_images": splits.train.images.contiguous(), "train_labels": splits.train.labels.contiguous(),
        "test_images": splits.test.images.contiguous(), "test_labels": splits.test.labels.contiguous(),
    }  # fmt: skip
    meta = {"classes": list(splits.classes), "mean": splits.mean, "std": splits.std, "split_files": splits.split_files}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"cnnkit": json.dumps(meta)}))
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, the decoded data is in hand
        from cnnkit._console import warn

        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        warn(f"could not cache the decoded {dataset} in {path.parent} ({reason}); the next load decodes again")
    return splits


def _read(path: Path, dataset: str, source: Path) -> DatasetSplits:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads((handle.metadata() or {})["cnnkit"])
    t = load_file(str(path))
    return DatasetSplits(
        name=dataset,
        train=ImageTensors(t["train_images"], t["train_labels"]),
        test=ImageTensors(t["test_images"], t["test_labels"]),
        classes=tuple(meta["classes"]),
        source=source,
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        split_files={k: list(v) for k, v in meta["split_files"].items()},
    )
