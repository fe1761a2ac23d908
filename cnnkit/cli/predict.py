"""``cnnkit predict WEIGHTS IMAGE...``: the most probable classes of image files.

A ``.onnx`` file runs in ONNX Runtime without importing torch; anything else is PyTorch weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cnnkit.cli._common import Format, FormatOption, guarded

app = typer.Typer()


@app.command("predict")
@guarded
def predict_command(
    weights: Annotated[Path, typer.Argument(help="A .safetensors or .onnx file, or a run directory.")],
    images: Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, ...).")],
    top: Annotated[int, typer.Option("--top", "-k", help="How many classes to show per image.")] = 3,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    fmt: FormatOption = Format.table,
) -> None:
    """Classify images with trained weights: top-K classes and their probabilities."""
    if weights.suffix.lower() == ".onnx":
        from cnnkit.onnx_runtime import predict_onnx

        predictions = predict_onnx(weights, images, top=top, device=device)
    else:
        from cnnkit.evaluate import predict_files

        predictions = predict_files(weights, images, top=top, device=device)
    if fmt is Format.json:
        typer.echo(json.dumps([p.to_dict() for p in predictions], indent=2))
        return
    width = max(len(name) for p in predictions for name, _ in p.top)
    for prediction in predictions:
        typer.echo(str(prediction.image))
        for name, probability in prediction.top:
            typer.echo(f"  {name:<{width}}  {probability:7.2%}")
