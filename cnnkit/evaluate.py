"""Evaluate a classifier on a split (loss, top-1/top-5, confusion matrix, per-class scores) or on image files.

:func:`evaluate` is the one loop both ``cnnkit eval`` and the trainer use. It keeps every count on
the model's device (a confusion matrix built with ``bincount``) and synchronises once at the end,
so it never stalls a GPU with per-batch ``.item()`` calls. :func:`evaluate_weights` is the whole
of ``cnnkit eval``: weights file in, dataset from its metadata, result out; :func:`predict_files`
is the whole of ``cnnkit predict``. The files ``cnnkit eval`` writes come from :mod:`cnnkit.reports`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.checkpoint import WeightsMeta, load_weights, resolve_weights
from cnnkit.errors import DataError, UsageError, WeightsError
from cnnkit.prediction import Prediction, Predictor, decode_images, predict_all, prepare_batch, training_resize
from cnnkit.reports import ExampleScores, plot_confusion, write_confusion_csv
from cnnkit.rundir import RunDir

if TYPE_CHECKING:
    import numpy as np

    from cnnkit.protocols import DatasetSplits, ImageTensors

__all__ = [
    "EvalResult",
    "ExampleScores",
    "evaluate",
    "WeightsEvaluation",
    "evaluate_weights",
    "check_fit",
    "recorded_data_folder",
    "write_confusion_csv",
    "plot_confusion",
    "Prediction",
    "load_images",
    "prepare_images",
    "predict_files",
    "load_predictor",
]


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured over one split."""

    loss: float
    """Mean cross-entropy per example."""
    top1: float
    top5: float | None
    """Top-5 accuracy; None when there are 5 classes or fewer (it would always be 1)."""
    confusion: torch.Tensor
    """(K, K) int64 counts on the CPU: rows are true classes, columns predicted classes."""
    precision: list[float]
    recall: list[float]
    f1: list[float]
    per_example: ExampleScores | None = None
    """Every example's prediction, probabilities and loss; only with ``keep_examples=True``."""

    @property
    def examples(self) -> int:
        """How many examples were evaluated."""
        return int(self.confusion.sum())

    @property
    def support(self) -> list[int]:
        """Examples per true class."""
        return self.confusion.sum(dim=1).tolist()

    @property
    def macro_f1(self) -> float:
        """Unweighted mean of the per-class F1 scores."""
        return sum(self.f1) / len(self.f1)

    def to_dict(self, classes: Sequence[str] | None = None) -> dict[str, Any]:
        """A JSON-ready summary; ``classes`` names the rows (else they are numbered)."""
        names = list(classes) if classes is not None else [str(i) for i in range(len(self.f1))]
        return {
            "examples": self.examples,
            "loss": self.loss,
            "top1": self.top1,
            "top5": self.top5,
            "macro_f1": self.macro_f1,
            "per_class": [
                {"class": name, "precision": p, "recall": r, "f1": f, "support": s}
                for name, p, r, f, s in zip(names, self.precision, self.recall, self.f1, self.support, strict=True)
            ],
            "confusion": self.confusion.tolist(),
        }


