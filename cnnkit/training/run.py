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
process runs the same driver inside :func:`cnnkit.training.strategy.session`. Rank 0 alone
picks and creates the run directory (and tells the others), writes every file and prints; the
model is wrapped in DDP before the trainer gets it; each rank seeds its dropout differently. When
torchrun restarts the workers after a failure (``--max-restarts``), the run its first attempt
started (``--out``, or the run directory that recorded the same torchrun run id) is resumed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.config import RESUMABLE_KEYS, TrainConfig
from cnnkit.errors import CnnkitError, UsageError
from cnnkit.gpu import out_of_memory_as_usage_error
from cnnkit.protocols import DatasetSplits, RunResult
from cnnkit.rundir import RunDir
from cnnkit.training import strategy as strategies
from cnnkit.training.context import Run
from cnnkit.training.events import EventBus, Events, Handler
from cnnkit.training.launch import launch_resume, launch_train
from cnnkit.training.process import determinism, first_ctrl_c_only
from cnnkit.training.record import environment, weights_meta
from cnnkit.training.state import ResumePoint, RunState, check_resume_point, load_state, restore_rng
from cnnkit.training.strategy import Strategy

__all__ = ["train", "resume", "prepare", "build_model", "typed_options", "read_run_config"]


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


def prepare(config: TrainConfig, recorded: RunDir | None = None) -> tuple[nn.Module, DatasetSplits]:
    """Load the dataset and build the model the config names; resuming (``recorded``), the files the
    run recorded in each split, checked against the sizes it recorded."""
    from cnnkit.data import load_dataset, load_recorded

    files = recorded.read_split_files() if recorded is not None else {}
    classes = recorded.environment().get("classes") if recorded is not None else None
    common: dict[str, Any] = {"input_size": config.input_size, "val_fraction": config.val_fraction}
    if recorded is not None and files and isinstance(classes, list):
        data = load_recorded(config.dataset, config.data, files, classes, **common, **config.dataset_options)
        recorded.check_split_sizes(data.source)
    else:
        data = load_dataset(config.dataset, config.data, **common, **config.dataset_options)
    return build_model(config, data), data


