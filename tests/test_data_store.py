"""cnnkit.data.store: decode once at the run's size into a memory-mapped entry; cnnkit cache info|clear.

Every image is generated in tmp_path with PIL; the cache is the per-test CNNKIT_CACHE of conftest.
"""

from __future__ import annotations

import errno
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit._decode_pool as decode_pool
from cnnkit.cli.app import app
from cnnkit.data import store, store_build
from cnnkit.data.cache import dataset_statistics
from cnnkit.data.store import stored_images, stores_folder
from cnnkit.errors import CnnkitError, DataError
from cnnkit.image_files import read_image, read_image_square

RED, BLUE = (255, 0, 0), (0, 0, 255)


def images(folder: Path, count: int, size: tuple[int, int] = (40, 30), suffix: str = ".png") -> list[Path]:
    """``count`` distinct RGB images (width, height ``size``), seeded."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}{suffix}"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def banded(path: Path, width: int = 60, height: int = 30) -> Path:
    """A wide image: a red centre square (height x height) between blue sides."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:] = BLUE
    left = (width - height) // 2
    array[:, left : left + height] = RED
    Image.fromarray(array).save(path)
    return path


def load(files: list[Path], **kw: object) -> store.StoredImages:
    options = {"size": 16, "channels": 3, "resize": "crop", "dataset": "test", "stats_count": len(files)}
    options.update(kw)
    return stored_images(files, progress=False, **options)  # type: ignore[arg-type]


