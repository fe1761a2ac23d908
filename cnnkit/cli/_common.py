"""Small parsing helpers shared by the subcommands (kept torch-free: they run at start-up)."""

from __future__ import annotations

import functools
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from enum import Enum
from typing import Annotated, ParamSpec, TypeVar

import typer

from cnnkit.errors import CnnkitError, InterruptedRun, UsageError, debug_enabled

P = ParamSpec("P")
R = TypeVar("R")


def parse_key_values(pairs: list[str] | None, flag: str = "-o") -> dict[str, str]:
    """``["width=0.25", "batch_norm=true"]`` -> ``{"width": "0.25", "batch_norm": "true"}``."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} '{pair}' is not of the form key=value (e.g. {flag} width=0.25)")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


STANDALONE = False
"""True when running as the ``cnnkit`` program (not in-process, e.g. under CliRunner in tests)."""


def settle_interrupt() -> None:
    """After Ctrl-C the outcome is decided (exit 130): further presses must not kill the process by
    signal on its way out. Only for the real program: in-process callers keep their handler."""
    if STANDALONE and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def guarded(command: Callable[P, R]) -> Callable[P, R]:
    """Run a command body so that an expected error is one stderr line and its exit code.

    Unexpected exceptions (bugs) keep their traceback. Typer reads the wrapped signature.
    """

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except CnnkitError as exc:
            if isinstance(exc, InterruptedRun):
                settle_interrupt()
            exc.show()
            raise typer.Exit(exc.exit_code) from exc
        except OSError as exc:
            # The machine said no (permission, disk full, a folder that cannot exist): name the
            # path, no traceback; --debug shows where.
            if debug_enabled():
                traceback.print_exc()
            where = f": {exc.filename}" if exc.filename else ""
            print(f"cnnkit: error: {exc.strerror or exc}{where}", file=sys.stderr, flush=True)
            raise typer.Exit(1) from exc
        except KeyboardInterrupt:
            # Outside training (which saves first and raises InterruptedRun) nothing is half-done.
            settle_interrupt()
            print("cnnkit: interrupted", file=sys.stderr, flush=True)
            raise typer.Exit(130) from None

    return wrapper


class Format(str, Enum):
    """How a command prints its result: a table for people, JSON for programs."""

    table = "table"
    json = "json"


FormatOption = Annotated[Format, typer.Option("--format", "-f", help="table or json.")]