def _per_class(confusion: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    counts = confusion.double()
    hits = counts.diagonal()
    predicted, actual = counts.sum(dim=0), counts.sum(dim=1)
    # A class never predicted (or never present) scores 0 rather than NaN, as scikit-learn does.
    precision = torch.where(predicted > 0, hits / predicted.clamp(min=1), 0.0)
    recall = torch.where(actual > 0, hits / actual.clamp(min=1), 0.0)
    both = precision + recall
    f1 = torch.where(both > 0, 2 * precision * recall / both.clamp(min=1e-12), 0.0)
    return precision.tolist(), recall.tolist(), f1.tolist()


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    keep_examples: bool = False,
) -> EvalResult:
    """Run ``model`` over every ``(images, labels)`` batch of ``loader`` without gradients.

    Images must already be on the model's device and prepared as for training (resized,
    normalised). The model is put in eval mode and returned to its previous mode afterwards.
    ``keep_examples`` also returns every example's scores (:attr:`EvalResult.per_example`),
    gathered on the device and moved to the CPU once at the end; training leaves it off.
    """
    if num_classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    was_training = model.training
    model.eval()
    k = num_classes
    sums: dict[str, torch.Tensor] = {}
    kept: list[torch.Tensor] = []  # per batch: (B, 5) rows of label, predicted, p, p(true), loss
    try:
        with torch.inference_mode():
            for images, labels in loader:
                logits = model(images).float()
                if logits.ndim != 2 or logits.shape[1] != k:
                    raise WeightsError(
                        f"the model outputs shape {tuple(logits.shape)}, expected (batch, {k}) "
                        f"for {k} classes; evaluate it on a dataset with as many classes as it outputs"
                    )
                labels = labels.to(logits.device, torch.long)
                if not sums:
                    # MPS has no float64; elsewhere a float64 sum stays exact over any split size.
                    acc = torch.float32 if logits.device.type == "mps" else torch.float64
                    sums = {
                        "loss": torch.zeros((), dtype=acc, device=logits.device),
                        "confusion": torch.zeros(k * k, dtype=torch.long, device=logits.device),
                        "top5": torch.zeros((), dtype=torch.long, device=logits.device),
                        "bad_labels": torch.zeros((), dtype=torch.long, device=logits.device),
                    }
                valid = (labels >= 0) & (labels < k)
                sums["bad_labels"] += (~valid).sum()
                safe = labels.clamp(0, k - 1)
                predicted = logits.argmax(dim=1)
                if keep_examples:
                    log_p = logits.log_softmax(dim=1)
                    losses = -log_p.gather(1, safe[:, None])[:, 0]
                    sums["loss"] += losses.sum().to(sums["loss"].dtype)
                    chosen = log_p.gather(1, predicted[:, None])[:, 0].exp()
                    kept.append(torch.stack([safe.float(), predicted.float(), chosen, (-losses).exp(), losses], 1))
                else:
                    sums["loss"] += F.cross_entropy(logits, safe, reduction="sum").to(sums["loss"].dtype)
                # A bincount of true*K+predicted, done with index_add_: CUDA's bincount reads the
                # input's max back to the host to size its output, a sync on every batch.
                sums["confusion"].index_add_(0, safe * k + predicted, valid.long())
                if k > 5:
                    sums["top5"] += (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).sum()
    finally:
        model.train(was_training)
    if not sums:
        raise DataError("nothing to evaluate: the split has no examples")
    if int(sums["bad_labels"]):
        raise DataError(
            f"{int(sums['bad_labels'])} labels lie outside 0..{k - 1} for a {k}-class model; "
            "evaluate on the dataset the weights were trained for"
        )
    matrix = sums["confusion"].view(k, k).cpu()
    total = int(matrix.sum())
    if total == 0:
        raise DataError("nothing to evaluate: the split has no examples")
    precision, recall, f1 = _per_class(matrix)
    per_example = None
    if keep_examples:
        rows = torch.cat(kept).cpu()  # the one move to the host
        label, chosen_class, p, p_true, loss = rows.unbind(1)
        per_example = ExampleScores(label.long(), chosen_class.long(), p, p_true, loss)
    return EvalResult(
        loss=float(sums["loss"]) / total,
        top1=int(matrix.diagonal().sum()) / total,
        top5=int(sums["top5"]) / total if k > 5 else None,
        confusion=matrix,
        precision=precision,
        recall=recall,
        f1=f1,
        per_example=per_example,
    )


def check_fit(weights: Path | str, meta: WeightsMeta, data: DatasetSplits) -> None:
    """WeightsError, naming both sides, when ``data`` has other channels or classes than ``meta``."""
    channels, classes = data.channels, len(data.classes)
    if channels == meta.in_channels and classes == meta.num_classes:
        return

    def describe(c: int, k: int) -> str:
        return f"{c} channel{'s' * (c != 1)} and {k} class{'es' * (k != 1)}"

    trained_on = f"; they were trained on {meta.dataset}" if meta.dataset and meta.dataset != data.name else ""
    raise WeightsError(
        f"weights {weights} expect {describe(meta.in_channels, meta.num_classes)}; "
        f"{data.name} has {describe(channels, classes)}{trained_on}"
    )


@dataclass(frozen=True)
class WeightsEvaluation:
    """A weights file evaluated on a dataset split (what ``cnnkit eval`` prints)."""

    weights: Path
    meta: WeightsMeta
    dataset: str
    split: str
    classes: list[str]
    result: EvalResult
    data: ImageTensors | None = None
    """The evaluated split (its uint8 images, for the gallery of the worst predictions)."""
    files: list[str] | None = None
    """The split's file names, in example order, for folder datasets."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary, including what the run recorded at training time."""
        return {
            "weights": str(self.weights),
            "model": self.meta.model,
            "dataset": self.dataset,
            "split": self.split,
            "recorded": dict(self.meta.metrics),
            **self.result.to_dict(self.classes),
        }


