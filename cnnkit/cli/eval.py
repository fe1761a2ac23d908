"""``cnnkit eval WEIGHTS``: loss, accuracy, per-class scores, the confusion matrix and every prediction
of a weights file, or of a ``.onnx`` graph run in ONNX Runtime (:mod:`cnnkit.onnx_eval`)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cnnkit.cli._common import Format, FormatOption, guarded, parse_key_values, stdout_console

if TYPE_CHECKING:
    from cnnkit.evaluate import WeightsEvaluation

app = typer.Typer()


class Split(str, Enum):
    test = "test"
    val = "val"
    train = "train"


@app.command("eval")
@guarded
def eval_command(
    weights: Annotated[
        Path,
        typer.Argument(
            help="A .safetensors weights file, a run directory, or a .onnx file from 'cnnkit export' (run in ONNX "
            "Runtime, prepared as its metadata says)."
        ),
    ],
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Registered dataset (default: the one it was trained on).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Folder holding the dataset's files (default: the folder the weights were trained from, "
            "while it exists, else the dataset's default search).",
        ),
    ] = None,
    dataset_option: Annotated[
        list[str] | None,
        typer.Option("-d", "--dataset-option", help="Dataset option key=value (overrides the recorded one)."),
    ] = None,
    split: Annotated[Split, typer.Option("--split", help="Which split to evaluate.")] = Split.test,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Examples per batch.")] = 256,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    fmt: FormatOption = Format.table,
    plot: Annotated[
        bool,
        typer.Option(
            "--plot",
            help="Also write the confusion matrix as a PNG heat map and the highest-loss predictions as a "
            "gallery (worst_<split>.png).",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for confusion_<split>.csv/.png, predictions_<split>.csv and worst_<split>.png "
            "(default: the run directory or the file's folder).",
        ),
    ] = None,
) -> None:
    """Evaluate trained weights; the model and dataset come from the file's metadata.

    Writes the confusion matrix (confusion_<split>.csv) and one row per example
    (predictions_<split>.csv: file or index, true and predicted class, the predicted and the true
    class's probability, loss). A .onnx file is run in ONNX Runtime on the dataset its metadata
    records, with the preprocessing it records.
    """
    from cnnkit.reports import plot_confusion, plot_worst, write_confusion_csv, write_predictions_csv

    onnx = weights.suffix.lower() == ".onnx"
    options = parse_key_values(dataset_option, flag="-d")
    if onnx:
        from cnnkit.onnx_eval import evaluate_onnx

        evaluation = evaluate_onnx(
            weights, dataset=dataset, data=data, dataset_options=options, split=split.value, batch_size=batch_size,
            device=device,
        )  # fmt: skip
    else:
        from cnnkit.evaluate import evaluate_weights

        evaluation = evaluate_weights(
            weights, dataset=dataset, data=data, dataset_options=options, split=split.value, batch_size=batch_size,
            device=device,
        )  # fmt: skip
    folder = out if out is not None else evaluation.weights.parent
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)  # --out names a folder for the reports: made on demand
    csv_path = folder / f"confusion_{split.value}.csv"
    write_confusion_csv(csv_path, evaluation.result.confusion, evaluation.classes)
    scores = evaluation.result.per_example
    assert scores is not None  # evaluate_weights keeps every example
    predictions_path = folder / f"predictions_{split.value}.csv"
    files = evaluation.files if evaluation.files is not None and len(evaluation.files) == len(scores) else None
    write_predictions_csv(predictions_path, scores, evaluation.classes, files)
    written = [csv_path, predictions_path]
    if plot:
        png_path = folder / f"confusion_{split.value}.png"
        title = f"{evaluation.meta.model} on {evaluation.dataset} ({split.value})"
        plot_confusion(png_path, evaluation.result.confusion, evaluation.classes, title=title)
        written.append(png_path)
        if evaluation.data is not None:
            worst_path = folder / f"worst_{split.value}.png"
            plot_worst(worst_path, evaluation.data.images, scores, evaluation.classes, title=title)
            written.append(worst_path)

    runtime = _onnx_runtime() if onnx else None
    if fmt is Format.json:
        report = {**evaluation.to_dict(), "files": [str(p) for p in written], "predictions": str(predictions_path)}
        if runtime is not None:
            report["runtime"] = runtime
        typer.echo(json.dumps(report, indent=2))
        return
    _print_table(evaluation, written, runtime)


def _onnx_runtime() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def _print_table(evaluation: WeightsEvaluation, written: list[Path], runtime: str | None = None) -> None:
    from rich.table import Table

    result = evaluation.result
    # No markup: class names such as '[unlabelled]' are printed as they are.
    console = stdout_console(markup=False, highlight=False)
    # Plain lines never wrap (rich wraps at 80 columns when output is not a terminal).
    typer.echo(
        f"{evaluation.meta.model} on {evaluation.dataset} {evaluation.split} "
        f"({result.examples} examples) from {evaluation.weights}" + (f" in {runtime}" if runtime else "")
    )
    line = f"loss {result.loss:.4f}  top-1 {result.top1:.4f}"
    if result.top5 is not None:
        line += f"  top-5 {result.top5:.4f}"
    line += f"  macro F1 {result.macro_f1:.4f}"
    recorded = evaluation.meta.metrics.get(f"{evaluation.split}_acc")
    if recorded is not None:
        line += f"  (recorded at epoch {evaluation.meta.epoch}: {recorded:.4f})"
    typer.echo(line)

    table = Table("class")
    for column in ("precision", "recall", "F1", "support"):
        table.add_column(column, justify="right")
    for name, p, r, f, n in zip(
        evaluation.classes, result.precision, result.recall, result.f1, result.support, strict=True
    ):
        table.add_row(name, f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", str(n))
    console.print(table)
    for path in written:
        typer.echo(f"wrote {path}")
