"""The torch-free half of ``cnnkit predict``: find and decode image files, prepare them as the model was fed, rank classes.

Both ways of predicting use these functions: :func:`cnnkit.evaluate.load_predictor` (PyTorch, a
``.safetensors`` file or a run directory) and :meth:`cnnkit.onnx_runtime.OnnxModel.predictor`
(ONNX Runtime, a ``.onnx`` file) each give a :class:`Predictor`, and :func:`predict_batches` runs
either over any number of files in bounded memory, so an image becomes exactly the same input, and
logits become the same ranking, whichever runtime computes the model. Only PIL and numpy are
imported here.

The preprocessing is the one the models were evaluated with (``cnnkit.evaluate.prepare_images``
and ``cnnkit.data.batches.to_float``): scale uint8 to 0..1, resize to ``size`` x ``size`` with an
antialiased bilinear filter (PIL's, which ``torch.nn.functional.interpolate(..., antialias=True)``
reproduces), then ``(x - mean) / std`` per channel.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.errors import DataError, UsageError, WeightsError

__all__ = [
    "BATCH_SIZE",
    "Prediction",
    "Unreadable",
    "Predictor",
    "gather_images",
    "predict_batches",
    "predict_all",
    "decode_images",
    "prepare_batch",
    "rank",
    "training_resize",
]

BATCH_SIZE = 64
"""Images decoded and run through the model at a time by ``cnnkit predict`` (``--batch-size``)."""


@dataclass(frozen=True)
class Prediction:
    """The most probable classes for one image, best first."""

    image: Path
    top: list[tuple[str, float]]
    """(class name, probability) pairs."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {"image": str(self.image), "top": [{"class": c, "probability": p} for c, p in self.top]}


@dataclass(frozen=True)
class Unreadable:
    """An image file that could not be decoded (not an image, truncated, empty, too large, gone)."""

    image: Path
    reason: str
    """Why, in a few words without the file name, e.g. ``empty (0 bytes)``."""
    error: DataError = field(repr=False, compare=False)
    """The one-line error naming the file (what a single unreadable file exits 3 with)."""


@dataclass(frozen=True)
class Predictor:
    """A model ready for image files, whichever runtime holds it: what its inputs are and its logits."""

    source: Path
    classes: list[str]
    channels: int
    size: int
    mean: list[float] | None
    std: list[float] | None
    logits: Callable[[np.ndarray], np.ndarray]
    """A prepared float32 (N, C, size, size) batch -> (N, K) logits as a numpy array."""
    resize: str | None = None
    """How an image file becomes square, as the model's training images did (``crop``, ``squash``,
    ``pad``: :func:`cnnkit.image_files.read_image_square`); None: resized whole to the square."""


def training_resize(dataset: str | None, dataset_options: Mapping[str, Any]) -> str | None:
    """How the training images of ``dataset`` became square (:attr:`Predictor.resize`): its
    ``resize`` option; for an image folder without one, its default ``crop``; else None (the
    bundled datasets' images are square already)."""
    chosen = dataset_options.get("resize")
    if isinstance(chosen, str):
        return chosen
    return "crop" if dataset == "image-folder" else None


# -- which files ------------------------------------------------------------------------------------


