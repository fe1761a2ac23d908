"""Reading and running an exported ``.onnx`` file in ONNX Runtime, without PyTorch.

This module's one job is the torch-free side of cnnkit's ONNX graphs: the contract a graph
written by ``cnnkit export --format onnx`` keeps (input :data:`INPUT_NAME`, float32 (batch, C, S,
S) prepared as :mod:`cnnkit.prediction` does; output :data:`OUTPUT_NAME`, (batch, K); the
``metadata_props`` in :data:`METADATA_KEYS`), reading that metadata back (:func:`read_onnx_info`),
running the graph for ``cnnkit predict FILE.onnx`` (:func:`load_onnx`, :func:`predict_onnx`) and
over a whole split of uint8 images for ``cnnkit eval FILE.onnx`` and the int8 export's accuracy
check (:func:`split_logits`, :func:`top1`). A float32 graph and its int8 (QDQ) form keep the same
contract. It imports neither torch nor anything that does, at module level or inside its
functions; exporting and checking against PyTorch are :mod:`cnnkit.onnx_export`'s.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.errors import UsageError, WeightsError
from cnnkit.prediction import Prediction, Predictor, predict_all, prepare_batch, training_resize

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "INSTALL_HINT",
    "METADATA_KEYS",
    "QUANTIZATION_KEY",
    "OnnxInfo",
    "OnnxModel",
    "require",
    "optional_import",
    "first_line",
    "session_options",
    "read_onnx_info",
    "load_onnx",
    "open_graph",
    "predict_onnx",
    "split_logits",
    "top1",
]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INSTALL_HINT = "pip install 'cnnkit[onnx]'"

METADATA_KEYS: dict[str, str] = {
    "cnnkit": "the whole weights metadata as JSON (what a .safetensors file holds under the same key)",
    "model": "registered model name, e.g. resnet18",
    "classes": "JSON list of class names in logit order",
    "in_channels": "1 (grayscale) or 3 (RGB)",
    "input_size": "square side S in pixels",
    "mean": "JSON list, per-channel mean on the 0..1 scale, or null (no normalisation)",
    "std": "JSON list, per-channel standard deviation on the 0..1 scale, or null",
    "preprocessing": "the preprocessing in words",
    "cnnkit_version": "the cnnkit version that exported the file",
    "exporter": "the PyTorch exporter that wrote the graph: torch.export, or TorchScript (the fallback) and why",
}
"""The ``metadata_props`` of an exported graph and what each holds (all values are strings)."""
QUANTIZATION_KEY = "quantization"
"""Only in an int8 graph (``--quantize int8``): JSON saying how it was quantised and calibrated,
and the test top-1 of the float and int8 graphs."""


def require(module: str, purpose: str) -> Any:
    """Import an optional dependency, or raise a one-line UsageError (exit 2) saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"{purpose} needs the '{module}' package, which is not installed; {INSTALL_HINT}") from exc


