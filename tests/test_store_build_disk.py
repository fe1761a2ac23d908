"""How a build's workers use the disk: a store larger than the page cache is written past it (whole
aligned pages with O_DIRECT, the partial first and last pages of a chunk through the page cache;
the same bytes either way), and each chunk's files are asked for before any is decoded."""

from __future__ import annotations

import errno
import os
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import cnnkit._decode_pool as decode_pool
from cnnkit.data import store_build


def jpegs(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.mark.parametrize("first", [0, 5, 11])
def test_direct_writes_put_the_same_bytes_at_any_offset_and_nothing_beside(tmp_path: Path, first: int) -> None:
    files = jpegs(tmp_path / "imgs", 16)
    per_image = 3 * 28 * 28  # 2,352 bytes: chunks start and end inside pages
    count = 4
    reference = decode_pool.decode_chunk(files[first : first + count], 3, 28, "crop")
    assert reference.pixels is not None
    array = tmp_path / "array.bin"
    sentinel = np.full(16 * per_image + 8192, 7, dtype=np.uint8)
    for direct in (False, True):
        sentinel.tofile(array)
        chunk = decode_pool.decode_chunk(
            files[first : first + count], 3, 28, "crop", (str(array), first * per_image, direct)
        )
        assert chunk.pixels is None and chunk.write_error is None and np.array_equal(chunk.sums, reference.sums)
        written = np.fromfile(array, dtype=np.uint8)
        lo, hi = first * per_image, (first + count) * per_image
        assert np.array_equal(written[lo:hi], reference.pixels.reshape(-1))
        assert (written[:lo] == 7).all() and (written[hi:] == 7).all()


def test_only_whole_aligned_pages_go_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []
    original = decode_pool._write_direct

    def spy(path: str, view: memoryview, offset: int) -> bool:
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        calls.append((address % 4096, offset % 4096, len(view) % 4096))
        return original(path, view, offset)

    monkeypatch.setattr(decode_pool, "_write_direct", spy)
    files = jpegs(tmp_path / "imgs", 8)
    array = tmp_path / "array.bin"
    np.zeros(8 * 3 * 28 * 28, dtype=np.uint8).tofile(array)
    decode_pool.decode_chunk(files[3:8], 3, 28, "crop", (str(array), 3 * 3 * 28 * 28, True))
    assert calls == [(0, 0, 0)]
    decode_pool.decode_chunk(files[3:8], 3, 28, "crop", (str(array), 3 * 3 * 28 * 28, False))
    assert len(calls) == 1  # not asked for: through the page cache


def test_a_file_system_without_o_direct_gets_plain_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path: Any, flags: int, *args: Any) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    files = jpegs(tmp_path / "imgs", 6)
    reference = decode_pool.decode_chunk(files, 3, 32, "crop").pixels
    assert reference is not None
    array = tmp_path / "array.bin"
    np.zeros(6 * 3 * 32 * 32, dtype=np.uint8).tofile(array)
    chunk = decode_pool.decode_chunk(files, 3, 32, "crop", (str(array), 0, True))
    assert chunk.write_error is None and np.array_equal(np.fromfile(array, dtype=np.uint8), reference.reshape(-1))


def test_a_build_writes_direct_only_a_store_the_page_cache_cannot_keep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    original = decode_pool.decode_chunk

    def recording(*args: Any) -> Any:
        seen.append(bool(args[4][2]) if len(args) > 4 and args[4] is not None else False)
        return original(*args)

    class Threads(ThreadPoolExecutor):  # the pool's code path, with workers that need no pickling
        def __init__(self, max_workers: int, **_: Any) -> None:
            super().__init__(max_workers)

    monkeypatch.setattr(futures, "ProcessPoolExecutor", Threads)
    monkeypatch.setattr(store_build, "_workers", lambda: 2)  # the pool, even on one core
    monkeypatch.setattr(decode_pool, "decode_chunk", recording)
    files = jpegs(tmp_path / "imgs", 12)
    for memory, expected in ((1 << 40, False), (1000, True)):
        seen.clear()
        build = store_build.Build(
            files, tmp_path / f"entry-{expected}", (12, 3, 16, 16), "crop", "test", 12, False, chunk_bytes=4 * 768,
            pool_min_files=0, available_memory=lambda memory=memory: memory,
        )  # fmt: skip
        build.run()
        assert seen and set(seen) == {expected}


def test_a_worker_asks_for_all_of_its_chunks_files_before_decoding_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_advise, real_square = os.posix_fadvise, decode_pool.square_pixels

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        events.append("advise" if advice == os.POSIX_FADV_WILLNEED else "other")
        real_advise(fd, offset, length, advice)

    def square(*args: Any) -> Any:
        events.append("decode")
        return real_square(*args)

    monkeypatch.setattr(os, "posix_fadvise", advise)
    monkeypatch.setattr(decode_pool, "square_pixels", square)
    files = jpegs(tmp_path / "imgs", 5)
    decode_pool._will_need([*files, tmp_path / "missing.jpg"])  # a file gone is the decoder's to report
    assert events == ["advise"] * 5
    events.clear()
    decode_pool.decode_chunk(files, 3, 16, "crop")
    assert events == ["advise"] * 5 + ["decode"] * 5
