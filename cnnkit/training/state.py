"""Run state: where a run is (:class:`RunState`), and its resume point on disk (:class:`ResumePoint`).

``RunState`` is the plain record the driver, the trainer-facing run and the handlers share: epoch,
step, learning rate, history, best so far, the epoch on disk, whether to stop, why it failed, timings.
:meth:`RunState.resume_point` and :meth:`RunState.resumed_from` are the one pair of functions
between it and the resume point; nothing is copied field by field anywhere else.

``state.safetensors`` holds the resume point without pickle: the model's, the optimiser's and the
trainer's own tensors and the RNG states as safetensors; its metadata key ``cnnkit-state`` holds
everything else as JSON (epoch, step, best so far, the metrics history, the optimiser's
hyperparameters, the trainer's non-tensor state). One file written with ``atomic_write`` means the
tensors and the bookkeeping can never disagree, whenever the process dies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cnnkit.checkpoint import unwrap
from cnnkit.errors import CnnkitError, DataError, UsageError, WeightsError
from cnnkit.fs import atomic_write
from cnnkit.protocols import DatasetSplits
from cnnkit.rundir import RunDir

__all__ = ["RunState", "ResumePoint", "save_state", "load_state", "check_resume_point", "restore_rng"]

_META_KEY = "cnnkit-state"
_FORMAT = 1


@dataclass
class ResumePoint:
    """Where a run stands at an epoch boundary: enough to continue it bit for bit."""

    epoch: int
    """Epochs completed."""
    step: int
    """Optimisation steps taken (the learning-rate schedule's clock)."""
    best_acc: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    """One metrics row per completed epoch (what metrics.csv holds)."""
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    """The trainer's own ``state_dict()`` (an EMA, a scaler); empty when it keeps none."""


@dataclass
class RunState:
    """Where a run is. The driver owns it; the run, the trainer and the handlers read and advance it."""

    epoch: int = 0
    """The epoch being trained (1-based); after it completes, the number of epochs done."""
    step: int = 0
    """Optimisation steps since the run began (the schedule's clock)."""
    lr: float = math.nan
    """The learning rate of the last step."""
    history: list[dict[str, float]] = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = 0
    saved_epoch: int = 0
    """The epoch the files on disk (last, state) hold."""
    should_stop: bool = False
    """Set by a handler (early stopping) to end the run after this epoch."""
    error: CnnkitError | None = None
    """Why the run ended early (set before FAILED or INTERRUPTED is emitted)."""
    seen: int = 0
    """Training examples of the whole job seen this epoch (as last reported)."""
    loss: float | None = None
    """Mean training loss so far this epoch (as last reported)."""
    train_seconds: float = 0.0
    """Seconds spent in training epochs by this process (since it started or resumed)."""
    train_examples: int = 0

    @classmethod
    def resumed_from(cls, point: ResumePoint) -> RunState:
        """The state of a run continuing from ``point``."""
        return cls(
            epoch=point.epoch, step=point.step, history=list(point.history), best_acc=point.best_acc,
            best_epoch=point.best_epoch, saved_epoch=point.epoch,
        )  # fmt: skip

    def resume_point(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, trainer: Mapping[str, Any] | None = None
    ) -> ResumePoint:
        """The resume point as of now: this state, the model's, optimiser's and trainer's state and the RNG."""
        return ResumePoint(
            self.epoch, self.step, self.best_acc, self.best_epoch, list(self.history),
            model={k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()},
            optimizer=optimizer.state_dict() if optimizer is not None else {},
            rng=capture_rng(), trainer=dict(trainer or {}),
        )  # fmt: skip


def capture_rng() -> dict[str, torch.Tensor]:
    """The global torch RNG states (CPU and each GPU) that dropout and friends draw from."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    """Put back what :func:`capture_rng` saw."""
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(states, key=lambda k: int(k[4:]) if k[4:].isdigit() else -1) if k[:4] == "cuda"]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser state dict -> (tensors by flat name, the JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {}
    for index, slots in state["state"].items():
        plain: dict[str, Any] = {}
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain[name] = value  # e.g. SGD's momentum_buffer before the first step: None
        rest[str(index)] = plain
    return tensors, {"state": rest, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(slots) for i, slots in rest["state"].items()}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _split_tree(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """A trainer's state tree -> JSON with ``{"tensor": key}`` in place of each tensor (put in ``tensors``)."""
    if isinstance(value, torch.Tensor):
        key = f"trainer.{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"trainer state_dict(): the keys of '{where or 'the top'}' must be strings")
        return {"dict": {k: _split_tree(v, tensors, f"{where}.{k}".lstrip(".")) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"list": [_split_tree(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    raise TypeError(
        f"trainer state_dict(): '{where}' is a {type(value).__name__}; only tensors, numbers, strings, "
        "None and lists or dicts of them are saved (never pickle)"
    )


def _join_tree(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {k: _join_tree(v, tensors) for k, v in node["dict"].items()}
    if "list" in node:
        return [_join_tree(v, tensors) for v in node["list"]]
    return node["value"]


def save_state(path: str | Path, point: ResumePoint) -> None:
    """Write the resume point atomically (model, optimiser, trainer and RNG tensors + JSON bookkeeping)."""
    tensors = {f"model.{k}": v for k, v in point.model.items()}
    empty: dict[str, Any] = {"state": {}, "param_groups": []}
    optim_tensors, optim_rest = _split_optimizer(point.optimizer or empty)
    tensors.update(optim_tensors)
    tensors.update({f"rng.{k}": v for k, v in point.rng.items()})
    meta = {
        "format": _FORMAT,
        "epoch": point.epoch,
        "step": point.step,
        "best_acc": point.best_acc,
        "best_epoch": point.best_epoch,
        "history": point.history,
        "optimizer": optim_rest,
    }
    if point.trainer:  # absent for trainers without state: files stay as older versions wrote them
        meta["trainer"] = _split_tree(dict(point.trainer), tensors, "")
    metadata = {_META_KEY: json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_state(path: str | Path) -> ResumePoint:
    """Read a resume point written by :func:`save_state` (tensors on the CPU).

    A missing file is a UsageError (exit 2: the run has no resume point); a truncated, damaged or
    hand-edited one is a WeightsError (exit 4) naming it.
    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{file} does not exist: the run saved no resume point yet; start it again without --resume")
    try:
        with safe_open(str(file), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[_META_KEY])
        tensors = load_file(str(file), device="cpu")
        groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optimizer": {}, "rng": {}, "trainer": {}}
        for key, value in tensors.items():
            kind, _, name = key.partition(".")
            groups[kind][key if kind in ("optimizer", "trainer") else name] = value
        state = ResumePoint(
            epoch=int(meta["epoch"]),
            step=int(meta["step"]),
            best_acc=float(meta["best_acc"]),
            best_epoch=int(meta["best_epoch"]),
            history=list(meta["history"]),
            model=groups["model"],
            optimizer=_join_optimizer(groups["optimizer"], meta["optimizer"])
            if meta["optimizer"]["param_groups"]
            else {},
            rng=groups["rng"],
            trainer=_join_tree(meta["trainer"], groups["trainer"]) if "trainer" in meta else {},
        )
        _check_consistent(state)
    except Exception as exc:  # any unreadable or inconsistent file is the same one-line story
        reason = (str(exc).splitlines() or [""])[0][:160] or type(exc).__name__
        raise WeightsError(
            f"{file} is not a readable cnnkit trainer state ({reason}); restore it from a backup, "
            "or start a new run (the run's best.safetensors is still usable with eval and export)"
        ) from exc
    return state


def _check_consistent(state: ResumePoint) -> None:
    """What a hand edit or a foreign file would break: raises ValueError saying what."""
    if state.epoch < 1 or len(state.history) != state.epoch or not all(isinstance(r, dict) for r in state.history):
        raise ValueError(f"epoch {state.epoch} with {len(state.history)} metrics rows")
    if not 0 <= state.best_epoch <= state.epoch or state.step < 0:
        raise ValueError(f"best epoch {state.best_epoch}, step {state.step} at epoch {state.epoch}")
    if not state.model:
        raise ValueError("no model tensors")
    cpu = state.rng.get("cpu")
    if cpu is None or cpu.dtype != torch.uint8 or cpu.ndim != 1:
        raise ValueError("no CPU random-generator state")


def check_resume_point(run_dir: RunDir, saved: ResumePoint, model: nn.Module, data: DatasetSplits) -> None:
    """Before a resumed run writes anything: the saved run still fits the data and model at hand.

    The dataset must have the classes, channels and example counts the run was trained on
    (else DataError, exit 3: resuming on other data would silently mix two experiments); the
    resume point's tensors must fit the model the config builds, and the run's weights files
    must be readable (else WeightsError, exit 4).
    """
    from cnnkit.checkpoint import read_meta

    last = run_dir.last
    if not last.is_file():
        raise WeightsError(
            f"{last} is missing although {run_dir.state} holds epoch {saved.epoch}; "
            "restore it, or start a new run"
        )
    meta = read_meta(last)  # WeightsError when truncated or edited
    recorded = run_dir.environment()
    # The run's own files must agree before the data is judged against them: a hand-edited file
    # is the file's fault (exit 4), not the dataset's.
    claims = {str(run_dir.config): recorded.get("classes")}
    if run_dir.best.is_file():
        claims[str(run_dir.best)] = read_meta(run_dir.best).classes
    for file, classes in claims.items():
        if isinstance(classes, list) and classes != list(meta.classes):
            raise WeightsError(
                f"{last} and {file} disagree about the classes ({_short(list(meta.classes))} vs {_short(classes)}); "
                "one of them was edited: restore it, or start a new run"
            )
    then = {
        "classes": list(meta.classes),
        "channels": meta.in_channels,
        "train examples": recorded.get("train_examples"),
        "test examples": recorded.get("test_examples"),
        "val examples": recorded.get("val_examples"),
    }
    now = {"classes": list(data.classes), "channels": data.channels, "train examples": len(data.train),
           "test examples": len(data.test), "val examples": len(data.val) if data.val is not None else 0}  # fmt: skip
    changed = [key for key, value in then.items() if value is not None and value != now[key]]
    if changed:
        differences = "; ".join(f"{key} {_short(then[key])} then, {_short(now[key])} now" for key in changed)
        raise DataError(
            f"the dataset at {data.source} changed since {run_dir} was trained ({differences}); "
            "resume with the data it was trained on, or start a new run"
        )
    expected = {k: v.shape for k, v in unwrap(model).state_dict().items()}
    stored = {k: v.shape for k, v in saved.model.items()}
    if expected != stored:
        wrong = sorted(set(expected) ^ set(stored)) or [k for k in expected if expected[k] != stored[k]]
        raise WeightsError(
            f"{run_dir.state} does not fit the model its run config builds (first difference: "
            f"{wrong[0]}); the config or the state was edited: restore them, or start a new run"
        )


def _short(value: Any) -> str:
    if isinstance(value, list):
        shown = ", ".join(map(str, value[:5])) + (f" and {len(value) - 5} more" if len(value) > 5 else "")
        return f"[{shown}]"
    return str(value)
