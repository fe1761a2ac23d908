"""Hostile image folders and ``cnnkit predict`` inputs: each loads correctly or is one line, exit 3, naming the file.

Everything is generated with PIL in temp folders: every format PIL writes, 16-bit, palette and
RGBA PNGs, EXIF-rotated JPEGs, mixed grayscale and colour, decompression bombs, empty and fake
files, hidden files, non-UTF-8 and unicode names, symbolic-link loops, and 2,000 tiny files.
The rules are in :mod:`cnnkit.image_files` and :mod:`cnnkit.data.image_folder`.
"""

from __future__ import annotations

import os
import struct
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.checkpoint import WeightsMeta, save_weights
from cnnkit.cli.app import app
from cnnkit.data import load_dataset
from cnnkit.errors import DataError
from cnnkit.registry import MODELS

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 8


def gray(path: Path, value: int, size: tuple[int, int] = (SIDE, SIDE), **save: Any) -> Path:
    """A flat grayscale image (``size`` is width, height) saved in the format its suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path, **save)
    return path


def reference_class(root: Path, count: int = 3, size: tuple[int, int] = (SIDE, SIDE)) -> None:
    """Every folder needs two classes: ``ref`` holds plain dark PNGs."""
    for i in range(count):
        gray(root / "ref" / f"{i}.png", 30, size)


def pixels_of(splits: Any, label: int) -> torch.Tensor:
    """Every image of class ``label``, train, val and test together."""
    parts = [part for part in (splits.train, splits.val, splits.test) if part is not None]
    return torch.cat([part.images[part.labels == label] for part in parts])


def one_error(result: Any, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnkit: error: ") and "Traceback" not in result.output, lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return str(lines[0])


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width`` x ``height`` 8-bit gray pixels: the header of a decompression bomb.

    Nothing beyond the header is real, so any attempt to decode it would fail differently: the
    error must come from the size check, before decoding.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


# -- formats -------------------------------------------------------------------------------------------------


def _write_format(path_stem: Path, kind: str) -> tuple[Path, float]:
    """One image of ``kind`` whose pixels read back as the returned 8-bit gray level."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    if kind == "png16":
        path = path_stem.with_suffix(".png")
        Image.fromarray(np.full((SIDE, SIDE), 40_000, np.uint16)).save(path)  # 16-bit grayscale
        return path, 40_000 / 257
    if kind in ("palette", "palette-transparent"):
        path = path_stem.with_suffix(".png")
        image = Image.new("P", (SIDE, SIDE), 1)
        image.putpalette([0, 0, 0, 180, 180, 180] + [0] * 762)
        image.save(path, transparency=0) if kind == "palette-transparent" else image.save(path)
        return path, 180
    if kind == "rgba":
        path = path_stem.with_suffix(".png")
        Image.new("RGBA", (SIDE, SIDE), (180, 180, 180, 40)).save(path)  # alpha is dropped, colours kept
        return path, 180
    suffix = {"jpeg": ".jpg", "bmp": ".bmp", "tiff": ".tif", "webp": ".webp", "gif": ".gif", "uppercase": ".PNG"}[kind]
    path = path_stem.with_suffix(suffix)
    Image.new("RGB", (SIDE, SIDE), (180, 180, 180)).save(path, **({"quality": 95} if kind == "jpeg" else {}))
    return path, 180


