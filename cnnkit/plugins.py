"""What the installed distributions register in cnnkit's groups, whether it loads, and contract checks.

``cnnkit plugins`` shows :func:`survey`; ``cnnkit plugins check DIST`` runs :func:`check_distribution`.
Unlike listing, both import every entry they report on: that is how a broken plugin is found.
Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from cnnkit.errors import CnnkitError, PluginLoadError, UsageError
from cnnkit.registry import BUILTIN_DISTRIBUTION, DATASETS, MODELS, TRAINERS, Entry, Registry, normalise_distribution

__all__ = [
    "GROUPS",
    "Clash",
    "Distribution",
    "CheckResult",
    "ChecksFailed",
    "clashes",
    "survey",
    "check_distribution",
]

GROUPS: dict[str, Registry[Any]] = {"models": MODELS, "datasets": DATASETS, "trainers": TRAINERS}
"""Each entry-point group's registry, by the plural its names are shown under."""

Status = Literal["ok", "disabled", "failed"]


@dataclass(frozen=True)
class Clash:
    """One name registered by two distributions in one group, and which registration wins."""

    group: str
    name: str
    winner: str
    loser: str

    @property
    def qualified(self) -> str:
        """How to ask for the losing registration explicitly."""
        return f"{self.loser}:{self.name}"


@dataclass
class Distribution:
    """One installed distribution that registers cnnkit entries."""

    name: str
    version: str
    entries: dict[str, list[str]] = field(default_factory=dict)
    """Group (``models``, ``datasets``, ``trainers``) -> the names it registers there."""
    status: Status = "ok"
    reason: str | None = None
    """Why it is disabled or failed, in one line."""
    failed: list[str] = field(default_factory=list)
    """``group:name`` of each entry that failed to load."""

    def to_dict(self) -> dict[str, Any]:
        return {"distribution": self.name, "version": self.version, "status": self.status,
                "reason": self.reason, "entries": self.entries, "failed": self.failed}  # fmt: skip


def _disabled_reason(dist: str) -> str:
    return f"CNNKIT_DISABLE_PLUGIN_AUTOLOAD is set; allow it with CNNKIT_PLUGINS={dist}"


