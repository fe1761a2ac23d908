"""``cnnkit export WEIGHTS --out FILE.onnx --quantize int8``: an int8 ONNX graph whose accuracy is measured.

Static post-training quantisation by ONNX Runtime's quantiser (``quantize_static``): QDQ format
(QuantizeLinear/DequantizeLinear pairs around the float operators, which ONNX Runtime's CPU
kernels fuse into integer ones), int8 weights per output channel (symmetric), uint8 activations
per tensor (asymmetric, the quantiser's advice for x86 CPUs), ranges by min-max calibration. The
ranges are calibrated on :data:`CALIBRATION_IMAGES` training images of the run's own dataset
(its recorded folder, options and split, as ``cnnkit eval`` loads them), prepared exactly as the
graph's metadata says (:func:`cnnkit.prediction.prepare_batch`), or on the images of
``--calibration-data DIR``. The float32 graph is exported and checked against PyTorch first
(:mod:`cnnkit.onnx_export`); then both graphs run over the test split and both top-1 are
reported. A drop of more than :data:`WARN_DROP` points is a warning; with ``--max-drop X`` a drop
of more than X points is an error (exit 4, as a failed ``--check``: the graph does not do what
the weights do) and nothing is written. The file keeps the float32 input and output and the same
metadata, plus a ``quantization`` entry (how, on what, and both top-1).

The weights use 7 of the 8 bits (``reduce_range``): on x86 CPUs without VNNI (before Cascade Lake
and Zen 4) ONNX Runtime's uint8 x int8 kernels add pairs of products in 16 bits, which full-range
weights saturate. Measured on such a CPU (AVX2, Fashion-MNIST test, 10,000 images): LeNet-BN lost
1.61 points with full-range weights and -0.07 with 7 bits, ResNet-18 0.72 and 0.08. One file runs
everywhere, so it takes the range that is safe everywhere; uint8 weights (ONNX Runtime's other
remedy) would also do, but TensorRT-style runtimes take only int8 ones.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnkit.errors import CnnkitError, DataError, UsageError, WeightsError
from cnnkit.onnx_export import (
    DEFAULT_TOLERANCE,
    OnnxCheck,
    OnnxExport,
    OnnxGraph,
    check_plan,
    check_target,
    export_graph,
    label,
    quiet,
    verified,
    write_graph,
)
from cnnkit.onnx_runtime import INPUT_NAME, QUANTIZATION_KEY, open_graph, require, split_logits, top1
from cnnkit.prediction import prepare_batch

if TYPE_CHECKING:
    from cnnkit.checkpoint import WeightsMeta
    from cnnkit.protocols import DatasetSplits

__all__ = ["CALIBRATION_IMAGES", "WARN_DROP", "Calibration", "Int8Export", "calibrate_on_split",
           "calibrate_on_folder", "quantize_graph", "export_int8", "drop_warning"]  # fmt: skip

CALIBRATION_IMAGES = 256
"""Images the activation ranges are calibrated on (fewer when the source holds fewer)."""
WARN_DROP = 1.0
"""Top-1 points the int8 graph may lose against the float32 one before a warning says so."""
_BATCH = 32


@dataclass(frozen=True)
class Calibration:
    """Prepared float32 batches to calibrate on, and where they came from (in words)."""

    batches: list[np.ndarray]
    source: str

    @property
    def count(self) -> int:
        return sum(len(batch) for batch in self.batches)


def _sample(total: int, count: int) -> np.ndarray:
    """``count`` of ``range(total)`` drawn without replacement by a fixed seed, in order."""
    return np.sort(np.random.default_rng(0).choice(total, size=min(count, total), replace=False))


def _prepared(images: list[np.ndarray], meta: WeightsMeta) -> list[np.ndarray]:
    return [
        prepare_batch(images[start : start + _BATCH], meta.input_size, meta.mean, meta.std)
        for start in range(0, len(images), _BATCH)
    ]


def calibrate_on_split(splits: DatasetSplits, meta: WeightsMeta, count: int = CALIBRATION_IMAGES) -> Calibration:
    """``count`` images of ``splits.train`` (what the run trained on), prepared as the run fed them."""
    images = splits.train.images
    if len(images) == 0:
        raise DataError(f"{splits.name} at {splits.source} has no training images to calibrate with; "
                        "pass --calibration-data DIR (a folder of images)")  # fmt: skip
    chosen = [images[i].numpy() for i in _sample(len(images), count).tolist()]
    return Calibration(
        _prepared(chosen, meta),
        f"{len(chosen)} training images of {splits.name} ({splits.source}) through the run's preprocessing",
    )


def calibrate_on_folder(folder: Path, meta: WeightsMeta, count: int = CALIBRATION_IMAGES) -> Calibration:
    """``count`` image files under ``folder`` (recursively, as ``predict`` finds them), prepared as
    the graph's metadata says; no folder or no images is exit 3, an unreadable image exit 3 naming it."""
    from cnnkit.image_files import IMAGE_SUFFIXES, image_files
    from cnnkit.prediction import decode_images

    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DataError(f"--calibration-data {folder} {what}; pass a folder of images to calibrate with")
    files, _ = image_files(folder, strict=False)
    if not files:
        raise DataError(f"--calibration-data {folder} holds no image files (named {'/'.join(sorted(IMAGE_SUFFIXES))}); "
                        "pass a folder of images like those the model will see")  # fmt: skip
    chosen = [files[i] for i in _sample(len(files), count).tolist()]
    return Calibration(
        _prepared(decode_images(chosen, meta.in_channels), meta),
        f"{len(chosen)} images of {folder} through the graph's preprocessing",
    )