def entries() -> list[str]:
    folder = stores_folder()
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def mapping_of(tensor: torch.Tensor) -> str | None:
    """The file the tensor's data is mapped from (/proc/self/maps), None for anonymous memory."""
    address = tensor.data_ptr()
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                name = fields[5].strip() if len(fields) == 6 else ""
                return name if name.startswith("/") else None
    return None


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many files this process decodes (the in-process path: fewer files than POOL_MIN_FILES)."""
    counted: list[int] = []
    original = decode_pool.decode_chunk

    def counting(paths, *args):  # type: ignore[no-untyped-def]
        counted.append(len(paths))
        return original(paths, *args)

    monkeypatch.setattr(decode_pool, "decode_chunk", counting)
    return counted


# ------------------------------------------------------------------------------------ resizing


def test_crop_squash_pad_shapes_and_crop_keeps_the_centre(tmp_path: Path) -> None:
    path = banded(tmp_path / "wide.png")
    crop = read_image_square(path, 3, 16, "crop")
    squash = read_image_square(path, 3, 16, "squash")
    pad = read_image_square(path, 3, 16, "pad")
    assert crop.shape == squash.shape == pad.shape == (3, 16, 16)
    assert crop.dtype == np.uint8
    # crop: the centre square only, red (the outermost columns blend a little with the blue beyond,
    # as they do after torchvision's Resize)
    assert (crop[0, :, 1:-1] > 250).all() and (crop[2, :, 1:-1] < 5).all() and (crop[0] > 200).all()
    # squash: the blue sides are still there, squeezed
    assert squash[2, :, 0].min() > 250 and squash[0, :, 8].min() > 250
    # pad: the whole 2:1 image on a black square, 8 rows of it in the middle
    assert (pad[:, :4] == 0).all() and (pad[:, -4:] == 0).all()
    assert pad[2, 8, 0] > 250 and pad[0, 8, 8] > 250
    # grayscale, and a tall image
    tall = tmp_path / "tall.png"
    Image.fromarray(np.full((50, 20), 77, dtype=np.uint8)).save(tall)
    for mode in ("crop", "squash", "pad"):
        assert read_image_square(tall, 1, 10, mode).shape == (1, 10, 10)  # type: ignore[arg-type]
    assert (read_image_square(tall, 1, 10, "crop") == 77).all()


@pytest.mark.slow
def test_crop_matches_torchvision_resize_and_center_crop(tmp_path: Path) -> None:
    from torchvision import transforms

    rng = np.random.default_rng(1)
    path = tmp_path / "smooth.png"
    coarse = Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8))
    coarse.resize((90, 60), Image.Resampling.BICUBIC).save(path)
    ours = read_image_square(path, 3, 24, "crop").astype(np.int16)
    with Image.open(path) as image:
        theirs = np.asarray(transforms.CenterCrop(24)(transforms.Resize(24)(image.convert("RGB")))).transpose(2, 0, 1)
    assert np.abs(ours - theirs.astype(np.int16)).max() <= 3  # the same window, resampled in one step


def test_shrinking_averages_every_pixel_so_fine_detail_does_not_alias() -> None:
    from cnnkit.image_files import resample

    # A one-pixel checkerboard: sampled (nearest or plain bilinear at a factor above 2) it comes out
    # as stripes or solid black/white; averaged, it is the mid grey it looks like from afar (an odd
    # factor leaves a faint 4/9 - 5/9 checker, as any box of whole pixels does).
    board = (np.indices((96, 96)).sum(0) % 2 * 255).astype(np.uint8)
    for out in (24, 32, 40, 45):
        shrunk = resample(board, (0.0, 0.0, 96.0, 96.0), (out, out)).astype(int)
        assert abs(shrunk.mean() - 127.5) < 2 and shrunk.std() < 20, (out, shrunk.mean(), shrunk.std())  # sampled: 127.5


def test_resample_keeps_a_fractional_window_exact() -> None:
    from cnnkit.image_files import resample

    # A linear ramp (value = 2 * column): any window, at any factor, resamples to the ramp at the
    # output pixels' centres, so an off-by-half-a-pixel window shows at once.
    ramp = np.tile((np.arange(120) * 2).astype(np.uint8), (10, 1))
    for box, width in (((10.5, 0.0, 70.5, 10.0), 40), ((3.25, 0.0, 99.25, 10.0), 24), ((20.0, 0.0, 50.0, 10.0), 60)):
        out = resample(ramp, box, (width, 10)).astype(float)
        step = (box[2] - box[0]) / width
        centres = box[0] + (np.arange(width) + 0.5) * step - 0.5  # in source pixel centres
        expected = 2 * np.clip(centres, 0, 119)
        assert np.abs(out[5] - expected).max() <= 1.0, (box, np.abs(out[5] - expected).max())
    rgb = np.dstack([ramp, ramp // 2, 255 - ramp])  # channels stay apart
    out = resample(rgb, (0.0, 0.0, 120.0, 10.0), (60, 5))
    assert out.shape == (5, 60, 3) and (np.abs(out[..., 2].astype(int) - (255 - out[..., 0].astype(int))) <= 1).all()


def test_a_big_jpeg_is_drafted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import JpegImagePlugin

    path = tmp_path / "photo.jpg"
    Image.new("RGB", (3000, 2000), (90, 140, 200)).save(path, quality=90)
    decoded_sizes: list[tuple[int, int]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):  # type: ignore[no-untyped-def]
        result = original(self, mode, size)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    pixels = read_image_square(path, 3, 28, "crop")
    assert pixels.shape == (3, 28, 28)
    assert decoded_sizes == [(375, 250)]  # an eighth of each side: 1/64 of the full decode
    assert abs(int(pixels[2].mean()) - 200) <= 2


def test_read_image_is_unchanged_by_the_shared_open_path(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(np.arange(12 * 10 * 3, dtype=np.uint8).reshape(10, 12, 3)).save(path)
    assert read_image(path, 3).shape == (3, 10, 12)
    assert read_image(path, 1, (5, 6)).shape == (1, 5, 6)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        read_image_square(empty, 3, 8, "crop")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    with pytest.raises(DataError, match="text.jpg is not a readable image"):
        read_image_square(text, 3, 8, "crop")


# ------------------------------------------------------------------------------------ the store


def test_entry_is_reused_and_rebuilt_when_a_file_changes(tmp_path: Path, decodes: list[int]) -> None:
    files = images(tmp_path / "imgs", 12)
    first = load(files, stats_count=8)
    assert first.images.shape == (12, 3, 16, 16) and first.images.dtype == torch.uint8
    assert sum(decodes) == 12
    assert first.path is not None and first.path.parent == stores_folder()
    assert [n for n in entries() if n.startswith(".")] == []
    mean, std = dataset_statistics(first.images[:8])
    assert first.mean == pytest.approx(mean, abs=1e-12) and first.std == pytest.approx(std, abs=1e-12)

    again = load(files, stats_count=8)
    assert sum(decodes) == 12  # nothing decoded: read from the entry
    assert torch.equal(again.images, first.images) and again.mean == first.mean and again.path == first.path

    other = load(files, stats_count=5)  # another split of the same files: same entry, its own statistics
    assert sum(decodes) == 12 and other.path == first.path
    assert other.mean == pytest.approx(dataset_statistics(first.images[:5])[0], abs=1e-12)

    reordered = load(files[::-1])  # order is part of the key (it is the images' order)
    assert sum(decodes) == 24 and torch.equal(reordered.images, first.images.flip(0))

    Image.new("RGB", (40, 30), RED).save(files[3])
    os.utime(files[3], ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = load(files, stats_count=8)
    assert sum(decodes) == 36 and changed.path != first.path
    assert (changed.images[3, 0] == 255).all() and torch.equal(changed.images[4], first.images[4])


def test_large_sets_are_memory_mapped_from_the_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "IN_MEMORY_MAX", 0)
    files = images(tmp_path / "imgs", 10)
    for _ in range(2):  # built, then opened
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "non-writable array" warning from torch
            result = load(files)
        assert result.path is not None
        # file-backed pages: the tensor's data lies in a mapping of the entry's array file
        assert mapping_of(result.images) == str(result.path / store.ARRAY_FILE)
        assert torch.equal(result.images[2], torch.from_numpy(read_image_square(files[2], 3, 16, "crop")))
        result.images[0].zero_()  # copy-on-write: writable, and the file is untouched
    assert load(files).images[0].any()
    monkeypatch.setattr(store, "IN_MEMORY_MAX", 1 << 30)
    assert mapping_of(load(files).images) is None  # small: an ordinary in-memory tensor


def test_a_store_larger_than_memory_and_swap_can_be_mapped(tmp_path: Path) -> None:
    """A writable private mapping is charged in full against the commit limit unless made with
    MAP_NORESERVE: np.memmap(mode="c") of 30 GB on a 24 GB machine was "Cannot allocate memory"
    (the heuristic refuses one mapping larger than memory plus swap). A sparse file larger than
    that costs no disk and no reading."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            sizes = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo}
        limit = sizes["MemTotal"] + sizes["SwapTotal"]
        heuristic = Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "0"
    except (OSError, KeyError):
        pytest.skip("no /proc/meminfo (not Linux)")
    if not heuristic:
        pytest.skip("the commit limit is only heuristic under vm.overcommit_memory=0")
    side = 224
    count = limit // (3 * side * side) + 10_000
    path = tmp_path / "huge.u8"
    with open(path, "wb") as file:
        file.truncate(count * 3 * side * side)  # sparse
    with pytest.raises(OSError):  # what the store did before
        np.memmap(path, dtype=np.uint8, mode="c", shape=(count, 3, side, side))
    array = store.map_array(path, (count, 3, side, side))
    tensor = torch.from_numpy(array)
    assert tensor.shape == (count, 3, side, side) and int(tensor[count - 1].sum()) == 0
    tensor[0, 0, 0, 0] = 7  # private: the write stays in this process
    with open(path, "rb") as file:
        assert file.read(1) == b"\0"


