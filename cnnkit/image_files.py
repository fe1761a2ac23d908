"""One image file -> uint8 pixels, the same way for training folders and for ``cnnkit predict``.

Only PIL, OpenCV and numpy are imported (``predict`` on an ONNX file runs without torch). What every
image becomes, whatever its format (PNG, JPEG, BMP, TIFF, WebP, GIF's first frame):

- its EXIF orientation is applied (``ImageOps.exif_transpose``), so a photo a camera stored
  sideways with an "rotate 90" tag is used upright, as every viewer shows it;
- 16-bit grayscale (PIL modes ``I;16*`` and ``I``) is scaled to 8 bits (value / 257), not clipped;
- palette images are expanded (through RGBA when they have a transparent colour, so PIL does not
  warn); an alpha channel is dropped, keeping the colours as stored;
- grayscale and colour images mix freely: each is converted to the channel count asked for.

An image with more pixels than PIL's safety limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89
million) is refused before it is decoded: a decompression bomb costs no memory.

:func:`read_image_square` reads the same way (one shared opening and conversion) and resizes on
the way to a square (crop, squash or pad); a JPEG is decoded at a reduced DCT scale when the
result is much smaller (PIL's ``draft``), which makes large photos cheap, and the resizing is
OpenCV's (:func:`resample`), several times faster than PIL's.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from cnnkit.errors import DataError

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "IMAGE_SUFFIXES",
    "RESIZE_MODES",
    "ResizeMode",
    "image_files",
    "read_image",
    "read_image_square",
    "resample",
    "square_pixels",
    "to_pixels",
    "check_pixel_count",
    "header",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
"""File name endings read as images (any case); other files in a class folder are skipped."""

GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
"""PIL modes holding one channel of intensity."""

_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees


def image_files(folder: Path, *, strict: bool = True) -> tuple[list[Path], list[Path]]:
    """(image files, skipped visible non-image files) under ``folder``, following links, never twice.

    What training folders and ``cnnkit predict FOLDER`` read: files named as images
    (:data:`IMAGE_SUFFIXES`, any case), in sorted order; hidden files and folders (``.`` names)
    are ignored; a linked folder is read once (a link loop ends there). A broken or looping link
    named as an image is a DataError when ``strict``, else listed with the images (reading it then
    fails, and ``predict`` reports it as unreadable).
    """
    images: list[Path] = []
    skipped: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        identity = os.stat(top)
        if (identity.st_dev, identity.st_ino) in seen:  # a link back to a folder already read
            dirs[:] = []
            continue
        seen.add((identity.st_dev, identity.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(top) / name
            if name.startswith("."):
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES:
                if strict and not path.is_file():
                    raise DataError(f"{path} is not a readable image (a broken or looping link); replace or remove it")
                images.append(path)
            elif path.is_file():
                skipped.append(path)
    return sorted(images), skipped


def check_pixel_count(path: Path, image: PILImage.Image) -> None:
    """DataError when ``image`` (opened, not decoded) is larger than PIL's decompression-bomb limit."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise DataError(
            f"{path} is {image.width}x{image.height} = {image.width * image.height:,} pixels, more than "
            f"PIL's safety limit of {limit:,} (a decompression bomb, or an image far too large); "
            "shrink it or remove it"
        )


def _open(path: Path) -> PILImage.Image:
    """``Image.open`` with PIL's bomb warning (1-2x the limit) turned into our one-line error."""
    from PIL import Image

    if threading.current_thread() is not threading.main_thread():
        return Image.open(path)  # warning filters are process-wide; the main thread screened sizes first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def header(path: Path) -> tuple[bool, tuple[int, int]]:
    """(grayscale?, (height, width) as used, i.e. after the EXIF rotation) without decoding pixels."""
    with _open(path) as image:
        check_pixel_count(path, image)
        height, width = image.height, image.width
        if image.getexif().get(_ORIENTATION) in _SWAPS_SIDES:
            height, width = width, height
        return image.mode in GRAY_MODES, (height, width)


