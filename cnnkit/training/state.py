"""The trainer's resume point, stored without pickle: one safetensors file, JSON in its metadata.

``state.safetensors`` holds the model's and the optimiser's tensors and the RNG states; its
metadata key ``cnnkit-state`` holds everything else as JSON (epoch, step, best so far, the metrics
history, the optimiser's hyperparameters). One file written with ``atomic_write`` means the
tensors and the bookkeeping can never disagree, whenever the process dies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cnnkit.errors import DataError, UsageError, WeightsError
from cnnkit.fs import atomic_write
from cnnkit.protocols import DatasetSplits

__all__ = ["STATE_NAME", "TrainerState", "save_state", "load_state", "check_resume_point"]

STATE_NAME = "state.safetensors"
_META_KEY = "cnnkit-state"
_FORMAT = 1


@dataclass
class TrainerState:
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


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)


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


def save_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: TrainerState
) -> None:
    """Write the resume point atomically (model, optimiser and RNG tensors + JSON bookkeeping)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    empty: dict[str, Any] = {"state": {}, "param_groups": []}
    optim_tensors, optim_rest = _split_optimizer(optimizer.state_dict() if optimizer is not None else empty)
    tensors.update(optim_tensors)
    tensors.update({f"rng.{k}": v for k, v in capture_rng().items()})
    meta = {
        "format": _FORMAT,
        "epoch": state.epoch,
        "step": state.step,
        "best_acc": state.best_acc,
        "best_epoch": state.best_epoch,
        "history": state.history,
        "optimizer": optim_rest,
    }
    metadata = {_META_KEY: json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_state(path: str | Path) -> TrainerState:
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
        groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optimizer": {}, "rng": {}}
        for key, value in tensors.items():
            kind, _, name = key.partition(".")
            if kind == "optimizer":
                groups[kind][key] = value
            else:
                groups[kind][name] = value
        state = TrainerState(
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
        )
        _check_consistent(state)
    except Exception as exc:  # any unreadable or inconsistent file is the same one-line story
        reason = (str(exc).splitlines() or [""])[0][:160] or type(exc).__name__
        raise WeightsError(
            f"{file} is not a readable cnnkit trainer state ({reason}); restore it from a backup, "
            "or start a new run (the run's best.safetensors is still usable with eval and export)"
        ) from exc
    return state


def _check_consistent(state: TrainerState) -> None:
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


def check_resume_point(run_dir: Path, saved: TrainerState, model: nn.Module, data: DatasetSplits) -> None:
    """Before a resumed run writes anything: the saved run still fits the data and model at hand.

    The dataset must have the classes, channels and example counts the run was trained on
    (else DataError, exit 3: resuming on other data would silently mix two experiments); the
    resume point's tensors must fit the model the config builds, and the run's weights files
    must be readable (else WeightsError, exit 4).
    """
    from cnnkit.checkpoint import BEST_NAME, LAST_NAME, read_meta

    last = run_dir / LAST_NAME
    if not last.is_file():
        raise WeightsError(
            f"{last} is missing although {run_dir / STATE_NAME} holds epoch {saved.epoch}; "
            "restore it, or start a new run"
        )
    meta = read_meta(last)  # WeightsError when truncated or edited
    recorded = _recorded_environment(run_dir)
    # The run's own files must agree before the data is judged against them: a hand-edited file
    # is the file's fault (exit 4), not the dataset's.
    claims = {str(run_dir / "config.json"): recorded.get("classes")}
    if (run_dir / BEST_NAME).is_file():
        claims[str(run_dir / BEST_NAME)] = read_meta(run_dir / BEST_NAME).classes
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
    }
    now = {"classes": list(data.classes), "channels": data.channels, "train examples": len(data.train),
           "test examples": len(data.test)}  # fmt: skip
    changed = [key for key, value in then.items() if value is not None and value != now[key]]
    if changed:
        differences = "; ".join(f"{key} {_short(then[key])} then, {_short(now[key])} now" for key in changed)
        raise DataError(
            f"the dataset at {data.source} changed since {run_dir} was trained ({differences}); "
            "resume with the data it was trained on, or start a new run"
        )
    expected = {k: v.shape for k, v in _unwrap(model).state_dict().items()}
    stored = {k: v.shape for k, v in saved.model.items()}
    if expected != stored:
        wrong = sorted(set(expected) ^ set(stored)) or [k for k in expected if expected[k] != stored[k]]
        raise WeightsError(
            f"{run_dir / STATE_NAME} does not fit the model its config.json builds (first difference: "
            f"{wrong[0]}); the config or the state was edited: restore them, or start a new run"
        )


def _recorded_environment(run_dir: Path) -> dict[str, Any]:
    """The ``environment`` a run recorded in its config.json (empty when absent)."""
    try:
        record = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        environment = record.get("environment", {})
        return environment if isinstance(environment, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def _short(value: Any) -> str:
    if isinstance(value, list):
        shown = ", ".join(map(str, value[:5])) + (f" and {len(value) - 5} more" if len(value) > 5 else "")
        return f"[{shown}]"
    return str(value)