def _one_line(exc: BaseException) -> str:
    """The underlying error of a failed load as ``Type: message`` (first line only)."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, CnnkitError) and cause is None:
        return exc.format_message()
    shown = cause if cause is not None else exc
    text = (str(shown).splitlines() or [""])[0]
    return f"{type(shown).__name__}: {text}" if text else type(shown).__name__


def _registrations() -> Iterator[tuple[str, Registry[Any], str, Entry, bool]]:
    """(group, registry, the name to ask for, entry, disabled) for every registration in every group."""
    for group, registry in GROUPS.items():
        for name, entry in registry.entries().items():
            yield group, registry, name, entry, False
        for qualified, entry in registry.shadowed().items():
            yield group, registry, qualified, entry, False
        for name, entry in registry.disabled().items():
            yield group, registry, name, entry, True


def clashes() -> list[Clash]:
    """Every name two distributions register in one group, with the winner (cnnkit's own, else
    the first distribution in name order)."""
    found = []
    for group, registry in GROUPS.items():
        winners = registry.entries()
        for entry in registry.shadowed().values():
            found.append(Clash(group, entry.name, winners[entry.name].distribution, entry.distribution))
    return sorted(found, key=lambda c: (c.group, c.name, c.loser))


def survey(load: bool = True) -> list[Distribution]:
    """Every distribution that registers cnnkit entries (cnnkit first, then by name).

    With ``load`` each enabled entry is imported (a class entry instantiated) to find the ones
    that fail; a distribution with any failed entry is ``failed``, its first failure the reason.
    """
    found: dict[str, Distribution] = {}
    disabled: dict[str, bool] = {}
    for group, registry, asked, entry, off in _registrations():
        dist = found.get(entry.distribution)
        if dist is None:
            version = entry.version  # the registry falls back to installed metadata itself
            dist = found[entry.distribution] = Distribution(entry.distribution, version)
        dist.entries.setdefault(group, []).append(entry.name)
        # The switches turn a whole distribution off or on, never part of one.
        disabled[entry.distribution] = off
        if off or not load:
            continue
        try:
            registry.get(asked)
        except Exception as exc:  # a plugin's import can raise anything
            dist.failed.append(f"{group}:{entry.name}")
            if dist.reason is None:
                dist.reason = f"{registry.kind} '{entry.name}': {_one_line(exc)}"
    for dist in found.values():
        dist.entries = {group: sorted(names) for group, names in dist.entries.items()}
        if disabled.get(dist.name):
            dist.status, dist.reason = "disabled", _disabled_reason(dist.name)
        elif dist.failed:
            dist.status = "failed"
    return sorted(found.values(), key=lambda d: (d.name != BUILTIN_DISTRIBUTION, d.name))


# -- contract checks -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    """The outcome of checking one entry."""

    group: str
    name: str
    passed: bool
    detail: str
    """What was checked (passed) or what is wrong (failed), in one line."""
    seconds: float


class ChecksFailed(CnnkitError):
    """At least one entry of a distribution failed its contract check (exit 1, as test runners do)."""

    exit_code = 1


def _check_side(spec: Any) -> int:
    """A small square side the model accepts, so that even large models are checked in seconds."""
    from cnnkit.summary import smallest_input_size

    recipe_side = int(spec.recipe.input_size)
    try:
        smallest = smallest_input_size(spec, in_channels=1, num_classes=10)
    except CnnkitError:
        return recipe_side  # the contract check itself will say what is wrong at this size
    return min(recipe_side, max(smallest, 32))


def _check_model(spec: Any) -> str:
    from cnnkit.testing import check_model_spec

    side = _check_side(spec)
    check_model_spec(spec, input_size=side)
    return f"contract holds (meta builds at 1 and 3 channels, a training step at {side} px)"


def _check_dataset(spec: Any) -> str:
    from cnnkit.testing import check_dataset_attributes, check_dataset_spec

    check_dataset_attributes(spec)
    try:
        folder = spec.locate()
    except CnnkitError:
        return "attributes hold (no data found here, so loading was not checked)"
    check_dataset_spec(spec)
    return f"attributes hold and {folder} loads"


def _check_trainer(trainer: Any) -> str:
    from cnnkit.testing import check_trainer

    check_trainer(trainer)
    return "protocol attributes hold (name, summary, options, fit)"


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The checks run batches of two at small inputs, which gain nothing from more CPU threads;
    on a busy machine the extra threads' spinning makes them many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _loaded(registry: Any, name: str) -> Any:
    """The entry, or, when it does not fit its protocol, the object itself: the contract check then
    says what exactly is wrong (the protocol test only says that something is)."""
    try:
        return registry.get(name)
    except PluginLoadError as exc:
        try:
            obj = registry.unchecked(name)
        except Exception:
            raise exc from None
        return obj


_CHECKS: dict[str, Callable[[Any], str]] = {"models": _check_model, "datasets": _check_dataset, "trainers": _check_trainer}


def check_distribution(
    dist: str, report: Callable[[CheckResult], None] | None = None
) -> list[CheckResult]:  # fmt: skip
    """Import every entry that distribution ``dist`` registers and run cnnkit.testing's contract
    check on it; ``report`` is called as each finishes. ``UsageError`` for a distribution that
    registers nothing (naming those that do) or that the switches disabled."""
    wanted = normalise_distribution(dist)
    registrations = list(_registrations())
    mine = [(g, r, asked, e) for g, r, asked, e, off in registrations if not off and e.distribution == wanted]
    if not mine:
        if any(e.distribution == wanted for *_, e, off in registrations if off):
            raise UsageError(f"distribution '{dist}' is disabled ({_disabled_reason(wanted)}) and cannot be checked")
        known = sorted({e.distribution for *_, e, _off in registrations})
        raise UsageError(
            f"no installed distribution '{dist}' registers cnnkit entries; those that do: {', '.join(known)}"
        )
    results = []
    for group, registry, asked, entry in mine:
        started = time.perf_counter()
        try:
            with _one_thread():
                detail, passed = _CHECKS[group](_loaded(registry, asked)), True
        except AssertionError as exc:
            detail, passed = (str(exc).splitlines() or ["check failed"])[0], False
        except Exception as exc:  # a plugin's code can raise anything; report it, check the rest
            detail, passed = _one_line(exc), False
        result = CheckResult(group, entry.name, passed, detail, time.perf_counter() - started)
        results.append(result)
        if report is not None:
            report(result)
    return results
