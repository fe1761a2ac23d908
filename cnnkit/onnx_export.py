"""ONNX export of cnnkit weights from PyTorch, with its metadata and its check in ONNX Runtime.

This module's one job is the torch side: ``cnnkit export WEIGHTS --format onnx`` writes a graph
that runs without PyTorch, in the format :mod:`cnnkit.onnx_runtime` defines and reads (input
``input``, float32 (batch, C, S, S) already prepared as :mod:`cnnkit.prediction` does, with a
dynamic batch axis; output ``logits`` (batch, K)). This module fills the graph's
``metadata_props`` (see :data:`METADATA_KEYS`; ``cnnkit`` holds the whole weights metadata as
JSON, as in a ``.safetensors`` file) and, with ``--check``, compares ONNX Runtime's logits with
PyTorch's.

The graph is written by PyTorch's ``torch.export``-based exporter (``torch.onnx.export(...,
dynamo=True)``, which needs ``onnxscript``) at opset :data:`OPSET`, with its optimiser on (batch
norm folded into the convolutions, constants folded). Every built-in model and the EfficientNet
plugin's B0 exports through it and matches PyTorch (a test each, which also checks that no
fallback was taken), so none of them needs PyTorch's TorchScript-based exporter
(``dynamo=False``), which PyTorch deprecates. That exporter is kept only as the fallback for a
model ``torch.export`` cannot capture: Python control flow on a tensor's *value* (``if x.sum() >
0:``, say in a plugin's network), which ``torch.export`` refuses to guess and TorchScript's tracer
freezes to the branch the example input took; or a PyTorch older than 2.5, which has no
``torch.export`` exporter. Such an export warns that it fell back and why, says so in its
``exporter`` metadata, and is checked in ONNX Runtime like any other. ``torch.export`` is the
slower of the two: 1-3 s for LeNet-BN and 3-15 s for the larger networks on this busy 2-core
machine (DenseNet-121 up to 50 s), where TorchScript took 0.1-0.4 s.

Adaptive average pooling whose output side does not divide its input side (AlexNet, VGG and
LeNet away from their recipe sizes) is exported as the two constant averaging matrices that the
pooling is at the traced size, whichever exporter runs (:mod:`cnnkit.onnx_pooling` says why).

Reading and running a ``.onnx`` file (:func:`load_onnx`, :func:`predict_onnx`,
:func:`read_onnx_info`) lives in the torch-free :mod:`cnnkit.onnx_runtime`; those names are
re-exported here so ``cnnkit.onnx_export`` keeps its public API.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnkit._version import __version__
from cnnkit.errors import UsageError
from cnnkit.onnx_check import DEFAULT_TOLERANCE, OnnxCheck, check_onnx, verified
from cnnkit.onnx_pooling import exportable_pooling
from cnnkit.onnx_runtime import (
    INPUT_NAME,
    INSTALL_HINT,
    METADATA_KEYS,
    OUTPUT_NAME,
    OnnxInfo,
    OnnxModel,
    load_onnx,
    optional_import,
    predict_onnx,
    read_onnx_info,
    require,
)

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
    "EXPORTERS",
    "OnnxInfo",
    "OnnxGraph",
    "OnnxCheck",
    "OnnxExport",
    "OnnxModel",
    "require",
    "export_graph",
    "model_to_onnx",
    "metadata_props",
    "label",
    "check_onnx",
    "check_target",
    "check_plan",
    "verified",
    "write_graph",
    "quiet",
    "export_onnx",
    "read_onnx_info",
    "load_onnx",
    "predict_onnx",
]

OPSET = 18
"""The ONNX opset the graphs are written in (ONNX Runtime 1.14 and later run it)."""
EXPORTERS = ("auto", "torch.export", "torchscript")
"""``auto``: ``torch.export``, falling back to TorchScript only for a model ``torch.export`` cannot
capture; the other two use that exporter alone."""


# -- metadata ---------------------------------------------------------------------------------------


def metadata_props(meta: WeightsMeta, exporter: str) -> dict[str, str]:
    """The ``metadata_props`` of ``meta``'s graph (see :data:`METADATA_KEYS`)."""
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
        "exporter": exporter,
    }


