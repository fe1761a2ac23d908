"""Optimiser, learning-rate schedule and weight initialisation named by a :class:`TrainConfig`.

The schedule is a pure function of the global step, so resuming needs nothing but the step
count, and the loop sets ``lr`` on each parameter group itself (no scheduler object to save).

Extending a run (``--resume RUN --epochs N``, ``--lr X``) re-plans the rest of the schedule instead
of stretching it: the run's record lists one :class:`Resume` per resume that changed the plan, and
:func:`lr_schedule` composes them over the original schedule. The rules:

- A resume that keeps the epochs and gives no ``lr`` is a no-op: the schedule stays bit-exact.
  So is any resume of a ``constant`` schedule without ``lr`` (it does not depend on the epochs).
- Other epochs, no ``lr`` (cosine, onecycle): from ``at_step`` on, a cosine from the composed
  schedule's value at ``at_step`` (the lr the run would take next) down to the schedule's floor at
  the new end (cosine: 0; onecycle: lr/25e4). It never rises above the value at ``at_step``; a run
  that had finished is at its floor already, so it stays there (the plan line says to pass ``--lr``).
- ``lr`` X (a warm restart, SGDR's idea): a linear warm-up from that value to X over one epoch of
  steps (or ``warmup`` epochs when that is shorter and more than 0; never past the new end), then a
  cosine down to the floor of X at the new end (``constant``: X from then on).
- A resume at step 0 (nothing had been trained) starts the schedule over with its epochs and lr.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnnkit.config import TrainConfig
from cnnkit.errors import UsageError

__all__ = ["Resume", "build_optimizer", "describe_plan", "lr_schedule", "xavier_init"]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; weight decay applies to weight matrices and kernels, not to biases or norms.

    With ``--freeze backbone`` the frozen parameters are in it too (no gradient: no step, no decay),
    so that they train once unfrozen. With ``--head-lr-mult X`` the head's parameters form their own
    groups, marked ``lr_scale`` X: around every ``step`` the optimiser multiplies their ``lr`` by it
    (and restores it after), so a trainer that sets every group's ``lr`` to the schedule's, as the
    protocol says, gives the head X times the rate without knowing of it.
    """
    keep_frozen = config.freeze != "none"
    params = [p for p in model.parameters() if p.requires_grad or keep_frozen]
    head: set[int] = set()
    if config.head_lr_mult != 1:
        from cnnkit.training.finetune import head_of, head_parameters

        name = head_of(config)
        if name is None:
            raise UsageError(f"--head-lr-mult needs model '{config.model}' to say where its head is, and its spec does not")
        head = {id(p) for p in head_parameters(model, name)}
    groups: list[dict[str, Any]] = []
    for in_head in (False, True) if head else (False,):
        part = [p for p in params if (id(p) in head) == in_head]
        scale = {"lr_scale": config.head_lr_mult} if in_head else {}
        groups += [
            {"params": [p for p in part if p.ndim > 1], "weight_decay": config.weight_decay, **scale},
            {"params": [p for p in part if p.ndim <= 1], "weight_decay": 0.0, **scale},
        ]
    optimizer: torch.optim.Optimizer
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=config.lr)
    else:
        optimizer = torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov and config.momentum > 0
        )
    if head:
        optimizer.register_step_pre_hook(_scale_rates)
        optimizer.register_step_post_hook(_restore_rates)
    return optimizer


