"""The two recipes every model can be trained with: ``d2l`` (the seed's) and ``default`` (cnnkit's).

``d2l`` reproduces the d2l notebooks exactly: Xavier-uniform conv/linear weights, fixed-lr SGD
without momentum, the model's own learning rate, batch size and input size (``spec.recipe``), no
augmentation and inputs only scaled to 0..1.

``default`` is what ``cnnkit train MODEL`` uses and must beat ``d2l`` in the same 10 epochs. Its
values are per family; only lenet and lenet_bn are verified on Fashion-MNIST on a CPU (see
README), the others are unverified starting points chosen by the usual rules: SGD with Nesterov
momentum (lr 0.1 with BatchNorm, 0.01 without), one-cycle or cosine with warm-up, label smoothing
0.1, weight decay 5e-4, batch augmentation for the large models, normalised inputs. A plugin model
cnnkit has no entry for gets AdamW with cosine and warm-up, which tolerates unknown architectures.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RECIPES", "DEFAULTS", "VERIFIED", "recipe_values"]

RECIPES = ("default", "d2l")

_SGD: dict[str, Any] = {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
_LARGE: dict[str, Any] = {
    **_SGD, "schedule": "onecycle", "warmup": 0.0, "label_smoothing": 0.1,
    "augment": True, "normalize": True, "init": "default",
}  # fmt: skip

DEFAULTS: dict[str, dict[str, Any]] = {
    # Sigmoid LeNet trains slowly under plain SGD; AdamW with one-cycle gets it moving at once.
    "lenet": {
        "optimizer": "adamw", "lr": 0.01, "momentum": 0.0, "nesterov": False, "weight_decay": 0.01,
        "schedule": "onecycle", "warmup": 0.0, "label_smoothing": 0.0, "augment": False,
        "normalize": True, "init": "xavier",
    },
    "lenet_bn": {
        **_SGD, "lr": 0.2, "schedule": "onecycle", "warmup": 0.0, "label_smoothing": 0.0,
        "augment": False, "normalize": True, "init": "default",
    },
    # Without BatchNorm the large models need a lower peak and a warm-up to stay finite.
    "alexnet": {**_LARGE, "lr": 0.01},
    "vgg11": {**_LARGE, "lr": 0.01},
    "vgg16": {**_LARGE, "lr": 0.01},
    "nin": {**_LARGE, "lr": 0.01},
    "googlenet": {**_LARGE, "lr": 0.01},
    "resnet18": {**_LARGE, "lr": 0.1},
    "resnet50": {**_LARGE, "lr": 0.1},
    "densenet": {**_LARGE, "lr": 0.1},
    "densenet121": {**_LARGE, "lr": 0.1},
}  # fmt: skip
"""cnnkit's own hyperparameters per registered model (the ``default`` recipe)."""

VERIFIED = ("lenet", "lenet_bn")
"""Models whose ``default`` recipe was measured to beat ``d2l`` (the rest need a GPU to check)."""

_GENERIC: dict[str, Any] = {
    "optimizer": "adamw", "lr": 1e-3, "momentum": 0.0, "nesterov": False, "weight_decay": 0.05,
    "schedule": "cosine", "warmup": 1.0, "label_smoothing": 0.1, "augment": False,
    "normalize": True, "init": "default",
}  # fmt: skip


def recipe_values(model: str, recipe: str = "default") -> dict[str, Any]:
    """The config keys the named recipe fills for ``model`` (an unknown model is a UsageError)."""
    from cnnkit.registry import MODELS

    seed = MODELS.get(model).recipe
    shared = {"epochs": seed.epochs, "batch_size": seed.batch_size, "input_size": seed.input_size}
    if recipe == "d2l":
        return {
            **shared, "recipe": "d2l", "lr": seed.lr, "optimizer": "sgd", "momentum": 0.0,
            "nesterov": False, "weight_decay": 0.0, "schedule": "constant", "warmup": 0.0,
            "label_smoothing": 0.0, "augment": False, "normalize": False, "init": "xavier",
        }  # fmt: skip
    return {**shared, "recipe": "default", **DEFAULTS.get(model, _GENERIC)}
