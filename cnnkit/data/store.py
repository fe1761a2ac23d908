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

Why raw + ``numpy.memmap`` (and not safetensors, which the whole-split cache of
:mod:`cnnkit.data.cache` uses): the array is opened with ``np.memmap(..., mode="c")`` and wrapped
by ``torch.from_numpy`` -- zero-copy, so the tensor *is* the mapped file. A batch is an
``index_select`` straight from the page cache, with no per-batch copy through a reader library and
no decoded copy in anonymous memory; the kernel keeps the hot pages and drops the rest under
pressure, so 20,000 images at 224 px (3 GB) or 200,000 (30 GB) train in bounded memory.
Copy-on-write (``mode="c"``) makes the array writable as torch expects (no non-writable warning)
while every page stays file-backed until someone writes to it, and nothing written ever reaches
the file. A safetensors file can be memory-mapped too, but its slices come back as copies.

How it is built: a process pool over all cores (:mod:`cnnkit._decode_pool`, torch-free workers)
decodes chunks of files; the parent writes each chunk, in order, to the end of the array file with
plain ``write`` calls (so a full disk is an ``OSError``, never the ``SIGBUS`` a write through a map
would be) and accumulates the per-channel statistics of the first ``stats_count`` images as exact
integer sums (no float array over the set). At most two chunks per worker are in flight, so the
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
import errno
import hashlib
import json
import math
import os
import secrets
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.data.locate import decoded_cache
from cnnkit.errors import CnnkitError, DataError
from cnnkit.image_files import RESIZE_MODES, ResizeMode

__all__ = ["FORMAT", "ResizeMode", "StoredImages", "human_bytes", "store_key", "stored_images", "stores_folder"]

FORMAT = 1
"""Version of the entry layout; part of the key, so a new layout never reads an old entry."""

ARRAY_FILE = "images.u8"
META_FILE = "meta.json"

IN_MEMORY_MAX = 1 << 30
"""Arrays up to min(this, a quarter of the available memory) are returned in memory, not mapped."""

POOL_MIN_FILES = 64
"""Fewer files than this are decoded in this process: starting workers would cost more."""

CHUNK_BYTES = 8 << 20
"""About this many decoded bytes per task sent to a worker (at most 256 files, at least 1)."""

LOG_EVERY = 30.0
"""Seconds between progress lines when stderr is not a terminal."""


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
        made = _Build(paths, entry, shape, resize, dataset, stats_count, progress).run()
    if isinstance(made, StoredImages):
        return made
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
    array = np.memmap(array_path, dtype=np.uint8, mode="c", shape=shape)
    return array, meta