def optional_import(module: str) -> Any | None:
    """The optional dependency ``module`` when installed, else None."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line of at most 200 characters, for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


# -- metadata ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnnxInfo:
    """What an exported graph says about itself: enough to prepare images and name the outputs."""

    model: str
    classes: list[str]
    in_channels: int
    input_size: int
    mean: list[float] | None
    std: list[float] | None
    cnnkit_version: str
    meta_json: str
    """The full weights metadata (``cnnkit.checkpoint.WeightsMeta`` as JSON)."""
    quantization: str | None = None
    """How an int8 graph was quantised (JSON, see :data:`QUANTIZATION_KEY`); None for a float graph."""

    @property
    def resize(self) -> str | None:
        """How image files become square for this graph, as its training images did
        (:func:`cnnkit.prediction.training_resize` of the metadata's dataset and options)."""
        try:
            meta = json.loads(self.meta_json)
        except ValueError:
            return None
        options = meta.get("dataset_options") if isinstance(meta, dict) else None
        return training_resize(meta.get("dataset"), options if isinstance(options, dict) else {})

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _info_from_props(path: Path, props: Mapping[str, str]) -> OnnxInfo:
    if "cnnkit" not in props:
        raise WeightsError(
            f"{path} is an ONNX model but carries no cnnkit metadata; only files written by "
            "'cnnkit export --format onnx' can be used"
        )
    try:
        raw = json.loads(props["cnnkit"])
        classes, mean, std = json.loads(props["classes"]), json.loads(props["mean"]), json.loads(props["std"])
        info = OnnxInfo(
            model=str(props["model"]), classes=[str(c) for c in classes], in_channels=int(props["in_channels"]),
            input_size=int(props["input_size"]), mean=None if mean is None else [float(v) for v in mean],
            std=None if std is None else [float(v) for v in std],
            cnnkit_version=str(props.get("cnnkit_version", raw.get("cnnkit_version", "?"))), meta_json=props["cnnkit"],
            quantization=props.get(QUANTIZATION_KEY),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path} has corrupt cnnkit metadata ({first_line(exc)}); re-export it") from exc
    if not info.classes or info.in_channels < 1 or info.input_size < 1:
        raise WeightsError(f"{path} has corrupt cnnkit metadata (no classes, channels or size); re-export it")
    return info


# -- reading and running ----------------------------------------------------------------------------


def session_options(ort: Any) -> Any:
    """ONNX Runtime session options that log errors only."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no optimiser chatter on stderr
    return options


def _providers(ort: Any, device: str) -> list[Any]:
    available = ort.get_available_providers()
    wanted = device.strip().lower()
    if wanted in {"auto", "cpu"}:
        cuda = wanted == "auto" and "CUDAExecutionProvider" in available
        return (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]
    if (wanted == "cuda" or wanted.startswith("cuda:")) and "CUDAExecutionProvider" in available:
        index = int(wanted.partition(":")[2] or 0)
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    raise UsageError(
        f"--device {device} is not available to ONNX Runtime here (it offers {', '.join(available)}); "
        "use --device cpu or auto"
    )


class OnnxModel:
    """An exported graph opened in ONNX Runtime, with the metadata to prepare its inputs."""

    def __init__(self, path: Path, session: Any, info: OnnxInfo) -> None:
        self.path, self.session, self.info = path, session, info

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, K) float32 logits of a prepared (N, C, S, S) float32 batch."""
        (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        return np.asarray(out)

    def predictor(self) -> Predictor:
        """This graph as :func:`cnnkit.prediction.predict_batches` runs it."""
        info = self.info
        return Predictor(
            source=self.path, classes=info.classes, channels=info.in_channels, size=info.input_size,
            mean=info.mean, std=info.std, logits=self.logits, resize=info.resize,
        )  # fmt: skip

    def predict(self, images: Sequence[str | Path], top: int = 5) -> list[Prediction]:
        """The ``top`` most probable classes of each image file (batched; an unreadable file is a DataError)."""
        return predict_all(self.predictor(), images, top)


def _opened(source: bytes | str, label: Path, ort: Any, providers: list[Any]) -> OnnxModel:
    """A graph (a file's path, or its bytes) in an ONNX Runtime session, its metadata and input checked."""
    try:
        session = ort.InferenceSession(source, session_options(ort), providers=providers)
    except Exception as exc:  # InvalidProtobuf, Fail, InvalidGraph, …: any unreadable file is one message
        raise WeightsError(
            f"weights {label} is not a readable ONNX model ({first_line(exc)}); re-export it with "
            "'cnnkit export --format onnx'"
        ) from exc
    info = _info_from_props(label, session.get_modelmeta().custom_metadata_map)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    if (
        len(inputs) != 1 or inputs[0].name != INPUT_NAME or shape[1:] != [info.in_channels, info.input_size, info.input_size]
        or not any(o.name == OUTPUT_NAME for o in outputs)
    ):  # fmt: skip
        raise WeightsError(
            f"weights {label} take input {shape or '?'} but their metadata says {info.in_channels}x{info.input_size}x"
            f"{info.input_size}; the graph was changed after export, re-export it"
        )
    return OnnxModel(label, session, info)


def load_onnx(path: str | Path, device: str = "auto") -> OnnxModel:
    """Open a ``.onnx`` file written by ``cnnkit export --format onnx`` in ONNX Runtime.

    A missing, unreadable or foreign file is a one-line WeightsError (exit 4); a missing
    ``onnxruntime`` a UsageError (exit 2).
    """
    file = Path(path)
    if not file.is_file():
        what = "is a folder, not a .onnx file" if file.is_dir() else "do not exist"
        raise WeightsError(f"weights {file} {what}; pass a .onnx file written by 'cnnkit export --format onnx'")
    ort = require("onnxruntime", f"running {file}")
    providers = _providers(ort, device)
    if file.stat().st_size == 0:
        raise WeightsError(f"weights {file} is empty; re-export it with 'cnnkit export --format onnx'")
    return _opened(str(file), file, ort, providers)


def open_graph(data: bytes, label: str, device: str = "cpu") -> OnnxModel:
    """A serialised graph held in memory (not yet written), opened as :func:`load_onnx` opens a file."""
    ort = require("onnxruntime", f"running {label}")
    return _opened(data, Path(label), ort, _providers(ort, device))


def read_onnx_info(path: str | Path) -> OnnxInfo:
    """The cnnkit metadata of a ``.onnx`` file (opened in ONNX Runtime, which checks it too)."""
    return load_onnx(path, device="cpu").info


def predict_onnx(
    path: str | Path, images: Sequence[str | Path], top: int = 5, device: str = "auto"
) -> list[Prediction]:
    """``cnnkit predict`` for a ``.onnx`` file: the ``top`` most probable classes of each image file."""
    if top < 1:
        raise UsageError(f"--top must be >= 1, got {top}")
    if not images:
        raise UsageError("no images given; pass one or more image files")
    return load_onnx(path, device).predict(images, top)


# -- a whole split ----------------------------------------------------------------------------------


def split_logits(predictor: Predictor, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, K) float32 logits of uint8 (N, C, H, W) images, ``batch_size`` at a time.

    Each batch is prepared as the graph's metadata says (:func:`cnnkit.prediction.prepare_batch`:
    0..1, resized to its input size when the images are of another, normalised with its mean and
    std) and run by ``predictor.logits``; only one prepared batch is held at a time.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if images.ndim != 4 or images.shape[1] != predictor.channels:
        raise WeightsError(
            f"{predictor.source} takes {predictor.channels}-channel images; the split holds images of shape "
            f"{tuple(images.shape[1:])}"
        )
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = prepare_batch(list(images[start : start + batch_size]), predictor.size, predictor.mean, predictor.std)
        chunks.append(np.asarray(predictor.logits(batch), dtype=np.float32))
    if not chunks:
        return np.zeros((0, len(predictor.classes)), dtype=np.float32)
    return np.concatenate(chunks)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose arg-max is the label (a tie goes to the first class, as in torch's argmax)."""
    if len(labels) == 0:
        raise UsageError("nothing to evaluate: the split has no examples")
    return float((np.argmax(logits, axis=1) == np.asarray(labels)).mean())
