"""Small parsing helpers shared by the subcommands (kept torch-free: they run at start-up)."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, ParamSpec, TypeVar

import typer

from cnnkit.errors import CnnkitError, InterruptedRun, UsageError, debug_enabled

if TYPE_CHECKING:
    from rich.console import Console as RichConsole

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


def stdout_closed() -> None:
    """The reader of stdout went away (``cnnkit eval RUN | head -1``): a normal end, as in git.

    Later writes, the interpreter's final flush included, go to /dev/null instead of failing
    with "Broken pipe". Only for the real program: in-process callers keep their stdout.
    """
    if not STANDALONE or sys.__stdout__ is None:
        return
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.__stdout__.fileno())
        os.close(devnull)


def stdout_console(**options: Any) -> RichConsole:
    """A rich console on stdout whose closed pipe ends the command as :func:`guarded` ends any other
    (rich's own handler exits 1)."""
    from rich.console import Console

    class PipeAwareConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    return PipeAwareConsole(**options)


def finish_output(code: int | str | None) -> int | str | None:
    """The exit code once stdout is flushed: a closed pipe is a normal end (exit 0), also when typer
    met it outside a command body (it then wraps stdout and exits 1)."""
    if type(sys.stdout).__name__ == "PacifyFlushWrapper":
        stdout_closed()
        return 0
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_closed()
    except (OSError, ValueError, AttributeError):
        pass
    return code


_DOING = {"train_command": "training", "eval_command": "evaluating", "predict_command": "predicting"}
"""What a command was doing when it ran out of memory (for the one-line error)."""


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
        except BrokenPipeError:
            stdout_closed()
            raise typer.Exit(0) from None
        except OSError as exc:
            # The machine said no (permission, disk full, a folder that cannot exist): name the
            # path, no traceback; --debug shows where.
            if debug_enabled():
                traceback.print_exc()
            where = f": {exc.filename}" if exc.filename else ""
            print(f"cnnkit: error: {exc.strerror or exc}{where}", file=sys.stderr, flush=True)
            raise typer.Exit(1) from exc
        except Exception as exc:
            # Out of (GPU) memory is a batch too large for the device, fixed with a flag: one line,
            # exit 2. The trainer names its real batch size; this is the net for everything else.
            from cnnkit.gpu import is_out_of_memory, out_of_memory_error

            if not is_out_of_memory(exc):
                raise
            given_batch, given_model = kwargs.get("batch_size"), kwargs.get("model")
            error = out_of_memory_error(
                exc, batch_size=given_batch if isinstance(given_batch, int) else None,
                model=given_model if isinstance(given_model, str) else None, device=kwargs.get("device"),
                doing=_DOING.get(command.__name__, ""),
            )  # fmt: skip
            error.show()
            raise typer.Exit(error.exit_code) from exc
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
