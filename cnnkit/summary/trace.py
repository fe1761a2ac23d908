"""Run a model on the meta device and collect per-layer records: output shapes, multiply-adds (by
the rules in the :mod:`cnnkit.summary` docstring), activation bytes, 1x1 collapse, and where a failing
forward pass broke."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cnnkit.protocols import ModelSpec
from cnnkit.summary.units import Shape

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_AVG_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG_POOL = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_MAX_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_SPATIAL_KERNEL = (*_CONV, *_CONV_T, *_AVG_POOL, *_MAX_POOL)
"""Layers with a kernel that slides over the map: on a 1x1 map a kernel larger than 1 sees padding."""


class _Vanished(Exception):
    """Raised from a forward hook when a module's output has no elements left."""


@dataclass(frozen=True)
class _Failure:
    """Where and why a forward pass failed."""

    layer: str
    type: str
    message: str
    vanished: bool
    """The map emptied, or a kernel (convolution, pooling) no longer fit in it."""

    @property
    def where(self) -> str:
        return f"{self.layer} ({self.type})" if self.layer else f"the model's own forward ({self.type})"


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _leaf_macs(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> tuple[str, int]:
    """``(kind, MACs)`` of one call of a leaf module; kind is ``""`` when nothing is counted."""
    out = output.numel()
    if isinstance(module, _CONV):
        return "conv", out * (module.in_channels // module.groups) * _prod(module.kernel_size)
    if isinstance(module, _CONV_T):
        first = next(_tensors(inputs), None)
        n_in = first.numel() if first is not None else 0
        return "conv", n_in * (module.out_channels // module.groups) * _prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return "linear", out * module.in_features
    if isinstance(module, _NORM):
        return "norm", out
    if isinstance(module, _AVG_POOL):
        kernel = module.kernel_size
        # AvgPool2d/3d keep an int kernel_size as given: it stands for every spatial dimension.
        area = kernel ** (output.dim() - 2) if isinstance(kernel, int) else _prod(kernel)
        return "pool", out * area
    if isinstance(module, _ADAPTIVE_AVG_POOL):
        first = next(_tensors(inputs), None)
        return "pool", first.numel() if first is not None else 0
    return "", 0


def _storage_owner(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory ``tensor`` uses: its base if it is a view, else itself."""
    return tensor._base if tensor._base is not None else tensor


def _prod(values: tuple[int, ...] | int) -> int:
    if isinstance(values, int):
        return values
    result = 1
    for v in values:
        result *= int(v)
    return result


@contextmanager
def _dynamo_import_skipped() -> Iterator[None]:
    """Spare a meta forward pass the ~1 s import of ``torch._dynamo`` that it does not need.

    Many of torch's meta kernels (relu, add, cat, adaptive pooling) are Python functions wrapped in
    ``torch._disable_dynamo``, which imports dynamo on their first call only to exclude them from
    compilation. While dynamo has not been imported nothing can be compiling, so for the duration a
    stand-in whose ``disable`` returns the function unchanged is exact. On exit the stand-in and
    what the wrappers cached are removed: a later ``import torch._dynamo`` gets the real module.
    """
    if "torch._dynamo" in sys.modules:
        yield
        return
    stand_in = types.ModuleType("torch._dynamo")
    seen: list[Callable[..., Any]] = []

    def disable(fn: Callable[..., Any] | None = None, recursive: bool = True, **kwargs: Any) -> Any:
        if fn is None:
            return lambda f: disable(f, recursive, **kwargs)
        seen.append(fn)
        return fn

    stand_in.disable = disable  # type: ignore[attr-defined]
    sys.modules["torch._dynamo"] = stand_in
    # ``import torch._dynamo`` then reads the attribute on the package; torch's lazy __getattr__
    # would import the real module.
    torch._dynamo = stand_in  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if sys.modules.get("torch._dynamo") is stand_in:
            del sys.modules["torch._dynamo"]
        if torch.__dict__.get("_dynamo") is stand_in:
            del torch._dynamo  # type: ignore[attr-defined]
        for fn in seen:
            if getattr(fn, "__dynamo_disable", None) is fn:
                del fn.__dynamo_disable  # type: ignore[attr-defined]


class _Tracer:
    """Forward hooks on every module: which one is running, and (when recording) what it produced."""

    def __init__(self, model: nn.Module, record: bool) -> None:
        self.model = model
        self.record = record
        self.names: dict[nn.Module, str] = {m: name for name, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.shapes: dict[str, Shape] = {}
        self.leaf_macs: dict[str, int] = {}
        self.macs_by_kind: dict[str, int] = {"conv": 0, "linear": 0, "norm": 0, "pool": 0}
        self.activation_bytes = 0
        self.first_1x1: str | None = None
        """The first leaf whose output map is 1x1."""
        self.collapsed = False
        """A convolution or pooling with a kernel larger than 1 ran on a 1x1 map."""
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _Tracer:
        for module in self.names:
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post))
        self._quiet_dynamo = _dynamo_import_skipped()
        self._quiet_dynamo.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._quiet_dynamo.__exit__(None, None, None)

    def _pre(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        self.stack.append(module)
        if not self.collapsed and isinstance(module, _SPATIAL_KERNEL) and _prod(module.kernel_size) > 1:
            first = next(_tensors(inputs), None)
            self.collapsed = first is not None and _is_1x1(first)

    def _post(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        outputs = list(_tensors(output))
        name = self.names[module]
        # Some ops (adaptive pooling, flatten) happily pass an empty map on; stop where it emptied.
        if any(t.numel() == 0 for t in outputs):
            raise _Vanished(f"output shape {tuple(outputs[0].shape)}")
        if self.stack and self.stack[-1] is module:
            self.stack.pop()
        leaf = next(module.children(), None) is None
        if self.first_1x1 is None and leaf and outputs and _is_1x1(outputs[0]):
            self.first_1x1 = f"{name} ({type(module).__name__})"
        if not self.record:
            return
        if name not in self.shapes and outputs:
            shapes = tuple(tuple(t.shape) for t in outputs)
            self.shapes[name] = shapes[0] if len(shapes) == 1 else shapes
        if next(module.children(), None) is not None or not outputs:
            return
        kind, macs = _leaf_macs(module, inputs, outputs[0])
        if kind:
            self.macs_by_kind[kind] += macs
        self.leaf_macs[name] = self.leaf_macs.get(name, 0) + macs
        # In-place modules (ReLU(inplace=True)) return their input and views (Flatten) share its
        # memory: neither allocates a new activation.
        inputs_seen = {id(_storage_owner(t)) for t in _tensors(inputs)}
        self.activation_bytes += sum(
            t.numel() * t.element_size() for t in outputs if id(_storage_owner(t)) not in inputs_seen
        )

    def run(self, x: torch.Tensor) -> tuple[Any, _Failure | None]:
        """The model's output, or the failure and the innermost module that was running."""
        self.stack.clear()
        try:
            with torch.no_grad():
                return self.model(x), None
        except (_Vanished, RuntimeError, ValueError, IndexError) as exc:
            culprit = self.stack[-1] if self.stack else self.model
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            vanished = isinstance(exc, _Vanished) or hasattr(culprit, "kernel_size")
            return None, _Failure(self.names.get(culprit, ""), type(culprit).__name__, message, vanished)


def _is_1x1(tensor: torch.Tensor) -> bool:
    """A (N, C, *spatial) map whose spatial dimensions are all 1."""
    return tensor.dim() >= 3 and all(d == 1 for d in tensor.shape[2:])



def _build_on_meta(spec: ModelSpec, in_channels: int, num_classes: int, options: dict[str, Any]) -> nn.Module:
    # Meta tensors carry shapes only: no memory for the weights, and initialisers are no-ops.
    with torch.device("meta"), _dynamo_import_skipped():
        model = spec.build(in_channels, num_classes, **options)
    # Eval mode: batch norm on a batch of one would refuse to compute training statistics.
    return model.eval()


def _input_dtype(model: nn.Module) -> torch.dtype:
    first = next(model.parameters(), None)
    return first.dtype if first is not None and first.is_floating_point() else torch.float32