def test_mapped_tensors_are_private_copies_on_write(tmp_path: Path) -> None:
    path = tmp_path / "small.u8"
    np.arange(24, dtype=np.uint8).tofile(path)
    tensor = torch.from_numpy(store.map_array(path, (2, 3, 2, 2)))
    assert tensor.flatten().tolist() == list(range(24)) and mapping_of(tensor) == str(path)
    tensor.add_(1)
    assert tensor[0, 0, 0, 0] == 1 and np.fromfile(path, dtype=np.uint8)[0] == 0


def test_the_pool_decodes_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = images(tmp_path / "imgs", 20, suffix=".jpg")
    expected = torch.stack([torch.from_numpy(read_image_square(f, 3, 16, "squash")) for f in files])
    monkeypatch.setattr(store, "POOL_MIN_FILES", 0)
    monkeypatch.setattr(store, "CHUNK_BYTES", 3 * 16 * 16 * 3)  # 3 files per task: 7 tasks
    monkeypatch.setattr(store_build, "_workers", lambda: 2)
    result = load(files, resize="squash", stats_count=13)
    assert torch.equal(result.images, expected)
    mean, std = dataset_statistics(expected[:13])
    assert result.mean == pytest.approx(mean, abs=1e-12) and result.std == pytest.approx(std, abs=1e-12)


