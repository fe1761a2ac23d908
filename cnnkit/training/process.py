"""What a run changes in the process for its duration, and puts back: how Ctrl-C is handled (once
for the run, held back while a file is saved) and torch's determinism settings."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["first_ctrl_c_only", "sigint_deferred", "determinism"]


@contextlib.contextmanager
def first_ctrl_c_only() -> Iterator[list[bool]]:
    """Ctrl-C raises KeyboardInterrupt once; repeats while the run stops and exits are ignored.

    Yields a list that is non-empty once Ctrl-C was pressed (a collective cut short by a peer that
    exited on the same Ctrl-C is then an interruption, not a failure)."""
    pressed: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if not pressed:
            pressed.append(True)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def determinism(on: bool, device: torch.device) -> Iterator[None]:
    """torch.use_deterministic_algorithms for the run only; cudnn.benchmark otherwise (on CUDA)."""
    was = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    # Only when it changes: the call imports torch._inductor, seconds of start-up on a CPU.
    if on != was[0]:
        # On CUDA a few backward kernels (adaptive average pooling's among them) have no
        # deterministic version: torch warns there instead of failing the run.
        torch.use_deterministic_algorithms(on, warn_only=on and device.type == "cuda")
    torch.backends.cudnn.benchmark = device.type == "cuda" and not on
    try:
        yield
    finally:
        if on != was[0]:
            torch.use_deterministic_algorithms(was[0])
        torch.backends.cudnn.benchmark = was[1]


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Let a save finish when Ctrl-C is pressed during it, then raise KeyboardInterrupt (main thread
    only: signals live there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt
