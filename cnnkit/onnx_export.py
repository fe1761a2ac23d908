"""ONNX export of cnnkit weights from PyTorch, with its metadata and its check in ONNX Runtime.

This module's one job is the torch side: ``cnnkit export WEIGHTS --format onnx`` writes a graph
that runs without PyTorch, in the format :mod:`cnnkit.onnx_runtime` defines and reads (input
``input``, float32 (batch, C, S, S) already prepared as :mod:`cnnkit.prediction` does, with a
dynamic batch axis; output ``logits`` (batch, K)). This module fills the graph's
``metadata_props`` (see :data:`METADATA_KEYS`; ``cnnkit`` holds the whole weights metadata as
JSON, as in a ``.safetensors`` file) and, with ``--check``, compares ONNX Runtime's logits with
PyTorch's.

The exporter is PyTorch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``) at
opset :data:`OPSET`: it needs only the ``onnx`` package and exports these networks in a fraction
of a second, where the ``torch.export``-based exporter also needs ``onnxscript`` and took about
4 s per model here (PyTorch 2.14). It cannot express adaptive average pooling whose output side
does not divide its input side (AlexNet, VGG and LeNet away from their recipe sizes), so such
layers are exported as the two constant averaging matrices that the pooling is at the traced size.

Reading and running a ``.onnx`` file (:func:`load_onnx`, :func:`predict_onnx`,
:func:`read_onnx_info`) lives in the torch-free :mod:`cnnkit.onnx_runtime`; those names are
re-exported here so ``cnnkit.onnx_export`` keeps its public API.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnkit._version import __version__
from cnnkit.errors import UsageError, WeightsError
from cnnkit.onnx_runtime import (
    INPUT_NAME,
    INSTALL_HINT,
    METADATA_KEYS,
    OUTPUT_NAME,
    OnnxInfo,
    OnnxModel,
    first_line,
    load_onnx,
    optional_import,
    predict_onnx,
    read_onnx_info,
    require,
    session_options,
)
from cnnkit.prediction import prepare_batch

if TYPE_CHECKING:
    import torch
    from torch import nn

    from cnnkit.checkpoint import WeightsMeta

__all__ = [
    "OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "DEFAULT_TOLERANCE",
    "INSTALL_HINT",
    "METADATA_KEYS",
    "OnnxInfo",
    "OnnxCheck",
    "OnnxExport",
    "OnnxModel",
    "require",
    "model_to_onnx",
    "check_onnx",
    "export_onnx",
    "read_onnx_info",
    "load_onnx",
    "predict_onnx",
]

OPSET = 17
"""The ONNX opset the graphs are written in (ONNX Runtime 1.14 and later run it)."""
DEFAULT_TOLERANCE = 1e-3
"""Largest accepted |ONNX Runtime - PyTorch| logit difference, relative to the largest logit
magnitude when that exceeds 1 (so it is absolute for small logits)."""
CHECK_EXAMPLES = 8
"""Images in the check batch (not the traced batch of 2, so the dynamic axis is exercised too)."""


# -- metadata ---------------------------------------------------------------------------------------


def _metadata_props(meta: WeightsMeta) -> dict[str, str]:
    normalised = meta.mean is not None and meta.std is not None
    colour = "grayscale" if meta.in_channels == 1 else "RGB"
    steps = f"{colour} pixels / 255, resized to {meta.input_size}x{meta.input_size} (bilinear, antialiased)"
    steps += ", then (x - mean) / std per channel" if normalised else " (no normalisation)"
    return {
        "cnnkit": meta.model_dump_json(),
        "model": meta.model,
        "classes": json.dumps(list(meta.classes)),
        "in_channels": str(meta.in_channels),
        "input_size": str(meta.input_size),
        "mean": json.dumps(meta.mean if normalised else None),
        "std": json.dumps(meta.std if normalised else None),
        "preprocessing": f"{steps}; NCHW float32 input '{INPUT_NAME}', output '{OUTPUT_NAME}'",
        "cnnkit_version": __version__,
    }


# -- export -----------------------------------------------------------------------------------------


def _pool_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) weights of 1-D adaptive average pooling: window i is floor(i*n/m)..ceil((i+1)*n/m)."""
    import torch

    matrix = torch.zeros(size_out, size_in)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-(i + 1) * size_in // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


