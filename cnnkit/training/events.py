"""The events the training loop emits and the bus that calls their handlers.

Like pytorch-ignite: the loop calls ``events.emit(Events.X, run)`` at a few named points and
never does anything else; each feature of a run is a handler attached to the events it needs.
cnnkit's own handlers live in :mod:`cnnkit.training.handlers`.

The bus does not know the run's type: a handler is called with the run (a
:class:`~cnnkit.training.context.Run`), so this module imports nothing of the training driver and
every handler module can import it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any, Protocol

__all__ = ["Events", "EventBus", "Handler", "Feature"]


class Events(Enum):
    """The points in a run where handlers are called."""

    STARTED = "started"
    """Once, before the first epoch (also when resuming)."""
    EPOCH_STARTED = "epoch_started"
    ITERATION_COMPLETED = "iteration_completed"
    """Mid-epoch progress, as often as the trainer reports it (the standard one: every
    ``report_every`` seconds, not every step)."""
    EPOCH_COMPLETED = "epoch_completed"
    """After the epoch's evaluation; ``run.metrics`` holds its row."""
    COMPLETED = "completed"
    """The run finished (all epochs, or stopped early)."""
    INTERRUPTED = "interrupted"
    """Ctrl-C; the driver then exits 130 (the files already hold the last completed epoch)."""
    FAILED = "failed"
    """An expected error (e.g. divergence) ends the run; ``run.error`` holds it."""


Handler = Callable[[Any], None]
"""Called with the run (a :class:`~cnnkit.training.context.Run`) when its event is emitted."""


class Feature(Protocol):
    """Something that hangs off a run's events (a checkpointer, a progress bar, ...)."""

    def attach(self) -> list[tuple[Events, Handler]]:
        """The (event, handler) pairs to register, in order."""
        ...


class EventBus:
    """Calls the handlers registered for an event, in the order they were given."""

    def __init__(self, handlers: Iterable[tuple[Events, Handler]] = ()) -> None:
        self._handlers: dict[Events, list[Handler]] = {event: [] for event in Events}
        for event, handler in handlers:
            self.on(event, handler)

    def on(self, event: Events, handler: Handler) -> None:
        """Call ``handler(run)`` whenever ``event`` is emitted."""
        self._handlers[event].append(handler)

    def emit(self, event: Events, run: Any) -> None:
        """Call every handler of ``event`` with ``run``."""
        for handler in self._handlers[event]:
            handler(run)