# -- export -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warnings, log records or prints from the exporters (torch.export logs and prints graphs
    when it gives up; TorchScript announces its deprecation on every call)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _reason(exc: BaseException) -> str:
    """The first line of the deepest cause (torch.onnx wraps torch.export's own error), without colours."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    return (lines or [type(exc).__name__])[0][:200]


@dataclass(frozen=True)
class OnnxGraph:
    """A serialised graph with its metadata, and which exporter wrote it."""

    data: bytes
    exporter: str
    """``torch.export`` or ``TorchScript``."""
    fallback: str | None = None
    """Why the TorchScript fallback wrote it (e.g. torch.export's error); None when torch.export did, or
    TorchScript was asked for."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Its ``metadata_props`` (see :data:`METADATA_KEYS`)."""


def _torch_export(model: nn.Module, example: torch.Tensor) -> Any:
    import torch

    program = torch.onnx.export(
        model, (example,), None, dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME], dynamic_shapes=({0: "batch"},), optimize=True, verbose=False,
    )  # fmt: skip
    assert program is not None  # (only None when writing to a file)
    return program.model_proto


def _torchscript_export(model: nn.Module, example: torch.Tensor) -> Any:
    import onnx
    import torch

    buffer = io.BytesIO()
    destination: Any = buffer  # the TorchScript exporter writes to file objects too; its type hints omit them
    torch.onnx.export(
        model, (example,), destination, dynamo=False, opset_version=OPSET,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], do_constant_folding=True,
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
    )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def export_graph(model: nn.Module, meta: WeightsMeta, exporter: str = "auto") -> OnnxGraph:
    """The ONNX graph of ``model`` (eval mode) at ``meta``'s channels and input size, with metadata.

    The batch axis is dynamic. ``exporter`` is one of :data:`EXPORTERS`. Raises UsageError (exit
    2) when ``onnx`` or (for torch.export) ``onnxscript`` is missing, or no exporter can convert
    the model.
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"exporter '{exporter}' is not one of {', '.join(EXPORTERS)}")
    onnx = require("onnx", "ONNX export")
    if exporter != "torchscript":
        require("onnxscript", "ONNX export through torch.export")
    import torch

    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = torch.zeros(2, meta.in_channels, meta.input_size, meta.input_size, device=device)
    where = f"model '{meta.model}' at {meta.in_channels}x{meta.input_size}x{meta.input_size}"
    fallback: str | None = None
    try:
        with exportable_pooling(model, example), quiet():
            if exporter == "auto" and "dynamic_shapes" not in inspect.signature(torch.onnx.export).parameters:
                fallback = f"PyTorch {torch.__version__} has no torch.export-based ONNX exporter (2.5 and later have)"
            if exporter == "torchscript" or fallback is not None:
                proto, used = _torchscript_export(model, example), "TorchScript"
            else:
                try:
                    proto, used = _torch_export(model, example), "torch.export"
                except torch.onnx.errors.OnnxExporterError as exc:
                    if exporter != "auto":
                        raise
                    # torch.export could not capture the model (a data-dependent branch, say):
                    # TorchScript traces what this example did instead; see the module docstring.
                    fallback = f"torch.export could not capture the model ({_reason(exc)})"
                    proto, used = _torchscript_export(model, example), "TorchScript"
    except torch.onnx.errors.OnnxExporterError as exc:
        raise UsageError(
            f"{where} cannot be exported to ONNX ({_reason(exc)}); export it as --format safetensors instead"
        ) from exc
    finally:
        model.train(was_training)
    described = f"{used} (torch.onnx.export dynamo={used == 'torch.export'}), PyTorch {torch.__version__}"
    if fallback is not None:
        described += f"; the fallback, as {fallback}"
    props = metadata_props(meta, described)
    label(proto, props, f"cnnkit {meta.model}: {meta.in_channels}x{meta.input_size}x{meta.input_size} -> {meta.num_classes} logits")
    onnx.checker.check_model(proto)
    return OnnxGraph(proto.SerializeToString(), used, fallback, props)


def label(proto: Any, props: dict[str, str], doc: str) -> None:
    """Replace an ONNX ModelProto's ``metadata_props`` with ``props`` and its doc string with ``doc``."""
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = doc


