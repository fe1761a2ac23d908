"""The worker side of :mod:`cnnkit.data.store_build`: a chunk of image files -> uint8 pixels and pixel sums.

It imports PIL, OpenCV and numpy only (never torch), so a pool worker starts in a fraction of a
second and holds some 20 MB of its own memory plus one chunk's pixels (38 MB for 256 images at
224 px), however large the set it helps decode.

A worker writes its chunk's pixels itself, with ``pwrite`` at the chunk's offset in the array file,
and sends back only the sums: sending 8 MB of pixels through a pipe to the parent, which then wrote
them, cost more CPU than decoding them (profiled: 2.7 ms of CPU per 224 px image in all, 1.5 ms of
it decoding; bench/results/image_store.txt).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cnnkit.image_files import ResizeMode, square_pixels

__all__ = ["Chunk", "decode_chunk", "start_worker"]

_buffer: np.ndarray | None = None
"""This worker's pixel buffer, reused chunk after chunk (a fresh one would page-fault anew each time)."""


class Chunk(NamedTuple):
    """What :func:`decode_chunk` gives back."""

    pixels: np.ndarray | None
    """uint8 (n, channels, size, size); None when they were written to ``target``."""
    sums: np.ndarray
    """int64 (n, channels, 2): per image and channel, the sum of the values and of their squares."""
    write_error: OSError | None = None
    """Why writing to ``target`` failed (the pixels are then returned instead)."""


def start_worker() -> None:
    """Pool initializer. Ctrl-C reaches the whole process group; only the parent acts on it (it
    cancels the pool and removes its half-built entry), so workers print no tracebacks of their own.
    One OpenCV thread: the pool already runs a worker per core, and OpenCV's own threads would
    contend with the other workers for them."""
    import cv2

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)


def decode_chunk(
    paths: Sequence[Path], channels: int, size: int, resize: ResizeMode, target: tuple[str, int] | None = None
) -> Chunk:
    """Each file's pixels and, per channel, the exact sum of its values and of their squares (so
    the statistics of any number of images are exact integers; no float array is ever made).

    ``target`` = (array file, byte offset): the pixels are written there (in this worker's reused
    buffer until then) and not returned, unless the write fails (``write_error``).
    """
    import cv2

    global _buffer
    shape = (len(paths), channels, size, size)
    if target is None:
        pixels = np.empty(shape, dtype=np.uint8)
    else:
        count = int(np.prod(shape))
        if _buffer is None or _buffer.size < count:
            _buffer = np.empty(count, dtype=np.uint8)
        pixels = _buffer[:count].reshape(shape)
    sums = np.empty((len(paths), channels, 2), dtype=np.int64)
    for i, path in enumerate(paths):
        square = square_pixels(path, channels, size, resize)
        if channels == 1:
            pixels[i, 0] = square
        else:
            cv2.split(square, list(pixels[i]))  # HWC -> planes straight into the chunk, one pass
        for c in range(channels):
            # Exact integers, rounded: OpenCV adds in float64 (exact below 2**53; a plane's squares
            # stay below 65,025 x side**2), but its L2SQR comes back as sqrt(x) squared, 1e-9 off.
            sums[i, c, 0] = round(cv2.sumElems(pixels[i, c])[0])
            sums[i, c, 1] = round(cv2.norm(pixels[i, c], cv2.NORM_L2SQR))
    if target is None:
        return Chunk(pixels, sums)
    try:
        _pwrite(target[0], target[1], pixels)
    except OSError as exc:
        return Chunk(pixels.copy(), sums, exc)
    return Chunk(None, sums)


def _pwrite(path: str, offset: int, pixels: np.ndarray) -> None:
    """``pixels`` into the file at ``offset`` (plain writes: a full disk is an OSError, not a SIGBUS)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(pixels.reshape(-1).data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    finally:
        os.close(fd)
