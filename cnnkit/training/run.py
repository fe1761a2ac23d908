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

Distributed (started by torchrun, or by ``--nproc N`` through torch's elastic launcher): every
process runs the same driver inside :func:`cnnkit.training.distributed.session`. Rank 0 alone
picks and creates the run directory (and tells the others), writes every file and prints; the
model is wrapped in DDP before the trainer gets it; each rank seeds its dropout differently. When
torchrun restarts the workers after a failure (``--max-restarts``), the run its first attempt
started (``--out``, or the run directory that recorded the same torchrun run id) is resumed.
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
from cnnkit.gpu import out_of_memory_as_usage_error
from cnnkit.protocols import DatasetSplits
from cnnkit.training import distributed
from cnnkit.training.context import Run, RunResult
from cnnkit.training.distributed import Topology
from cnnkit.training.events import Events, Handler
from cnnkit.training.state import STATE_NAME, TrainerState, check_resume_point, load_state, restore_rng

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
def _first_ctrl_c_only() -> Iterator[list[bool]]:
    """Ctrl-C raises KeyboardInterrupt once; repeats while the run stops and exits are ignored.

    Yields a list that is non-empty once Ctrl-C was pressed (a collective cut short by a peer that
    exited on the same Ctrl-C is then an interruption, not a failure)."""
    pressed: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if not pressed:
            pressed.append(True)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield pressed
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
        # On CUDA a few backward kernels (adaptive average pooling's among them) have no
        # deterministic version: torch warns there instead of failing the run.
        torch.use_deterministic_algorithms(on, warn_only=on and device.type == "cuda")
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


def _check_distributable(config: TrainConfig, topology: Topology) -> None:
    """What a distributed run needs of the config, checked before anything is written."""
    world = topology.world_size
    if world == 1:
        return
    if config.batch_size % world:
        below, above = config.batch_size // world * world, -(-config.batch_size // world) * world
        raise UsageError(
            f"--batch-size {config.batch_size} is the global batch and must divide evenly over {world} processes "
            f"(each takes batch / {world}); use {below or above} or {above}"
        )
    if config.sync_bn and topology.device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA (SyncBatchNorm has no CPU implementation); drop --sync-bn on the CPU")


def _drive(
    config: TrainConfig, folder: Path | None, saved: TrainerState | None, data: DatasetSplits | None,
    handlers: Iterable[tuple[Events, Handler]], topology: Topology,
) -> RunResult:  # fmt: skip
    from cnnkit.options import parse_options
    from cnnkit.registry import TRAINERS
    from cnnkit.training.events import EarlyStopping, EventBus, Feature, default_handlers

    # 1. Everything that can be wrong with the request, before anything is written.
    device = topology.device
    _check_distributable(config, topology)
    trainer = TRAINERS.get(config.trainer)  # a fresh object per run
    options = parse_options(config.trainer, trainer.options, config.trainer_options, kind="trainer")
    if data is None:
        model, data = prepare(config)
    else:
        model = build_model(config, data)
    if saved is not None and folder is not None:
        check_resume_point(folder, saved, model, data)  # the saved run still fits this data and model
    # Files and the console are rank 0's; every rank stops early on the same (reduced) metrics.
    features: list[Feature] = (
        list(default_handlers(config)) if topology.is_main
        else [EarlyStopping(config.patience)] if config.patience is not None else []
    )  # fmt: skip

    # 2. The run directory: rank 0 picks and creates it, and tells the other ranks.
    def make_run_dir() -> tuple[str, bool]:
        chosen = folder if folder is not None else next_run_dir(config.runs_dir, config.model, config.dataset)
        fresh = folder is None or not folder.exists()
        chosen.mkdir(parents=True, exist_ok=True)
        return str(chosen), fresh

    chosen, created = topology.from_rank0(make_run_dir)
    folder, created = Path(chosen), created and topology.is_main
    config = config.model_copy(update={"out": str(folder)})
    # 3. The weights and RNG: restored from the resume point, or seeded.
    if saved is not None:
        model.load_state_dict(saved.model)
    model.to(device)
    run = Run(
        config, folder, model, data, device, options, EventBus(), _weights_meta(config, data),
        amp_dtype=_amp_dtype(config, device), resume_from=saved, rank=topology.rank,
        world_size=topology.world_size, backend=topology.backend,
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
    if not topology.is_main:
        run.events.on(Events.EPOCH_COMPLETED, _mirror_rank0_save)
    for event, handler in handlers:
        run.events.on(event, handler)
    with _determinism(config.deterministic, device), _first_ctrl_c_only() as ctrl_c:
        try:
            if saved is not None:
                restore_rng(saved.rng)
                if topology.rank:  # the state holds rank 0's generator; the others draw their own
                    torch.manual_seed(config.seed + topology.rank + 7919 * saved.epoch)
            else:
                torch.manual_seed(config.seed + topology.rank)  # dropout draws from the global generator
            # DDP when distributed (its construction gives every rank rank 0's weights).
            net = distributed.wrap(model, topology, config.sync_bn)
            run.emit(Events.STARTED)
            # 5. The fit.
            with out_of_memory_as_usage_error(batch_size=config.batch_size, model=config.model, device=device):
                result = trainer.fit(net, data, config, run)
        except KeyboardInterrupt:
            # 6. Ctrl-C: the files on disk already hold the last completed epoch; nothing is
            # half-written, so the exit is immediate and honest about what was kept.
            _interrupted(run, created, topology)
        except CnnkitError as exc:
            _failed(run, created, topology, exc)
            raise
        except Exception as exc:
            if not (topology.distributed and distributed.is_peer_failure(exc)):
                _discard_if_empty(run, created)
                raise
            if ctrl_c:  # the peers stopped on the same Ctrl-C
                _interrupted(run, created, topology)
            lost = distributed.peer_lost(topology, exc)
            _failed(run, created, topology, lost)
            raise lost from None
        except BaseException:
            _discard_if_empty(run, created)
            raise
    run.emit(Events.COMPLETED)
    return result


def _mirror_rank0_save(run: Run) -> None:
    """On ranks > 0: the epoch rank 0's checkpointer has just saved (for the Ctrl-C message)."""
    run.saved_epoch = run.epoch


def _interrupted(run: Run, created: bool, topology: Topology) -> None:
    message = _interrupted_message(run, created)
    run.error = InterruptedRun(message) if topology.is_main else distributed.QuietInterrupt(message)
    run.emit(Events.INTERRUPTED)
    _discard_if_empty(run, created)
    raise run.error from None


def _failed(run: Run, created: bool, topology: Topology, exc: CnnkitError) -> None:
    if topology.rank and not exc.message.startswith(f"rank {topology.rank}:"):
        exc.message = f"rank {topology.rank}: {exc.message}"  # which process said it
    run.error = exc
    run.emit(Events.FAILED)
    _discard_if_empty(run, created)


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


def _launches(config: TrainConfig) -> bool:
    """True when this call must start ``config.nproc`` processes itself (``--nproc N``)."""
    if config.nproc is None:
        return False
    if distributed.under_torchrun():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if config.nproc != world:
            raise UsageError(
                f"--nproc {config.nproc} under torchrun, which started {world} processes; drop --nproc "
                "(torchrun's --nproc_per_node says how many)"
            )
        return False
    return config.nproc > 1


def _check_fresh(folder: Path) -> None:
    if (folder / "config.json").exists():
        raise UsageError(
            f"--out {folder} already holds a run; continue it with --resume {folder} or pick another --out"
        )


def _previous_attempt(config: TrainConfig) -> Path | None:
    """After torchrun restarted the workers: the run directory the first attempt started, if any."""
    if config.out is not None:
        folder = Path(config.out)
        return folder if (folder / "config.json").exists() else None
    run_id = distributed.elastic_run_id()
    parent = Path(config.runs_dir) / f"{config.model.replace(':', '-')}-{config.dataset}"
    if run_id is None or not parent.is_dir():
        return None
    for folder in sorted((p for p in parent.iterdir() if p.name.isdigit()), key=lambda p: -int(p.name)):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            if record["environment"].get("torchelastic_run_id") == run_id:
                return folder
    return None


def train(
    config: TrainConfig, *, data: DatasetSplits | None = None, handlers: Iterable[tuple[Events, Handler]] = ()
) -> RunResult:
    """Start a new run in ``config.out`` (which must not hold a run) or the next numbered run directory.

    ``data``: train on these splits instead of loading ``config.dataset`` (tests, notebooks);
    ``handlers``: extra ``(event, handler)`` pairs, called after cnnkit's own (on every rank of a
    distributed run). Under torchrun this is one process's share of the job; ``config.nproc`` > 1
    starts that many processes here and returns when they are done.
    """
    config = typed_options(config)
    if config.data is not None:
        # Absolute, so that --resume, eval and the saved config work from any working directory.
        config = config.model_copy(update={"data": str(Path(config.data).expanduser().resolve())})
    if _launches(config):
        return _launch_train(config, data, handlers)
    with distributed.session(config.device, config.dist_timeout) as topology:
        if topology.restarts:
            # torchrun restarted the job after a failure: continue what the first attempt started.
            previous = topology.from_rank0(lambda: _previous_attempt(config))
            if previous is not None:
                overrides = {key: getattr(config, key) for key in RESUMABLE_KEYS}
                return _resume_in(Path(previous), overrides, data, handlers, topology)
        folder = None
        if config.out is not None:
            folder = Path(config.out)
            topology.from_rank0(lambda: _check_fresh(folder))
        return _drive(config, folder, None, data, handlers, topology)


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


def _resume_config(folder: Path, overrides: Mapping[str, Any] | None) -> TrainConfig:
    config = read_run_config(folder)
    changed = sorted(set(overrides or {}) - set(RESUMABLE_KEYS))
    if changed:
        raise UsageError(
            f"--resume continues the saved run as it was; {', '.join(changed)} cannot change "
            f"(only {', '.join(RESUMABLE_KEYS)} can); start a new run to change them"
        )
    # Quietness belongs to the terminal at hand, not to the run, and so does the number of
    # processes (a run may continue on more or fewer): neither is inherited.
    values = {**config.model_dump(), "quiet": False, "nproc": None, **dict(overrides or {}), "out": str(folder)}
    return TrainConfig.model_validate(values)


def resume(
    run_dir: str | Path, overrides: Mapping[str, Any] | None = None, *, data: DatasetSplits | None = None,
    handlers: Iterable[tuple[Events, Handler]] = (),
) -> RunResult:  # fmt: skip
    """Continue the run in ``run_dir`` from its last saved epoch; only RESUMABLE_KEYS may change.

    A run killed before it saved its first epoch has no resume point; it starts again from the
    beginning in the same directory. A distributed run may continue with another number of
    processes (the global batch, and so every step, stays the same); under torchrun every rank
    reads the run directory, so on several nodes it must be on a shared filesystem.
    """
    folder = Path(run_dir)
    config = _resume_config(folder, overrides)
    if _launches(config):
        return _launch_resume(folder, dict(overrides or {}), data, handlers)
    with distributed.session(config.device, config.dist_timeout) as topology:
        return _resume_in(folder, overrides, data, handlers, topology)


def _resume_in(
    folder: Path, overrides: Mapping[str, Any] | None, data: DatasetSplits | None,
    handlers: Iterable[tuple[Events, Handler]], topology: Topology,
) -> RunResult:  # fmt: skip
    config = _resume_config(folder, overrides)
    saved = load_state(folder / STATE_NAME) if (folder / STATE_NAME).exists() else None
    if saved is not None and saved.epoch >= config.epochs:
        raise UsageError(
            f"{folder} has already trained {saved.epoch} of {config.epochs} epochs; "
            f"pass --epochs N with N > {saved.epoch} to train it longer"
        )
    return _drive(config, folder, saved, data, handlers, topology)


# -- --nproc N: this process starts the workers and waits ----------------------------------------


def _refuse_in_memory(data: DatasetSplits | None, handlers: Iterable[tuple[Events, Handler]]) -> None:
    if data is not None or list(handlers):
        raise UsageError(
            "nproc > 1 starts new processes, which cannot receive in-memory data or handlers; "
            "run under torchrun instead, or pass a dataset by name"
        )


def _launch_train(
    config: TrainConfig, data: DatasetSplits | None, handlers: Iterable[tuple[Events, Handler]]
) -> RunResult:
    import tempfile

    _refuse_in_memory(data, handlers)
    assert config.nproc is not None
    if config.out is not None:
        folder, created = Path(config.out), not Path(config.out).exists()
        _check_fresh(folder)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder, created = next_run_dir(config.runs_dir, config.model, config.dataset), True
    # The workers read the resolved config from a file: the same run, whatever the caller was.
    values = config.model_dump(mode="json") | {"nproc": None, "out": str(folder)}
    with tempfile.TemporaryDirectory(prefix="cnnkit-launch-") as scratch:
        file = Path(scratch) / "config.json"
        file.write_text(json.dumps(values), encoding="utf-8")
        try:
            distributed.launch(config.nproc, ["train", "--config", str(file)])
        except CnnkitError:
            if created and not (folder / STATE_NAME).exists():
                shutil.rmtree(folder, ignore_errors=True)  # nothing was saved: no empty run left behind
            raise
    return _result_from(folder)


def _launch_resume(
    folder: Path, overrides: dict[str, Any], data: DatasetSplits | None, handlers: Iterable[tuple[Events, Handler]]
) -> RunResult:  # fmt: skip
    _refuse_in_memory(data, handlers)
    nproc = overrides.pop("nproc")
    flags: list[str] = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            flags += [flag, str(value)]
    distributed.launch(nproc, ["train", "--resume", str(folder), *flags])
    return _result_from(folder)


def _result_from(folder: Path) -> RunResult:
    """The RunResult of a run the workers finished, read back from its files."""
    state = load_state(folder / STATE_NAME)
    record = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    history = list(state.history)
    seconds = sum(row["epoch_seconds"] for row in history)
    examples = sum(row["examples_per_s"] * row["epoch_seconds"] for row in history)
    config = record["config"]
    stopped = config.get("patience") is not None and state.epoch < int(config["epochs"])
    return RunResult(
        folder, history, state.best_acc, state.best_epoch, examples / max(seconds, 1e-9),
        str(record["environment"]["device"]), stopped,
    )  # fmt: skip