def _reader(calibration: Calibration) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):  # type: ignore[misc]
        """The calibration batches as ONNX Runtime's calibrator asks for them, one at a time."""

        def __init__(self) -> None:
            self.position = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.position >= len(calibration.batches):
                return None
            self.position += 1
            return {INPUT_NAME: calibration.batches[self.position - 1]}

        def rewind(self) -> None:
            self.position = 0

    return Batches()


def quantize_graph(data: bytes, calibration: Calibration, *, full_range_weights: bool = False) -> bytes:
    """The int8 QDQ form of a float32 graph, calibrated on ``calibration`` (metadata not carried over);
    7-bit weights unless ``full_range_weights`` (see the module's docstring: only to compare)."""
    onnx = require("onnx", "--quantize")
    quantization = require("onnxruntime.quantization", "--quantize")
    with tempfile.TemporaryDirectory(prefix="cnnkit-int8-") as folder:
        out = Path(folder) / "int8.onnx"
        with quiet():  # the quantiser logs its advice and progress
            quantization.quantize_static(
                onnx.load_from_string(data), out, _reader(calibration),
                quant_format=quantization.QuantFormat.QDQ, per_channel=True, reduce_range=not full_range_weights,
                activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                calibrate_method=quantization.CalibrationMethod.MinMax,
            )  # fmt: skip
        return out.read_bytes()


@dataclass(frozen=True)
class Int8Export:
    """What :func:`export_int8` wrote, what it was calibrated on, and both graphs' top-1."""

    written: OnnxExport
    calibration: str
    float_top1: float | None
    int8_top1: float | None
    evaluated_on: str | None
    """E.g. ``fashion-mnist test (10000 examples)``; None when not evaluated."""
    not_evaluated: str | None = None
    """Why the test split could not be evaluated (only without ``--max-drop``)."""

    @property
    def drop(self) -> float | None:
        """Top-1 points lost by the int8 graph (negative: gained)."""
        if self.float_top1 is None or self.int8_top1 is None:
            return None
        return (self.float_top1 - self.int8_top1) * 100

    def lines(self) -> list[str]:
        """What ``cnnkit export`` prints on stdout."""
        out = [self.written.describe()]
        if self.written.check is not None:
            out.append(f"{self.written.check.describe()}, for the float32 graph before quantisation")
        out.append(f"quantised to int8 (QDQ, per-channel weights), calibrated on {self.calibration}")
        if self.float_top1 is not None and self.int8_top1 is not None:
            out.append(
                f"top-1 on {self.evaluated_on}: float32 {self.float_top1:.4f}, int8 {self.int8_top1:.4f} "
                f"({(self.int8_top1 - self.float_top1) * 100:+.2f} points)"
            )
        return out


def _test_split(file: Path, meta: WeightsMeta, splits: DatasetSplits | None) -> tuple[DatasetSplits | None, str | None]:
    """The splits to measure top-1 on (those calibrated on, else the run's dataset), or why there are none."""
    if splits is not None:
        return splits, None
    from cnnkit.onnx_eval import recorded_splits

    try:
        return recorded_splits(file, meta), None
    except CnnkitError as exc:
        return None, exc.message


