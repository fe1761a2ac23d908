"""``cnnkit predict WEIGHTS IMAGE_OR_FOLDER...``: the most probable classes of image files.

Arguments are image files, folders (walked recursively for files named as images, as training
folders are) and quoted glob patterns (``'photos/**/*.jpg'``). Files are decoded and run
``--batch-size`` at a time, so memory stays bounded however many there are; results are printed
(or written to ``--out``) as each batch completes.

A file that cannot be read (not an image, truncated, empty, too large) is skipped with a warning
on stderr (one line each; beyond ten, the first five and a count) and, with ``--out``, is a row
whose ``error`` column says why; the table and JSON list only the images predicted. Only when no
file can be read is it an error (exit 3, naming the first). An argument that gives no image at all
(no such path, a pattern that matches nothing, a folder without images) is exit 2.

A ``.onnx`` file runs in ONNX Runtime without importing torch; anything else is PyTorch weights.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cnnkit.cli._common import Format, FormatOption, guarded
from cnnkit.errors import DataError, UsageError

if TYPE_CHECKING:
    from cnnkit.prediction import Prediction, Unreadable

app = typer.Typer()

DEFAULT_BATCH = 64  # cnnkit.prediction.BATCH_SIZE (not imported here: numpy stays out of start-up)
WARN_EACH = 10
"""Up to this many unreadable files get a warning line each; beyond it, the first SHOW_FIRST and a count."""
SHOW_FIRST = 5


def _warn(message: str) -> None:
    print(f"cnnkit: warning: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _progress(total: int, show: bool) -> Iterator[Callable[[int], None]]:
    """``advance(n)``: a transient bar on stderr when ``show`` and stderr is a terminal, else nothing."""
    if show:
        from rich.console import Console

        console = Console(stderr=True, highlight=False, markup=False)
        if console.is_interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(
                TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                console=console, transient=True, redirect_stdout=False, redirect_stderr=False,
            ) as progress:  # fmt: skip
                task = progress.add_task("predicting", total=total)
                yield lambda n: progress.advance(task, n)
            return
    yield lambda n: None


class _Tally:
    """How many images were predicted and which could not be read (the first few kept)."""

    def __init__(self) -> None:
        self.predicted = 0
        self.unreadable = 0
        self.first: list[Unreadable] = []

    def add(self, results: list[Prediction | Unreadable]) -> None:
        from cnnkit.prediction import Unreadable

        for result in results:
            if isinstance(result, Unreadable):
                self.unreadable += 1
                if len(self.first) < WARN_EACH + 1:
                    self.first.append(result)
            else:
                self.predicted += 1

    def finish(self, total: int, out: Path | None) -> None:
        """DataError (exit 3) when nothing could be read; else the warnings for what could not."""
        if self.predicted == 0:
            first = self.first[0]
            if total == 1:
                raise first.error
            raise DataError(
                f"none of the {total} images can be read; the first, {first.image}: {first.reason}; "
                "pass PNG, JPEG or other files PIL opens"
            ) from first.error
        if self.unreadable <= WARN_EACH:
            for item in self.first:
                _warn(f"skipped {item.image}: {item.reason}")
            return
        for item in self.first[:SHOW_FIRST]:
            _warn(f"skipped {item.image}: {item.reason}")
        where = f"{out} lists each in its error column" if out else "--out FILE.csv lists each with its reason"
        _warn(
            f"{self.unreadable} of {total} images could not be read and were skipped "
            f"(the first {SHOW_FIRST} are above); {where}"
        )


def _decimal(value: float) -> str:
    import numpy as np

    return np.format_float_positional(value, trim="0")  # shortest exact digits, never 1e-05


def _write_csv(file: Path, batches: Iterator[list[Prediction | Unreadable]], k: int) -> None:
    from cnnkit.prediction import Unreadable

    with open(file, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
        writer = csv.writer(handle)
        ranks = range(1, k + 1)
        writer.writerow(["file", *(f"{kind}_{i}" for i in ranks for kind in ("class", "probability")), "error"])
        for results in batches:
            for result in results:
                if isinstance(result, Unreadable):
                    writer.writerow([str(result.image), *([""] * (2 * k)), result.reason])
                else:
                    cells = [cell for name, p in result.top for cell in (name, _decimal(p))]
                    writer.writerow([str(result.image), *cells, ""])


def _print_table(batches: Iterator[list[Prediction | Unreadable]]) -> None:
    from cnnkit.prediction import Prediction

    for results in batches:
        predictions = [r for r in results if isinstance(r, Prediction)]
        if not predictions:
            continue
        width = max(len(name) for p in predictions for name, _ in p.top)  # aligned within each batch
        for prediction in predictions:
            typer.echo(str(prediction.image))
            for name, probability in prediction.top:
                typer.echo(f"  {name:<{width}}  {probability:7.2%}")


def _print_json(batches: Iterator[list[Prediction | Unreadable]]) -> None:
    """The same text as ``json.dumps(predictions, indent=2)``, written as the predictions come."""
    from cnnkit.prediction import Prediction

    opened = False
    for results in batches:
        for result in results:
            if isinstance(result, Prediction):
                typer.echo(",\n" if opened else "[\n", nl=False)
                typer.echo(textwrap.indent(json.dumps(result.to_dict(), indent=2), "  "), nl=False)
                opened = True
    if opened:
        typer.echo("\n]")


@app.command("predict")
@guarded
def predict_command(
    weights: Annotated[Path, typer.Argument(help="A .safetensors or .onnx file, or a run directory.")],
    images: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders (searched recursively for image files) or quoted glob patterns "
            "such as 'photos/**/*.jpg'.",
            show_default=False,
        ),
    ],
    top: Annotated[int, typer.Option("--top", "-k", help="How many classes to show per image.")] = 3,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Write a CSV instead (replacing the file): one row per image: file, class_i and probability_i "
            "for each of the top K, error (why an unreadable file was skipped).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Images decoded and run through the model at a time.")
    ] = DEFAULT_BATCH,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar (errors and warnings still show).")
    ] = False,
    fmt: FormatOption = Format.table,
) -> None:
    """Classify images with trained weights: top-K classes and their probabilities, for files, folders and globs."""
    from cnnkit.prediction import gather_images, predict_batches
    from cnnkit.predictors import open_predictor

    if top < 1:
        raise UsageError(f"--top must be >= 1, got {top}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    paths, skipped = gather_images(images)
    if skipped:
        suffixes = sorted({p.suffix.lower() or p.name for p in skipped})
        _warn(f"skipped {len(skipped)} file(s) that are not images by name ({', '.join(suffixes[:5])})")
    predictor = open_predictor(weights, device)
    tally = _Tally()
    # The bar would garble results printed to the same screen: it shows when they go elsewhere.
    show_bar = not quiet and (out is not None or not sys.stdout.isatty())

    def batches(advance: Callable[[int], None]) -> Iterator[list[Prediction | Unreadable]]:
        for results in predict_batches(predictor, paths, top, batch_size):
            tally.add(results)
            advance(len(results))
            yield results

    if out is None:
        with _progress(len(paths), show_bar) as advance:
            (_print_json if fmt is Format.json else _print_table)(batches(advance))
        tally.finish(len(paths), None)
        return

    from cnnkit.fs import atomic_write

    def write(tmp: Path) -> None:
        with _progress(len(paths), show_bar) as advance:
            _write_csv(tmp, batches(advance), min(top, len(predictor.classes)))
        tally.finish(len(paths), out)  # inside: when nothing could be read, nothing is written

    atomic_write(out, write)
    unreadable = f", {tally.unreadable} unreadable skipped" if tally.unreadable else ""
    typer.echo(f"wrote {out} ({tally.predicted} images predicted{unreadable})")