def _scale_rates(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        if group.get("lr_scale", 1.0) != 1.0:
            group["lr_unscaled"] = group["lr"]
            group["lr"] = group["lr"] * group["lr_scale"]


def _restore_rates(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        if "lr_unscaled" in group:
            group["lr"] = group.pop("lr_unscaled")


@dataclass(frozen=True)
class Resume:
    """One resume that re-planned the schedule, as the run's record keeps it (``to_dict``: JSON).

    ``at_step``: the global step the resumed run started from (steps already taken);
    ``epochs``: the run's total epochs after the resume; ``lr``: the warm-restart peak ``--lr``
    gave (None: no warm restart); ``from_epochs`` and ``from_lr``: the config's ``epochs`` and
    ``lr`` before the resume (the first resume's are the original schedule's).
    """

    at_step: int
    epochs: int
    lr: float | None
    from_epochs: int
    from_lr: float

    def __post_init__(self) -> None:
        if self.at_step < 0 or self.epochs <= 0 or self.from_epochs <= 0 or not self.from_lr > 0:
            raise ValueError(f"not a valid resume: {self}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"a warm restart needs lr > 0, not {self.lr!r}")

    @property
    def is_noop(self) -> bool:
        """Keeps the epochs and gives no lr: the schedule goes on exactly as planned."""
        return self.lr is None and self.epochs == self.from_epochs

    def to_dict(self) -> dict[str, Any]:
        return {"at_step": self.at_step, "epochs": self.epochs, "lr": self.lr,
                "from_epochs": self.from_epochs, "from_lr": self.from_lr}  # fmt: skip

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Resume:
        try:
            lr = values["lr"]
            return cls(int(values["at_step"]), int(values["epochs"]), None if lr is None else float(lr),
                       int(values["from_epochs"]), float(values["from_lr"]))  # fmt: skip
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a recorded resume: {dict(values)!r} ({exc})") from exc


def _base_schedule(
    schedule: str, warmup: float, epochs: int, peak: float, steps_per_epoch: int
) -> Callable[[int], float]:
    """The schedule of a run that was never re-planned (the arithmetic is the release's, float for float)."""
    total = max(1, epochs * steps_per_epoch)
    if schedule == "onecycle":
        rise = max(1, round(warmup * steps_per_epoch) if warmup else round(0.3 * total))
        start, end = peak / 25, peak / 25e4

        def onecycle(step: int) -> float:
            if step < rise:
                return start + (peak - start) * step / rise
            progress = min(1.0, (step - rise) / max(1, total - rise))
            return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))

        return onecycle

    warm = round(warmup * steps_per_epoch)
    cosine = schedule == "cosine"

    def warmup_then(step: int) -> float:
        if step < warm:
            return peak * (step + 1) / warm
        if not cosine:
            return peak
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return peak * 0.5 * (1 + math.cos(math.pi * progress))

    return warmup_then


def _floor(schedule: str, peak: float) -> float:
    """Where a schedule with this peak ends (constant: it has none; its value stays)."""
    return peak / 25e4 if schedule == "onecycle" else 0.0


def _anneal(start: int, end: int, high: float, low: float) -> Callable[[int], float]:
    """Cosine from ``high`` at ``start`` to ``low`` at ``end`` (and after); never above ``high``."""
    low = min(low, high)
    span = max(1, end - start)

    def anneal(step: int) -> float:
        progress = min(1.0, max(0.0, (step - start) / span))
        return low + (high - low) * 0.5 * (1 + math.cos(math.pi * progress))

    return anneal


def _warm_steps(warmup: float, steps_per_epoch: int, remaining: int) -> int:
    """A warm restart's warm-up: one epoch, or ``warmup`` epochs when shorter and > 0; within the run."""
    steps = steps_per_epoch
    configured = round(warmup * steps_per_epoch)
    if 0 < configured < steps:
        steps = configured
    return max(1, min(steps, remaining))


@dataclass(frozen=True)
class _Segment:
    """The plan from one resume on (what :func:`describe_plan` reports)."""

    resume: Resume
    at_step: int
    end_step: int
    start_lr: float  # the composed schedule's value at at_step, before this resume
    peak: float  # the config's lr from this resume on
    warm_steps: int  # 0: no warm restart
    floor: float
    restart: bool  # at step 0: the schedule starts over
    at: Callable[[int], float]


def _plan(
    config: TrainConfig, steps_per_epoch: int, resumes: Sequence[Resume]
) -> tuple[Callable[[int], float], list[_Segment]]:
    resumes = list(resumes)
    if not resumes:
        return _base_schedule(config.schedule, config.warmup, config.epochs, config.lr, steps_per_epoch), []
    first = resumes[0]
    base = _base_schedule(config.schedule, config.warmup, first.from_epochs, first.from_lr, steps_per_epoch)
    starts: list[int] = [0]
    pieces: list[Callable[[int], float]] = [base]

    def composed(step: int) -> float:
        return pieces[bisect.bisect_right(starts, step) - 1](step)

    segments: list[_Segment] = []
    epochs, peak = first.from_epochs, first.from_lr
    for number, resume in enumerate(resumes, 1):
        if (resume.from_epochs, resume.from_lr) != (epochs, peak):
            raise ValueError(
                f"resume {number} of the record says it changed {resume.from_epochs} epochs at lr {resume.from_lr:g}, "
                f"but the schedule before it had {epochs} epochs at lr {peak:g}"
            )
        epochs, peak = resume.epochs, resume.lr if resume.lr is not None else peak
        if resume.is_noop or (config.schedule == "constant" and resume.lr is None):
            continue
        at, end = resume.at_step, resume.epochs * steps_per_epoch
        start_lr, floor = composed(at), _floor(config.schedule, peak)
        warm = 0
        if at == 0:
            piece = _base_schedule(config.schedule, config.warmup, resume.epochs, peak, steps_per_epoch)
        elif resume.lr is None:
            piece = _anneal(at, end, start_lr, floor)
        else:
            warm = _warm_steps(config.warmup, steps_per_epoch, end - at)
            piece = _warm_restart(at, warm, end, start_lr, resume.lr, floor, config.schedule == "constant")
        # A later resume at or before an earlier one's step replaces it from there on.
        keep = bisect.bisect_left(starts, at)
        del starts[max(1, keep) :], pieces[max(1, keep) :]
        if at == 0:
            pieces[0] = piece
        else:
            starts.append(at)
            pieces.append(piece)
        segments.append(_Segment(resume, at, end, start_lr, peak, warm, floor, at == 0, piece))
    if epochs != config.epochs or peak != config.lr:
        raise ValueError(
            f"the recorded resumes end at {epochs} epochs with lr {peak:g}, "
            f"but the config says {config.epochs} epochs with lr {config.lr:g}"
        )
    if len(pieces) == 1:
        return pieces[0], segments
    return composed, segments


def _warm_restart(
    at: int, warm: int, end: int, start_lr: float, peak: float, floor: float, constant: bool
) -> Callable[[int], float]:
    """Linear from ``start_lr`` to ``peak`` over ``warm`` steps from ``at``, then cosine to ``floor`` at ``end``."""
    top = at + warm
    after = (lambda step: peak) if constant else _anneal(top, end, peak, floor)

    def restart(step: int) -> float:
        if step < top - 1:
            return start_lr + (peak - start_lr) * ((step - at + 1) / warm)
        if step < top:
            return peak  # exactly, at the warm-up's last step
        return after(step)

    return restart


def lr_schedule(config: TrainConfig, steps_per_epoch: int, resumes: Sequence[Resume] = ()) -> Callable[[int], float]:
    """``step -> lr`` over ``config.epochs * steps_per_epoch`` steps.

    - ``constant``: ``lr`` (after an optional linear warm-up from 0),
    - ``cosine``: linear warm-up from 0, then cosine from ``lr`` down to 0,
    - ``onecycle``: torch's OneCycleLR shape: up from ``lr/25`` over ``warmup`` epochs (30% of the
      run when 0), then cosine down to ``lr/25e4``.

    ``resumes``: the run's recorded re-plans, in order (the module's docstring has the rules). The
    first one's ``from_epochs``/``from_lr`` give the original schedule; the last one's ``epochs``
    and lr must be the config's (a ValueError says where a record does not fit).
    """
    return _plan(config, steps_per_epoch, resumes)[0]


def _lr(value: float) -> str:
    return f"{value:.3g}"


def describe_plan(config: TrainConfig, steps_per_epoch: int, resumes: Sequence[Resume] = ()) -> str:
    """The one line the driver prints at a resume: the plan from the last resume's step on."""
    at_schedule, segments = _plan(config, steps_per_epoch, resumes)
    total = config.epochs * steps_per_epoch
    name = config.schedule
    last = resumes[-1] if resumes else None
    if last is None or not segments or segments[-1].resume is not last:
        # Nothing re-planned by this resume: the schedule goes on as planned.
        if last is None:
            return f"schedule: {name} over {config.epochs} epochs, to lr {_lr(at_schedule(total))} at step {total:,}"
        if name == "constant" and last.lr is None and last.epochs != last.from_epochs:
            changed = "extended" if last.epochs > last.from_epochs else "shortened"
            return (
                f"schedule: lr {_lr(at_schedule(last.at_step))} from step {last.at_step:,} to step {total:,} "
                f"(constant, {changed} from {last.from_epochs} to {last.epochs} epochs)"
            )
        return (
            f"schedule: unchanged, from lr {_lr(at_schedule(last.at_step))} at step {last.at_step:,} "
            f"to {_lr(at_schedule(total))} at step {total:,} ({name}, {config.epochs} epochs)"
        )
    seg = segments[-1]
    epochs = (
        f"{seg.resume.from_epochs} epochs" if seg.resume.epochs == seg.resume.from_epochs
        else f"{'extended' if seg.resume.epochs > seg.resume.from_epochs else 'shortened'} "
        f"from {seg.resume.from_epochs} to {seg.resume.epochs} epochs"
    )  # fmt: skip
    end_lr = _lr(seg.at(seg.end_step))
    if seg.restart:
        return f"schedule: starting over (nothing was trained yet): {name} over {config.epochs} epochs, to lr {end_lr} at step {total:,}"
    if seg.warm_steps:
        then = (
            f"then constant to step {seg.end_step:,}"
            if name == "constant"
            else f"then cosine to {end_lr} at step {seg.end_step:,}"
        )
        return (
            f"schedule: warm restart from lr {_lr(seg.start_lr)} at step {seg.at_step:,} to lr {_lr(seg.peak)} "
            f"over {seg.warm_steps:,} steps, {then} ({name}, {epochs})"
        )
    line = (
        f"schedule: from lr {_lr(seg.start_lr)} at step {seg.at_step:,} to {end_lr} at step {seg.end_step:,} "
        f"({name}, {epochs})"
    )
    if seg.start_lr < 0.01 * seg.peak:
        line += "; the run had annealed: pass --lr X for a warm restart"
    return line


def xavier_init(model: nn.Module) -> None:
    """d2l's initialisation: Xavier-uniform weights for every convolution and linear layer."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