@pytest.mark.parametrize("pool", [False, True])
def test_a_file_that_fails_mid_build_is_named_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pool: bool
) -> None:
    files = images(tmp_path / "imgs", 20)
    bad = tmp_path / "imgs" / "010.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    monkeypatch.setattr(store, "CHUNK_BYTES", 2 * 16 * 16 * 3)
    if pool:
        monkeypatch.setattr(store, "POOL_MIN_FILES", 0)
        monkeypatch.setattr(store_build, "_workers", lambda: 2)
    with pytest.raises(DataError, match="010.png is not a readable image") as caught:
        load(files)
    assert caught.value.exit_code == 3
    assert entries() == []  # neither an entry nor a temp folder


def test_an_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = images(tmp_path / "imgs", 12)
    monkeypatch.setattr(store, "CHUNK_BYTES", 2 * 16 * 16 * 3)
    calls: list[int] = []
    original = store_build._write_chunk

    def interrupted(handle, pixels):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(handle, pixels)

    monkeypatch.setattr(store_build, "_write_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(files)
    assert entries() == []


def test_disk_full_falls_back_to_memory_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    files = images(tmp_path / "imgs", 12)
    expected = load(files).images.clone()
    monkeypatch.setenv("CNNKIT_CACHE", str(tmp_path / "full-cache"))
    monkeypatch.setattr(store, "CHUNK_BYTES", 2 * 16 * 16 * 3)
    written: list[int] = []
    original = store_build._write_chunk

    def fills_up(handle, pixels):  # type: ignore[no-untyped-def]
        if len(written) == 2:  # the disk fills after two chunks
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(len(pixels))
        original(handle, pixels)

    monkeypatch.setattr(store_build, "_write_chunk", fills_up)
    capsys.readouterr()
    result = load(files)
    assert result.path is None and torch.equal(result.images, expected)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "No space left on device" in err and "full-cache" in err
    assert entries() == []

    # a disk already full is seen before decoding anything
    monkeypatch.setattr(store_build, "_write_chunk", original)
    monkeypatch.setattr(store.shutil, "disk_usage", lambda _: _Usage(0))
    assert load(files, size=12).path is None


def test_pool_workers_write_their_chunks_and_a_failed_write_falls_back_to_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pool workers write pixels into the array file themselves; when they cannot, the build keeps
    what they decoded in memory (one warning) and the images are still exactly right."""
    files = images(tmp_path / "imgs", 20, suffix=".jpg")
    expected = torch.stack([torch.from_numpy(read_image_square(f, 3, 16, "crop")) for f in files])
    monkeypatch.setattr(store, "POOL_MIN_FILES", 0)
    monkeypatch.setattr(store, "CHUNK_BYTES", 3 * 16 * 16 * 3)
    monkeypatch.setattr(store_build, "_workers", lambda: 2)
    monkeypatch.setattr(store, "IN_MEMORY_MAX", 0)  # mapped, so the entry's file itself is compared
    assert torch.equal(load(files).images, expected)  # written by the workers, read from the entry

    monkeypatch.setenv("CNNKIT_CACHE", str(tmp_path / "other-cache"))
    original = store_build.Build._reserve

    def unwritable(self: store_build.Build) -> None:
        original(self)
        array = self.tmp / store_build.ARRAY_FILE  # type: ignore[operator]
        array.unlink()
        array.mkdir()  # every worker's open() of it now fails (EISDIR), as on a broken disk

    monkeypatch.setattr(store_build.Build, "_reserve", unwritable)
    capsys.readouterr()
    result = load(files)
    assert result.path is None and torch.equal(result.images, expected)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "Is a directory" in err and "other-cache" in err
    assert entries() == []


def test_a_chunk_written_into_a_file_given_up_is_decoded_again(tmp_path: Path) -> None:
    """A worker may finish writing its chunk into the array file after the build fell back to memory
    (the chunk was in flight): its pixels are decoded again rather than lost."""
    files = images(tmp_path / "imgs", 4)
    build = store_build.Build(
        files, tmp_path / "entry", (4, 3, 16, 16), "crop", "test", 4, False, chunk_bytes=1 << 20,
        pool_min_files=0, available_memory=lambda: 1 << 30,
    )  # fmt: skip
    build.memory = np.zeros((4, 3, 16, 16), dtype=np.uint8)
    build.done = 2
    chunk = decode_pool.decode_chunk(files[2:], 3, 16, "crop")
    build._take(files[2:], decode_pool.Chunk(None, chunk.sums))
    assert np.array_equal(build.memory[2:], chunk.pixels)
    assert not build.memory[:2].any()


class _Usage:
    def __init__(self, free: int) -> None:
        self.free = free


def test_disk_full_and_no_memory_is_an_error_naming_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = images(tmp_path / "imgs", 6)
    monkeypatch.setattr(store.shutil, "disk_usage", lambda _: _Usage(0))
    monkeypatch.setattr(store, "available_memory", lambda: 1000)
    with pytest.raises(CnnkitError, match="CNNKIT_CACHE") as caught:
        load(files)
    assert caught.value.exit_code == 1 and str(stores_folder()) in caught.value.message
    assert entries() == []


def test_a_damaged_entry_is_rebuilt(tmp_path: Path, decodes: list[int]) -> None:
    files = images(tmp_path / "imgs", 6)
    first = load(files)
    assert first.path is not None
    with open(first.path / store.ARRAY_FILE, "r+b") as handle:
        handle.truncate(100)
    assert torch.equal(load(files).images, first.images) and sum(decodes) == 12


# ------------------------------------------------------------------------------------ the CLI


def test_cache_info_and_clear(tmp_path: Path, runner, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    from cnnkit.data.locate import decoded_cache

    empty = runner.invoke(app, ["cache", "info", "--format", "json"])
    assert empty.exit_code == 0 and json.loads(empty.stdout)["entries"] == 0

    old = load(images(tmp_path / "a", 5), dataset="old-set")
    new = load(images(tmp_path / "b", 7), dataset="new-set", size=8, resize="pad")
    decoded_cache().mkdir(parents=True, exist_ok=True)
    tensors = {"train_images": torch.zeros(3, 1, 4, 4, dtype=torch.uint8), "test_images": torch.zeros(2, 1, 4, 4, dtype=torch.uint8)}
    save_file(tensors, str(decoded_cache() / "image-folder-abc123.safetensors"), metadata={"cnnkit": "{}"})

    result = runner.invoke(app, ["cache", "info", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["entries"] == 3 and report["folder"] == str(decoded_cache())
    by_dataset = {item["dataset"]: item for item in report["items"]}
    assert by_dataset["new-set"]["files"] == 7 and by_dataset["new-set"]["size"] == 8
    assert by_dataset["new-set"]["resize"] == "pad" and by_dataset["new-set"]["channels"] == 3
    assert by_dataset["new-set"]["bytes"] >= 7 * 3 * 8 * 8 and by_dataset["new-set"]["kind"] == "store"
    assert by_dataset["image-folder"]["kind"] == "decoded" and by_dataset["image-folder"]["files"] == 5
    assert report["bytes"] == sum(item["bytes"] for item in report["items"])
    text = runner.invoke(app, ["cache", "info"])
    assert text.exit_code == 0 and "3 entries" in text.stdout and "new-set, 7 files at 8 px" in text.stdout

    # the old store and the safetensors file were last used 10 days ago
    ten_days_ago = time.time() - 10 * 86400
    assert old.path is not None and new.path is not None
    os.utime(old.path / store.META_FILE, (ten_days_ago, ten_days_ago))
    os.utime(decoded_cache() / "image-folder-abc123.safetensors", (ten_days_ago, ten_days_ago))
    cleared = runner.invoke(app, ["cache", "clear", "--older-than", "7"])
    assert cleared.exit_code == 0, cleared.output
    assert "removed 2 entries not used for 7 days" in cleared.stdout and "freed" in cleared.stdout
    assert not old.path.exists() and new.path.exists()
    assert not (decoded_cache() / "image-folder-abc123.safetensors").exists()

    stale = stores_folder() / ".deadbeef.1.ab.tmp"  # left by a killed build
    stale.mkdir()
    (stale / store.ARRAY_FILE).write_bytes(b"x" * 10)
    os.utime(stale / store.ARRAY_FILE, (ten_days_ago, ten_days_ago))
    os.utime(stale, (ten_days_ago, ten_days_ago))
    everything = runner.invoke(app, ["cache", "clear"])
    assert everything.exit_code == 0 and "removed 1 entry" in everything.stdout
    assert not new.path.exists() and not stale.exists()
    assert "nothing to remove" in runner.invoke(app, ["cache", "clear"]).stdout
    assert runner.invoke(app, ["cache", "clear", "--older-than", "-1"]).exit_code == 2