@pytest.mark.parametrize(
    "kind", ["jpeg", "bmp", "tiff", "webp", "gif", "png16", "palette", "palette-transparent", "rgba", "uppercase"]
)
def test_every_format_loads_with_its_pixels(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "data"
    reference_class(root)
    expected = 0.0
    for i in range(3):
        _, expected = _write_format(root / "x" / str(i), kind)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "palette images with transparency" or other PIL warning
        splits = load_dataset("image-folder", root, channels=1)
    mine = pixels_of(splits, splits.classes.index("x"))
    assert len(mine) == 3 and mine.shape[1:] == (1, SIDE, SIDE)
    assert (mine.float() - expected).abs().max() <= 3, (kind, mine.float().mean().item(), expected)


def test_exif_rotated_jpeg_is_used_upright(tmp_path: Path) -> None:
    """A camera stores the photo sideways with orientation 6 ("rotate 90 clockwise to view")."""
    root = tmp_path / "data"
    reference_class(root, size=(4, 8))  # upright images are 4 wide, 8 tall
    stored = np.zeros((4, 8), np.uint8)  # 8 wide, 4 tall as stored: left half black, right half white
    stored[:, 4:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "rotated").mkdir()
    for i in range(3):
        Image.fromarray(stored, mode="L").save(root / "rotated" / f"{i}.jpg", exif=exif, quality=95)
    splits = load_dataset("image-folder", root, resize="squash", image_size=8)
    upright = pixels_of(splits, splits.classes.index("rotated")).float()
    assert upright.shape[1:] == (1, 8, 8)  # stretched to the square, so a sideways image would show
    # Turned clockwise, the stored left (black) column becomes the top row.
    assert upright[:, :, :4].mean() < 40 and upright[:, :, 4:].mean() > 215


def test_mixed_grayscale_and_colour_in_one_class(tmp_path: Path) -> None:
    root = tmp_path / "data"
    reference_class(root)
    gray(root / "mixed" / "0.png", 90)
    Image.new("RGB", (SIDE, SIDE), (250, 10, 10)).save(root / "mixed" / "1.png")
    Image.new("LA", (SIDE, SIDE), (90, 255)).save(root / "mixed" / "2.png")
    splits = load_dataset("image-folder", root)
    assert splits.channels == 3  # one colour image makes the dataset RGB
    mine = pixels_of(splits, splits.classes.index("mixed"))
    grays = [img for img in mine if (img[0] == img[1]).all() and (img[1] == img[2]).all()]
    assert len(grays) == 2 and all(int(img[0, 0, 0]) == 90 for img in grays)  # gray replicated to 3 channels
    assert any(int(img[0, 0, 0]) == 250 and int(img[1, 0, 0]) == 10 for img in mine)


# -- broken and foreign files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("bomb", "more than PIL's safety limit"),  # 1-2x the limit: PIL only warns; cnnkit refuses
        ("big bomb", "safety limit"),  # beyond 2x: PIL itself refuses
        ("zero bytes", "is empty (0 bytes)"),
        ("text named .jpg", "is not a readable image"),
        ("truncated", "is not a readable image"),
        ("dangling link", "is not a readable image"),
        ("link loop", "is not a readable image"),
    ],
)
def test_bad_image_file_exits_3_naming_it(tmp_path: Path, runner: Any, kind: str, needle: str) -> None:
    root = tmp_path / "data"
    reference_class(root)
    for i in range(2):
        gray(root / "b" / f"{i}.png", 200)
    bad = root / "b" / ("bad.jpg" if kind == "text named .jpg" else "bad.png")
    if kind == "bomb":
        png_header(bad, 12_000, 12_000)  # 144 M pixels, past Image.MAX_IMAGE_PIXELS (89 M)
    elif kind == "big bomb":
        png_header(bad, 20_000, 20_000)
    elif kind == "zero bytes":
        bad.write_bytes(b"")
    elif kind == "text named .jpg":
        bad.write_text("not a picture")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:150])
    elif kind == "dangling link":
        bad.symlink_to(tmp_path / "nowhere.png")
    else:
        bad.symlink_to(bad)
    result = runner.invoke(app, ["data", "info", "image-folder", "--data", str(root)])
    one_error(result, 3, str(bad), needle)


