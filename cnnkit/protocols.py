"""The three things cnnkit plugs together: a model, a dataset and a trainer.

Built-ins and third-party plugins implement the same protocols and register through the same
entry-point groups (``cnnkit.models``, ``cnnkit.datasets``, ``cnnkit.trainers``); the registry
hands them out by name. This module imports neither torch nor plugin code, so that listing and
``--help`` stay instant.

Every public member below carries a docstring, and ``docs/plugins.md`` documents each one (a test
checks both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "HYPERPARAMETER_KEYS", "AugmentMode", "FINETUNE_LR_FACTOR", "FINETUNE_WARMUP", "RecipeName",
    "RECIPE_NAMES", "Hyperparameters", "Recipe", "ModelSpec", "model_head", "ImageTensors", "DatasetSplits",
    "DatasetSpec", "Batches", "TrainingRun", "RunResult", "REQUIRED_METRICS", "Trainer",
]

AugmentMode = Literal["none", "crop-flip", "trivial", "randaugment"]
"""Training augmentation (``--augment``); see :mod:`cnnkit.data.augment`."""

RecipeName = Literal["default", "d2l", "finetune"]
"""``default``: the model spec's own recipe, used as written; ``d2l``: the seed's, derived from it;
``finetune``: for a run that starts from trained weights (``--init-from``), derived from it."""
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
    augment: AugmentMode = Field(
        "none", description="Training-batch augmentation, per image on the device: 'crop-flip' (random crop of a "
        "padded image and horizontal flip), 'trivial' (crop-flip, then TrivialAugmentWide), 'randaugment' (crop-flip, "
        "then RandAugment with randaugment_ops and randaugment_magnitude). Config files' true/false still mean "
        "'crop-flip'/'none'.",
    )  # fmt: skip
    randaugment_ops: int = Field(2, ge=1, le=14, description="RandAugment: operations applied to each image (N).")
    randaugment_magnitude: int = Field(
        9, ge=0, le=30, description="RandAugment: magnitude bin (M) of every operation, 0..30."
    )
    random_erasing: float = Field(
        0.0, ge=0, le=1, description="Probability of erasing a random box (2-33% of the image) in each training image."
    )
    mixup: float = Field(0.0, ge=0, description="Mixup's Beta(alpha, alpha) parameter; 0: off.")
    cutmix: float = Field(
        0.0, ge=0, description="CutMix's Beta(alpha, alpha) parameter; 0: off. With mixup too: one of the two per batch."
    )
    ema: float = Field(
        0.0, ge=0, lt=1, description="Decay of an exponential moving average of the weights, kept on the device "
        "(0: off). When on, validation, test, best and last use the averaged weights.",
    )  # fmt: skip
    accum_steps: int = Field(
        1, ge=1, description="Batches whose gradients make one optimisation step (the schedule counts those steps)."
    )
    clip_grad: float = Field(0.0, ge=0, description="Clip the gradients' global L2 norm to this (0: off).")
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="'balanced': weigh each class's loss by the inverse of its training frequency."
    )
    normalize: bool = Field(True, description="Standardise inputs with the dataset's mean/std (else only scale to 0..1).")
    init: Literal["default", "xavier"] = Field(
        "default", description="Weight initialisation: the model's own, or d2l's Xavier-uniform."
    )

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_from_bool(cls, value: Any) -> Any:
        """Config files and runs from before the augmentation modes said augment = true / false."""
        if isinstance(value, bool):
            return "crop-flip" if value else "none"
        return value


HYPERPARAMETER_KEYS: tuple[str, ...] = tuple(Hyperparameters.model_fields)
"""The config keys a recipe fills (a file or the command line may still override each)."""

FINETUNE_LR_FACTOR = 0.1
"""The ``finetune`` recipe's peak learning rate, as a share of the default recipe's."""
FINETUNE_WARMUP = 0.5
"""The ``finetune`` recipe's warm-up, in epochs."""