def model_to_onnx(model: nn.Module, meta: WeightsMeta) -> bytes:
    """Serialised ONNX graph of ``model`` as :func:`export_graph` (``auto``) writes it."""
    return export_graph(model, meta).data


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
    exporter: str = "torch.export"
    fallback: str | None = None
    """Why the TorchScript fallback wrote the graph (see :class:`OnnxGraph`)."""
    dtype: str = "float32"
    """``int8`` for a quantised graph (its input and output stay float32)."""

    def describe(self) -> str:
        meta = self.meta
        weights = "int8 weights and activations, " if self.dtype == "int8" else ""
        return (
            f"wrote {self.path} ({meta.model}, ONNX opset {OPSET}, {weights}input batch x {meta.in_channels}x"
            f"{meta.input_size}x{meta.input_size} float32, {self.bytes / 1e6:.2f} MB) from {self.source}"
        )

    def fallback_warning(self) -> str | None:
        """The warning to show when the TorchScript fallback wrote the graph."""
        if self.fallback is None:
            return None
        return (
            f"{self.meta.model}: {self.fallback}; PyTorch's TorchScript exporter wrote the graph instead, which "
            "records only the branches its example input took"
        )


def check_target(out: str | Path, force: bool) -> Path:
    """``--out`` for an ONNX graph: a ``.onnx`` name, not a folder, new unless ``force`` (else exit 2)."""
    target = Path(out)
    if target.suffix.lower() != ".onnx":
        raise UsageError(f"--out {target} must end in .onnx for --format onnx (e.g. --out {target.with_suffix('.onnx')})")
    if target.is_dir():
        raise UsageError(f"--out {target} is a folder; name the file, e.g. --out {target / 'model.onnx'}")
    if target.exists() and not force:
        raise UsageError(f"{target} already exists; pass --force to overwrite it or choose another --out")
    return target


def check_plan(check: bool | None, tolerance: float) -> str | None:
    """Whether the export can be checked: None when it will be (or ``check`` is False), else why not.

    A bad ``tolerance``, or ``check=True`` without ``onnxruntime``, is a UsageError (exit 2).
    """
    if not (tolerance > 0):
        raise UsageError(f"--tolerance must be > 0, got {tolerance}")
    require("onnx", "--format onnx")
    if check is True:
        require("onnxruntime", "--check")
    elif check is None and optional_import("onnxruntime") is None:
        return f"not checked in ONNX Runtime: onnxruntime is not installed; {INSTALL_HINT}"
    return None


def write_graph(target: Path, data: bytes) -> None:
    """``data`` to ``target``, atomically (see :func:`cnnkit.fs.atomic_write`)."""
    from cnnkit.fs import atomic_write

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)

    atomic_write(target, write)


def export_onnx(
    source: str | Path,
    out: str | Path,
    *,
    force: bool = False,
    check: bool | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    exporter: str = "auto",
) -> OnnxExport:
    """Export a weights file (or run directory) to ``out`` (``.onnx``), atomically.

    ``check``: True runs the graph in ONNX Runtime against PyTorch and fails (WeightsError, exit 4,
    nothing written) above ``tolerance``; None does so when ``onnxruntime`` is installed; False
    skips it. A missing ``onnx`` or ``onnxscript`` (or, with ``check=True``, ``onnxruntime``) is a
    UsageError (exit 2). ``exporter``: see :data:`EXPORTERS`.
    """
    from cnnkit.checkpoint import load_weights, resolve_weights

    target = check_target(out, force)
    unchecked = check_plan(check, tolerance)
    file = resolve_weights(source)
    model, meta = load_weights(file)
    graph = export_graph(model, meta, exporter)
    result = verified(graph.data, model, meta, file, target, check, tolerance, unchecked)
    write_graph(target, graph.data)
    return OnnxExport(target, file, meta, len(graph.data), result, unchecked, graph.exporter, graph.fallback)
