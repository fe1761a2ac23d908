"""``cnnkit export WEIGHTS --out FILE``: a standalone safetensors file (optionally float16) or an ONNX graph.

``--format onnx`` (or an ``--out`` ending in ``.onnx``) writes a graph that runs without PyTorch,
with the class names and preprocessing in its metadata, and checks it in ONNX Runtime when that is
installed; both need ``pip install 'cnnkit[onnx]'`` (see :mod:`cnnkit.onnx_export`). ``--quantize
int8`` writes the graph's int8 form instead, calibrated on the run's training images (or
``--calibration-data DIR``), and prints both graphs' test top-1 (see :mod:`cnnkit.onnx_quantize`).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli._common import guarded
from cnnkit.errors import UsageError

app = typer.Typer()


class ExportFormat(str, Enum):
    """What ``cnnkit export`` writes."""

    safetensors = "safetensors"
    onnx = "onnx"


class Quantize(str, Enum):
    """``--quantize``: the integer type an ONNX graph's weights and activations are stored in."""

    int8 = "int8"


def chosen_format(fmt: ExportFormat | None, out: Path) -> ExportFormat:
    """``--format`` if given (it must agree with a recognised ``--out`` suffix), else from the suffix."""
    by_suffix = {".onnx": ExportFormat.onnx, ".safetensors": ExportFormat.safetensors}.get(out.suffix.lower())
    if fmt is None:
        return by_suffix or ExportFormat.safetensors
    if by_suffix is not None and by_suffix is not fmt:
        raise UsageError(f"--out {out} does not suit --format {fmt.value}; use --out {out.with_suffix('.' + fmt.value)}")
    return fmt


@app.command("export")
@guarded
def export_command(
    weights: Annotated[Path, typer.Argument(help="A .safetensors weights file or a run directory (its best weights).")],
    out: Annotated[Path, typer.Option("--out", help="The file to write, ending in .safetensors or .onnx.")],
    fmt: Annotated[
        ExportFormat | None,
        typer.Option(
            "--format", help="safetensors (the default) or onnx; an --out ending in .onnx means onnx.", show_default=False
        ),
    ] = None,
    half: Annotated[
        bool, typer.Option("--half", help="Store float16 tensors (half the size; loading casts back). safetensors only.")
    ] = False,
    check: Annotated[
        bool | None,
        typer.Option(
            "--check/--no-check",
            help="onnx: run a batch in ONNX Runtime and compare its logits with PyTorch's; a difference above "
            "--tolerance is an error. Default: on when onnxruntime is installed.",
            show_default=False,
        ),
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance",
            help="onnx: largest accepted logit difference, relative to the largest logit when that exceeds 1 "
            "[default: 1e-3].",
            show_default=False,
        ),
    ] = None,
    quantize: Annotated[
        Quantize | None,
        typer.Option(
            "--quantize",
            help="onnx: write the graph with int8 weights and activations (static quantisation by ONNX Runtime, "
            "calibrated on the run's training images), then print the test top-1 of the float32 and int8 graphs; "
            "a drop over 1 point is a warning.",
            show_default=False,
        ),
    ] = None,
    calibration_data: Annotated[
        Path | None,
        typer.Option(
            "--calibration-data",
            help="--quantize: calibrate on the images in this folder instead of the run's training images.",
            show_default=False,
        ),
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(
            "--max-drop",
            help="--quantize: a test top-1 more than this many points below the float32 graph's is an error "
            "(exit 4) and nothing is written.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """Write trained weights and their metadata to a standalone safetensors file or an ONNX graph."""
    onnx = chosen_format(fmt, out) is ExportFormat.onnx
    if quantize is None and (calibration_data is not None or max_drop is not None):
        flag = "--calibration-data" if calibration_data is not None else "--max-drop"
        raise UsageError(f"{flag} applies to --quantize int8 only")
    if onnx:
        if half:
            raise UsageError("--half applies to --format safetensors only; ONNX graphs are exported in float32")
        _export_onnx(weights, out, check, tolerance, quantize, calibration_data, max_drop, force)
        return
    if quantize is not None:
        raise UsageError(
            f"--quantize {quantize.value} applies to ONNX graphs only (--out {out.with_suffix('.onnx')}); "
            "a .safetensors file keeps float weights (--half stores float16)"
        )
    if check is not None or tolerance is not None:
        flag = "--tolerance" if check is None else ("--check" if check else "--no-check")
        raise UsageError(f"{flag} applies to --format onnx only")
    from cnnkit.checkpoint import export_weights, read_meta, resolve_weights

    source = resolve_weights(weights)
    written = export_weights(source, out, half=half, force=force)
    meta = read_meta(written)
    size = written.stat().st_size
    typer.echo(f"wrote {written} ({meta.model}, {meta.weights_dtype}, {size / 1e6:.2f} MB) from {source}")


def _export_onnx(
    weights: Path, out: Path, check: bool | None, tolerance: float | None, quantize: Quantize | None,
    calibration_data: Path | None, max_drop: float | None, force: bool,
) -> None:  # fmt: skip
    from cnnkit._console import warn
    from cnnkit.onnx_export import DEFAULT_TOLERANCE, export_onnx

    limit = DEFAULT_TOLERANCE if tolerance is None else tolerance
    if quantize is not None:
        from cnnkit.onnx_quantize import drop_warning, export_int8

        int8 = export_int8(
            weights, out, force=force, check=check, tolerance=limit, calibration_data=calibration_data, max_drop=max_drop
        )
        for line in int8.lines():
            typer.echo(line)
        warnings = [int8.written.fallback_warning(), int8.written.unchecked, drop_warning(int8, max_drop)]
    else:
        exported = export_onnx(weights, out, force=force, check=check, tolerance=limit)
        typer.echo(exported.describe())
        if exported.check is not None:
            typer.echo(exported.check.describe())
        warnings = [exported.fallback_warning(), exported.unchecked]
    for message in warnings:
        if message:
            warn(message)