class Recipe(Hyperparameters):
    """How a model trains by default (``--recipe default``), and what the seed used (``--recipe d2l``).

    A model spec's recipe is used exactly as written. The ``d2l`` recipe is derived from it: the
    same epochs and batch, the seed's input size, optimiser and learning rate, and nothing else
    (no momentum, weight decay, schedule, smoothing, augmentation, mixing, EMA, clipping or
    normalisation; Xavier init).
    The ``finetune`` recipe too: the default one with a tenth of its peak rate, a short warm-up
    (half an epoch, whatever the schedule) and the model's own initialisation (no Xavier).
    ``per_dataset`` changes the recipe on a named dataset before any of them is derived.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed_lr: float | None = Field(
        None, gt=0, description="Learning rate of the seed's (d2l) recipe; None: the same as lr."
    )
    seed_optimizer: Literal["sgd", "adamw"] = Field("sgd", description="Optimiser of the seed's (d2l) recipe.")
    seed_input_size: int | None = Field(None, gt=0, description="Input size of the seed's recipe; None: input_size.")
    per_dataset: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "Changes on the dataset of that name, e.g. {'coil20': {'input_size': 48}}; all three recipes derive from them."))

    @model_validator(mode="after")
    def _changes_valid(self) -> Recipe:
        """A typo or a bad value in ``per_dataset`` fails where the spec is built, naming the key."""
        for dataset in self.per_dataset:
            self.on(dataset)
        return self

    def on(self, dataset: str | None) -> Recipe:
        """This recipe as it trains on ``dataset``: its ``per_dataset`` changes applied (itself when none)."""
        changes = self.per_dataset.get(dataset or "")
        return Recipe(**{**self.model_dump(exclude={"per_dataset"}), **changes}) if changes else self

    def named(self, name: str) -> Hyperparameters:
        """The hyperparameters of recipe ``name`` (one of :data:`RECIPE_NAMES`)."""
        if name not in RECIPE_NAMES:
            raise ValueError(f"recipe {name!r} is not one of {', '.join(RECIPE_NAMES)}")
        own = {key: getattr(self, key) for key in HYPERPARAMETER_KEYS}
        if name == "default":
            return Hyperparameters(**own)
        if name == "finetune":
            return Hyperparameters(**{**own, "lr": self.lr * FINETUNE_LR_FACTOR, "warmup": FINETUNE_WARMUP,
                                      "init": "default"})  # fmt: skip
        return Hyperparameters(
            epochs=self.epochs, batch_size=self.batch_size, input_size=self.seed_input_size or self.input_size,
            optimizer=self.seed_optimizer, lr=self.seed_lr or self.lr, momentum=0.0, nesterov=False,
            weight_decay=0.0, schedule="constant", warmup=0.0, label_smoothing=0.0, augment="none",
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


def model_head(spec: object) -> str | None:
    """Where a model spec's head is: its optional ``head`` attribute, a dotted submodule path of the
    built module (``fc``, ``classifier``, ``head``, ``12``) holding the layers after the feature
    extractor, the last of which maps to the classes. ``None`` when the spec does not say (it is not
    a protocol member, so specs written before it still load); then ``--freeze backbone`` and
    ``--head-lr-mult`` refuse the model, and a class-count change replaces only the layers whose
    outputs are the classes."""
    head = getattr(spec, "head", None)
    return head if isinstance(head, str) and head else None


@dataclass
class ImageTensors:
    """One split held in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    mapped: bool = False
    """True when ``images`` is memory-mapped from a file (a store larger than memory): loaders then
    read the next chunk of batches in a background thread."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DatasetSplits:
    """A loaded dataset: its splits (train, test, and val when it has one), the class names and where
    the files were found."""

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
    val: ImageTensors | None = None
    """The validation split, when the dataset has one (image folders' val/ or their seeded carve-out);
    None: the run carves its own from train when it needs one."""

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


REQUIRED_METRICS = ("train_loss", "train_acc")
"""What a trainer reports for every epoch besides what ``run.evaluate`` returns (``val_loss`` and
``val_acc``; ``test_loss`` and ``test_acc`` too with ``--test-every-epoch``); ``lr``,
``examples_per_s`` and ``epoch_seconds`` are filled in by the run when a trainer leaves them out."""


@dataclass(frozen=True)
class RunResult:
    """What a fit returns: where the run is and how it went."""

    run_dir: Path
    history: list[dict[str, float]]
    """One metrics row per completed epoch (what metrics.csv holds)."""
    best_acc: float
    best_epoch: int
    examples_per_s: float
    """Training examples per second over the whole run (d2l's figure)."""
    device: str
    stopped_early: bool

    @property
    def final(self) -> dict[str, float]:
        """The last epoch's metrics."""
        return self.history[-1] if self.history else {}


class Batches(Protocol):
    """What ``run.loader(split)`` returns: batches prepared on the run's device."""

    @property
    def num_examples(self) -> int:
        """Examples one epoch yields over all processes (the split, less a dropped last batch)."""
        ...


    def __len__(self) -> int:
        """Batches per epoch (optimisation steps per epoch for the training split)."""
        ...

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` of ``epoch``: float32 (B, C, S, S) resized, normalised and (train,
        if the config says so) augmented; int64 labels, except for training batches with ``mixup``
        or ``cutmix`` on: then float32 (B, num_classes) probabilities (``F.cross_entropy`` takes
        either; ``labels.argmax(1)`` is each image's larger share). The order and augmentation depend only on
        (seed, epoch), so a resumed run sees the same batches."""
        ...

    def part_weight(self, index: int, size: int) -> float:
        """How much this process's ``size`` examples of batch ``index`` weigh in the global batch's
        mean loss: 1.0 except in an uneven last batch of a multi-process run. Multiply the loss
        by it when it is not 1 (DDP averages the processes' gradients)."""
        ...


@runtime_checkable
class TrainingRun(Protocol):
    """The run as a trainer sees it: everything ``Trainer.fit`` may use, and nothing else.

    The driver owns it and has already built the model (on ``device``), loaded the data, made the
    run directory, restored the weights and RNG of a resumed run, and attached every handler
    (progress, log, metrics.csv, curves, checkpoints, early stopping, TensorBoard) to its events.
    """

    device: torch.device
    """Where the model and the batches are (``cpu``, ``cuda:0``, ...)."""
    options: BaseModel
    """The trainer's own options (``-t key=value``), validated by its ``options`` model."""
    amp_dtype: torch.dtype | None
    """``torch.bfloat16`` or ``torch.float16`` when mixed precision is on for this run
    (``--amp``, default on CUDA), ``None`` when it is off: run the forward pass under
    ``torch.autocast(device.type, dtype=amp_dtype)`` only when it is not None, and use a GradScaler
    only for float16."""
    @property
    def resumed(self) -> bool:
        """True when this run continues a saved one (``--resume``, or torchrun restarting the job):
    the weights, RNG and (at :meth:`start`) optimiser and trainer state are already restored."""
        ...

    @property
    def rank(self) -> int:
        """This process's index in a job of several processes (torchrun, ``--nproc``); 0 when alone.
    Only rank 0 writes files and prints; every rank must take every step."""
        ...

    @property
    def first_epoch(self) -> int:
        """The first epoch :meth:`epochs` yields: 1 for a fresh run, the saved epoch + 1 when resumed."""
        ...

    @property
    def epoch(self) -> int:
        """The epoch being trained, 1-based (0 before the first); after it completes, epochs done."""
        ...

    inference_model: nn.Module | None
    """The module whose weights are the run's result, when it is not the one being trained (an
    exponential moving average of the weights): ``best`` and ``last`` save it and the end-of-run
    test evaluates it. ``None`` (the default): the trained model itself. Set it before the first
    ``epoch_completed``; pass it to :meth:`evaluate` too."""
    step: int
    """Optimisation steps since the run began, across resumes (the schedule's clock). The trainer
    advances it by one per optimiser step; it is saved with every epoch."""
    lr: float
    """The learning rate of the last step; set it when you set the optimiser's (it goes into the
    metrics row and the progress line). NaN before the first step."""

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimiser the config names (``optimizer``, ``lr``, ``momentum``, ``nesterov``,
        ``weight_decay``: decay on weights and kernels, never on biases or norms)."""
        ...

    def lr_schedule(self, steps_per_epoch: int) -> Callable[[int], float]:
        """``step -> learning rate`` of the config's ``schedule`` and ``warmup`` over
        ``epochs * steps_per_epoch`` optimisation steps (a pure function of ``step``, so resuming
        needs nothing else). Set every parameter group's ``lr`` to ``lr_at(run.step)`` before a step."""
        ...

    def start(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Call once, before :meth:`epochs`, after making your optimiser and any state of your own:
        registers the optimiser (its state is checkpointed every epoch) and, when resumed, loads the
        saved optimiser state and calls the trainer's ``load_state_dict`` with what its
        ``state_dict`` returned at the saved epoch."""
        ...

    def epochs(self) -> Iterator[int]:
        """The epochs still to train, from :attr:`first_epoch` to ``config.epochs`` (1-based),
        emitting EPOCH_STARTED before each; stops after an epoch in which early stopping asked to."""
        ...

    def loader(self, split: Literal["train", "val", "test"]) -> Batches:
        """Batches of ``split`` at the config's input size and normalisation, this process's part of
        each global batch of ``config.batch_size`` (val and test in batches twice that size)."""
        ...

    def iteration_completed(self, seen: int, loss: float) -> None:
        """Mid-epoch progress: ``seen`` training examples this process has trained on so far this
        epoch, ``loss`` their mean training loss. Call it now and then (every second or so), not
        every step: reading ``loss`` syncs the device. A non-finite loss ends the run (exit 5)."""
        ...

    def evaluate(self, net: nn.Module, loader: Batches | None = None) -> dict[str, float]:
        """``{"val_loss": mean cross-entropy, "val_acc": top-1 in 0..1}`` of ``net`` on the val split
        (eval mode, no gradients, under AMP when on, over all processes); with
        ``--test-every-epoch`` also ``test_loss`` and ``test_acc``; empty when the run has no val
        split and no test every epoch. ``loader`` is ignored (earlier versions took the test loader)."""
        ...

    def epoch_completed(self, metrics: Mapping[str, float], examples: int | None = None) -> None:
        """Record the epoch: ``metrics`` holds at least :data:`REQUIRED_METRICS` (losses are means,
        accuracies in 0..1, this process's figures: the run averages them over processes); it may
        add ``lr``, ``examples_per_s``, ``epoch_seconds``. ``examples``: training examples this
        process saw in the epoch (default: the last report's, else its part of the split). Emits
        EPOCH_COMPLETED, on which checkpoints, metrics.csv, curves, log and early stopping act."""
        ...

    def result(self) -> RunResult:
        """What ``fit`` returns."""
        ...


@runtime_checkable
class Trainer(Protocol):
    """Fits a model to a dataset; the run driver does everything around the fit.

    A trainer only trains: it builds its optimiser (``run.build_optimizer``), calls
    ``run.start(optimizer)``, iterates ``run.epochs()``, reports each epoch with
    ``run.epoch_completed(metrics)`` and returns ``run.result()``. A fresh trainer object is made for
    every run (an entry point names the class).

    Optional: a trainer with state of its own (an EMA of the weights, a GradScaler, a counter)
    defines ``state_dict() -> dict`` and ``load_state_dict(state: dict) -> None``. The state is
    saved with every epoch into ``state.safetensors`` (tensors as safetensors, everything else as
    JSON: a tree of dicts with string keys, lists, tensors, numbers, strings and None; never pickle)
    and handed back to ``load_state_dict`` by ``run.start`` when the run is resumed.
    """

    name: str
    """Registered name, e.g. ``standard``."""
    summary: str
    """One line shown by ``cnnkit list trainers --long``."""
    options: type[BaseModel]
    """Pydantic model (``extra="forbid"``) of the trainer's own options (``-t key=value``); the
    validated instance is ``run.options``."""

    def fit(self, model: nn.Module, data: DatasetSplits, config: Any, run: TrainingRun) -> RunResult:
        """Train ``model`` (already on ``run.device``, wrapped in DDP when several processes train) on
        ``data.train`` under ``config`` (a ``cnnkit.config.TrainConfig``), evaluating on ``data.test``
        each epoch; resuming is the driver's job (``run.start`` restores the saved point)."""
        ...