def test_hidden_and_non_image_files_are_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    reference_class(root)
    for i in range(3):
        gray(root / "b" / f"{i}.png", 200)
    (root / "b" / "notes.txt").write_text("a note")  # visible, not an image by name: skipped, counted
    (root / "b" / "labels.csv").write_text("x")
    (root / "b" / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored
    (root / "b" / "._0.png").write_bytes(b"AppleDouble junk")  # hidden, though named .png: ignored
    (root / "b" / ".ipynb_checkpoints").mkdir()
    (root / "b" / ".ipynb_checkpoints" / "3.png").write_bytes(b"junk")
    (root / ".git").mkdir()  # a hidden folder at the top is no class
    splits = load_dataset("image-folder", root)
    assert splits.classes == ("b", "ref") and len(splits.train) + len(splits.val) + len(splits.test) == 6
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"cnnkit: warning: {root}: skipped 2 file(s) that are not images by name (.csv, .txt)"]


def test_empty_class_and_single_class_exit_3(tmp_path: Path, runner: Any) -> None:
    root = tmp_path / "data"
    reference_class(root)
    (root / "empty").mkdir()
    (root / "empty" / ".DS_Store").write_bytes(b"")  # only hidden files: still empty
    result = runner.invoke(app, ["data", "info", "image-folder", "--data", str(root)])
    one_error(result, 3, str(root / "empty"), "holds no .png/.jpg/.jpeg/.bmp images")
    (root / "empty" / ".DS_Store").unlink()
    (root / "empty").rmdir()
    result = runner.invoke(app, ["data", "info", "image-folder", "--data", str(root)])
    one_error(result, 3, str(root), "single class folder (ref)", "at least two")


# -- names and links ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_unicode_and_non_utf8_names_train_and_record(tmp_path: Path, runner: Any) -> None:
    root = tmp_path / "données"
    latin1 = os.fsdecode(b"caf\xe9")  # a Latin-1 name: not UTF-8, arrives with surrogate escapes
    for i in range(4):
        gray(root / "日本" / f"画像 {i} 🙂.png", 40)
        gray(root / latin1 / f"{latin1}-{i}.png", 200)
    splits = load_dataset("image-folder", root)
    assert splits.classes == ("caf\\xe9", "日本")  # sorted by folder name; shown with an escape
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", "lenet_bn", "--dataset", "image-folder", "--data", str(root), "--input-size", "16",
              "--epochs", "1", "--device", "cpu", "--out", str(out), "-q"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    listed = (out / "split_train.txt").read_text(encoding="utf-8") + (out / "split_test.txt").read_text(
        encoding="utf-8"
    )
    assert "日本/画像 0 🙂.png" in listed and "caf\\xe9/caf\\xe9-0.png" in listed
    again = load_dataset("image-folder", root)  # from the cache, names and all
    assert again.split_files == splits.split_files


def test_symlink_loop_between_folders_reads_each_image_once(tmp_path: Path) -> None:
    root = tmp_path / "data"
    reference_class(root)
    for i in range(3):
        gray(root / "b" / "inner" / f"{i}.png", 200)
    (root / "b" / "inner" / "back").symlink_to(root / "b")  # b/inner/back -> b: a loop
    (root / "b" / "self").symlink_to(".")
    (root / "ref" / "to-b").symlink_to(root / "b" / "inner")  # a link out of the class is followed
    splits = load_dataset("image-folder", root)
    counts = torch.bincount(torch.cat([splits.train.labels, splits.val.labels, splits.test.labels])).tolist()
    assert counts == [3, 6]  # b: its 3 images once; ref: 3 own + 3 through the link


