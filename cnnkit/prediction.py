"""The torch-free half of ``cnnkit predict``: decode image files, prepare them as the model was fed, rank classes.

Both ways of predicting use these functions: :func:`cnnkit.evaluate.predict_files` (PyTorch, a
``.safetensors`` file) and :func:`cnnkit.onnx_export.predict_onnx` (ONNX Runtime, a ``.onnx``
file), so an image becomes exactly the same input, and logits become the same ranking, whichever
runtime computes the model. Only PIL and numpy are imported here.

The preprocessing is the one the models were evaluated with (``cnnkit.evaluate.prepare_images``
and ``cnnkit.data.batches.to_float``): scale uint8 to 0..1, resize to ``size`` x ``size`` with an
antialiased bilinear filter (PIL's, which ``torch.nn.functional.interpolate(..., antialias=True)``
reproduces), then ``(x - mean) / std`` per channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.errors import DataError, UsageError, WeightsError

__all__ = ["Prediction", "decode_images", "prepare_batch", "rank"]


@dataclass(frozen=True)
class Prediction:
    """The most probable classes for one image, best first."""

    image: Path
    top: list[tuple[str, float]]
    """(class name, probability) pairs."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return {"image": str(self.image), "top": [{"class": c, "probability": p} for c, p in self.top]}


def decode_images(paths: Sequence[str | Path], channels: int) -> list[np.ndarray]:
    """Decode image files into uint8 (C, H, W) arrays with 1 (grayscale) or 3 (RGB) channels.

    Each file is read as training folders read it (:func:`cnnkit.image_files.read_image`: EXIF
    rotation, 16-bit, palettes, the decompression-bomb limit); a file that cannot be read is a
    one-line DataError naming it.
    """
    from cnnkit.image_files import read_image

    if channels not in (1, 3):
        raise WeightsError(f"image files can give 1 or 3 channels; these weights expect {channels}")
    decoded = []
    for path in map(Path, paths):
        try:
            decoded.append(read_image(path, channels))
        except DataError as exc:
            cause = exc.__cause__
            if cause is None:  # already names the file and the fix (empty, too large)
                raise
            reason = "no such file" if isinstance(cause, FileNotFoundError) else (str(cause).splitlines() or ["?"])[0]
            raise DataError(f"image {path} cannot be read ({reason}); pass PNG, JPEG or other files PIL opens") from cause
    return decoded


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
