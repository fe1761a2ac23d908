"""cnnkit: the classic CNN image classifiers, trained, evaluated, summarised and exported.

The public API is small and importing it is cheap: torch is imported only when a model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnkit._version import __version__

if TYPE_CHECKING:
    from torch import nn

    from cnnkit.protocols import DatasetSpec, DatasetSplits, ModelSpec, Trainer
    from cnnkit.summary import ModelSummary

__all__ = [
    "__version__",
    "build_model",
    "get_dataset",
    "get_model",
    "get_trainer",
    "list_datasets",
    "list_models",
    "list_trainers",
    "load_dataset",
    "load_model",
    "summarize",
]


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by an fnmatch pattern (``'res*'``)."""
    from cnnkit.registry import MODELS

    return MODELS.names(pattern)


def list_datasets(pattern: str | None = None) -> list[str]:
    """Registered dataset names."""
    from cnnkit.registry import DATASETS

    return DATASETS.names(pattern)


def list_trainers(pattern: str | None = None) -> list[str]:
    """Registered trainer names."""
    from cnnkit.registry import TRAINERS

    return TRAINERS.names(pattern)


def get_model(name: str) -> ModelSpec:
    """The registered architecture ``name`` (its recipe, options and ``build``)."""
    from cnnkit.registry import MODELS

    return MODELS.get(name)


def get_dataset(name: str) -> DatasetSpec:
    """The registered dataset ``name``."""
    from cnnkit.registry import DATASETS

    return DATASETS.get(name)


def get_trainer(name: str) -> Trainer:
    """The registered trainer ``name``."""
    from cnnkit.registry import TRAINERS

    return TRAINERS.get(name)


def build_model(
    name: str, in_channels: int = 1, num_classes: int = 10, *, weights: str | Path | None = None, **options: Any
) -> nn.Module:
    """Build a freshly initialised model: ``build_model("vgg11", 1, 10, width=0.25)``.

    ``weights``: start from these instead (what ``cnnkit train --init-from`` takes): a cnnkit run
    directory or weights file of the same model, a torchvision-format state dict (``.pth``/``.pt``,
    read with ``weights_only=True``, or ``.safetensors``), or ``"torchvision:NAME"`` from torch hub's
    cache (never downloaded). A class count other than the file's replaces the classifier; another
    channel count adapts the first convolution; each is said in one line on stderr. Anything else
    that does not fit raises :class:`cnnkit.errors.WeightsError`."""
    from cnnkit.protocols import model_head

    spec = get_model(name)
    model = spec.build(in_channels, num_classes, **options)
    if weights is not None:
        from cnnkit._console import warn
        from cnnkit.weights_init import initialise

        record = initialise(model, name, options, str(weights), head=model_head(spec),
                            in_channels=in_channels, num_classes=num_classes)  # fmt: skip
        for note in record.notes[1:]:
            warn(note)
    return model


def load_model(path: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild a model from a cnnkit ``.safetensors`` file (or a run directory) alone, in eval mode."""
    from cnnkit.checkpoint import load_model as _load_model

    return _load_model(path, device=device)


def load_dataset(name: str, data: str | Path | None = None, **options: Any) -> DatasetSplits:
    """Both splits of a registered dataset as uint8 tensors: ``load_dataset("coil20", split="pose-block")``."""
    from cnnkit.data import load_dataset as _load_dataset

    return _load_dataset(name, data, **options)


def summarize(
    model: str, input_shape: tuple[int, int, int] | None = None, num_classes: int = 10, **kwargs: Any
) -> ModelSummary:
    """Layer table, parameters and MACs of a registered model, computed on the meta device."""
    from cnnkit.summary import summarize as _summarize

    return _summarize(model, input_shape, num_classes, **kwargs)
