"""Decoding image files once, at load time, into one uint8 tensor (never in the training loop)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from cnnkit.errors import DataError
from cnnkit.image_files import IMAGE_SUFFIXES, read_image

__all__ = ["decode_images", "IMAGE_SUFFIXES"]


def decode_images(paths: Sequence[Path], channels: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 (N, channels, H, W) from image files; ``size`` (H, W) resizes any that differ.

    Each file is read by :func:`cnnkit.image_files.read_image` (EXIF orientation applied, 16-bit
    scaled, any format PIL reads); the first unreadable one is a DataError naming it. PIL
    releases the GIL while decoding, so a few threads speed this one-off step up.
    """
    if not paths:
        return torch.empty((0, channels, *(size or (0, 0))), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=4) as pool:
        arrays = list(pool.map(lambda p: read_image(p, channels, size), paths))
    first = arrays[0].shape
    for path, array in zip(paths, arrays, strict=True):
        if array.shape != first:
            raise DataError(
                f"{path} is {array.shape[1]}x{array.shape[2]}, unlike {paths[0]} ({first[1]}x{first[2]}); "
                "pass -d image_size=N to resize every image"
            )
    return torch.from_numpy(np.stack(arrays))
