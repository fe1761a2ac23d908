"""Resolve ``--device auto|cpu|cuda|cuda:N|mps`` to a ``torch.device``, with one-line errors."""

from __future__ import annotations

import torch

from cnnkit.errors import UsageError

__all__ = ["resolve_device", "available_devices", "describe_available"]


def available_devices() -> list[str]:
    """What this machine offers, e.g. ``["cpu", "cuda:0"]``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def describe_available() -> str:
    """``cpu, cuda:0 (NVIDIA H100 80GB HBM3)``: what this machine offers, GPUs by name (for errors)."""
    described = []
    for name in available_devices():
        if name.startswith("cuda:"):
            try:
                name += f" ({torch.cuda.get_device_name(int(name[5:]))})"
            except (RuntimeError, AssertionError):  # a GPU that cannot be queried is still listed
                pass
        described.append(name)
    return ", ".join(described)


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable device is a ``UsageError``."""
    spec = spec.strip().lower()
    available = available_devices()
    if spec == "auto":
        return torch.device(next((d for d in available if d != "cpu"), "cpu"))
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UsageError(
            f"--device '{spec}' is not a device name; use auto, cpu, cuda, cuda:N or mps "
            f"(available here: {describe_available()})"
        ) from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available here; available: {describe_available()}")
        index = 0 if device.index is None else device.index
        count = torch.cuda.device_count()
        if index >= count:
            raise UsageError(
                f"--device {spec}: no such GPU (this machine has {count}); use one of: {describe_available()}"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and "mps" not in available:
        raise UsageError(f"--device {spec}: MPS is not available here; available: {describe_available()}")
    if device.type not in {"cpu", "cuda", "mps"}:
        raise UsageError(f"--device '{spec}' is not supported; use one of: auto, {describe_available()}")
    return device