@pytest.mark.slow
def test_two_thousand_tiny_files(tmp_path: Path) -> None:
    root = tmp_path / "many"
    tile = np.zeros((4, 4), np.uint8)
    for i in range(2000):
        (root / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        tile[0, 0] = i % 4 * 60
        Image.fromarray(tile, mode="L").save(root / f"c{i % 4}" / f"{i}.png")
    started = time.perf_counter()
    splits = load_dataset("image-folder", root)
    first = time.perf_counter() - started
    assert len(splits.train) + len(splits.val) + len(splits.test) == 2000
    for label in range(4):  # every image under its own class
        assert (pixels_of(splits, label)[:, 0, 0, 0] == label * 60).all()
    assert first < 60, f"first load of 2,000 files took {first:.1f} s"


# -- predict --------------------------------------------------------------------------------------------------


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = MODELS.get("lenet_bn").build(3, 4).eval()
    meta = WeightsMeta(model="lenet_bn", in_channels=3, num_classes=4, input_size=28, classes=["w", "x", "y", "z"])
    save_weights(tmp_path / "w" / "best.safetensors", model, meta)
    return tmp_path / "w" / "best.safetensors"


def _top(runner: Any, weights: Path, *images: Path) -> list[list[tuple[str, float]]]:
    import json

    result = runner.invoke(app, ["predict", str(weights), *map(str, images), "--format", "json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return [[(t["class"], round(t["probability"], 4)) for t in p["top"]] for p in json.loads(result.stdout)]


def test_predict_reads_every_format_like_training(tmp_path: Path, runner: Any, weights: Path) -> None:
    kinds = ["jpeg", "bmp", "tiff", "webp", "gif", "png16", "palette", "palette-transparent", "rgba"]
    files = [_write_format(tmp_path / "in" / kind, kind)[0] for kind in kinds]
    flat = gray(tmp_path / "in" / "flat.png", 180)
    results = _top(runner, weights, flat, *files)
    assert len(results) == len(kinds) + 1
    for kind, result in zip(kinds, results[1:], strict=True):  # the same gray level, the same answer
        assert [c for c, _ in result] == [c for c, _ in results[0]], kind


def test_predict_applies_exif_rotation(tmp_path: Path, runner: Any, weights: Path) -> None:
    upright = np.zeros((28, 14), np.uint8)
    upright[:14] = 255  # top half white
    Image.fromarray(upright, mode="L").save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 8  # stored turned; "rotate 90 counter-clockwise to view"
    Image.fromarray(np.rot90(upright, k=-1).copy(), mode="L").save(tmp_path / "turned.png", exif=exif)
    plain, turned = _top(runner, weights, tmp_path / "upright.png", tmp_path / "turned.png")
    assert plain == turned


@pytest.mark.parametrize("kind", ["bomb", "zero bytes", "folder", "text"])
def test_predict_bad_input_is_skipped_naming_it_and_alone_exits(tmp_path: Path, runner: Any, weights: Path, kind: str) -> None:
    bad = tmp_path / "bad.png"
    if kind == "bomb":
        png_header(bad, 12_000, 12_000)
    elif kind == "zero bytes":
        bad.write_bytes(b"")
    elif kind == "folder":
        bad.mkdir()
    else:
        bad.write_text("hello")
    good = gray(tmp_path / "good.png", 100)
    result = runner.invoke(app, ["predict", str(weights), str(good), str(bad), "--device", "cpu"])
    if kind == "folder":  # a folder without images gives no image: a usage error naming it
        one_error(result, 2, str(bad))
        return
    assert result.exit_code == 0 and str(good) in result.stdout, result.output
    assert result.stderr.strip().splitlines() == [f"cnnkit: warning: skipped {bad}: " + result.stderr.split(": ", 3)[-1].strip()]
    one_error(runner.invoke(app, ["predict", str(weights), str(bad), "--device", "cpu"]), 3, str(bad))


def test_predict_non_utf8_file_name(tmp_path: Path, runner: Any, weights: Path) -> None:
    name = tmp_path / os.fsdecode(b"\xe9t\xe9.png")
    gray(name, 100)
    assert len(_top(runner, weights, name)) == 1


def test_data_error_type_is_the_one_documented(tmp_path: Path) -> None:
    root = tmp_path / "data"
    reference_class(root)
    gray(root / "b" / "0.png", 9)
    gray(root / "b" / "2.png", 9)
    (root / "b" / "1.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"1\.png is empty"):
        load_dataset("image-folder", root)