def to_pixels(image: PILImage.Image, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """An opened image -> uint8 (channels, H, W): upright, 8-bit, resized to ``size`` (H, W) if given."""
    from PIL import Image

    converted = _upright(image, channels)
    if size is not None and converted.size != (size[1], size[0]):
        converted = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return _planes(converted)


def _upright(image: PILImage.Image, channels: int) -> PILImage.Image:
    """An opened image -> a PIL image in mode L (``channels`` 1) or RGB: EXIF-upright, 8-bit."""
    from PIL import Image, ImageOps

    upright = ImageOps.exif_transpose(image)  # a new image (a copy when there is nothing to turn)
    if upright.mode.startswith("I;16") or upright.mode == "I":
        wide = np.asarray(upright, dtype=np.int64).clip(0, 65535)
        upright = Image.fromarray(((wide + 128) // 257).astype(np.uint8), mode="L")
    elif upright.mode == "P" and "transparency" in upright.info:
        upright = upright.convert("RGBA")
    mode = "L" if channels == 1 else "RGB"
    # convert() to the mode an image has copies it: a second copy of every image in a store build
    return upright if upright.mode == mode and upright is not image else upright.convert(mode)


def _planes(image: PILImage.Image | np.ndarray) -> np.ndarray:
    """A mode L or RGB image, or its (H, W[, 3]) pixels -> uint8 (channels, H, W)."""
    array = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))


@contextmanager
def _opened(path: Path) -> Iterator[PILImage.Image]:
    """The file opened (header read, pixels not yet decoded) and screened: an empty file, a
    decompression bomb or anything PIL fails on, here or in the ``with`` body, is a DataError
    (exit 3) naming the file. The one way every reader here opens an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path} is empty (0 bytes); replace or remove it")
        with _open(path) as opened:
            check_pixel_count(path, opened)
            yield opened
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path} is larger than PIL's safety limit ({exc}); shrink it or remove it") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"{path} is not a readable image ({reason}); replace or remove it") from exc


def read_image(path: Path, channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 (channels, H, W) from an image file; DataError (exit 3) naming the file otherwise."""
    with _opened(path) as opened:
        return to_pixels(opened, channels, size)


ResizeMode = Literal["crop", "squash", "pad"]
"""How an image becomes ``size`` x ``size``: ``crop`` scales its shorter side to ``size`` and cuts the
centre square (torchvision's ``Resize(size)`` + ``CenterCrop(size)``); ``squash`` scales each side to
``size`` (the aspect ratio is lost); ``pad`` scales its longer side to ``size`` and centres it on a
black square."""

RESIZE_MODES: tuple[str, ...] = ("crop", "squash", "pad")


def read_image_square(path: Path, channels: int, size: int, resize: ResizeMode) -> np.ndarray:
    """uint8 (channels, size, size) from an image file, read as :func:`read_image` reads it (same
    opening, EXIF rotation, 16-bit scaling, palettes, bomb limit and errors) and resized on the way.

    A JPEG is decoded at the smallest of its DCT scales (1/2, 1/4, 1/8) that still covers the
    result (PIL's ``draft``), so a 3000x2000 photo read at 28 px costs a 375x250 decode, not a
    6-megapixel one.
    """
    return _planes(square_pixels(path, channels, size, resize))


def square_pixels(path: Path, channels: int, size: int, resize: ResizeMode) -> np.ndarray:
    """:func:`read_image_square` before it becomes planes: uint8 (size, size) for one channel,
    (size, size, 3) for RGB, as PIL and OpenCV lay pixels out."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    with _opened(path) as opened:
        if opened.format == "JPEG":
            # The scale is the same whichever way the image turns (EXIF), so the stored sides do.
            opened.draft(None, _needed(opened.size, size, resize))
        return _fit(np.asarray(_upright(opened, channels)), size, resize)


def _needed(width_height: tuple[int, int], size: int, resize: ResizeMode) -> tuple[int, int]:
    """(width, height) an image must keep for ``_fit`` to resample down, never up, from it."""
    width, height = width_height
    if resize == "squash":
        return size, size
    scale = size / (min(width, height) if resize == "crop" else max(width, height))
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def _fit(pixels: np.ndarray, size: int, resize: ResizeMode) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) -> ``size`` x ``size`` by ``resize`` (see :func:`resample`)."""
    height, width = pixels.shape[:2]
    if (width, height) == (size, size):
        return pixels
    if resize == "squash":
        return resample(pixels, (0.0, 0.0, width, height), (size, size))
    if resize == "crop":
        # torchvision's Resize(size): the shorter side becomes size, the longer int(size * long / short);
        # CenterCrop(size) then starts at round((side - size) / 2). The same window of the source is
        # resampled in one step, without making the larger image first.
        if width <= height:
            new_w, new_h = size, int(size * height / width)
        else:
            new_w, new_h = int(size * width / height), size
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        sx, sy = width / new_w, height / new_h
        return resample(pixels, (left * sx, top * sy, (left + size) * sx, (top + size) * sy), (size, size))
    scale = size / max(width, height)
    inner = (max(1, min(size, round(width * scale))), max(1, min(size, round(height * scale))))
    canvas = np.zeros((size, size, *pixels.shape[2:]), dtype=np.uint8)
    top, left = (size - inner[1]) // 2, (size - inner[0]) // 2
    canvas[top : top + inner[1], left : left + inner[0]] = resample(pixels, (0.0, 0.0, width, height), inner)
    return canvas


def resample(pixels: np.ndarray, box: tuple[float, float, float, float], out: tuple[int, int]) -> np.ndarray:
    """The ``box`` (left, top, right, bottom; pixel edges, fractional) of uint8 (H, W[, C]) pixels,
    resampled to ``out`` (width, height).

    Shrinking by a factor f first averages whole blocks of floor(f) x floor(f) pixels (OpenCV's
    area interpolation: every source pixel counts, so fine detail cannot alias), then samples the
    rest (a factor below 2) bilinearly at the pixel centres (an affine warp: a fractional box
    stays exact); enlarging is bilinear alone. OpenCV's vectorised kernels take 0.2 ms for a
    256 -> 224 px RGB image where PIL's antialiased bilinear took 1.0 ms on this project's CPU
    (profiled per image; PIL's was most of the decode-and-resize time); the values are within a
    few grey levels of PIL's (torchvision's ``Resize``), the same window of the image.
    """
    import cv2

    left, top, right, bottom = box
    fx, fy = (right - left) / out[0], (bottom - top) / out[1]
    kx, ky = max(1, int(fx)), max(1, int(fy))
    if kx > 1 or ky > 1:
        height, width = pixels.shape[:2]
        whole = pixels[: height - height % ky, : width - width % kx]
        pixels = cv2.resize(whole, (width // kx, height // ky), interpolation=cv2.INTER_AREA)
        left, right, top, bottom = left / kx, right / kx, top / ky, bottom / ky
        fx, fy = fx / kx, fy / ky
    # Output pixel u's centre (u + 0.5) maps to left + (u + 0.5) * fx in source edges, i.e. that
    # minus 0.5 in source pixel centres (OpenCV's coordinates).
    matrix = np.array([[fx, 0.0, left + 0.5 * fx - 0.5], [0.0, fy, top + 0.5 * fy - 0.5]])
    return cv2.warpAffine(
        pixels, matrix, out, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
    )