def with_validation(config: TrainConfig, data: DatasetSplits) -> tuple[DatasetSplits, dict[str, Any] | None]:
    """The data with the run's val split (the dataset's own, else carved from train), and its record."""
    from cnnkit.data.validation import carve_validation, validation_record

    data, held = carve_validation(data, config.val_fraction, config.seed)
    record = validation_record(data, config.val_fraction, config.seed, carved=held is not None)
    if record is not None and held is not None and "val" not in data.split_files:
        record["indices"] = held.tolist()  # no file names to list: which training examples, by index
    return data, record


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 where the device has it, else fp16 (with a GradScaler); None: full precision."""
    if not (config.amp if config.amp is not None else device.type == "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _drive(
    config: TrainConfig, folder: RunDir | None, saved: ResumePoint | None, data: DatasetSplits | None,
    handlers: Iterable[tuple[Events, Handler]], strategy: Strategy, resumes: tuple[Any, ...] = (),
    replanned: bool = False,
) -> RunResult:  # fmt: skip
    from cnnkit.allocator import keep_freed_memory
    from cnnkit.options import parse_options
    from cnnkit.registry import TRAINERS
    from cnnkit.training import finetune
    from cnnkit.training.events import Feature
    from cnnkit.training.handlers import EarlyStopping, default_handlers

    # 1. Everything that can be wrong with the request, before anything is written.
    device = strategy.device
    strategy.check(config.batch_size, config.sync_bn)
    trainer = TRAINERS.get(config.trainer)  # a fresh object per run
    options = parse_options(config.trainer, trainer.options, config.trainer_options, kind="trainer")
    if data is None:
        model, data = prepare(config, folder if saved is not None else None)
    else:
        model = build_model(config, data)
    finetune.check(config, model, strategy)
    # --init-from: a fresh run loads the weights now; a resumed one restores its own below.
    recorded = folder.environment().get("init_from") if saved is not None and folder is not None else None
    init_from = finetune.start_weights(model, config, data, recorded, strategy.is_main and not config.quiet)
    data, validation = with_validation(config, data)
    if validation is None and config.patience is not None:
        raise UsageError(
            f"--patience {config.patience} stops on the validation split, and this run has none "
            "(--val-fraction 0); give a --val-fraction above 0, or drop --patience"
        )
    if saved is not None and folder is not None:
        check_resume_point(folder, saved, model, data)  # the saved run still fits this data and model
    # Files and the console are rank 0's; every rank stops early on the same (reduced) metrics.
    features: list[Feature] = (
        list(default_handlers(config)) if strategy.is_main
        else [EarlyStopping(config.patience)] if config.patience is not None else []
    )  # fmt: skip

    # 2. The run directory: rank 0 picks and creates it, and tells the other ranks.
    def make_run_dir() -> tuple[str, bool]:
        chosen = folder or RunDir.next_numbered(config.runs_dir, config.model, config.dataset)
        fresh = chosen.create() or folder is None
        return str(chosen.path), fresh

    chosen, created = strategy.from_rank0(make_run_dir)
    run_dir, created = RunDir(Path(chosen)), created and strategy.is_main
    config = config.model_copy(update={"out": str(run_dir.path)})
    # 3. The weights and RNG: restored from the resume point, or seeded.
    if saved is not None:
        model.load_state_dict(saved.model)
    model.to(device)
    if device.type == "cpu":  # the batches' temporaries reused, not faulted in again (cnnkit.allocator)
        keep_freed_memory()
    amp = _amp_dtype(config, device)
    meta = weights_meta(config, data, validation)
    if init_from is not None:
        meta = meta.model_copy(update={"init_from": {k: init_from[k] for k in ("source", "path", "sha256", "format")}})
    run = Run(
        config, run_dir, model, data, device, options, EventBus(), meta, strategy=strategy,
        amp_dtype=amp, resume_from=saved, trainer=trainer,
        environment={**environment(config, data, strategy, amp), "validation": validation,
                     **({"init_from": init_from} if init_from is not None else {})},
        state=RunState.resumed_from(saved) if saved is not None else RunState(), resumes=resumes,
        replanned=replanned,
    )  # fmt: skip
    if run.channels_last:
        model.to(memory_format=torch.channels_last)
    # 4. The handlers.
    for feature in features:
        for event, handler in feature.attach():
            run.events.on(event, handler)
    if not strategy.is_main:
        run.events.on(Events.EPOCH_COMPLETED, _mirror_rank0_save)
    for event, handler in handlers:
        run.events.on(event, handler)
    with determinism(config.deterministic, device), first_ctrl_c_only() as ctrl_c:
        try:
            if saved is not None:
                restore_rng(saved.rng)
            strategy.seed(config.seed, saved.epoch if saved is not None else None)
            # DDP when distributed (its construction gives every rank rank 0's weights).
            net = strategy.wrap(model, config.sync_bn)
            run.emit(Events.STARTED)
            # 5. The fit.
            with out_of_memory_as_usage_error(batch_size=config.batch_size, model=config.model, device=device):
                result = trainer.fit(net, data, config, run)
        except KeyboardInterrupt:
            # 6. Ctrl-C: the files on disk already hold the last completed epoch; nothing is
            # half-written, so the exit is immediate and honest about what was kept.
            _interrupted(run, created)
        except CnnkitError as exc:
            _failed(run, created, exc)
            raise
        except Exception as exc:
            lost = strategy.peer_failure(exc)
            if lost is None:
                _discard_if_empty(run, created)
                raise
            if ctrl_c:  # the peers stopped on the same Ctrl-C
                _interrupted(run, created)
            _failed(run, created, lost)
            raise lost from None
        except BaseException:
            _discard_if_empty(run, created)
            raise
    run.test_report = _test_report(run, net)
    run.emit(Events.COMPLETED)
    return result


def _test_report(run: Run, net: nn.Module) -> dict[str, Any]:
    """Test, once the training is over: the final weights and the best ones (by validation)."""
    from cnnkit.checkpoint import load_weights

    def measured(epoch: int, model: nn.Module) -> dict[str, Any]:
        loss, accuracy, confusion = run.evaluate_split(model, "test")
        support = confusion.sum(1).tolist()
        per_class = {name: {"acc": float(confusion[i, i]) / max(n, 1), "support": int(n)}
                     for i, (name, n) in enumerate(zip(run.data.classes, support, strict=True))}  # fmt: skip
        return {"epoch": epoch, "test_loss": loss, "test_acc": accuracy, "per_class": per_class}

    report = {"final": measured(run.epoch, run.inference_model or net)}
    if run.best_epoch == run.epoch:
        report["best"] = report["final"]
    elif run.best_epoch and run.dir.best.is_file():
        best, _ = load_weights(run.dir.best, run.device)
        report["best"] = measured(run.best_epoch, best)
    return report


def _mirror_rank0_save(run: Run) -> None:
    """On ranks > 0: the epoch rank 0's checkpointer has just saved (for the Ctrl-C message)."""
    run.saved_epoch = run.epoch


def _interrupted(run: Run, created: bool) -> None:
    run.error = run.strategy.interruption(_interrupted_message(run, created))
    run.emit(Events.INTERRUPTED)
    _discard_if_empty(run, created)
    raise run.error from None


def _failed(run: Run, created: bool, exc: CnnkitError) -> None:
    run.error = run.strategy.label(exc)
    run.emit(Events.FAILED)
    _discard_if_empty(run, created)


def _interrupted_message(run: Run, created: bool) -> str:
    where = f"interrupted in epoch {run.epoch}"
    if run.saved_epoch == 0:
        if created:
            return f"{where}, before any epoch was saved; {run.dir} removed (start again to train)"
        return f"{where}, before any epoch was saved; continue with: cnnkit train --resume {run.dir}"
    return (
        f"{where}; {run.dir.last} holds epoch {run.saved_epoch}; "
        f"continue from the end of epoch {run.saved_epoch} with: cnnkit train --resume {run.dir}"
    )


def _discard_if_empty(run: Run, created: bool) -> None:
    """A run directory this call created that holds no saved epoch is noise: remove it."""
    if created and run.saved_epoch == 0:
        run.dir.discard()


