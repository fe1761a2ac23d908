"""Out of memory while training: one :class:`~cnnkit.errors.UsageError` line instead of a traceback.

Running out of device memory is nearly always a batch (or input) too large for the device, which
the user fixes with a flag: so it is a usage error (exit 2) naming the batch size, the model and the
device, and suggesting half the batch::

    cnnkit: error: out of memory on cuda:0 (NVIDIA H100 80GB HBM3) training vgg11 with batch size 4096:
    tried to allocate 24.50 GiB of 79.19 GiB; use a smaller --batch-size, e.g. --batch-size 2048

The training driver wraps the loop in :func:`out_of_memory_as_usage_error`; the CLI's ``guarded``
wrapper converts any that escape elsewhere (evaluation, prediction) with what it knows. This module
imports torch only when an error is being converted, so importing it is free.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from typing import Any

from cnnkit.errors import UsageError

__all__ = ["is_out_of_memory", "out_of_memory_error", "out_of_memory_as_usage_error"]

# RuntimeErrors that are out-of-memory without being torch.OutOfMemoryError: the CPU allocator,
# MPS, and cuBLAS/cuDNN failing to allocate their workspaces.
_OOM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
)
_TRIED = re.compile(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]?i?B)")
_TOTAL = re.compile(r"total capacity of ([\d.]+ ?[KMGT]?i?B)")
_CPU_BYTES = re.compile(r"you tried to allocate (\d+) bytes")
_GPU_INDEX = re.compile(r"GPU (\d+) has a total capacity")


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``) and the allocators'
    out-of-memory RuntimeErrors; False for anything else, and always when torch is not loaded."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OOM_MESSAGES)


def _device_label(device: Any, exc: BaseException) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3)``, ``cpu``; never raises (the device may be in a bad state).

    With no device given (or ``auto``) it is read from the error: CUDA's names its GPU.
    """
    spec = str(device).strip().lower() if device is not None else "auto"
    if spec == "auto":
        gpu = _GPU_INDEX.search(str(exc))
        if gpu is None:
            return "the GPU" if _is_cuda_oom(exc) else "the device"
        spec = f"cuda:{gpu.group(1)}"
    label = spec
    try:
        import torch

        resolved = torch.device(spec)
        if resolved.type == "cuda":
            index = resolved.index if resolved.index is not None else torch.cuda.current_device()
            label = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    except Exception:  # a broken context must not hide the error being reported
        pass
    return label


def _is_cuda_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return oom_type is not None and isinstance(exc, oom_type) and "CUDA" in str(exc)


def _amount(exc: BaseException) -> str:
    """``tried to allocate 24.50 GiB of 79.19 GiB`` from torch's message, or '' when it says neither."""
    text = str(exc)
    tried, total = _TRIED.search(text), _TOTAL.search(text)
    if tried is None:
        cpu = _CPU_BYTES.search(text)
        return f"tried to allocate {int(cpu.group(1)) / 2**30:.2f} GiB" if cpu else ""
    return f"tried to allocate {tried.group(1)}" + (f" of {total.group(1)}" if total else "")


def out_of_memory_error(
    exc: BaseException, *, batch_size: int | None, model: str | None = None, device: Any = None,
    doing: str = "training",
) -> UsageError:  # fmt: skip
    """The one-line UsageError for an out-of-memory ``exc``: what ran out, and the flag that fixes it.

    ``batch_size`` None means it is not known here (the suggestion then names no number).
    """
    head = f"out of memory on {_device_label(device, exc)}"
    if doing:
        head += f" {doing}" + (f" {model}" if model else "")
    elif model:
        head += f" with {model}"
    if batch_size:
        head += f" at batch size {batch_size}" if model and not doing else f" with batch size {batch_size}"
    amount = _amount(exc)
    head += f": {amount}" if amount else ""
    if batch_size is None:
        fix = "use a smaller --batch-size"
    elif batch_size > 1:
        fix = f"use a smaller --batch-size, e.g. --batch-size {batch_size // 2}"
    else:
        fix = "even one example does not fit: use a smaller --input-size, a narrower model (-o width=...) or another --device"
    return UsageError(f"{head}; {fix}")


@contextlib.contextmanager
def out_of_memory_as_usage_error(
    *, batch_size: int | None, model: str | None = None, device: Any = None, doing: str = "training"
) -> Iterator[None]:
    """Run the body; an out-of-memory error in it becomes :func:`out_of_memory_error` (exit 2).

    The original exception is kept as ``__cause__`` (``--debug`` shows its traceback). On CUDA the
    caching allocator's free blocks are released, so what runs afterwards (the failure handlers,
    another run in the same process) starts from the memory actually in use.
    """
    try:
        yield
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        error = out_of_memory_error(exc, batch_size=batch_size, model=model, device=device, doing=doing)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        raise error from exc
