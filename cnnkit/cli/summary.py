"""``cnnkit summary MODEL``: layers, output shapes, parameters, MACs and memory, on the meta device."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cnnkit.cli._common import Format, FormatOption, guarded, parse_key_values, stdout_console

app = typer.Typer()


@app.command("summary")
@guarded
def summary(
    model: Annotated[str, typer.Argument(help="Registered model name (see 'cnnkit list models').")],
    input_shape: Annotated[
        str | None,
        typer.Option(
            "--input", "-i", metavar="CxHxW", help="Input shape, e.g. 1x96x96 [default: 1 channel at the recipe size]."
        ),
    ] = None,
    classes: Annotated[int, typer.Option("--classes", "-k", help="Number of output classes.")] = 10,
    batch: Annotated[int, typer.Option("--batch", "-b", help="Batch size the shapes and memory are for.")] = 1,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", metavar="KEY=VALUE", help="Model option, e.g. -o width=0.25.")
    ] = None,
    depth: Annotated[
        int, typer.Option("--depth", "-d", help="1: top-level layers; 2, 3, ...: deeper; 0: every leaf.")
    ] = 1,
    fmt: FormatOption = Format.table,
) -> None:
    """Show each layer's output shape, parameters and multiply-adds, then the totals.

    Runs on PyTorch's meta device: no weights are allocated and nothing is computed, so even
    VGG-16 at 224 px takes a second or so beyond starting torch.
    """
    from cnnkit.summary import parse_input_shape, summarize

    shape = parse_input_shape(input_shape) if input_shape is not None else None
    result = summarize(
        model, shape, num_classes=classes, batch=batch, options=parse_key_values(option), depth=depth
    )
    if result.collapse_warning:
        from cnnkit._console import warn

        warn(result.collapse_warning)
    if fmt is Format.json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    stdout_console(soft_wrap=False).print(result.renderable())
