"""Layer-by-layer model summaries computed on the meta device, and the smallest input a model takes.

The model is built under ``torch.device("meta")`` and run on a meta tensor: every shape is real,
no weight is allocated and no arithmetic happens, so the pass over VGG-16 at 224 px takes tens of
milliseconds (see :func:`_dynamo_import_skipped` for the second it would otherwise spend on an
import). Forward hooks record each module's output shape and multiply-adds;
forward pre-hooks track which module is running, so that a shape error torch raises deep inside a
network is reported against the layer where the feature map vanished.

What counts as a multiply-accumulate (MAC), for the whole batch given:

- convolution: output elements x in_channels / groups x kernel volume (transposed: input elements
  x out_channels / groups x kernel volume); the bias is not counted,
- linear: output elements x in_features; the bias is not counted,
- batch/group/layer/instance/local-response norm: one per output element (at inference the scale
  and shift fold into a single multiply-add),
- average pooling: output elements x kernel area; adaptive average pooling: one per input element,
- nothing for max pooling (comparisons), activations, dropout, flatten, and for functional
  operations written in a ``forward`` outside any module (residual additions, concatenation).

FLOPs are reported as 2 x MACs, the convention ``torch.utils.flop_counter`` follows; convolution
and linear MACs agree with that counter exactly.
"""

from __future__ import annotations

import re
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cnnkit.errors import UsageError
from cnnkit.protocols import ModelSpec

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = [
    "LayerRow",
    "ModelSummary",
    "summarize",
    "parse_input_shape",
    "smallest_input_size",
    "human_count",
    "human_bytes",
]

MAX_SIDE = 1024
"""Largest square side :func:`smallest_input_size` searches (when the recipe size does not work)."""

Shape = tuple[int, ...] | tuple[tuple[int, ...], ...]
"""One output's shape, or one shape per tensor for modules that return several."""

_INPUT_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*[xX×]\s*(\d+)\s*$")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
_AVG_POOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_AVG_POOL = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_MAX_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_SPATIAL_KERNEL = (*_CONV, *_CONV_T, *_AVG_POOL, *_MAX_POOL)
"""Layers with a kernel that slides over the map: on a 1x1 map a kernel larger than 1 sees padding."""


# --------------------------------------------------------------------------------------------
# Parsing and units
# --------------------------------------------------------------------------------------------
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


def human_bytes(value: float) -> str:
    """``23_935_208`` -> ``"22.83 MiB"`` (powers of 1024)."""
    for threshold, unit in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f} {unit}"
    return f"{int(value)} B"


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


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerRow:
    """One row of the summary: a module at the requested depth (or a shallower leaf)."""

    name: str
    """Dotted name as ``model.named_modules()`` gives it, e.g. ``b4.1``."""
    type: str
    """Class name, e.g. ``MaxPool2d``."""
    output_shape: Shape | None
    """Shape of its output for the batch given (``None`` when the forward pass never called it)."""
    params: int
    """Parameters in this module and everything below it."""
    macs: int
    """Multiply-adds of the leaf modules below it (see the module docstring for what counts)."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{name, type, output_shape, params, macs}``."""
        return {
            "name": self.name,
            "type": self.type,
            "output_shape": _shape_json(self.output_shape),
            "params": self.params,
            "macs": self.macs,
        }


