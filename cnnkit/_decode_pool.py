"""The worker side of :mod:`cnnkit.data.store_build`: a chunk of image files -> uint8 pixels and pixel sums.

It imports PIL and numpy only (never torch), so a pool worker starts in a fraction of a second and
holds some 20 MB of its own memory, however large the set it helps decode.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnnkit.image_files import ResizeMode, square_image

__all__ = ["decode_chunk", "ignore_interrupts"]

_VALUES = np.arange(256, dtype=np.int64)
_SQUARES = _VALUES * _VALUES


def ignore_interrupts() -> None:
    """Pool initializer: Ctrl-C reaches the whole process group; only the parent acts on it (it
    cancels the pool and removes its half-built entry), so workers print no tracebacks of their own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode_chunk(
    paths: Sequence[Path], channels: int, size: int, resize: ResizeMode
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (n, channels, size, size), int64 (n, channels, 2)): each file's pixels and, per channel,
    the exact sum of its values and of their squares (from PIL's histogram, so the statistics of
    any number of images are exact integers; no float array is ever made)."""
    pixels = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    sums = np.empty((len(paths), channels, 2), dtype=np.int64)
    for i, path in enumerate(paths):
        image = square_image(path, channels, size, resize)
        histogram = np.asarray(image.histogram(), dtype=np.int64).reshape(channels, 256)
        sums[i, :, 0] = histogram @ _VALUES
        sums[i, :, 1] = histogram @ _SQUARES
        array = np.asarray(image)
        pixels[i] = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)  # one copy, into place
    return pixels, sums