def _result(entry: Path, array: np.ndarray, meta: dict[str, Any], stats_count: int) -> StoredImages:
    stats = meta.get("stats", {}).get(str(stats_count))
    if stats is None:  # another split of the same files: computed once from the array, then kept
        sums = _array_sums(array[:stats_count])
        mean, std = _mean_std(sums, stats_count * array.shape[2] * array.shape[3])
        meta.setdefault("stats", {})[str(stats_count)] = {"mean": list(mean), "std": list(std)}
        with contextlib.suppress(OSError):
            _write_meta(entry / META_FILE, meta)
    else:
        mean, std = tuple(stats["mean"]), tuple(stats["std"])
    if array.nbytes <= min(IN_MEMORY_MAX, available_memory() // 4):
        images = torch.from_numpy(np.fromfile(entry / ARRAY_FILE, dtype=np.uint8).reshape(array.shape))
    else:
        images = torch.from_numpy(array)
    return StoredImages(images, tuple(mean), tuple(std), entry)


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


def _mean_std(sums: np.ndarray, count: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (Bessel-corrected) std on 0..1 from exact integer sums over ``count`` values."""
    channels = sums.shape[0]
    if count == 0:
        return (0.0,) * channels, (1.0,) * channels
    means, stds = [], []
    for total, squares in sums.tolist():  # Python ints: exact however many values
        means.append(total / count / 255)
        variance = (squares * count - total * total) / (count * max(count - 1, 1))  # exact until this division
        stds.append(math.sqrt(max(variance, 0.0)) / 255)
    return tuple(means), tuple(stds)


def available_memory() -> int:
    """Bytes the system can give without swapping (``MemAvailable``: free plus reclaimable cache)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    from cnnkit.data.batches import available_memory as free_pages

    return free_pages()


# ---------------------------------------------------------------------------------------- building


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def _workers_skip_main() -> Iterator[None]:
    """Workers started meanwhile do not import ``__main__``, as spawn and forkserver workers do.

    They run nothing but :mod:`cnnkit._decode_pool`; importing the caller's script would run it
    again in each worker when it has no ``if __name__ == "__main__":`` guard (common on Linux,
    where fork never needed one), and fails outright for ``python - < script``.
    ProcessPoolExecutor starts its spawn/forkserver workers inside ``submit``, in this thread.
    """
    from multiprocessing import spawn

    original = spawn.get_preparation_data

    def without_main(name: str) -> dict[str, Any]:
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    spawn.get_preparation_data = without_main  # type: ignore[assignment]
    try:
        yield
    finally:
        spawn.get_preparation_data = original  # type: ignore[assignment]


def _pool_context() -> Any:
    """forkserver where there is one: workers forked from a fresh, torch-free process (fork from a
    process running torch's thread pools is unsafe, and spawn re-imports more per worker)."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _write_chunk(handle: Any, pixels: np.ndarray) -> None:
    """Append ``pixels`` to the open array file (a seam for tests that fill the disk)."""
    view = memoryview(pixels.reshape(-1))  # type: ignore[arg-type]
    while view:
        written = handle.write(view)
        view = view[written:]


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    from cnnkit.fs import write_text

    write_text(path, json.dumps(meta, indent=1) + "\n")


class _Build:
    """One build of an entry (see the module docstring); :meth:`run` returns the entry's path, or
    the images themselves when the cache could not take them."""

    def __init__(
        self, paths: list[Path], entry: Path, shape: tuple[int, int, int, int], resize: ResizeMode,
        dataset: str, stats_count: int, progress: bool,
    ) -> None:  # fmt: skip
        self.paths, self.entry, self.shape, self.resize = paths, entry, shape, resize
        self.dataset, self.stats_count, self.progress = dataset, stats_count, progress
        self.per_image = math.prod(shape[1:])
        self.nbytes = shape[0] * self.per_image
        self.tmp: Path | None = None
        self.handle: Any = None
        self.memory: np.ndarray | None = None  # the in-memory fallback, once the cache failed
        self.done = 0

    def run(self) -> Path | StoredImages:
        sums = np.zeros((self.shape[1], 2), dtype=np.int64)
        try:
            self._open_file()
            chunks = self._chunks()
            with _Progress(self.dataset, self.shape, enabled=self.progress) as bar, contextlib.closing(chunks):  # type: ignore[type-var]
                for pixels, per_image in chunks:
                    if self.done < self.stats_count:
                        sums += per_image[: self.stats_count - self.done].sum(0)
                    self._store(pixels)
                    self.done += len(pixels)
                    bar.advance(len(pixels))
            mean, std = _mean_std(sums, self.stats_count * self.shape[2] * self.shape[3])
            if self.memory is not None:
                return StoredImages(torch.from_numpy(self.memory), mean, std, None)
            return self._commit(mean, std)
        except BaseException:
            self._discard()
            raise

    # -- where the pixels go

    def _open_file(self) -> None:
        folder = self.entry.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if shutil.disk_usage(folder).free < self.nbytes + (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
            self.tmp = folder / f".{self.entry.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            self.tmp.mkdir()
            self.handle = open(self.tmp / ARRAY_FILE, "wb", buffering=0)  # noqa: SIM115 - closed in _commit/_discard
        except OSError as exc:
            self._fall_back(exc)

    def _store(self, pixels: np.ndarray) -> None:
        if self.memory is None:
            try:
                _write_chunk(self.handle, pixels)
                return
            except OSError as exc:
                self._fall_back(exc)
        assert self.memory is not None
        self.memory[self.done : self.done + len(pixels)] = pixels

    def _fall_back(self, exc: OSError) -> None:
        """The cache cannot take the array: one warning, then memory (keeping what was decoded)."""
        from cnnkit._console import warn

        folder = self.entry.parent
        reason = exc.strerror or type(exc).__name__
        fix = "free some space or set CNNKIT_CACHE to a folder on a larger disk"
        if exc.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            fix = "make it writable or set CNNKIT_CACHE to a folder that is"
        need = human_bytes(self.nbytes)
        if self.nbytes > available_memory() // 2:
            self._discard()
            raise CnnkitError(
                f"cannot store the decoded {self.dataset} ({need}) in the cache folder {folder} ({reason}), and "
                f"it does not fit in memory; {fix}"
            ) from exc
        warn(f"cannot store the decoded {self.dataset} ({need}) in {folder} ({reason}); keeping it in memory instead")
        memory = np.empty(self.shape, dtype=np.uint8)
        if self.done and self.tmp is not None:  # what is already in the file is not decoded again
            done = np.fromfile(self.tmp / ARRAY_FILE, dtype=np.uint8, count=self.done * self.per_image)
            memory[: self.done] = done.reshape(self.done, *self.shape[1:])
        self._discard()
        self.memory = memory

    def _commit(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Path | StoredImages:
        assert self.tmp is not None
        meta = {
            "format": FORMAT,
            "shape": list(self.shape),
            "dtype": "uint8",
            "files": self.shape[0],
            "dataset": self.dataset,
            "size": self.shape[2],
            "channels": self.shape[1],
            "resize": self.resize,
            "source": _common_folder(self.paths),
            "stats": {str(self.stats_count): {"mean": list(mean), "std": list(std)}},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cnnkit": _version(),
        }
        try:
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None
            _write_meta(self.tmp / META_FILE, meta)
            _fsync(self.tmp)
            try:
                os.replace(self.tmp, self.entry)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # Another process finished the same entry first: theirs is as good as ours.
                shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        except OSError as exc:  # the array is complete in the temp file: read it back, or give up
            self._fall_back(exc)
            assert self.memory is not None
            return StoredImages(torch.from_numpy(self.memory), mean, std, None)
        with contextlib.suppress(OSError):
            _fsync(self.entry.parent)
        return self.entry

    def _discard(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()
            self.handle = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    # -- decoding

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(pixels, per-image sums) of consecutive chunks of files, in order."""
        from cnnkit._decode_pool import decode_chunk

        n = len(self.paths)
        workers = _workers()
        step = max(1, min(256, CHUNK_BYTES // self.per_image, -(-n // (4 * workers))))
        starts = range(0, n, step)
        args = (self.shape[1], self.shape[2], self.resize)
        if n < POOL_MIN_FILES or workers == 1:
            for start in starts:
                yield decode_chunk(self.paths[start : start + step], *args)
            return
        from concurrent.futures import Future, ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        from cnnkit._decode_pool import ignore_interrupts

        pool = ProcessPoolExecutor(
            max_workers=min(workers, len(starts)), mp_context=_pool_context(), initializer=ignore_interrupts
        )
        pending: deque[Future[tuple[np.ndarray, np.ndarray]]] = deque()
        queued = iter(starts)
        try:
            while True:
                while len(pending) < 2 * workers:  # bounded: a few chunks in flight, never the set
                    first = next(queued, None)
                    if first is None:
                        break
                    with _workers_skip_main():
                        pending.append(pool.submit(decode_chunk, self.paths[first : first + step], *args))
                if not pending:
                    return
                try:
                    yield pending.popleft().result()
                except BrokenProcessPool as exc:
                    raise CnnkitError(
                        f"a worker decoding {self.dataset} died (out of memory, or killed); "
                        "free some memory and run again"
                    ) from exc
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------- progress


class _Progress:
    """A rich bar with ETA on stderr when it is a terminal; else a line every LOG_EVERY seconds."""

    def __init__(self, dataset: str, shape: tuple[int, ...], *, enabled: bool) -> None:
        self.total = shape[0]
        self.label = f"{dataset}: decoding {shape[0]:,} images at {shape[2]} px"
        self.enabled = enabled
        self.bar: Any = None
        self.task: Any = None
        self.done = 0
        self.started = time.perf_counter()
        self.next_line = self.started + LOG_EVERY

    def __enter__(self) -> _Progress:
        if not self.enabled:
            return self
        from rich.console import Console

        console = Console(stderr=True, highlight=False, markup=False)
        if console.is_interactive:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )  # fmt: skip

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                TimeRemainingColumn(), console=console, transient=True, redirect_stdout=False,
                redirect_stderr=True,
            )  # fmt: skip
            self.task = self.bar.add_task(self.label, total=self.total)
            self.bar.start()
        return self

    def advance(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
            return
        now = time.perf_counter()
        if self.enabled and now >= self.next_line and self.done < self.total:
            self.next_line = now + LOG_EVERY
            rate = self.done / max(now - self.started, 1e-9)
            left = (self.total - self.done) / max(rate, 1e-9)
            print(
                f"{self.label}: {self.done:,}/{self.total:,} ({100 * self.done / self.total:.0f}%), "
                f"{rate:,.0f} images/s, about {_duration(left)} left",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *_: object) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------------------- helpers


def _fsync(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _common_folder(paths: Sequence[Path]) -> str | None:
    try:
        common = os.path.commonpath([os.fsdecode(os.path.abspath(p)) for p in paths])
    except ValueError:
        return None
    return os.fsencode(common).decode("utf-8", "backslashreplace")


def _version() -> str:
    from cnnkit import __version__

    return __version__


def human_bytes(count: float) -> str:
    """Bytes as text: ``1.5 GB`` (powers of 1024, the units ``du -h`` uses)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
