"""Image files decoded once, at the run's size, into a memory-mapped store: bounded memory at any size.

:func:`stored_images` turns a list of image files into one uint8 (N, C, size, size) tensor. Each
file is read by :func:`cnnkit.image_files.read_image_square` (the same opening, EXIF rotation,
16-bit scaling, palettes, bomb limit and errors as every other reader; a JPEG decoded at a reduced
DCT scale when the result is much smaller) and resized on the way (``crop``, ``squash`` or
``pad``), so a folder of phone photos costs its decoded size *at the run's size*, never its native
size.

Where it lives: ``decoded_cache() / "stores" / <key>/``, holding ``images.u8`` (the raw array, C
order, nothing else) and ``meta.json`` (shape, mean/std, what made it, when). The key hashes the
files *in order* (path, size, mtime: the order is the images' order, unlike
:func:`cnnkit.data.cache.source_key`), the size, the channels, the resize mode and a format version;
editing, adding, removing or reordering a file makes a new entry.

Why a raw array memory-mapped (and not safetensors, which the whole-split cache of
:mod:`cnnkit.data.cache` uses): the array file is mapped (:func:`map_array`) and wrapped by
``torch.from_numpy`` -- zero-copy, so the tensor *is* the mapped file. A batch is an
``index_select`` straight from the page cache, with no per-batch copy through a reader library and
no decoded copy in anonymous memory; the kernel keeps the hot pages and drops the rest under
pressure, so 20,000 images at 224 px (3 GB) or 200,000 (30 GB) train in bounded memory.
The mapping is private and writable (copy-on-write, as ``np.memmap(mode="c")``), so the tensor is
writable as torch expects, every page stays file-backed until someone writes to it, and nothing
written ever reaches the file; it is made with ``MAP_NORESERVE``, because a writable private
mapping is otherwise charged in full against the system's commit limit, and a store larger than
memory plus swap (200,000 images at 224 px: 30 GB on a 24 GB machine) could not be opened at all
("Cannot allocate memory"). Where even that is refused (strict overcommit), it is mapped
read-only. A safetensors file can be memory-mapped too, but its slices come back as copies.

How it is built (:mod:`cnnkit.data.store_build`): a process pool over all cores
(:mod:`cnnkit._decode_pool`, torch-free workers) decodes chunks of files, each worker writing its
chunk into its place in the array file with plain ``pwrite`` calls (so a full disk is an
``OSError``, never the ``SIGBUS`` a write through a map would be; small sets are decoded and
appended in this process); the parent accumulates the per-channel statistics of the first
``stats_count`` images as exact integer sums (no float array over the set). At most two chunks per worker are in flight, so the
build's memory does not grow with the set. It builds into a hidden temp folder beside the entry,
fsyncs, and ``os.replace``-s it into place: an interrupted or failed build (Ctrl-C, a file that
fails to decode: DataError naming it, exit 3) leaves no entry and no temp folder.

A full or unwritable cache costs one warning: the set is decoded into memory instead when it fits
in half the available memory, else a CnnkitError (exit 1) names the cache folder and the fix.
Small sets (under min(1 GiB, a quarter of the available memory)) are returned as a plain
in-memory tensor, read from the entry, as fast as any in-memory split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap
import os
import shutil
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.data.locate import decoded_cache
from cnnkit.data.store_build import ARRAY_FILE, FORMAT, META_FILE, Build, Decoded, mean_std, write_meta
from cnnkit.errors import DataError
from cnnkit.image_files import RESIZE_MODES, ResizeMode

__all__ = [
    "ARRAY_FILE", "FORMAT", "META_FILE", "ResizeMode", "StoredImages", "store_key", "stored_images",
    "stores_folder",
]  # fmt: skip

IN_MEMORY_MAX = 1 << 30
"""Arrays up to min(this, a quarter of the available memory) are returned in memory, not mapped."""

POOL_MIN_FILES = 64
"""Fewer files than this are decoded in this process: starting workers would cost more."""

CHUNK_BYTES = 8 << 20
"""About this many decoded bytes per task sent to a worker (at most 256 files, at least 1)."""


@dataclass(frozen=True)
class StoredImages:
    """The decoded images of :func:`stored_images` and their statistics."""

    images: torch.Tensor
    """uint8 (N, C, size, size): memory-mapped from the cache entry (file pages, not anonymous
    memory), or an ordinary in-memory tensor for small sets."""
    mean: tuple[float, ...]
    """Per channel, on the 0..1 scale, of ``images[:stats_count]`` (the training split)."""
    std: tuple[float, ...]
    """Per channel (with Bessel's correction, as ``torch.std``), of ``images[:stats_count]``."""
    path: Path | None
    """The cache entry (a folder); None when it could not be written and the images are in memory."""
    mapped: bool = False
    """True when ``images`` is memory-mapped (its pages are read from disk as batches touch them)."""


def stores_folder() -> Path:
    """Where the entries live: ``decoded_cache() / "stores"``."""
    return decoded_cache() / "stores"


def store_key(files: Sequence[Path], *, size: int, channels: int, resize: ResizeMode) -> str:
    """A digest of the files in order (path, size, mtime), the size, channels, resize mode and format."""
    digest = hashlib.sha256(f"store|{FORMAT}|{size}|{channels}|{resize}|{len(files)}".encode())
    for file in files:
        try:
            stat = os.stat(file)
        except OSError as exc:
            raise DataError(f"{file} cannot be read ({exc.strerror}); replace or remove it") from exc
        # fsencode: file names need not be UTF-8 (a Latin-1 name arrives with surrogate escapes).
        # abspath, not resolve(): no syscalls per path component (20,000 files open in milliseconds).
        digest.update(b"|" + os.fsencode(os.path.abspath(file)) + f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def stored_images(
    files: Sequence[Path],
    *,
    size: int,
    channels: int,
    resize: ResizeMode,
    dataset: str,
    stats_count: int,
    progress: bool = True,
) -> StoredImages:
    """``files`` decoded, in order, to uint8 (N, channels, size, size), from the cache or built once.

    ``stats_count``: the first that many images (the training split) give ``mean`` and ``std``; 0
    gives mean 0 and std 1 (normalising changes nothing). ``progress``: a bar with ETA on stderr
    when it is a terminal, else a line every 30 s while a build runs. ``dataset`` only labels the
    entry (``cnnkit cache info``). A file that cannot be decoded is a DataError (exit 3) naming it.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    paths = [Path(f) for f in files]
    if not 0 <= stats_count <= len(paths):
        raise ValueError(f"stats_count must be within 0..{len(paths)}, got {stats_count}")
    shape = (len(paths), channels, size, size)
    if not paths:
        return StoredImages(torch.empty(shape, dtype=torch.uint8), (0.0,) * channels, (1.0,) * channels, None)
    key = store_key(paths, size=size, channels=channels, resize=resize)
    entry = stores_folder() / key
    found = _open_entry(entry, shape)
    if found is not None:
        return _result(entry, *found, stats_count)
    with _building(entry):  # processes wanting the same entry (the ranks of a run) build it once
        found = _open_entry(entry, shape)
        if found is not None:
            return _result(entry, *found, stats_count)
        made = Build(
            paths, entry, shape, resize, dataset, stats_count, progress, chunk_bytes=CHUNK_BYTES,
            pool_min_files=POOL_MIN_FILES, available_memory=available_memory,
        ).run()  # fmt: skip
    if isinstance(made, Decoded):
        return StoredImages(torch.from_numpy(made.images), made.mean, made.std, None)
    found = _open_entry(entry, shape)
    if found is None:  # removed under our feet (cnnkit cache clear in another shell): build again
        return stored_images(
            files, size=size, channels=channels, resize=resize, dataset=dataset, stats_count=stats_count,
            progress=progress,
        )  # fmt: skip
    return _result(entry, *found, stats_count)


@contextlib.contextmanager
def _building(entry: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<key>.lock`` beside the entry (none where the cache cannot be
    written or there is no ``fcntl``: the atomic replace keeps concurrent builds correct anyway)."""
    try:
        import fcntl

        entry.parent.mkdir(parents=True, exist_ok=True)
        handle = open(entry.parent / f".{entry.name}.lock", "a+b")  # noqa: SIM115 - closed below
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        handle.close()


# ---------------------------------------------------------------------------------------- reading


def read_meta(entry: Path) -> dict[str, Any] | None:
    """An entry's meta.json, or None when it is missing or not ours."""
    try:
        meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _open_entry(entry: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, dict[str, Any]] | None:
    """(the array mapped copy-on-write, meta) of a complete entry; None when there is none.

    A damaged one (wrong shape, short file) is removed, so that it is rebuilt."""
    meta = read_meta(entry)
    if meta is None:
        return None
    array_path = entry / ARRAY_FILE
    try:
        complete = list(meta.get("shape", [])) == list(shape) and array_path.stat().st_size == math.prod(shape)
    except OSError:
        complete = False
    if not complete:
        shutil.rmtree(entry, ignore_errors=True)
        return None
    with contextlib.suppress(OSError):  # last used; a read-only cache still reads
        os.utime(entry / META_FILE)
    return map_array(array_path, shape), meta


_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
"""Linux's flag (Python has the constant from 3.13): the mapping reserves no swap/commit charge."""


def map_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 array file at ``path`` memory-mapped as ``shape``: private and writable
    (copy-on-write) without a commit charge, else read-only (see the module docstring)."""
    size = math.prod(shape)
    with open(path, "rb") as file:
        try:
            mapped = mmap.mmap(
                file.fileno(), size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except (OSError, AttributeError, TypeError):  # refused (strict overcommit), or no such flags here
            mapped = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, dtype=np.uint8, count=size).reshape(shape)


def _result(entry: Path, array: np.ndarray, meta: dict[str, Any], stats_count: int) -> StoredImages:
    stats = meta.get("stats", {}).get(str(stats_count))
    if stats is None:  # another split of the same files: computed once from the array, then kept
        sums = _array_sums(array[:stats_count])
        mean, std = mean_std(sums, stats_count * array.shape[2] * array.shape[3])
        meta.setdefault("stats", {})[str(stats_count)] = {"mean": list(mean), "std": list(std)}
        with contextlib.suppress(OSError):
            write_meta(entry / META_FILE, meta)
    else:
        mean, std = tuple(stats["mean"]), tuple(stats["std"])
    if array.nbytes <= min(IN_MEMORY_MAX, available_memory() // 4):
        images = torch.from_numpy(np.fromfile(entry / ARRAY_FILE, dtype=np.uint8).reshape(array.shape))
    else:
        return StoredImages(_as_tensor(array), tuple(mean), tuple(std), entry, mapped=True)
    return StoredImages(images, tuple(mean), tuple(std), entry)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy``, without its warning for a read-only mapping (nothing here writes to a split)."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _array_sums(array: np.ndarray) -> np.ndarray:
    """int64 (C, 2): per channel, the sum of the values and of their squares, a few MB at a time."""
    channels = array.shape[1]
    sums = np.zeros((channels, 2), dtype=np.int64)
    per_image = max(1, math.prod(array.shape[1:]))
    step = max(1, (4 << 20) // per_image)
    values = np.arange(256, dtype=np.int64)
    for start in range(0, array.shape[0], step):
        chunk = np.asarray(array[start : start + step])
        for c in range(channels):
            histogram = np.bincount(chunk[:, c].ravel(), minlength=256)
            sums[c] += (histogram @ values, histogram @ (values * values))
    return sums


def available_memory() -> int:
    """Bytes the system can give without swapping (``MemAvailable``: free plus reclaimable cache)."""
    from cnnkit.data.batches import reclaimable_memory

    return reclaimable_memory()
