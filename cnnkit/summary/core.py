"""Build a :class:`ModelSummary`: :func:`summarize` checks the request, traces one forward pass,
turns the records into rows at the requested depth and explains an input that does not fit."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnnkit.errors import UsageError
from cnnkit.protocols import ModelSpec
from cnnkit.summary.report import LayerRow, ModelSummary
from cnnkit.summary.search import _smallest_side, _uncollapsed_side
from cnnkit.summary.trace import _build_on_meta, _input_dtype, _tensors, _Tracer


def _resolve(model: str | ModelSpec) -> ModelSpec:
    if isinstance(model, str):
        from cnnkit.registry import MODELS

        return MODELS.get(model)
    return model


def _depth_of(name: str) -> int:
    return 0 if not name else name.count(".") + 1


def _rows_at_depth(model: nn.Module, depth: int) -> list[tuple[str, nn.Module]]:
    """Modules exactly ``depth`` levels down, plus shallower leaves; ``depth=0`` means all leaves."""
    modules = list(model.named_modules())
    if len(modules) == 1:
        return modules  # a model with no submodules is its own single row
    rows = []
    for name, module in modules[1:]:
        leaf = next(module.children(), None) is None
        level = _depth_of(name)
        if (depth == 0 and leaf) or (depth > 0 and (level == depth or (level < depth and leaf))):
            rows.append((name, module))
    return rows


def _validated_options(spec: ModelSpec, options: dict[str, Any]) -> dict[str, Any]:
    schema = getattr(spec, "options", None)
    try:
        return schema.model_validate(options).model_dump(mode="json")  # type: ignore[union-attr]
    except Exception:  # a plugin's options type may not be pydantic; show what was given
        return dict(options)


def summarize(
    model: str | ModelSpec,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int = 10,
    batch: int = 1,
    options: dict[str, Any] | None = None,
    depth: int = 1,
) -> ModelSummary:
    """Summarise a registered model (by name or spec) for one input shape, on the meta device.

    ``input_shape`` is (C, H, W), by default 1 channel at the recipe's input size. ``depth`` 1
    lists the top-level children, 2 their children, and so on; 0 lists every leaf. An input too
    small for the network is a :class:`UsageError` naming the layer where the map vanished and
    the smallest input that works.
    """
    spec = _resolve(model)
    recipe_side = getattr(getattr(spec, "recipe", None), "input_size", None)
    if input_shape is None:
        input_shape = (1, recipe_side or 224, recipe_side or 224)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise UsageError(f"input shape {input_shape} must be three positive integers (C, H, W), e.g. (1, 28, 28)")
    if num_classes < 1:
        raise UsageError(f"--classes {num_classes}: a classifier needs at least 1 class (e.g. --classes 10)")
    if batch < 1:
        raise UsageError(f"--batch {batch}: the batch must hold at least 1 example (e.g. --batch 1)")
    if depth < 0:
        raise UsageError(f"--depth {depth}: use 1 for top-level layers, more to go deeper, 0 for every leaf")
    options = dict(options or {})
    c, h, w = input_shape

    net = _build_on_meta(spec, c, num_classes, options)
    x = torch.empty(batch, c, h, w, device="meta", dtype=_input_dtype(net))
    with _Tracer(net, record=True) as tracer:
        output, failure = tracer.run(x)
    if failure is not None:
        smallest = _smallest_side(net, spec.name, c, recipe_side)
        if min(h, w) < smallest:
            what = "the feature map vanished at" if failure.vanished else "the forward pass failed at"
            raise UsageError(
                f"input {c}x{h}x{w} is too small for {spec.name}: {what} "
                f"{failure.where}; the smallest input is {c}x{smallest}x{smallest}"
            )
        known_good = recipe_side or smallest
        raise UsageError(
            f"input {c}x{h}x{w} does not fit {spec.name}: {failure.where} failed ({failure.message}); "
            f"try its recipe's input, {c}x{known_good}x{known_good}"
        )

    # Each leaf's MACs count towards every ancestor shown as a row.
    subtree_macs: dict[str, int] = {}
    for name, macs in tracer.leaf_macs.items():
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            subtree_macs[prefix] = subtree_macs.get(prefix, 0) + macs
    rows = [
        LayerRow(
            name=name or type(module).__name__,
            type=type(module).__name__,
            output_shape=tracer.shapes.get(name),
            params=sum(p.numel() for p in module.parameters()),
            macs=subtree_macs.get(name, 0) if name else sum(tracer.leaf_macs.values()),
        )
        for name, module in _rows_at_depth(net, depth)
    ]

    collapsed_at = uncollapsed = None
    if tracer.collapsed:
        collapsed_at = "the input" if h == w == 1 else (tracer.first_1x1 or "an early layer")
        uncollapsed = _uncollapsed_side(net, c, min(h, w), recipe_side)

    params = list(net.parameters())
    out_shapes = tuple(tuple(t.shape) for t in _tensors(output))
    return ModelSummary(
        model=spec.name,
        input_shape=(c, h, w),
        num_classes=num_classes,
        batch=batch,
        options=_validated_options(spec, options),
        depth=depth,
        layers=rows,
        output_shape=out_shapes[0] if len(out_shapes) == 1 else (out_shapes or None),
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        macs=sum(tracer.leaf_macs.values()),
        macs_by_kind=dict(tracer.macs_by_kind),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        buffer_bytes=sum(b.numel() * b.element_size() for b in net.buffers()),
        activation_bytes=tracer.activation_bytes,
        dtype=str(x.dtype).removeprefix("torch."),
        collapsed_at=collapsed_at,
        uncollapsed_side=uncollapsed,
    )
