"""Tiny stderr helpers shared by the library and the CLI (no rich import: they run at start-up)."""

from __future__ import annotations

import sys

_said: set[str] = set()


def warn(message: str) -> None:
    """Print ``cnnkit: warning: <message>`` on stderr, once per distinct message per process."""
    if message in _said:
        return
    _said.add(message)
    print(f"cnnkit: warning: {message}", file=sys.stderr, flush=True)


def reset_warnings() -> None:
    """Forget which warnings were shown (tests use it to see them again)."""
    _said.clear()
