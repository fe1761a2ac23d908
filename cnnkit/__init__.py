"""cnnkit: the classic CNN image classifiers, trained, evaluated, summarised and exported.

The public API is small and importing it is cheap: torch is imported only when a model is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from torch import nn

    from cnnkit.protocols import DatasetSpec, ModelSpec, Trainer

__all__ = [
    "__version__",
    "build_model",
    "get_dataset",
    "get_model",
    "get_trainer",
    "list_datasets",
    "list_models",
    "list_trainers",
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


def build_model(name: str, in_channels: int = 1, num_classes: int = 10, **options: Any) -> nn.Module:
    """Build a freshly initialised model: ``build_model("vgg11", 1, 10, width=0.25)``."""
    return get_model(name).build(in_channels, num_classes, **options)