@functools.cache
def _matrix_pool_class() -> type[nn.Module]:
    from torch import nn

    class MatrixAveragePool(nn.Module):
        """Adaptive average pooling at one fixed input size, as ``rows @ x @ cols`` (two MatMuls in ONNX)."""

        def __init__(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
            super().__init__()
            self.rows, self.cols = rows, cols

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.rows @ x) @ self.cols

    return MatrixAveragePool


@contextlib.contextmanager
def _exportable_pooling(model: nn.Module, example: torch.Tensor) -> Iterator[None]:
    """Within the block, adaptive average pools the exporter cannot express are matrix products."""
    import torch
    from torch import nn

    def is_global(size: Any) -> bool:
        return all(side == 1 for side in (size if isinstance(size, tuple) else (size, size)))

    # Pooling to 1x1 (a GlobalAveragePool) always exports; only the others need the input size.
    pools = {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.AdaptiveAvgPool2d) and not is_global(m.output_size)
    }  # fmt: skip
    if not pools:
        yield
        return
    seen: dict[str, set[tuple[int, int]]] = {name: set() for name in pools}

    def record(name: str, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen[name].add((int(args[0].shape[-2]), int(args[0].shape[-1])))

    hooks = [m.register_forward_pre_hook(functools.partial(record, name)) for name, m in pools.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, pool in pools.items():
            if len(seen[name]) != 1:
                continue  # not run, or shared between inputs of several sizes: left to the exporter
            ((height, width),) = seen[name]
            out = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
            out_h, out_w = out[0] or height, out[1] or width
            if height % out_h == 0 and width % out_w == 0:
                continue  # the exporter writes a plain AveragePool (or GlobalAveragePool) here
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            rows = _pool_matrix(height, out_h).to(example.device)
            cols = _pool_matrix(width, out_w).T.contiguous().to(example.device)
            replacement = _matrix_pool_class()(rows, cols)
            setattr(parent, attribute, replacement)
            swapped.append((parent, attribute, pool))
        yield
    finally:
        for parent, attribute, original in swapped:
            setattr(parent, attribute, original)


def model_to_onnx(model: nn.Module, meta: WeightsMeta) -> bytes:
    """Serialised ONNX graph of ``model`` (eval mode) at ``meta``'s channels and input size, with metadata.

    The batch axis is dynamic. Raises UsageError (exit 2) when ``onnx`` is missing or the exporter
    cannot convert the model.
    """
    onnx = require("onnx", "ONNX export")
    import torch

    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = torch.zeros(2, meta.in_channels, meta.input_size, meta.input_size, device=device)
    buffer = io.BytesIO()
    destination: Any = buffer  # the TorchScript exporter writes to file objects too; its type hints omit them
    try:
        with _exportable_pooling(model, example), warnings.catch_warnings():
            # The TorchScript exporter announces its deprecation on every call; it is chosen on purpose.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), destination, dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )  # fmt: skip
    except torch.onnx.errors.OnnxExporterError as exc:
        raise UsageError(
            f"model '{meta.model}' at {meta.in_channels}x{meta.input_size}x{meta.input_size} cannot be exported "
            f"to ONNX ({first_line(exc)}); export it as --format safetensors instead"
        ) from exc
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in _metadata_props(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"cnnkit {meta.model}: {meta.in_channels}x{meta.input_size}x{meta.input_size} -> {meta.num_classes} logits"
    onnx.checker.check_model(proto)
    data: bytes = proto.SerializeToString()
    return data


@dataclass(frozen=True)
class OnnxCheck:
    """ONNX Runtime's logits against PyTorch's on the same batch."""

    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    examples: int
    runtime: str
    """E.g. ``onnxruntime 1.20.1``."""

    @property
    def limit(self) -> float:
        """The largest accepted difference: ``tolerance`` scaled by the logits' magnitude when above 1."""
        return self.tolerance * max(1.0, self.max_abs_logit)

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.limit

    def describe(self) -> str:
        return (
            f"checked with {self.runtime} on {self.examples} random images: max abs logit difference "
            f"{self.max_abs_diff:.1e} (tolerance {self.limit:.1e})"
        )


def _check_batch(meta: WeightsMeta, examples: int) -> np.ndarray:
    # Random pixel images prepared exactly as predict prepares files: inputs in the range and
    # normalisation the model sees in use, not the all-zero tensor it was traced with.
    rng = np.random.default_rng(0)
    side = meta.input_size
    pixels = [rng.integers(0, 256, (meta.in_channels, side, side), dtype=np.uint8) for _ in range(examples)]
    return prepare_batch(pixels, side, meta.mean, meta.std)


def check_onnx(
    onnx_model: bytes | str | Path,
    model: nn.Module,
    meta: WeightsMeta,
    tolerance: float = DEFAULT_TOLERANCE,
    examples: int = CHECK_EXAMPLES,
) -> OnnxCheck:
    """Run one batch through ONNX Runtime and through ``model``; the largest logit difference.

    Needs ``onnxruntime`` (UsageError, exit 2, when missing). Does not raise on a mismatch: see
    :attr:`OnnxCheck.passed`.
    """
    ort = require("onnxruntime", "checking an ONNX export")
    import torch

    batch = _check_batch(meta, examples)
    source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    session = ort.InferenceSession(source, session_options(ort), providers=["CPUExecutionProvider"])
    (ort_logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            torch_logits = model(torch.from_numpy(batch).to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    if ort_logits.shape != torch_logits.shape:
        diff = math.inf
    else:
        diff = float(np.abs(ort_logits.astype(np.float64) - torch_logits).max())
    return OnnxCheck(diff, float(np.abs(torch_logits).max()), tolerance, examples, f"onnxruntime {ort.__version__}")


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and how it was checked."""

    path: Path
    source: Path
    meta: WeightsMeta
    bytes: int
    check: OnnxCheck | None
    """None when not checked (see ``unchecked``)."""
    unchecked: str | None = None
    """Why the export was not checked; None when it was, or when checking was turned off."""

    def describe(self) -> str:
        meta = self.meta
        return (
            f"wrote {self.path} ({meta.model}, ONNX opset {OPSET}, input batch x {meta.in_channels}x"
            f"{meta.input_size}x{meta.input_size} float32, {self.bytes / 1e6:.2f} MB) from {self.source}"
        )


def export_onnx(
    source: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    check: bool | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> OnnxExport:
    """Export a weights file (or run directory) to ``out`` (``.onnx``), atomically.

    ``check``: True runs the graph in ONNX Runtime against PyTorch and fails (WeightsError, exit 4,
    nothing written) above ``tolerance``; None does so when ``onnxruntime`` is installed; False
    skips it. A missing ``onnx`` (or, with ``check=True``, ``onnxruntime``) is a UsageError (exit 2).
    """
    from cnnkit.checkpoint import load_weights, resolve_weights
    from cnnkit.fs import atomic_write

    target = Path(out)
    if target.suffix.lower() != ".onnx":
        raise UsageError(f"--out {target} must end in .onnx for --format onnx (e.g. --out {target.with_suffix('.onnx')})")
    if target.is_dir():
        raise UsageError(f"--out {target} is a folder; name the file, e.g. --out {target / 'model.onnx'}")
    if target.exists() and not force:
        raise UsageError(f"{target} already exists; pass --force to overwrite it or choose another --out")
    if not (tolerance > 0):
        raise UsageError(f"--tolerance must be > 0, got {tolerance}")
    require("onnx", "--format onnx")
    unchecked = None
    if check is True:
        require("onnxruntime", "--check")
    elif check is None and optional_import("onnxruntime") is None:
        unchecked = f"not checked in ONNX Runtime: onnxruntime is not installed; {INSTALL_HINT}"

    file = resolve_weights(source)
    model, meta = load_weights(file)
    data = model_to_onnx(model, meta)
    result = None
    if check is not False and unchecked is None:
        result = check_onnx(data, model, meta, tolerance)
        if not result.passed:
            raise WeightsError(
                f"ONNX Runtime's logits for {file} differ from PyTorch's by {result.max_abs_diff:.1e} "
                f"(tolerance {result.limit:.1e}); {target} was not written; pass --no-check to write it anyway"
            )
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write(target, write)
    return OnnxExport(target, file, meta, len(data), result, unchecked)
