"""Decoding image files once, at load time, into one uint8 tensor (never in the training loop)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cnnkit.errors import DataError

__all__ = ["decode_images", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def _decode(path: Path, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes); replace or remove it")
    try:
        with Image.open(path) as opened:
            image = opened.convert("L" if channels == 1 else "RGB")
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path} is not a readable image ({exc}); replace or remove it") from exc
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def decode_images(paths: Sequence[Path], channels: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 (N, channels, H, W) from image files; ``size`` (H, W) resizes any that differ.

    PIL releases the GIL while decoding, so a few threads speed this one-off step up.
    """
    if not paths:
        return torch.empty((0, channels, *(size or (0, 0))), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=4) as pool:
        arrays = list(pool.map(lambda p: _decode(p, channels, size), paths))
    first = arrays[0].shape
    for path, array in zip(paths, arrays, strict=True):
        if array.shape != first:
            raise DataError(
                f"{path} is {array.shape[1]}x{array.shape[2]}, unlike {paths[0]} ({first[1]}x{first[2]}); "
                "pass -d image_size=N to resize every image"
            )
    return torch.from_numpy(np.stack(arrays))
