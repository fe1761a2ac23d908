"""``cnnkit export WEIGHTS --out FILE.safetensors``: one standalone weights file, optionally float16.

ONNX export is not offered: it needs the ``onnx`` package, which cnnkit does not depend on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli._common import guarded

app = typer.Typer()


@app.command("export")
@guarded
def export_command(
    weights: Annotated[Path, typer.Argument(help="A .safetensors weights file or a run directory (its best weights).")],
    out: Annotated[Path, typer.Option("--out", help="The file to write, ending in .safetensors.")],
    half: Annotated[
        bool, typer.Option("--half", help="Store float16 tensors (half the size; loading casts back).")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
) -> None:
    """Write trained weights and their metadata to a standalone safetensors file."""
    from cnnkit.checkpoint import export_weights, read_meta, resolve_weights

    source = resolve_weights(weights)
    written = export_weights(source, out, half=half, force=force)
    meta = read_meta(written)
    size = written.stat().st_size
    typer.echo(f"wrote {written} ({meta.model}, {meta.weights_dtype}, {size / 1e6:.2f} MB) from {source}")
