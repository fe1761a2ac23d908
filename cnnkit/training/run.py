"""The run driver: everything around a fit, done once, for any trainer (built-in or plugin).

:func:`train` starts a new run and :func:`resume` continues a saved one. Both go through
:func:`_drive`, which in order:

1. validates the model, dataset and trainer options and the device, loads the data and builds the
   model: every mistake is reported before anything is written;
2. creates the run directory (the next free ``runs/<model>-<dataset>/<N>`` or ``--out``);
3. seeds (or restores the saved weights and RNG states), sets determinism, catches Ctrl-C;
4. attaches the handlers (progress, log.txt, metrics.csv, curves.png, checkpoints, early
   stopping, TensorBoard) to the events of a :class:`~cnnkit.training.context.Run`;
5. calls ``trainer.fit(model, data, config, run)`` on a fresh trainer object;
6. turns Ctrl-C into exit 130 and a non-finite loss into exit 5, and removes a run directory that
   failed before its first epoch was saved (it would hold nothing to evaluate or resume).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.checkpoint import WeightsMeta, provider_of
from cnnkit.config import RESUMABLE_KEYS, TrainConfig
from cnnkit.errors import CnnkitError, InterruptedRun, UsageError
from cnnkit.protocols import DatasetSplits
from cnnkit.training.context import Run, RunResult
from cnnkit.training.events import Events, Handler
from cnnkit.training.state import STATE_NAME, TrainerState, load_state, restore_rng

__all__ = ["train", "resume", "prepare", "build_model", "next_run_dir", "typed_options", "read_run_config"]


def typed_options(config: TrainConfig) -> TrainConfig:
    """The config with model, dataset and trainer options validated and typed (``"0.25"`` -> ``0.25``)."""
    from cnnkit.options import parse_options
    from cnnkit.registry import DATASETS, MODELS, TRAINERS

    def typed(name: str, schema: Any, given: dict[str, Any], kind: str) -> dict[str, Any]:
        values = parse_options(name, schema, given, kind=kind).model_dump()
        # Keep only what was given, so config.json shows choices, not every default.
        return {key: values[key] for key in given}

    return config.model_copy(
        update={
            "model_options": typed(config.model, MODELS.get(config.model).options, config.model_options, "model"),
            "dataset_options": typed(
                config.dataset, DATASETS.get(config.dataset).options, config.dataset_options, "dataset"
            ),
            "trainer_options": typed(
                config.trainer, TRAINERS.get(config.trainer).options, config.trainer_options, "trainer"
            ),
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


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the device has it, else fp16 (with a GradScaler); None: full precision."""
    if not (config.amp if config.amp is not None else device.type == "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@contextlib.contextmanager
def _first_ctrl_c_only() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt once; repeats while the run stops and exits are ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[bool] = []

    def on_sigint(signum: int, frame: Any) -> None:
        if not pressed:
            pressed.append(True)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _determinism(on: bool, device: torch.device) -> Iterator[None]:
    """torch.use_deterministic_algorithms for the run only; cudnn.benchmark otherwise (on CUDA)."""
    was = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    # Only when it changes: the call imports torch._inductor, seconds of start-up on a CPU.
    if on != was[0]:
        torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not on
    try:
        yield
    finally:
        if on != was[0]:
            torch.use_deterministic_algorithms(was[0])
        torch.backends.cudnn.benchmark = was[1]


def _weights_meta(config: TrainConfig, data: DatasetSplits) -> WeightsMeta:
    distribution, version = provider_of(config.model)
    return WeightsMeta(
        model=config.model, model_options=dict(config.model_options), in_channels=data.channels,
        num_classes=len(data.classes), input_size=config.input_size, classes=list(data.classes),
        dataset=config.dataset, dataset_options=dict(config.dataset_options), data=str(data.source.resolve()),
        mean=list(data.mean) if config.normalize else None, std=list(data.std) if config.normalize else None,
        model_distribution=distribution, model_distribution_version=version,
    )  # fmt: skip


def _drive(
    config: TrainConfig, folder: Path | None, saved: TrainerState | None, data: DatasetSplits | None,
    handlers: Iterable[tuple[Events, Handler]],
) -> RunResult:  # fmt: skip
    from cnnkit.device import resolve_device
    from cnnkit.options import parse_options
    from cnnkit.registry import TRAINERS
    from cnnkit.training.events import EventBus, default_handlers

    # 1. Everything that can be wrong with the request, before anything is written.
    device = resolve_device(config.device)
    trainer = TRAINERS.get(config.trainer)  # a fresh object per run
    options = parse_options(config.trainer, trainer.options, config.trainer_options, kind="trainer")
    if data is None:
        model, data = prepare(config)
    else:
        model = build_model(config, data)
    features = default_handlers(config)
    # 2. The run directory.
    created = folder is None or not folder.exists()
    if folder is None:
        folder = next_run_dir(config.runs_dir, config.model, config.dataset)
    folder.mkdir(parents=True, exist_ok=True)
    config = config.model_copy(update={"out": str(folder)})
    # 3. The weights and RNG: restored from the resume point, or seeded.
    if saved is not None:
        model.load_state_dict(saved.model)
    model.to(device)
    run = Run(
        config, folder, model, data, device, options, EventBus(), _weights_meta(config, data),
        amp_dtype=_amp_dtype(config, device), resume_from=saved,
    )  # fmt: skip
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    if saved is not None:
        run.epoch, run.step, run.history = saved.epoch, saved.step, list(saved.history)
        run.best_acc, run.best_epoch, run.saved_epoch = saved.best_acc, saved.best_epoch, saved.epoch
    # 4. The handlers.
    for feature in features:
        for event, handler in feature.attach():
            run.events.on(event, handler)
    for event, handler in handlers:
        run.events.on(event, handler)
    with _determinism(config.deterministic, device), _first_ctrl_c_only():
        try:
            if saved is not None:
                restore_rng(saved.rng)
            else:
                torch.manual_seed(config.seed)  # dropout draws from the global generator
            run.emit(Events.STARTED)
            # 5. The fit.
            result = trainer.fit(model, data, config, run)
        except KeyboardInterrupt:
            # 6. Ctrl-C: the files on disk already hold the last completed epoch; nothing is
            # half-written, so the exit is immediate and honest about what was kept.
            run.error = InterruptedRun(_interrupted_message(run, created))
            run.emit(Events.INTERRUPTED)
            _discard_if_empty(run, created)
            raise run.error from None
        except CnnkitError as exc:
            run.error = exc
            run.emit(Events.FAILED)
            _discard_if_empty(run, created)
            raise
        except BaseException:
            _discard_if_empty(run, created)
            raise
    run.emit(Events.COMPLETED)
    return result


def _interrupted_message(run: Run, created: bool) -> str:
    where = f"interrupted in epoch {run.epoch}"
    if run.saved_epoch == 0:
        if created:
            return f"{where}, before any epoch was saved; {run.run_dir} removed (start again to train)"
        return f"{where}, before any epoch was saved; continue with: cnnkit train --resume {run.run_dir}"
    return (
        f"{where}; {run.run_dir / 'last.safetensors'} holds epoch {run.saved_epoch}; "
        f"continue from the end of epoch {run.saved_epoch} with: cnnkit train --resume {run.run_dir}"
    )


def _discard_if_empty(run: Run, created: bool) -> None:
    """A run directory this call created that holds no saved epoch is noise: remove it."""
    if created and run.saved_epoch == 0:
        shutil.rmtree(run.run_dir, ignore_errors=True)


def train(
    config: TrainConfig, *, data: DatasetSplits | None = None, handlers: Iterable[tuple[Events, Handler]] = ()
) -> RunResult:
    """Start a new run in ``config.out`` (which must not hold a run) or the next numbered run directory.

    ``data``: train on these splits instead of loading ``config.dataset`` (tests, notebooks);
    ``handlers``: extra ``(event, handler)`` pairs, called after cnnkit's own.
    """
    config = typed_options(config)
    if config.data is not None:
        # Absolute, so that --resume, eval and the saved config work from any working directory.
        config = config.model_copy(update={"data": str(Path(config.data).expanduser().resolve())})
    folder = None
    if config.out is not None:
        folder = Path(config.out)
        if (folder / "config.json").exists():
            raise UsageError(
                f"--out {folder} already holds a run; continue it with --resume {folder} or pick another --out"
            )
    return _drive(config, folder, None, data, handlers)


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


def resume(
    run_dir: str | Path, overrides: Mapping[str, Any] | None = None, *, data: DatasetSplits | None = None,
    handlers: Iterable[tuple[Events, Handler]] = (),
) -> RunResult:  # fmt: skip
    """Continue the run in ``run_dir`` from its last saved epoch; only RESUMABLE_KEYS may change.

    A run killed before it saved its first epoch has no resume point; it starts again from the
    beginning in the same directory.
    """
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
    saved = load_state(folder / STATE_NAME) if (folder / STATE_NAME).exists() else None
    if saved is not None and saved.epoch >= config.epochs:
        raise UsageError(
            f"{folder} has already trained {saved.epoch} of {config.epochs} epochs; "
            f"pass --epochs N with N > {saved.epoch} to train it longer"
        )
    return _drive(config, folder, saved, data, handlers)
