"""``cnnkit eval FILE.onnx``: a split evaluated in ONNX Runtime, prepared as the file's metadata says.

The graph runs in ONNX Runtime only (:func:`cnnkit.onnx_runtime.load_onnx`), fed exactly as
``cnnkit predict FILE.onnx`` feeds it: the uint8 images scaled to 0..1, resized to the metadata's
``input_size`` when they are of another size, normalised with its ``mean`` and ``std``
(:func:`cnnkit.onnx_runtime.split_logits`, numpy and PIL; a test checks it equals the PyTorch
path). The dataset, its options, its folder and its validation split are the ones recorded in the
file's ``cnnkit`` metadata, chosen as :func:`cnnkit.evaluate.evaluate_weights` chooses them for a
``.safetensors`` file; a ``.onnx`` file inside a run directory also gets the run's recorded split
files. The report (loss, top-1/top-5, per-class scores, confusion matrix, every prediction) is the
one ``cnnkit eval`` prints for weights, from the same :func:`cnnkit.evaluate.evaluate` over ONNX
Runtime's logits.

Where this imports torch, and why: loading the *data*. Every dataset, built-in or plugin, returns
its splits as uint8 torch tensors (the :class:`cnnkit.protocols.DatasetSpec` contract), and the
seeded splits of image folders and the validation share carved from a training split draw from
torch's generator (:mod:`cnnkit.data.layouts`, :mod:`cnnkit.data.validation`): a torch-free
re-implementation could evaluate other images than the run held out. The graph itself never runs
in PyTorch, and the torch-free part (opening the file, preparing the batches, running them,
top-1) is :mod:`cnnkit.onnx_runtime`'s, which a test runs with torch made unimportable.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnkit.errors import UsageError, WeightsError
from cnnkit.onnx_runtime import OnnxModel, first_line, load_onnx, split_logits

if TYPE_CHECKING:
    import torch

    from cnnkit.checkpoint import WeightsMeta
    from cnnkit.evaluate import EvalResult, WeightsEvaluation
    from cnnkit.protocols import DatasetSplits

__all__ = ["weights_meta", "recorded_splits", "scores", "evaluate_onnx"]


def weights_meta(model: OnnxModel) -> WeightsMeta:
    """The full weights metadata a graph carries (its ``cnnkit`` entry); corrupt is exit 4."""
    from pydantic import ValidationError

    from cnnkit.checkpoint import WeightsMeta

    try:
        return WeightsMeta.model_validate_json(model.info.meta_json)
    except ValidationError as exc:
        raise WeightsError(f"{model.path} has corrupt cnnkit metadata ({first_line(exc)}); re-export it") from exc


def recorded_splits(
    file: Path,
    meta: WeightsMeta,
    dataset: str | None = None,
    data: str | Path | None = None,
    dataset_options: Mapping[str, Any] | None = None,
) -> DatasetSplits:
    """The dataset ``meta`` was trained on (or ``dataset``), loaded as its run loaded it: the same
    choices as :func:`cnnkit.evaluate.evaluate_weights` (:func:`cnnkit.evaluate.recorded_splits`)."""
    from cnnkit.evaluate import recorded_splits as load

    return load(file, meta, dataset, data, dataset_options, subject=str(file))


def scores(logits: np.ndarray, labels: torch.Tensor, num_classes: int) -> EvalResult:
    """Loss, top-1/top-5, per-class scores and every example's scores from (N, K) logits, by the
    one implementation ``cnnkit eval`` uses for weights (:func:`cnnkit.evaluate.evaluate`)."""
    import torch
    from torch import nn

    from cnnkit.evaluate import evaluate

    step = 4096
    batches = [
        (torch.from_numpy(logits[start : start + step]), labels[start : start + step])
        for start in range(0, len(logits), step)
    ]
    return evaluate(nn.Identity(), batches, num_classes, keep_examples=True)


def evaluate_onnx(
    path: str | Path,
    dataset: str | None = None,
    data: str | Path | None = None,
    dataset_options: Mapping[str, Any] | None = None,
    split: str = "test",
    batch_size: int = 256,
    device: str = "auto",
) -> WeightsEvaluation:
    """Evaluate a ``.onnx`` file written by ``cnnkit export`` on a split, in ONNX Runtime.

    A file that is not such a graph is exit 4 (before any data is read); ``device`` picks ONNX
    Runtime's provider (auto, cpu, cuda, cuda:N).
    """
    from cnnkit.evaluate import WeightsEvaluation

    if split not in {"train", "val", "test"}:
        raise UsageError(f"--split '{split}' is not a split; use test, val or train")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    model = load_onnx(path, device)
    meta = weights_meta(model)
    splits = recorded_splits(model.path, meta, dataset, data, dataset_options)
    chosen = getattr(splits, split)
    if chosen is None:
        raise UsageError(f"--split {split}: {splits.name} as loaded for {model.path} has no {split} split; use test or train")
    logits = split_logits(model.predictor(), chosen.images.numpy(), batch_size)
    result = scores(logits, chosen.labels, meta.num_classes)
    return WeightsEvaluation(
        model.path, meta, splits.name, split, list(meta.classes), result, chosen, splits.split_files.get(split)
    )
