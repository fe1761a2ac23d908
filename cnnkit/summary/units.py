"""Text in and out of a summary: parse ``--input CxHxW`` and write counts, bytes and shapes for people
and for JSON."""

from __future__ import annotations

import re
from typing import Any

from cnnkit.errors import UsageError
from cnnkit.units import human_bytes as human_bytes  # the one format, importable from here as before

Shape = tuple[int, ...] | tuple[tuple[int, ...], ...]
"""One output's shape, or one shape per tensor for modules that return several."""

_INPUT_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_input_shape(text: str) -> tuple[int, int, int]:
    """``"1x96x96"`` -> ``(1, 96, 96)``; anything else is a one-line :class:`UsageError`."""
    match = _INPUT_RE.match(text)
    dims = tuple(int(g) for g in match.groups()) if match else ()
    if len(dims) != 3 or min(dims) < 1:
        raise UsageError(
            f"--input '{text}' is not of the form CxHxW with three positive integers "
            f"(channels x height x width), e.g. --input 1x28x28 or --input 3x224x224"
        )
    return dims  # type: ignore[return-value]


def human_count(value: float, unit: str = "") -> str:
    """``5_983_802`` -> ``"5.98 M"``; ``1.53e9, "MACs"`` -> ``"1.53 GMACs"`` (powers of 1000)."""
    for threshold, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f} {prefix}{unit}"
    return f"{value:g} {unit}".rstrip()


def _format_shape(shape: Shape | None) -> str:
    if shape is None:
        return "-"
    if shape and isinstance(shape[0], tuple):
        return ", ".join(_format_shape(s) for s in shape)  # type: ignore[arg-type]
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _shape_json(shape: Shape | None) -> list[Any] | None:
    if shape is None:
        return None
    return [list(s) if isinstance(s, tuple) else s for s in shape]
