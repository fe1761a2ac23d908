"""``cnnkit data fetch|info``: get a dataset, and see where its files are and what they hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cnnkit.cli._common import Format, FormatOption, guarded, parse_key_values

app = typer.Typer(help="Fetch datasets and show where their files are.")



DataOpt = Annotated[Path | None, typer.Option("--data", help="The dataset's folder (default: $CNNKIT_DATA/<name>).")]


@app.command("fetch")
@guarded
def fetch(
    name: Annotated[str, typer.Argument(help="Dataset to download (fashion-mnist).")], data: DataOpt = None
) -> None:
    """Download a dataset's files (Fashion-MNIST from torchvision's mirrors, MD5-checked)."""
    from cnnkit.data.fetch import fetch as fetch_files

    folder = fetch_files(name, data)
    typer.echo(f"{name}: files in {folder}")


@app.command("info")
@guarded
def info(
    name: Annotated[str, typer.Argument(help="A registered dataset (cnnkit list datasets).")],
    data: DataOpt = None,
    dataset_option: Annotated[
        list[str] | None,
        typer.Option("--dataset-option", "-d", help="Loading option key=value, e.g. -d split=pose-block."),
    ] = None,
    fmt: FormatOption = Format.table,
) -> None:
    """Classes, channels, native size, split sizes, statistics and where the files were found."""
    from cnnkit.data import load_dataset
    from cnnkit.registry import DATASETS

    spec = DATASETS.get(name)
    options: dict[str, Any] = dict(parse_key_values(dataset_option, "-d"))
    describe = getattr(spec, "describe", None)
    if callable(describe):  # the user's own images: the layout from the file names, nothing decoded
        _show_layout(name, spec.summary, describe(data, **options), fmt)
        return
    splits = load_dataset(name, data, **options)
    _, channels, height, width = splits.train.images.shape
    report = {
        "name": name,
        "summary": spec.summary,
        "source": str(splits.source),
        "classes": list(splits.classes),
        "channels": int(channels),
        "image_size": [int(height), int(width)],
        "train": len(splits.train),
        "val": len(splits.val) if splits.val is not None else 0,
        "test": len(splits.test),
        "mean": [round(m, 4) for m in splits.mean],
        "std": [round(s, 4) for s in splits.std],
    }
    if fmt is Format.json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{name}: {spec.summary}")
    typer.echo(f"  files     {report['source']}")
    val = f"val {report['val']:,}, " if splits.val is not None else ""
    typer.echo(f"  images    {channels}x{height}x{width}, train {report['train']:,}, {val}test {report['test']:,}")
    if splits.val is None:
        typer.echo("  val       none of its own: a run holds out --val-fraction of each class of train (default 0.1)")
    typer.echo(f"  classes   {len(splits.classes)}: {', '.join(splits.classes)}")
    typer.echo(f"  mean/std  {report['mean']} / {report['std']}")


def _show_layout(name: str, summary: str, report: dict, fmt: Format) -> None:
    if fmt is Format.json:
        typer.echo(json.dumps({"name": name, "summary": summary, **report}, indent=2))
        return
    from cnnkit._console import warn

    for note in report["notes"]:
        warn(note)
    typer.echo(f"{name}: {summary}")
    typer.echo(f"  files     {report['source']} ({report['layout']})")
    height, width = report["image_size"]
    typer.echo(
        f"  images    {report['channels']}x{height}x{width} (most common), train {report['train']:,}, "
        f"val {report['val']:,}, test {report['test']:,}"
    )
    typer.echo(f"  classes   {len(report['classes'])}: {', '.join(report['classes'])}")