def export_int8(
    source: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    check: bool | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    calibration_data: str | Path | None = None,
    max_drop: float | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    batch_size: int = 256,
    weight_bits: int = 7,
) -> Int8Export:
    """Export a weights file (or run directory) to ``out`` as an int8 graph, atomically.

    Nothing is written when the float32 graph fails its check (exit 4), when no images can be
    found to calibrate with (exit 3, naming where they were looked for), or when the int8 top-1 is
    more than ``max_drop`` points below the float32 one (exit 4); with ``max_drop``, a test split
    that cannot be loaded is exit 3. ``weight_bits=8``: full-range weights instead of 7-bit ones,
    for comparing the two (``bench/onnx_latency.py --full-range``), not an option of the CLI.
    """
    from cnnkit.checkpoint import load_weights, resolve_weights
    from cnnkit.onnx_eval import recorded_splits

    if max_drop is not None and not (max_drop >= 0):
        raise UsageError(f"--max-drop must be >= 0 (top-1 points), got {max_drop}")
    if weight_bits not in (7, 8):
        raise UsageError(f"weight_bits must be 7 or 8 (8: full-range weights, to compare), got {weight_bits}")
    if calibration_images < 1:
        raise UsageError(f"calibration_images must be >= 1, got {calibration_images}")
    target = check_target(out, force)
    unchecked = check_plan(check, tolerance)
    require("onnxruntime", "--quantize int8")
    file = resolve_weights(source)
    model, meta = load_weights(file)

    splits = None
    if calibration_data is not None:
        calibration = calibrate_on_folder(Path(calibration_data), meta, calibration_images)
    else:
        if meta.dataset is None:
            raise DataError(f"{file} does not record the dataset it was trained on, so there are no training images "
                            "to calibrate with; pass --calibration-data DIR (a folder of images)")  # fmt: skip
        try:
            splits = recorded_splits(file, meta)
        except DataError as exc:
            raise DataError(f"no images to calibrate with: {exc.message}; or pass --calibration-data DIR "
                            "(a folder of images)") from exc  # fmt: skip
        calibration = calibrate_on_split(splits, meta, calibration_images)
    splits, not_evaluated = _test_split(file, meta, splits)
    if not_evaluated is not None and max_drop is not None:
        raise DataError(f"--max-drop needs the test split to compare the graphs on: {not_evaluated}")

    graph = export_graph(model, meta)
    result: OnnxCheck | None = verified(graph.data, model, meta, file, target, check, tolerance, unchecked)
    int8 = quantize_graph(graph.data, calibration, full_range_weights=weight_bits == 8)
    float_top1 = int8_top1 = drop = None
    evaluated_on = None
    if splits is not None:
        images, labels = splits.test.images.numpy(), splits.test.labels.numpy()
        graphs = (open_graph(graph.data, "the float32 graph"), open_graph(_with_metadata(int8, graph, meta), str(target)))
        float_top1, int8_top1 = (top1(split_logits(g.predictor(), images, batch_size), labels) for g in graphs)
        evaluated_on = f"{splits.name} test ({len(labels)} examples)"
        drop = (float_top1 - int8_top1) * 100
        if max_drop is not None and drop > max_drop:
            raise WeightsError(
                f"the int8 graph's top-1 on {evaluated_on} is {int8_top1:.4f}, {drop:.2f} points below the float32 "
                f"graph's {float_top1:.4f} (--max-drop {max_drop:g}); {target} was not written; calibrate on other "
                "images (--calibration-data DIR) or export float32 (no --quantize)"
            )
    report = {
        "format": "QDQ", "weights": f"int8 ({weight_bits}-bit range), per output channel, symmetric", "activations": "uint8, per tensor",
        "calibration": "min-max", "calibrated_on": calibration.source, "calibration_images": calibration.count,
        "evaluated_on": evaluated_on, "float32_top1": float_top1, "int8_top1": int8_top1,
    }  # fmt: skip
    data = _with_metadata(int8, graph, meta, report)
    write_graph(target, data)
    return Int8Export(
        OnnxExport(target, file, meta, len(data), result, unchecked, graph.exporter, graph.fallback, dtype="int8"),
        calibration.source, float_top1, int8_top1, evaluated_on, not_evaluated,
    )  # fmt: skip


def _with_metadata(data: bytes, graph: OnnxGraph, meta: WeightsMeta, report: dict[str, Any] | None = None) -> bytes:
    """The quantised graph with the float one's metadata (and, once measured, the quantisation report)."""
    onnx = require("onnx", "--quantize")
    proto = onnx.load_from_string(data)
    props = dict(graph.metadata)
    if report is not None:
        props[QUANTIZATION_KEY] = json.dumps(report)
    side = meta.input_size
    label(proto, props, f"cnnkit {meta.model} (int8 QDQ): {meta.in_channels}x{side}x{side} -> {meta.num_classes} logits")
    serialised: bytes = proto.SerializeToString()
    return serialised


def drop_warning(exported: Int8Export, max_drop: float | None) -> str | None:
    """The warning ``cnnkit export`` shows: a drop over :data:`WARN_DROP` points (without
    ``--max-drop``), or a top-1 that could not be measured."""
    if exported.not_evaluated is not None:
        return f"the int8 graph's accuracy was not measured: {exported.not_evaluated}"
    drop = exported.drop
    if drop is None or max_drop is not None or drop <= WARN_DROP:
        return None
    return (
        f"the int8 graph's top-1 is {drop:.2f} points below the float32 graph's ({exported.int8_top1:.4f} against "
        f"{exported.float_top1:.4f}, more than {WARN_DROP:g}); calibrate on other images (--calibration-data DIR), "
        "or pass --max-drop X to make such a drop an error"
    )