def recorded_data_folder(weights: Path, meta: WeightsMeta) -> Path | None:
    """The folder the weights' dataset was loaded from when they were trained, or None if unknown.

    Newer weights record it (``meta.data``); for older ones the run directory's ``config.json``
    beside them does (``--data``, else the folder the dataset was found in).
    """
    if meta.data:
        return Path(meta.data)
    return RunDir(weights.parent).recorded_data_folder()


def _load_for(file: Path, meta: WeightsMeta, name: str, data: Path | None, options: dict[str, Any]) -> DatasetSplits:
    """The splits to evaluate ``file`` on: for weights in a run directory that recorded its split
    files, exactly those files (the dataset says in one line if its folder changed since); else the dataset."""
    from cnnkit import data as datasets

    run = RunDir(file.parent)
    recorded = run.read_split_files() if name == meta.dataset and run.holds_run() else {}
    if not recorded:
        return datasets.load_dataset(name, data, input_size=meta.input_size, **options)
    return datasets.load_recorded(name, data, recorded, meta.classes, input_size=meta.input_size, **options)


def recorded_splits(
    file: Path,
    meta: WeightsMeta,
    dataset: str | None = None,
    data: str | Path | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    *,
    subject: str | None = None,
) -> DatasetSplits:
    """The dataset ``meta`` was trained on (or ``dataset``), loaded as its run loaded it: what
    :func:`evaluate_weights` evaluates, and ``cnnkit eval FILE.onnx`` and ``--quantize`` too.

    The recorded options (``dataset_options`` override single ones); ``data``, else the recorded
    folder while it exists, else the dataset's own search; the run's split files when ``file`` lies
    in its run directory; the validation share carved from train again. A dataset of other
    channels or classes is exit 4. ``subject``: how messages name ``file`` (default
    ``weights FILE``; an ONNX file is named alone).
    """
    from cnnkit._console import warn
    from cnnkit.registry import DATASETS

    plural = subject is None
    named = f"weights {file}" if subject is None else subject
    name = dataset or meta.dataset
    if name is None:
        raise UsageError(
            f"{named} {'do' if plural else 'does'} not record the dataset {'they were' if plural else 'it was'} "
            f"trained on; pass --dataset (registered: {', '.join(DATASETS.names())})"
        )
    if name == meta.dataset and name not in DATASETS.names() and meta.dataset_distribution not in (None, "cnnkit"):
        version = meta.dataset_distribution_version
        raise UsageError(
            f"{named} {'were' if plural else 'was'} trained on dataset '{name}' of {meta.dataset_distribution}"
            f"{' ' + version if version else ''}, which is not installed here; install it (pip install "
            f"'{meta.dataset_distribution}{'==' + version if version else ''}'), or pass --dataset"
        )
    # The recorded options only describe the recorded dataset; another one starts from defaults.
    options = dict(meta.dataset_options) if name == meta.dataset else {}
    options.update(dataset_options or {})
    recorded = recorded_data_folder(file, meta) if name == meta.dataset else None
    if data is None and recorded is not None and recorded.exists():
        data = recorded  # where it was trained from: a run directory alone is enough to evaluate it
    try:
        splits = _load_for(file, meta, name, Path(data) if data is not None else None, options)
    except DataError as exc:
        if data is not None or recorded is None:
            raise
        raise DataError(f"{exc.message} (the weights were trained on {recorded}, which no longer exists)") from exc
    validation = meta.validation if name == meta.dataset else None
    if validation is not None and validation.get("from") == "train" and splits.val is None:
        from cnnkit.data.validation import carve_validation

        # The run held these out of train: val is them again, and train is what it trained on.
        splits, _ = carve_validation(splits, float(validation["fraction"]), int(validation["seed"]))
    check_fit(file, meta, splits)
    if list(splits.classes) != list(meta.classes):
        whose = "the weights' names" if plural else "the file's names"
        warn(f"{splits.name} names its classes differently from {named}; reporting {whose}")
    return splits


