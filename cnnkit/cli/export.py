"""``cnnkit export WEIGHTS --out FILE``: a standalone safetensors file (optionally float16) or an ONNX graph.

``--format onnx`` (or an ``--out`` ending in ``.onnx``) writes a graph that runs without PyTorch,
with the class names and preprocessing in its metadata, and checks it in ONNX Runtime when that is
installed; both need ``pip install 'cnnkit[onnx]'`` (see :mod:`cnnkit.onnx_export`).
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
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """Write trained weights and their metadata to a standalone safetensors file or an ONNX graph."""
    if chosen_format(fmt, out) is ExportFormat.onnx:
        if half:
            raise UsageError("--half applies to --format safetensors only; ONNX graphs are exported in float32")
        from cnnkit._console import warn
        from cnnkit.onnx_export import DEFAULT_TOLERANCE, export_onnx

        exported = export_onnx(weights, out, force=force, check=check, tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance)
        typer.echo(exported.describe())
        if exported.check is not None:
            typer.echo(exported.check.describe())
        if exported.unchecked:
            warn(exported.unchecked)
        return
    if check is not None or tolerance is not None:
        flag = "--tolerance" if check is None else ("--check" if check else "--no-check")
        raise UsageError(f"{flag} applies to --format onnx only")
    from cnnkit.checkpoint import export_weights, read_meta, resolve_weights

    source = resolve_weights(weights)
    written = export_weights(source, out, half=half, force=force)
    meta = read_meta(written)
    size = written.stat().st_size
    typer.echo(f"wrote {written} ({meta.model}, {meta.weights_dtype}, {size / 1e6:.2f} MB) from {source}")
