"""The three things cnnkit plugs together: a model, a dataset and a trainer.

Built-ins and third-party plugins implement the same protocols and register through the same
entry-point groups (``cnnkit.models``, ``cnnkit.datasets``, ``cnnkit.trainers``); the registry
hands them out by name. This module imports neither torch nor plugin code, so that listing and
``--help`` stay instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Recipe", "ModelSpec", "ImageTensors", "DatasetSplits", "DatasetSpec", "Trainer"]


class Recipe(BaseModel):
    """How a model is trained by default: the seed's (d2l's) hyperparameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: int = Field(28, gt=0, description="Square input side in pixels images are resized to.")
    batch_size: int = Field(128, gt=0, description="Examples per optimisation step.")
    lr: float = Field(0.1, gt=0, description="Learning rate.")
    epochs: int = Field(10, gt=0, description="Passes over the training split.")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="Optimiser the recipe uses.")


@runtime_checkable
class ModelSpec(Protocol):
    """A registered architecture: what it is, how it is trained, and how to build it."""

    name: str
    """Registered name, e.g. ``resnet18``."""
    summary: str
    """One line shown by ``cnnkit list models --long``."""
    paper: str
    """The paper it follows (authors, title, venue, year)."""
    recipe: Recipe
    """The seed's default recipe: input size, batch size, learning rate, epochs, optimiser."""
    options: type[BaseModel]
    """Pydantic model (``extra="forbid"``) of the architecture's hyperparameters (``-o key=value``)."""

    def build(self, in_channels: int = 1, num_classes: int = 10, **options: Any) -> nn.Module:
        """A freshly initialised ``nn.Module`` mapping (N, in_channels, H, W) to (N, num_classes)."""
        ...


@dataclass
class ImageTensors:
    """One split held in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DatasetSplits:
    """A loaded dataset: both splits, the class names and where the files were found."""

    name: str
    train: ImageTensors
    test: ImageTensors
    classes: tuple[str, ...]
    source: Path
    mean: tuple[float, ...]
    """Per-channel mean of the training images on the 0..1 scale (for normalisation)."""
    std: tuple[float, ...]
    """Per-channel standard deviation of the training images on the 0..1 scale."""
    split_files: dict[str, list[str]] = field(default_factory=dict)
    """For folder datasets: the files in each split, saved into the run directory."""

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])


@runtime_checkable
class DatasetSpec(Protocol):
    """A registered dataset: its metadata and how to find and load its splits."""

    name: str
    """Registered name, e.g. ``fashion-mnist``."""
    summary: str
    """One line shown by ``cnnkit list datasets --long``."""
    classes: tuple[str, ...]
    """Class names in label order; empty when they come from the files (image folders)."""
    channels: int
    """Native channel count (1 grayscale, 3 RGB)."""
    image_size: tuple[int, int]
    """Native (height, width); (0, 0) when images vary in size."""
    options: type[BaseModel]
    """Pydantic model (``extra="forbid"``) of loading options such as the split rule and seed."""

    def locate(self, data: Path | None = None) -> Path:
        """The folder holding the files: ``data`` if given, else the default search path."""
        ...

    def load(self, data: Path | None = None, **options: Any) -> DatasetSplits:
        """Both splits as uint8 tensors (cached after the first decode)."""
        ...


@runtime_checkable
class Trainer(Protocol):
    """Fits a model to a dataset under a config, reporting metrics at each epoch's end."""

    name: str
    """Registered name, e.g. ``standard``."""
    summary: str
    """One line shown by ``cnnkit list trainers --long``."""

    def fit(self, model: nn.Module, data: DatasetSplits, config: Any) -> Any:
        """Train ``model`` on ``data.train``, evaluate on ``data.test`` each epoch; return the run's result."""
        ...
