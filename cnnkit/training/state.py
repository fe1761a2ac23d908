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

from cnnkit.checkpoint import atomic_write
from cnnkit.errors import UsageError

__all__ = ["STATE_NAME", "TrainerState", "save_state", "load_state"]

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
    """Read a resume point written by :func:`save_state` (tensors on the CPU)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(
            f"{file} does not exist: the run saved no resume point yet; start it again without --resume"
        )
    try:
        with safe_open(str(file), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[_META_KEY])
        tensors = load_file(str(file), device="cpu")
    except Exception as exc:  # any unreadable file is the same one-line story
        raise UsageError(f"{file} is not a readable cnnkit trainer state ({type(exc).__name__}); start afresh") from exc
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optimizer": {}, "rng": {}}
    for key, value in tensors.items():
        kind, _, name = key.partition(".")
        if kind == "optimizer":
            groups[kind][key] = value
        else:
            groups[kind][name] = value
    return TrainerState(
        epoch=int(meta["epoch"]),
        step=int(meta["step"]),
        best_acc=float(meta["best_acc"]),
        best_epoch=int(meta["best_epoch"]),
        history=list(meta["history"]),
        model=groups["model"],
        optimizer=_join_optimizer(groups["optimizer"], meta["optimizer"]) if meta["optimizer"]["param_groups"] else {},
        rng=groups["rng"],
    )
