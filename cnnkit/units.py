"""Sizes as people read them, one format everywhere (summaries, the cache, the store's messages);
torch-free, so that the CLI's start-up may use it."""

from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(value: float) -> str:
    """``23_935_208`` -> ``"22.83 MiB"`` (powers of 1024, with the binary prefixes that say so)."""
    for threshold, unit in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f} {unit}"
    return f"{int(value)} B"