def _launches(config: TrainConfig) -> bool:
    """True when this call must start ``config.nproc`` processes itself (``--nproc N``)."""
    if config.nproc is None:
        return False
    if strategies.under_torchrun():
        started = strategies.torchrun_processes()
        if config.nproc != started:
            raise UsageError(
                f"--nproc {config.nproc} under torchrun, which started {started} processes; drop --nproc "
                "(torchrun's --nproc_per_node says how many)"
            )
        return False
    return config.nproc > 1


def _previous_attempt(config: TrainConfig) -> str | None:
    """After torchrun restarted the workers: the run directory the first attempt started, if any."""
    if config.out is not None:
        folder = RunDir(Path(config.out))
        return str(folder.path) if folder.holds_run() else None
    run_id = strategies.elastic_run_id()
    if run_id is None:
        return None
    found = RunDir.find(
        config.runs_dir, config.model, config.dataset,
        lambda record: record["environment"].get("torchelastic_run_id") == run_id,
    )  # fmt: skip
    return str(found.path) if found is not None else None


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
    if config.init_from is not None and not config.init_from.startswith("torchvision:"):
        config = config.model_copy(update={"init_from": str(Path(config.init_from).expanduser().resolve())})
    if _launches(config):
        return launch_train(config, data, handlers)
    with strategies.session(config.device, config.dist_timeout) as strategy:
        if strategy.restarts:
            # torchrun restarted the job after a failure: continue what the first attempt started.
            previous = strategy.from_rank0(lambda: _previous_attempt(config))
            if previous is not None:
                overrides = {key: getattr(config, key) for key in RESUMABLE_KEYS}
                return _resume_in(RunDir(Path(previous)), overrides, data, handlers, strategy)
        folder = RunDir(Path(config.out)) if config.out is not None else None
        if folder is not None:
            strategy.from_rank0(folder.check_fresh)
        return _drive(config, folder, None, data, handlers, strategy)


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The config a run directory was trained with (its record's ``config``)."""
    folder = RunDir(Path(run_dir))
    if not folder.holds_run():
        raise UsageError(f"--resume {run_dir}: no {folder.config.name} there; pass the folder of a cnnkit run")
    return folder.read_config()


def _check_installed(folder: RunDir, config: TrainConfig) -> None:
    """The run's model, dataset and trainer are registered here; else name what to install (exit 2)."""
    from cnnkit.registry import DATASETS, MODELS, TRAINERS

    providers = folder.environment().get("providers") or {}
    for kind, registry, name in (("model", MODELS, config.model), ("dataset", DATASETS, config.dataset),
                                 ("trainer", TRAINERS, config.trainer)):  # fmt: skip
        if name in registry.names():
            continue
        provider = providers.get(kind) or {}
        distribution, version = provider.get("distribution"), provider.get("version")
        if distribution and distribution != "cnnkit":
            pin = f"=={version}" if version else ""
            raise UsageError(
                f"{folder} was trained with {kind} '{name}' of {distribution}{' ' + version if version else ''}, "
                f"which is not installed here; install it (pip install '{distribution}{pin}') and resume again"
            )
        raise UsageError(
            f"{folder} was trained with {kind} '{name}', which is not registered here; install the plugin that "
            f"provides it ('cnnkit list {kind}s' shows what is)"
        )


def _resume_config(folder: RunDir, overrides: Mapping[str, Any] | None) -> TrainConfig:
    config = read_run_config(folder.path)
    _check_installed(folder, config)
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
    folder = RunDir(Path(run_dir))
    config = _resume_config(folder, overrides)
    if _launches(config):
        return launch_resume(folder, dict(overrides or {}), data, handlers)
    with strategies.session(config.device, config.dist_timeout) as strategy:
        return _resume_in(folder, overrides, data, handlers, strategy)


def _resume_in(
    folder: RunDir, overrides: Mapping[str, Any] | None, data: DatasetSplits | None,
    handlers: Iterable[tuple[Events, Handler]], strategy: Strategy,
) -> RunResult:  # fmt: skip
    from cnnkit.training.optim import Resume

    config = _resume_config(folder, overrides)
    saved = load_state(folder.state) if folder.holds_resume_point() else None
    if saved is not None and saved.epoch >= config.epochs:
        raise UsageError(
            f"{folder} has already trained {saved.epoch} of {config.epochs} epochs; "
            f"pass --epochs N with N > {saved.epoch} to train it longer"
        )
    # Longer, or a warm restart: the rest of the schedule is re-planned from where the run is.
    previous = read_run_config(folder.path)
    resumes = [Resume.from_dict(r) for r in folder.read_record().get("resumes", [])]
    warm = config.lr != previous.lr  # a restart's repeated RESUMABLE_KEYS carry the saved lr: no restart
    added = config.epochs != previous.epochs or warm
    if added:
        resumes.append(Resume(saved.step if saved else 0, config.epochs, config.lr if warm else None,
                              previous.epochs, previous.lr))  # fmt: skip
    return _drive(config, folder, saved, data, handlers, strategy, tuple(resumes), added)