def gather_images(arguments: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """(image files, skipped non-image files) named by ``cnnkit predict``'s arguments, in their order.

    Each argument is a file (taken whatever its name), a folder (walked recursively for files
    named as images, as training folders are: :func:`cnnkit.image_files.image_files`), or a glob
    pattern (``glob.glob(recursive=True)``, so ``**`` crosses folders; matched folders are walked,
    matched files are kept when named as images). A file named twice is kept once, where first
    named. An argument that gives no image (no such path, a pattern matching nothing, a folder
    without image files) is a UsageError (exit 2) naming it.
    """
    from cnnkit.image_files import IMAGE_SUFFIXES, image_files

    if not arguments:
        raise UsageError("no images given; pass image files, folders or glob patterns")
    found: dict[str, Path] = {}
    skipped: list[Path] = []
    for argument in arguments:
        text = os.fspath(argument)
        literal = os.path.lexists(text)  # a file whose name has [ or * in it is still that file
        if literal:
            matches = [text]
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise UsageError(f"'{text}' matches no files; check the pattern")
        else:
            raise UsageError(f"{text}: no such file or folder; pass image files, folders or glob patterns")
        named: list[Path] = []
        for match in matches:
            path = Path(match)
            if path.is_dir():
                images, others = image_files(path, strict=False)
                named += images
                skipped += others
            elif literal or (path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")):
                named.append(path)
            else:
                skipped.append(path)
        if not named:
            suffixes = "/".join(sorted(IMAGE_SUFFIXES))
            what = f"folder {text} holds" if literal else f"'{text}' matches"
            raise UsageError(f"{what} no image files (named {suffixes}); pass image files, folders or glob patterns")
        for path in named:
            found.setdefault(os.path.abspath(path), path)
    return list(found.values()), skipped


# -- decoding ---------------------------------------------------------------------------------------


def _read_one(path: Path, channels: int, square: tuple[int, str] | None = None) -> np.ndarray | Unreadable:
    from cnnkit.image_files import read_image, read_image_square

    try:
        if square is not None:  # (size, resize): as the training images were decoded into the store
            return read_image_square(path, channels, square[0], square[1])  # type: ignore[arg-type]
        return read_image(path, channels)
    except DataError as exc:
        cause = exc.__cause__
        if cause is None:  # already names the file and the fix (empty, too large)
            reason = exc.message.removeprefix(f"{path} ").removeprefix("is ").partition("; ")[0]
            return Unreadable(path, reason, exc)
        if isinstance(cause, FileNotFoundError):
            reason = "no such file"
        else:
            reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        error = DataError(f"image {path} cannot be read ({reason}); pass PNG, JPEG or other files PIL opens")
        error.__cause__, error.__suppress_context__ = cause, True
        return Unreadable(path, reason, error)


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise WeightsError(f"image files can give 1 or 3 channels; these weights expect {channels}")


def decode_images(paths: Sequence[str | Path], channels: int) -> list[np.ndarray]:
    """Decode image files into uint8 (C, H, W) arrays with 1 (grayscale) or 3 (RGB) channels.

    Each file is read as training folders read it (:func:`cnnkit.image_files.read_image`: EXIF
    rotation, 16-bit, palettes, the decompression-bomb limit); a file that cannot be read is a
    one-line DataError naming it.
    """
    _check_channels(channels)
    decoded = []
    for path in map(Path, paths):
        image = _read_one(path, channels)
        if isinstance(image, Unreadable):
            raise image.error
        decoded.append(image)
    return decoded


def predict_batches(
    predictor: Predictor, images: Sequence[str | Path], top: int = 5, batch_size: int = BATCH_SIZE
) -> Iterator[list[Prediction | Unreadable]]:
    """Predict ``batch_size`` files at a time: for each batch, its files' results in their order.

    Only one batch is decoded at a time, so memory stays bounded however many files there are. A
    file that cannot be decoded is an :class:`Unreadable` in its place; the others still run.
    """
    if top < 1:
        raise UsageError(f"--top must be >= 1, got {top}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    _check_channels(predictor.channels)
    paths = [Path(p) for p in images]
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        results: list[Prediction | Unreadable | None] = [None] * len(chunk)
        readable: list[int] = []
        decoded: list[np.ndarray] = []
        square = (predictor.size, predictor.resize) if predictor.resize else None
        for index, path in enumerate(chunk):
            image = _read_one(path, predictor.channels, square)
            if isinstance(image, Unreadable):
                results[index] = image
            else:
                readable.append(index)
                decoded.append(image)
        if decoded:
            batch = prepare_batch(decoded, predictor.size, predictor.mean, predictor.std)
            del decoded
            ranked = rank([chunk[i] for i in readable], predictor.logits(batch), predictor.classes, top)
            for index, prediction in zip(readable, ranked, strict=True):
                results[index] = prediction
        yield [r for r in results if r is not None]


def predict_all(
    predictor: Predictor, images: Sequence[str | Path], top: int = 5, batch_size: int = BATCH_SIZE
) -> list[Prediction]:
    """Every file's prediction, batched; the first file that cannot be read is its DataError (exit 3)."""
    if not images:
        raise UsageError("no images given; pass one or more image files")
    out: list[Prediction] = []
    for results in predict_batches(predictor, images, top, batch_size):
        for result in results:
            if isinstance(result, Unreadable):
                raise result.error
            out.append(result)
    return out


def _resize_plane(plane: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    # Mode "F" (float32) keeps the 0..1 values unrounded; PIL's BILINEAR widens its kernel when
    # shrinking, which is what antialias=True means in torch.
    resized = Image.fromarray(plane).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def prepare_batch(
    images: Sequence[np.ndarray],
    size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """uint8 (C, H, W) images of any sizes -> one float32 batch (N, C, size, size) as the model was trained.

    Scaled to 0..1, resized (bilinear, antialiased; images already at ``size`` are left as they
    are), then normalised with ``mean``/``std`` (one value, or one per channel) when both are given.
    """
    if not images:
        raise UsageError("no images given; pass one or more image files")
    channels = images[0].shape[0]
    batch = np.empty((len(images), channels, size, size), dtype=np.float32)
    for index, image in enumerate(images):
        scaled = image.astype(np.float32) / np.float32(255)
        if scaled.shape[1:] != (size, size):
            scaled = np.stack([_resize_plane(plane, size) for plane in scaled])
        batch[index] = scaled
    if mean is not None and std is not None:
        shift = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
        scale = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
        batch = (batch - shift) / scale
    return batch


def rank(
    images: Sequence[str | Path], logits: np.ndarray, classes: Sequence[str], top: int
) -> list[Prediction]:
    """The ``top`` most probable classes of each image from its (N, K) logits, best first."""
    if top < 1:
        raise UsageError(f"--top must be >= 1, got {top}")
    scores = logits.astype(np.float64)
    scores -= scores.max(axis=1, keepdims=True)  # a stable softmax
    probabilities = np.exp(scores)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    # A stable sort: equal probabilities keep class order, on either runtime.
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, : min(top, len(classes))]
    return [
        Prediction(Path(path), [(classes[c], float(row[c])) for c in best])
        for path, best, row in zip(images, order.tolist(), probabilities, strict=True)
    ]
