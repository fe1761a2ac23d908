"""Building one entry of the decoded-image store: decode the files, write the array, commit it.

This module's one job is :class:`Build`: the process pool over all cores (:mod:`cnnkit._decode_pool`,
torch-free workers) whose workers decode chunks of files and write each into its place in the array
file (``pwrite`` at the chunk's offset: pixels never travel through a pipe), the exact integer sums
of the first ``stats_count`` images, the fsync and ``os.replace`` into place, the fall back to
memory when the cache cannot take the array, and the progress bar. Sets too small for a pool are
decoded here and appended in order. The entry's layout (:data:`FORMAT`, :data:`ARRAY_FILE`,
:data:`META_FILE`) is defined here because the build writes it; :mod:`cnnkit.data.store` (the public
face: keys, opening an entry, its statistics) re-exports it and calls :class:`Build` with its
tunables, so this module never imports that one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cnnkit._decode_pool import Chunk
from cnnkit._version import __version__
from cnnkit.errors import CnnkitError
from cnnkit.fs import fsync_dir
from cnnkit.image_files import ResizeMode
from cnnkit.units import human_bytes

__all__ = ["ARRAY_FILE", "FORMAT", "META_FILE", "Build", "Decoded", "mean_std", "write_meta"]

FORMAT = 2
"""Version of the entry layout and its pixels (2: OpenCV resizing); in the key: a new one never reads an old entry."""

ARRAY_FILE = "images.u8"
META_FILE = "meta.json"

LOG_EVERY = 30.0
"""Seconds between progress lines when stderr is not a terminal."""


class Decoded(NamedTuple):
    """What :meth:`Build.run` returns when the cache could not take the array: it, in memory."""

    images: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]


def mean_std(sums: np.ndarray, count: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
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


# ---------------------------------------------------------------------------------------- pool


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

    spawn.get_preparation_data = without_main
    try:
        yield
    finally:
        spawn.get_preparation_data = original


def _pool_context() -> Any:
    """forkserver where there is one: workers forked from a fresh, torch-free process (fork from a
    process running torch's thread pools is unsafe, and spawn re-imports more per worker)."""
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _write_chunk(handle: Any, pixels: np.ndarray) -> None:
    """Append ``pixels`` to the open array file (a seam for tests that fill the disk)."""
    view = pixels.reshape(-1).data
    while view:
        written = handle.write(view)
        view = view[written:]


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    from cnnkit.fs import write_text

    write_text(path, json.dumps(meta, indent=1) + "\n")


class Build:
    """One build of an entry (see the module docstring); :meth:`run` returns the entry's path, or
    the images themselves (:class:`Decoded`) when the cache could not take them.

    ``chunk_bytes``: about this many decoded bytes per task sent to a worker (at most 256 files, at
    least 1); ``pool_min_files``: fewer files are decoded in this process; ``available_memory``:
    bytes the system can give, asked when the cache fails (the tunables of :mod:`cnnkit.data.store`).
    """

    def __init__(
        self, paths: list[Path], entry: Path, shape: tuple[int, int, int, int], resize: ResizeMode,
        dataset: str, stats_count: int, progress: bool, *, chunk_bytes: int, pool_min_files: int,
        available_memory: Callable[[], int],
    ) -> None:  # fmt: skip
        self.paths, self.entry, self.shape, self.resize = paths, entry, shape, resize
        self.dataset, self.stats_count, self.progress = dataset, stats_count, progress
        self.chunk_bytes, self.pool_min_files, self.available_memory = chunk_bytes, pool_min_files, available_memory
        self.per_image = math.prod(shape[1:])
        self.nbytes = shape[0] * self.per_image
        self.tmp: Path | None = None
        self.handle: Any = None
        self.memory: np.ndarray | None = None  # the in-memory fallback, once the cache failed
        self.done = 0

    def run(self) -> Path | Decoded:
        sums = np.zeros((self.shape[1], 2), dtype=np.int64)
        try:
            self._open_file()
            chunks = self._chunks()
            with _Progress(self.dataset, self.shape, enabled=self.progress) as bar, contextlib.closing(chunks):
                for paths, chunk in chunks:
                    if self.done < self.stats_count:
                        sums += chunk.sums[: self.stats_count - self.done].sum(0)
                    self._take(paths, chunk)
                    self.done += len(paths)
                    bar.advance(len(paths))
            mean, std = mean_std(sums, self.stats_count * self.shape[2] * self.shape[3])
            if self.memory is not None:
                return Decoded(self.memory, mean, std)
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

    def _take(self, paths: Sequence[Path], chunk: Chunk) -> None:
        """Keep a decoded chunk (the next one in order): in the file, or in memory after a fall back."""
        if chunk.write_error is not None and self.memory is None:  # a worker could not write its part
            self._fall_back(chunk.write_error)
        pixels = chunk.pixels
        if pixels is None and self.memory is None:  # a worker wrote it into the file
            return
        if pixels is None:  # written into the file given up meanwhile (it was in flight): decoded again
            pixels = _decode(paths, self.shape[1], self.shape[2], self.resize).pixels
        assert pixels is not None
        self._store(pixels)

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
        if self.nbytes > self.available_memory() // 2:
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

    def _commit(self, mean: tuple[float, ...], std: tuple[float, ...]) -> Path | Decoded:
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
            "cnnkit": __version__,
        }
        try:
            os.fsync(self.handle.fileno())
            self.handle.close()
            self.handle = None
            write_meta(self.tmp / META_FILE, meta)
            fsync_dir(self.tmp)
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
            return Decoded(self.memory, mean, std)
        with contextlib.suppress(OSError):
            fsync_dir(self.entry.parent)
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

    def _chunks(self) -> Generator[tuple[Sequence[Path], Chunk], None, None]:
        """(files, their Chunk) of consecutive chunks of files, in order. Pool workers write their
        pixels into the array file themselves (at the chunk's offset) while the file is in use."""
        n = len(self.paths)
        workers = _workers()
        step = max(1, min(256, self.chunk_bytes // self.per_image, -(-n // (4 * workers))))
        starts = range(0, n, step)
        args = (self.shape[1], self.shape[2], self.resize)
        if n < self.pool_min_files or workers == 1:
            for start in starts:
                paths = self.paths[start : start + step]
                yield paths, _decode(paths, *args)
            return
        from concurrent.futures import Future, ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        from cnnkit._decode_pool import decode_chunk, start_worker

        self._reserve()
        # A store the page cache could not keep anyway is written past it (O_DIRECT, see
        # cnnkit._decode_pool._pwrite); a smaller one through it, so the first epoch reads memory.
        direct = self.nbytes > self.available_memory() // 2
        pool = ProcessPoolExecutor(
            max_workers=min(workers, len(starts)), mp_context=_pool_context(), initializer=start_worker
        )
        pending: deque[tuple[Sequence[Path], Future[Chunk]]] = deque()
        queued = iter(starts)
        try:
            while True:
                while len(pending) < 2 * workers:  # bounded: a few chunks in flight, never the set
                    first = next(queued, None)
                    if first is None:
                        break
                    files = self.paths[first : first + step]
                    target = None
                    if self.memory is None and self.tmp is not None:
                        target = (str(self.tmp / ARRAY_FILE), first * self.per_image, direct)
                    with _workers_skip_main():
                        pending.append((files, pool.submit(decode_chunk, files, *args, target)))
                if not pending:
                    return
                ready, future = pending.popleft()
                try:
                    chunk = future.result()
                except BrokenProcessPool as exc:
                    raise CnnkitError(
                        f"a worker decoding {self.dataset} died (out of memory, or killed); "
                        "free some memory and run again"
                    ) from exc
                yield ready, chunk
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def _reserve(self) -> None:
        """Allocate the array file's blocks before workers write into it (out of order), where the
        file system can: a disk too small shows before any decoding."""
        fallocate = getattr(os, "posix_fallocate", None)  # none on macOS: the workers' writes allocate
        if self.handle is None or fallocate is None:
            return
        try:
            fallocate(self.handle.fileno(), 0, self.nbytes)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                self._fall_back(exc)


def _decode(paths: Sequence[Path], channels: int, size: int, resize: ResizeMode) -> Chunk:
    """A chunk decoded in this process (small sets; a chunk written into a file given up)."""
    from cnnkit._decode_pool import decode_chunk

    return decode_chunk(paths, channels, size, resize)


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


def _common_folder(paths: Sequence[Path]) -> str | None:
    try:
        common = os.path.commonpath([os.fsdecode(os.path.abspath(p)) for p in paths])
    except ValueError:
        return None
    return os.fsencode(common).decode("utf-8", "backslashreplace")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