@dataclass(frozen=True)
class ModelSummary:
    """What :func:`summarize` found: one row per layer and the totals of one forward pass."""

    model: str
    input_shape: tuple[int, int, int]
    num_classes: int
    batch: int
    options: dict[str, Any]
    """The model's options after validation (defaults filled in)."""
    depth: int
    layers: list[LayerRow]
    output_shape: Shape | None
    total_params: int
    trainable_params: int
    macs: int
    """Multiply-adds of one forward pass over the batch (see the module docstring)."""
    macs_by_kind: dict[str, int] = field(default_factory=dict)
    """``macs`` split into ``conv``, ``linear``, ``norm`` and ``pool``."""
    param_bytes: int = 0
    buffer_bytes: int = 0
    """Non-parameter state such as batch-norm running statistics."""
    activation_bytes: int = 0
    """Sum of leaf modules' output sizes in one forward pass (in-place outputs and views add nothing)."""
    dtype: str = "float32"
    collapsed_at: str | None = None
    """The layer from which every feature map is 1x1 while later convolutions or pooling still slide
    kernels over it (an input far below what the net was designed for); None when that never happens."""
    uncollapsed_side: int | None = None
    """The smallest square side at which the map no longer collapses (set with ``collapsed_at``)."""

    @property
    def collapse_warning(self) -> str | None:
        """One line saying where the maps collapsed to 1x1 and which input avoids it, or None."""
        if self.collapsed_at is None:
            return None
        c, h, w = self.input_shape
        avoid = (
            f"an input of at least {c}x{self.uncollapsed_side}x{self.uncollapsed_side} avoids it"
            if self.uncollapsed_side
            else "no square input up to 1024 avoids it"
        )
        return (
            f"{self.model} at {c}x{h}x{w}: the feature map is 1x1 from {self.collapsed_at} on, so the later "
            f"convolutions and pooling see little but padding; {avoid}"
        )

    @property
    def flops(self) -> int:
        """Floating-point operations, counted as 2 x MACs."""
        return 2 * self.macs

    def to_dict(self) -> dict[str, Any]:
        """The JSON schema of ``cnnkit summary --format json``."""
        return {
            "model": self.model,
            "input": list(self.input_shape),
            "classes": self.num_classes,
            "batch": self.batch,
            "options": self.options,
            "depth": self.depth,
            "dtype": self.dtype,
            "output_shape": _shape_json(self.output_shape),
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "macs": self.macs,
            "flops": self.flops,
            "macs_by_kind": dict(self.macs_by_kind),
            "param_bytes": self.param_bytes,
            "buffer_bytes": self.buffer_bytes,
            "activation_bytes": self.activation_bytes,
            "layers": [row.to_dict() for row in self.layers],
        }

    def renderable(self) -> RenderableType:
        """A rich table of the layers followed by the totals, for ``Console.print``."""
        from rich.console import Group
        from rich.table import Table

        c, h, w = self.input_shape
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        title = f"{self.model}: input {self.batch}x{c}x{h}x{w}, {self.num_classes} classes"
        title += f", {options}" if options else ""
        layers = Table(title=title, title_justify="left", header_style="bold")
        layers.add_column("Layer", no_wrap=True)
        layers.add_column("Type", no_wrap=True)
        layers.add_column("Output shape", no_wrap=True)
        layers.add_column("Params", justify="right", no_wrap=True)
        layers.add_column("MACs", justify="right", no_wrap=True)
        for row in self.layers:
            layers.add_row(
                row.name, row.type, _format_shape(row.output_shape), f"{row.params:,}", human_count(row.macs)
            )

        kinds = ", ".join(f"{k} {human_count(v)}" for k, v in self.macs_by_kind.items() if v)
        totals = Table.grid(padding=(0, 2))
        totals.add_column(style="bold")
        totals.add_column()
        totals.add_row("Total params", f"{self.total_params:,} ({human_count(self.total_params)})")
        totals.add_row("Trainable params", f"{self.trainable_params:,} ({human_count(self.trainable_params)})")
        totals.add_row("MACs", human_count(self.macs, "MACs") + (f" ({kinds})" if kinds else ""))
        totals.add_row("FLOPs (2 x MACs)", human_count(self.flops, "FLOPs"))
        totals.add_row("Parameter memory", f"{human_bytes(self.param_bytes)} ({self.dtype})")
        if self.buffer_bytes:
            totals.add_row("Buffer memory", human_bytes(self.buffer_bytes))
        totals.add_row(
            "Activation memory", f"{human_bytes(self.activation_bytes)} (batch {self.batch}, one forward pass)"
        )
        return Group(layers, totals)


# --------------------------------------------------------------------------------------------
# Tracing a forward pass on the meta device
# --------------------------------------------------------------------------------------------
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


def _resolve(model: str | ModelSpec) -> ModelSpec:
    if isinstance(model, str):
        from cnnkit.registry import MODELS

        return MODELS.get(model)
    return model


def _build_on_meta(spec: ModelSpec, in_channels: int, num_classes: int, options: dict[str, Any]) -> nn.Module:
    # Meta tensors carry shapes only: no memory for the weights, and initialisers are no-ops.
    with torch.device("meta"), _dynamo_import_skipped():
        model = spec.build(in_channels, num_classes, **options)
    # Eval mode: batch norm on a batch of one would refuse to compute training statistics.
    return model.eval()


def _input_dtype(model: nn.Module) -> torch.dtype:
    first = next(model.parameters(), None)
    return first.dtype if first is not None and first.is_floating_point() else torch.float32


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


# --------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------
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
