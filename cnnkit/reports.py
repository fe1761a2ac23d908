"""What ``cnnkit eval`` writes beside the weights: the confusion matrix (CSV, PNG heat map), every
prediction (``predictions_<split>.csv``) and a gallery of the worst ones (``worst_<split>.png``).

Every file is written atomically (:func:`cnnkit.fs.atomic_write`). Figures use matplotlib's object
API with the Agg canvas, never pyplot, so no global backend or figure state is touched.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cnnkit.fs import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "ExampleScores",
    "write_confusion_csv",
    "plot_confusion",
    "PREDICTION_COLUMNS",
    "write_predictions_csv",
    "worst_examples",
    "plot_worst",
    "WORST_COUNT",
]

PREDICTION_COLUMNS = ("true", "predicted", "probability", "true_probability", "loss")
"""The columns of ``predictions_<split>.csv`` after the first (``file`` for folder datasets, else ``index``)."""

WORST_COUNT = 16
"""How many examples ``worst_<split>.png`` shows at most."""


@dataclass(frozen=True)
class ExampleScores:
    """Per-example results of ``evaluate(..., keep_examples=True)``: CPU tensors of length N, in the
    order the loader yielded the examples (a split's own order for an evaluation loader)."""

    labels: torch.Tensor
    """int64 true classes."""
    predicted: torch.Tensor
    """int64 predicted classes (the arg-max)."""
    probability: torch.Tensor
    """float32 softmax probability of the predicted class."""
    true_probability: torch.Tensor
    """float32 softmax probability of the true class."""
    loss: torch.Tensor
    """float32 cross-entropy of each example (their mean is :attr:`cnnkit.evaluate.EvalResult.loss`)."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(path: str | Path, fig: Figure) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def write_confusion_csv(path: str | Path, confusion: torch.Tensor, classes: Sequence[str]) -> None:
    """The confusion matrix as CSV: a header of predicted class names, one row per true class."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            out = csv.writer(handle)
            out.writerow(["true \\ predicted", *classes])
            for name, row in zip(classes, confusion.tolist(), strict=True):
                out.writerow([name, *row])

    atomic_write(path, write)


def plot_confusion(path: str | Path, confusion: torch.Tensor, classes: Sequence[str], title: str = "") -> None:
    """A PNG heat map of the confusion matrix, coloured by row share (recall), counts written in."""
    counts = confusion.double()
    share = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    k = len(classes)
    side = max(4.0, 0.45 * k + 2)
    fig = _figure(side + 1, side)
    ax = fig.add_subplot()
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="share of the true class")
    ax.set_xticks(range(k), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    if k <= 30:
        for (i, j), n in zip(((i, j) for i in range(k) for j in range(k)), confusion.flatten().tolist()):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
    _save_png(path, fig)


def write_predictions_csv(
    path: str | Path, scores: ExampleScores, classes: Sequence[str], files: Sequence[str] | None = None
) -> None:
    """One row per example, in split order: its file (``files``, for folder datasets) or its index,
    then :data:`PREDICTION_COLUMNS`: true and predicted class names, the predicted class's
    probability, the true class's probability and the example's cross-entropy loss."""
    n = len(scores)
    if files is not None and len(files) != n:
        raise ValueError(f"{len(files)} file names for {n} examples")
    names = list(classes)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            out = csv.writer(handle)
            out.writerow(["file" if files is not None else "index", *PREDICTION_COLUMNS])
            rows = zip(
                scores.labels.tolist(), scores.predicted.tolist(), scores.probability.tolist(),
                scores.true_probability.tolist(), scores.loss.tolist(), strict=True,
            )  # fmt: skip
            for i, (true, predicted, probability, true_probability, loss) in enumerate(rows):
                out.writerow([
                    files[i] if files is not None else i, names[true], names[predicted],
                    f"{probability:.8g}", f"{true_probability:.8g}", f"{loss:.8g}",
                ])  # fmt: skip

    atomic_write(path, write)


def worst_examples(scores: ExampleScores, count: int = WORST_COUNT) -> torch.Tensor:
    """Indices of the ``count`` highest-loss examples, worst first (ties: the earlier example first)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    order = torch.sort(scores.loss, descending=True, stable=True).indices
    return order[:count]


def _panel(image: torch.Tensor) -> tuple[Any, dict[str, Any]]:
    """A uint8 (C, H, W) image as what ``imshow`` draws: grayscale with a fixed 0..255 scale, or RGB."""
    if image.shape[0] == 3:
        return image.permute(1, 2, 0).numpy(), {}
    return image[0].numpy(), {"cmap": "gray", "vmin": 0, "vmax": 255}


def plot_worst(
    path: str | Path,
    images: torch.Tensor,
    scores: ExampleScores,
    classes: Sequence[str],
    count: int = WORST_COUNT,
    title: str = "",
) -> torch.Tensor:
    """A PNG grid of the ``count`` highest-loss examples (as fastai's ``plot_top_losses``), worst
    first, each labelled ``true / predicted 0.93`` (the predicted class's probability) beneath.

    ``images`` is the evaluated split's uint8 (N, C, H, W) tensor, rows in the order of ``scores``
    (1 channel drawn grayscale, 3 as RGB, any other count by its first channel). Returns the
    indices shown.
    """
    if images.shape[0] != len(scores):
        raise ValueError(f"{images.shape[0]} images for {len(scores)} examples")
    chosen = worst_examples(scores, count)
    shown = max(len(chosen), 1)
    cols = math.ceil(math.sqrt(shown))
    rows = math.ceil(shown / cols)
    fig = _figure(2.0 * cols, 2.2 * rows + (0.3 if title else 0.0))
    names = list(classes)
    for slot, i in enumerate(chosen.tolist()):
        ax = fig.add_subplot(rows, cols, slot + 1)
        pixels, style = _panel(images[i].cpu())
        ax.imshow(pixels, interpolation="nearest", **style)
        ax.set_xticks([])
        ax.set_yticks([])
        true, predicted = int(scores.labels[i]), int(scores.predicted[i])
        ax.set_xlabel(f"{names[true]} / {names[predicted]} {float(scores.probability[i]):.2f}", fontsize=8)
    if title:
        fig.suptitle(f"{title}: true / predicted probability, highest loss first", fontsize=9)
    _save_png(path, fig)
    return chosen
