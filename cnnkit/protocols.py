"""The three things cnnkit plugs together: a model, a dataset and a trainer.

Built-ins and third-party plugins implement the same protocols and register through the same
entry-point groups (``cnnkit.models``, ``cnnkit.datasets``, ``cnnkit.trainers``); the registry
hands them out by name. This module imports neither torch nor plugin code, so that listing and
``--help`` stay instant.

Every public member below carries a docstring, and ``docs/plugins.md`` documents each one (a test
checks both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch
    from torch import nn

    from cnnkit.config import TrainConfig
    from cnnkit.training.context import Run, RunResult

__all__ = [
    "HYPERPARAMETER_KEYS",
    "RecipeName",
    "RECIPE_NAMES",
    "Hyperparameters",
    "Recipe",
    "ModelSpec",
    "ImageTensors",
    "DatasetSplits",
    "DatasetSpec",
    "Trainer",
]

RecipeName = Literal["default", "d2l"]
"""``default``: the model spec's own recipe, used as written; ``d2l``: the seed's, derived from it."""
RECIPE_NAMES: tuple[str, ...] = get_args(RecipeName)


class Hyperparameters(BaseModel):
    """The knobs a recipe sets and a run may override: declared once, shared by Recipe and TrainConfig.

    The defaults are a cautious recipe for an unknown architecture (AdamW, cosine with a one-epoch
    warm-up, label smoothing, normalised inputs); built-in models set every field they change.
    """

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, gt=0, description="Passes over the training split.")
    batch_size: int = Field(128, gt=0, description="Examples per optimisation step (the global batch).")
    input_size: int = Field(28, gt=0, description="Square side in pixels images are resized to.")
    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="Optimiser.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (AdamW keeps its beta1 of 0.9).")
    nesterov: bool = Field(False, description="Nesterov momentum for SGD (needs momentum > 0).")
    weight_decay: float = Field(0.05, ge=0, description="Decoupled for AdamW, L2 for SGD; never on norms or biases.")
    schedule: Literal["constant", "cosine", "onecycle"] = Field(
        "cosine", description="Learning-rate schedule over the whole run, stepped every batch."
    )
    warmup: float = Field(1.0, ge=0, description="Epochs of linear warm-up to lr (onecycle: 0 means 30% of the run).")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the training loss.")
    augment: bool = Field(False, description="Random crop with padding and horizontal flip of training batches.")
    normalize: bool = Field(True, description="Standardise inputs with the dataset's mean/std (else only scale to 0..1).")
    init: Literal["default", "xavier"] = Field(
        "default", description="Weight initialisation: the model's own, or d2l's Xavier-uniform."
    )


HYPERPARAMETER_KEYS: tuple[str, ...] = tuple(Hyperparameters.model_fields)
"""The config keys a recipe fills (a file or the command line may still override each)."""


class Recipe(Hyperparameters):
    """How a model trains by default (``--recipe default``), and what the seed used (``--recipe d2l``).

    A model spec's recipe is used exactly as written. The ``d2l`` recipe is derived from it: the
    same epochs, batch and input size, the seed's optimiser and learning rate, and nothing else
    (no momentum, weight decay, schedule, smoothing, augmentation or normalisation; Xavier init).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed_lr: float | None = Field(
        None, gt=0, description="Learning rate of the seed's (d2l) recipe; None: the same as lr."
    )
    seed_optimizer: Literal["sgd", "adamw"] = Field("sgd", description="Optimiser of the seed's (d2l) recipe.")

    def named(self, name: str) -> Hyperparameters:
        """The hyperparameters of recipe ``name`` (one of :data:`RECIPE_NAMES`)."""
        if name not in RECIPE_NAMES:
            raise ValueError(f"recipe {name!r} is not one of {', '.join(RECIPE_NAMES)}")
        own = {key: getattr(self, key) for key in HYPERPARAMETER_KEYS}
        if name == "default":
            return Hyperparameters(**own)
        return Hyperparameters(
            epochs=self.epochs, batch_size=self.batch_size, input_size=self.input_size,
            optimizer=self.seed_optimizer, lr=self.seed_lr or self.lr, momentum=0.0, nesterov=False,
            weight_decay=0.0, schedule="constant", warmup=0.0, label_smoothing=0.0, augment=False,
            normalize=False, init="xavier",
        )  # fmt: skip


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
    """Its default recipe (used as written by ``cnnkit train``) and the seed's learning rate and optimiser."""
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
    """Fits a model to a dataset; the run driver does everything around the fit.

    The driver (``cnnkit.training.run``) resolves the config, builds the model, loads the data,
    creates the run directory, seeds, handles Ctrl-C and divergence, and attaches progress,
    metrics, curves, log and checkpoint handlers to the events it emits through ``run``. A trainer
    only trains: it calls ``run.start(optimizer)``, iterates ``run.epochs()``, reports each epoch
    with ``run.epoch_completed(metrics)`` and returns ``run.result()``. A fresh trainer object is
    made for every run (an entry point names the class).
    """

    name: str
    """Registered name, e.g. ``standard``."""
    summary: str
    """One line shown by ``cnnkit list trainers --long``."""
    options: type[BaseModel]
    """Pydantic model (``extra="forbid"``) of the trainer's own options (``-t key=value``); the
    validated instance is ``run.options``."""

    def fit(self, model: nn.Module, data: DatasetSplits, config: TrainConfig, run: Run) -> RunResult:
        """Train ``model`` (already on ``run.device``) on ``data.train`` under ``config``, evaluating on
        ``data.test`` each epoch; resuming is the driver's job (``run.start`` restores the saved point)."""
        ...
