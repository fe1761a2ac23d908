"""``Architecture``: the ModelSpec every built-in family file instantiates (plugins may too)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from cnnkit.errors import UsageError
from cnnkit.options import parse_options
from cnnkit.protocols import Recipe

__all__ = ["Architecture", "NoOptions", "sgd_recipe"]

O = TypeVar("O", bound=BaseModel)
M = TypeVar("M", bound=nn.Module)


class NoOptions(BaseModel):
    """For architectures with no hyperparameters to set."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Architecture(Generic[O]):
    """A registered architecture: metadata, the seed recipe, a builder ``(c, k, options) -> Module``
    and where the built module's head is (``head``: a dotted submodule path such as ``fc``; see
    :func:`cnnkit.protocols.model_head`)."""

    name: str
    summary: str
    paper: str
    recipe: Recipe
    options: type[O]
    builder: Callable[[int, int, O], nn.Module]
    head: str | None = None

    def build(self, in_channels: int = 1, num_classes: int = 10, **options: Any) -> nn.Module:
        """A freshly initialised model; unknown or invalid options raise ``UsageError``."""
        if in_channels < 1 or num_classes < 1:
            raise UsageError(
                f"model '{self.name}' needs in_channels >= 1 and num_classes >= 1, "
                f"got {in_channels} and {num_classes}"
            )
        return self.builder(in_channels, num_classes, parse_options(self.name, self.options, options))


def sgd_recipe(input_size: int, lr: float, seed_lr: float, **changes: Any) -> Recipe:
    """The default recipe of the large built-ins: Nesterov SGD with one-cycle, weight decay 5e-4,
    label smoothing 0.1, batch augmentation and normalised inputs; ``seed_lr`` is d2l's rate.

    Without BatchNorm the large models need the lower peak (0.01) to stay finite; with it, 0.1.
    ``changes`` set any other field (a LeNet changes several).
    """
    values: dict[str, Any] = dict(
        input_size=input_size, batch_size=128, epochs=10, optimizer="sgd", lr=lr, momentum=0.9, nesterov=True,
        weight_decay=5e-4, schedule="onecycle", warmup=0.0, label_smoothing=0.1, augment=True, normalize=True,
        init="default", seed_lr=seed_lr, seed_optimizer="sgd",
    )  # fmt: skip
    return Recipe(**{**values, **changes})


def fc_classifier(in_features: int, num_classes: int, dropout: float, hidden: int = 4096) -> nn.Sequential:
    """AlexNet's and VGG's head: flatten, two ReLU hidden layers of ``hidden`` units with dropout."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )  # fmt: skip


def init_relu_cnn(model: M, mode: Literal["fan_in", "fan_out"] = "fan_out") -> M:
    """torchvision's VGG initialisation: He (``mode``) for ReLU convolutions, unit BatchNorm, and a
    small Gaussian for linear layers so that the initial logits start near zero."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode=mode, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)
    return model
