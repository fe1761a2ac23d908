"""A whole training run from a config: data, model, run directory, trainer (what ``cnnkit train`` calls).

:func:`train` starts a new run, :func:`resume` continues a saved one. Both return the trainer's
:class:`~cnnkit.training.trainer.RunResult`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.config import RESUMABLE_KEYS, TrainConfig
from cnnkit.errors import UsageError
from cnnkit.protocols import DatasetSplits
from cnnkit.training.trainer import RunResult

__all__ = ["train", "resume", "prepare", "build_model", "next_run_dir", "typed_options"]


def typed_options(config: TrainConfig) -> TrainConfig:
    """The config with model and dataset options validated and typed (``"0.25"`` -> ``0.25``)."""
    from cnnkit.options import parse_options
    from cnnkit.registry import DATASETS, MODELS

    model_schema = MODELS.get(config.model).options
    model_options = parse_options(config.model, model_schema, config.model_options).model_dump()
    dataset_schema = DATASETS.get(config.dataset).options
    dataset_options = parse_options(
        config.dataset, dataset_schema, config.dataset_options, kind="dataset"
    ).model_dump()
    return config.model_copy(
        update={
            # Keep only what was given, so config.json shows choices, not every default.
            "model_options": {k: model_options[k] for k in config.model_options},
            "dataset_options": {k: dataset_options[k] for k in config.dataset_options},
        }
    )


def build_model(config: TrainConfig, data: DatasetSplits) -> nn.Module:
    """A freshly initialised model for ``data``: seeded, with d2l's Xavier init when asked."""
    from cnnkit.registry import MODELS
    from cnnkit.training.optim import xavier_init

    torch.manual_seed(config.seed)
    model = MODELS.get(config.model).build(data.channels, len(data.classes), **config.model_options)
    if config.init == "xavier":
        xavier_init(model)
    return model


def prepare(config: TrainConfig) -> tuple[nn.Module, DatasetSplits]:
    """Load the dataset and build the model the config names."""
    from cnnkit.data import load_dataset

    data = load_dataset(config.dataset, config.data, **config.dataset_options)
    return build_model(config, data), data


def next_run_dir(runs_dir: str | Path, model: str, dataset: str) -> Path:
    """``runs_dir/<model>-<dataset>/<N>`` for the next free N, created (safe against parallel runs)."""
    parent = Path(runs_dir) / f"{model.replace(':', '-')}-{dataset}"
    parent.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name) for p in parent.iterdir() if p.name.isdigit()]
    number = max(taken, default=0) + 1
    while True:
        try:
            (parent / str(number)).mkdir()
            return parent / str(number)
        except FileExistsError:  # another run took it between the listing and the mkdir
            number += 1


def _fit(config: TrainConfig, run_dir: Path, resume: bool) -> RunResult:
    from cnnkit.device import resolve_device
    from cnnkit.registry import TRAINERS

    # Reject a missing GPU before spending time on the data.
    resolve_device(config.device)
    model, data = prepare(config)
    trainer = TRAINERS.get(config.trainer)
    config = config.model_copy(update={"out": str(run_dir)})
    if resume:
        return trainer.fit(model, data, config, run_dir=run_dir, resume=True)  # type: ignore[call-arg]
    return trainer.fit(model, data, config)


def train(config: TrainConfig) -> RunResult:
    """Start a new run in ``config.out`` (which must not hold a run) or the next numbered run directory."""
    config = typed_options(config)
    if config.data is not None:
        # Absolute, so that --resume and the saved config work from any working directory.
        config = config.model_copy(update={"data": str(Path(config.data).expanduser().resolve())})
    if config.out is not None:
        run_dir = Path(config.out)
        if (run_dir / "config.json").exists():
            raise UsageError(
                f"--out {run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out"
            )
    else:
        from cnnkit.device import resolve_device

        resolve_device(config.device)  # no empty run directory for a device that is not there
        run_dir = next_run_dir(config.runs_dir, config.model, config.dataset)
    return _fit(config, run_dir, resume=False)


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The config a run directory was trained with (its ``config.json``)."""
    file = Path(run_dir) / "config.json"
    if not file.is_file():
        raise UsageError(f"--resume {run_dir}: no config.json there; pass the folder of a cnnkit run")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
        return TrainConfig.model_validate(record["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--resume {run_dir}: {file} is not a cnnkit run config ({type(exc).__name__})") from exc


def resume(run_dir: str | Path, overrides: Mapping[str, Any] | None = None) -> RunResult:
    """Continue the run in ``run_dir`` from its last completed epoch; only RESUMABLE_KEYS may change."""
    folder = Path(run_dir)
    config = read_run_config(folder)
    changed = sorted(set(overrides or {}) - set(RESUMABLE_KEYS))
    if changed:
        raise UsageError(
            f"--resume continues the saved run as it was; {', '.join(changed)} cannot change "
            f"(only {', '.join(RESUMABLE_KEYS)} can); start a new run to change them"
        )
    # Quietness belongs to the terminal at hand, not to the run: it is not inherited.
    values = {**config.model_dump(), "quiet": False, **dict(overrides or {}), "out": str(folder)}
    config = TrainConfig.model_validate(values)
    return _fit(config, folder, resume=True)
