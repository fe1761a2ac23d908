"""Search input sizes by bisection on the meta device: the smallest square side a model accepts, and
the smallest one at which its feature maps no longer collapse to 1x1."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnnkit.errors import UsageError
from cnnkit.protocols import ModelSpec
from cnnkit.summary.trace import _build_on_meta, _Failure, _input_dtype, _Tracer

MAX_SIDE = 1024
"""Largest square side :func:`smallest_input_size` searches (when the recipe size does not work)."""


def _probe(model: nn.Module, in_channels: int, side: int, batch: int = 1) -> _Failure | None:
    x = torch.empty(batch, in_channels, side, side, device="meta", dtype=_input_dtype(model))
    with _Tracer(model, record=False) as tracer:
        return tracer.run(x)[1]


def _smallest_side(model: nn.Module, name: str, in_channels: int, recipe_side: int | None) -> int:
    # A known-good size bounds the search; the recipe's size also suits nets whose classifier
    # expects a fixed feature-map size, where very large inputs fail too.
    upper = None
    for side in dict.fromkeys(s for s in (recipe_side, MAX_SIDE) if s):
        failure = _probe(model, in_channels, side)
        if failure is None:
            upper = side
            break
    if upper is None:
        raise UsageError(
            f"model '{name}' accepts no square input up to {in_channels}x{MAX_SIDE}x{MAX_SIDE}: "
            f"{failure.where if failure else 'its forward'} failed ({failure.message if failure else ''})"
        )
    if _probe(model, in_channels, 1) is None:
        return 1
    failing, working = 1, upper
    while working - failing > 1:
        middle = (failing + working) // 2
        if _probe(model, in_channels, middle) is None:
            working = middle
        else:
            failing = middle
    return working


def _collapses(model: nn.Module, in_channels: int, side: int) -> bool:
    x = torch.empty(1, in_channels, side, side, device="meta", dtype=_input_dtype(model))
    with _Tracer(model, record=False) as tracer:
        failure = tracer.run(x)[1]
    return failure is not None or tracer.collapsed


def _uncollapsed_side(model: nn.Module, in_channels: int, collapsing: int, recipe_side: int | None) -> int | None:
    """The smallest square side above ``collapsing`` whose maps do not collapse to 1x1 (bisection on the
    meta device, bounded by the recipe's size or 1024), or None when none up to 1024 works."""
    bounds = (s for s in (recipe_side, MAX_SIDE) if s and s > collapsing)
    upper = next((s for s in bounds if not _collapses(model, in_channels, s)), None)
    if upper is None:
        return None
    failing, working = collapsing, upper
    while working - failing > 1:
        middle = (failing + working) // 2
        if _collapses(model, in_channels, middle):
            failing = middle
        else:
            working = middle
    return working


def smallest_input_size(
    spec: ModelSpec, in_channels: int = 1, num_classes: int = 10, options: dict[str, Any] | None = None
) -> int:
    """The smallest square side the model accepts, found by bisection on the meta device.

    Assumes that sizes at or above the smallest one work (true of these nets, which end in
    adaptive pooling). Raises :class:`UsageError` when no side up to 1024 works.
    """
    model = _build_on_meta(spec, in_channels, num_classes, dict(options or {}))
    recipe = getattr(spec, "recipe", None)
    return _smallest_side(model, spec.name, in_channels, getattr(recipe, "input_size", None))
