"""Expected errors, each carrying the exit code the CLI documents.

| code | meaning                                   |
|------|-------------------------------------------|
| 1    | the operating system refused (permission, disk full); the path is named |
| 2    | usage: a bad name, option or value        |
| 3    | bad data: a missing, truncated or corrupt dataset file |
| 4    | bad weights file                           |
| 5    | training diverged (non-finite loss)        |
| 130  | interrupted (after saving what could be saved) |

The CLI (``cnnkit.cli._common.guarded``) prints any of them as one line on stderr and exits with
its code; ``--debug`` (or ``CNNKIT_DEBUG=1``) adds the traceback.
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback
from collections.abc import Iterable
from typing import IO, Any

__all__ = [
    "CnnkitError",
    "UsageError",
    "UnknownNameError",
    "PluginLoadError",
    "DataError",
    "WeightsError",
    "DivergedError",
    "InterruptedRun",
    "debug_enabled",
    "closest",
]


def debug_enabled() -> bool:
    """True when ``--debug`` was given or ``CNNKIT_DEBUG`` is set to a true value."""
    return os.environ.get("CNNKIT_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates that look most like ``name`` (for "did you mean" hints)."""
    pool = list(candidates)
    hits = difflib.get_close_matches(name, pool, n=n, cutoff=0.5)
    # Prefix matches help with e.g. "vgg" -> vgg11, vgg16, which difflib ranks low.
    hits += [c for c in pool if c.startswith(name) and c not in hits]
    return hits[:n]


class CnnkitError(Exception):
    """Base of every expected error; ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def format_message(self) -> str:
        return self.message

    def show(self, file: IO[Any] | None = None) -> None:
        stream = file if file is not None else sys.stderr
        if debug_enabled():
            traceback.print_exception(self, file=stream)
        print(f"cnnkit: error: {self.format_message()}", file=stream, flush=True)


class UsageError(CnnkitError):
    """A bad name, option or value given by the user (exit 2)."""

    exit_code = 2


class UnknownNameError(UsageError):
    """A model, dataset or trainer name that no installed distribution registers (exit 2)."""

    def __init__(self, kind: str, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        hint = closest(name, known)
        did_you_mean = f" Did you mean {', '.join(hint)}?" if hint else ""
        super().__init__(
            f"unknown {kind} '{name}'.{did_you_mean} Run 'cnnkit list {kind}s' to see all "
            f"{len(known)} registered {kind}s."
        )
        self.kind, self.name, self.known = kind, name, known


class PluginLoadError(UsageError):
    """A registered entry point whose code failed to import (exit 2)."""


class DataError(CnnkitError):
    """A missing, truncated or corrupt dataset file (exit 3)."""

    exit_code = 3


class WeightsError(CnnkitError):
    """A weights file that cannot be read or does not fit the model or dataset (exit 4)."""

    exit_code = 4


class DivergedError(CnnkitError):
    """Training produced a non-finite loss (exit 5)."""

    exit_code = 5


class InterruptedRun(CnnkitError):
    """The run was interrupted (Ctrl-C) after saving what could be saved (exit 130)."""

    exit_code = 130
