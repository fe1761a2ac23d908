"""What a run records about itself: the environment config.json keeps (versions, device, processes,
the distributions that provided its model, dataset and trainer, its data) and the metadata every
weights file carries."""

from __future__ import annotations

import contextlib
import platform
from typing import Any

import torch

from cnnkit._version import __version__
from cnnkit.checkpoint import WeightsMeta, provider_of
from cnnkit.config import TrainConfig
from cnnkit.errors import CnnkitError
from cnnkit.protocols import DatasetSplits
from cnnkit.training.strategy import Strategy

__all__ = ["environment", "weights_meta"]


def weights_meta(config: TrainConfig, data: DatasetSplits, validation: dict[str, Any] | None) -> WeightsMeta:
    """The template of the run's weights files' metadata (epoch and metrics are filled in per save)."""
    distribution, version = provider_of(config.model)
    dataset_distribution, dataset_version = provider_of(config.dataset, "dataset")
    return WeightsMeta(
        model=config.model, model_options=dict(config.model_options), in_channels=data.channels,
        num_classes=len(data.classes), input_size=config.input_size, classes=list(data.classes),
        dataset=config.dataset, dataset_options=dict(config.dataset_options), data=str(data.source.resolve()),
        mean=list(data.mean) if config.normalize else None, std=list(data.std) if config.normalize else None,
        model_distribution=distribution, model_distribution_version=version,
        dataset_distribution=dataset_distribution, dataset_distribution_version=dataset_version,
        validation={k: v for k, v in validation.items() if k != "indices"} if validation else None,
    )  # fmt: skip


def environment(config: TrainConfig, data: DatasetSplits, strategy: Strategy, amp: torch.dtype | None) -> dict:
    """What config.json records of where the run ran (and which distributions provided its parts)."""
    from cnnkit.registry import DATASETS, MODELS, TRAINERS

    plugins = sorted(
        {f"{e.distribution} {e.version}".strip() for r in (MODELS, DATASETS, TRAINERS) for e in r.entries().values()}
        - {f"cnnkit {__version__}"}
    )
    providers = {}
    for kind, registry, name in (("model", MODELS, config.model), ("dataset", DATASETS, config.dataset),
                                 ("trainer", TRAINERS, config.trainer)):  # fmt: skip
        with contextlib.suppress(CnnkitError):
            entry = registry.entry(name)
            providers[kind] = {"name": name, "distribution": entry.distribution, "version": entry.version or None}
    return {
        "cnnkit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(strategy.device),
        **strategy.environment(),
        "amp": str(amp).removeprefix("torch.") if amp else None,
        "plugins": plugins,
        "providers": providers,
        "dataset_source": str(data.source),
        "train_examples": len(data.train),
        "test_examples": len(data.test),
        "val_examples": len(data.val) if data.val is not None else 0,
        "classes": list(data.classes),
    }
