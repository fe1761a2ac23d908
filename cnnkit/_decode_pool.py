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

import errno
import mmap
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cnnkit.image_files import ResizeMode, square_pixels

__all__ = ["Chunk", "decode_chunk", "start_worker"]

_buffer: mmap.mmap | None = None
"""This worker's pixel buffer, reused chunk after chunk (a fresh one would page-fault anew each
time); page-aligned, so that it can be written with ``O_DIRECT``."""

_ALIGN = 4096
"""What ``O_DIRECT`` needs aligned (file offset, length and memory address): the page size, a
multiple of any disk's logical block size."""


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
    paths: Sequence[Path], channels: int, size: int, resize: ResizeMode, target: tuple[str, int, bool] | None = None
) -> Chunk:
    """Each file's pixels and, per channel, the exact sum of its values and of their squares (so
    the statistics of any number of images are exact integers; no float array is ever made).

    ``target`` = (array file, byte offset, direct): the pixels are written there (in this worker's
    reused buffer until then) and not returned, unless the write fails (``write_error``); with
    ``direct``, bypassing the page cache where the file system allows (see :func:`_pwrite`).
    """
    import cv2

    global _buffer
    _will_need(paths)
    shape = (len(paths), channels, size, size)
    if target is None:
        pixels = np.empty(shape, dtype=np.uint8)
    else:
        count = int(np.prod(shape))
        if _buffer is None or len(_buffer) < count + _ALIGN:
            _buffer = mmap.mmap(-1, count + _ALIGN)
        # Placed so that each byte's address and its file offset agree modulo _ALIGN: the aligned
        # middle of the chunk can then go to the disk straight from here.
        start = target[1] % _ALIGN
        pixels = np.frombuffer(_buffer, dtype=np.uint8, count=count, offset=start).reshape(shape)
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
        _pwrite(target[0], target[1], pixels, direct=target[2])
    except OSError as exc:
        return Chunk(pixels.copy(), sums, exc)
    return Chunk(None, sums)


def _will_need(paths: Sequence[Path]) -> None:
    """Ask the kernel to start reading every file of the chunk now (a hint; errors are the
    decoder's to report): read one at a time, each cold file was a wait on the disk with the core
    idle (a 200,000-JPEG build ran at 73% of what its CPU time allowed)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _pwrite(path: str, offset: int, pixels: np.ndarray, direct: bool = False) -> None:
    """``pixels`` into the file at ``offset`` (plain writes: a full disk is an OSError, not a SIGBUS).

    With ``direct``, the chunk's whole aligned pages go to the disk with ``O_DIRECT`` (``pixels``
    must then agree with the file offset modulo _ALIGN, as :func:`decode_chunk` places them) and
    only its partial first and last pages through the page cache. A store larger than the page
    cache is written through it at a high price on this project's virtual machine: 2.6 s of
    kernel CPU per GB (0.37 ms per 224 px image, half the decoding's cost), against 0.02 s with
    ``O_DIRECT`` (profiled). A file system without ``O_DIRECT`` gets plain writes."""
    view = memoryview(pixels.reshape(-1).data)
    head = min(len(view), -offset % _ALIGN)
    middle = (len(view) - head) // _ALIGN * _ALIGN
    if direct and middle and _write_direct(path, view[head : head + middle], offset + head):
        rest = [(view[:head], offset), (view[head + middle :], offset + head + middle)]
    else:
        rest = [(view, offset)]
    fd = os.open(path, os.O_WRONLY)
    try:
        for part, at in rest:
            _write_all(fd, part, at)
    finally:
        os.close(fd)


def _write_direct(path: str, view: memoryview, offset: int) -> bool:
    """Whether ``view`` (aligned in memory, in the file and in length) went into the file with
    ``O_DIRECT``; False where the system or file system has none (then it is written as usual,
    the same bytes at the same offsets)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | flag)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    try:
        _write_all(fd, view, offset)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)
    return True


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