def evaluate_weights(
    weights: str | Path,
    dataset: str | None = None,
    data: str | Path | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    split: str = "test",
    batch_size: int = 256,
    device: str | torch.device = "auto",
) -> WeightsEvaluation:
    """Evaluate a weights file (or run directory) on a registered dataset's split.

    The model is rebuilt from the file's metadata alone. The dataset defaults to the one the
    weights were trained on, with the same loading options (so a seeded random split is
    reproduced); ``dataset_options`` override single options. The files come from ``data``,
    else from the folder the weights were trained from (:func:`recorded_data_folder`) while it
    exists, else from the dataset's default search. Images are resized to the
    training input size and normalised exactly as in training.
    """
    from cnnkit.device import resolve_device

    if split not in {"train", "val", "test"}:
        raise UsageError(f"--split '{split}' is not a split; use test, val or train")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    target = resolve_device(device) if isinstance(device, str) else device
    file = resolve_weights(weights)
    model, meta = load_weights(file, target)

    splits = recorded_splits(file, meta, dataset, data, dataset_options)

    from cnnkit.data.batches import BatchLoader

    chosen = getattr(splits, split)
    if chosen is None:
        raise UsageError(
            f"--split {split}: {splits.name} as loaded for {file} has no {split} split; use test or train"
        )
    loader = BatchLoader(
        chosen,
        batch_size=batch_size,
        image_size=meta.input_size,
        mean=meta.mean,
        std=meta.std,
        device=target,
    )
    result = evaluate(model, loader, meta.num_classes, keep_examples=True)
    return WeightsEvaluation(
        file, meta, splits.name, split, list(meta.classes), result, chosen, splits.split_files.get(split)
    )


def load_images(paths: Sequence[str | Path], channels: int) -> list[torch.Tensor]:
    """Decode image files into uint8 (C, H, W) tensors with 1 (grayscale) or 3 (RGB) channels.

    A file PIL cannot read is a one-line DataError naming it (see :func:`cnnkit.prediction.decode_images`).
    """
    # torch.tensor copies: decoded arrays may share PIL's read-only buffer.
    return [torch.tensor(image) for image in decode_images(paths, channels)]


def prepare_images(
    images: Sequence[torch.Tensor],
    size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """uint8 (C, H, W) images of any sizes -> one float batch (N, C, size, size) as the model was trained.

    Scaled to 0..1, resized (bilinear, antialiased), then normalised with ``mean``/``std`` when
    given. One implementation serves PyTorch and ONNX Runtime alike:
    :func:`cnnkit.prediction.prepare_batch`, whose output equals ``F.interpolate(...,
    antialias=True)`` on the 0..1 images (a test checks).
    """
    arrays = [image.cpu().numpy() for image in images]
    return torch.from_numpy(prepare_batch(arrays, size, mean, std)).to(device)


def load_predictor(weights: str | Path, device: str | torch.device = "auto") -> Predictor:
    """A weights file (or run directory) loaded once, ready for :func:`cnnkit.prediction.predict_batches`."""
    from cnnkit.device import resolve_device

    target = resolve_device(device) if isinstance(device, str) else device
    model, meta = load_weights(weights, target)

    def logits(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch).to(target)).float().cpu().numpy()

    return Predictor(
        source=resolve_weights(weights), classes=list(meta.classes), channels=meta.in_channels,
        size=meta.input_size, mean=meta.mean, std=meta.std, logits=logits,
        resize=training_resize(meta.dataset, meta.dataset_options),
    )  # fmt: skip


def predict_files(
    weights: str | Path, images: Sequence[str | Path], top: int = 5, device: str | torch.device = "auto"
) -> list[Prediction]:
    """The ``top`` most probable classes of each image file under a weights file's model.

    A ``.onnx`` file (from ``cnnkit export --format onnx``) is run with ONNX Runtime instead. Files
    are decoded and run :data:`cnnkit.prediction.BATCH_SIZE` at a time; the first that cannot be
    read is a DataError (exit 3) naming it (``cnnkit predict`` lists such files and goes on).
    """
    if top < 1:
        raise UsageError(f"--top must be >= 1, got {top}")
    if not images:
        raise UsageError("no images given; pass one or more image files")
    if Path(weights).suffix.lower() == ".onnx":
        from cnnkit.onnx_runtime import predict_onnx

        return predict_onnx(weights, images, top=top, device=str(device))
    return predict_all(load_predictor(weights, device), images, top)
