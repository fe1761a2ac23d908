"""The results of a summary, :class:`LayerRow` and :class:`ModelSummary`, and their two renderings:
the JSON dict of ``cnnkit summary --format json`` and the rich table (plus the collapse warning line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cnnkit.summary.units import Shape, _format_shape, _shape_json, human_bytes, human_count

if TYPE_CHECKING:
    from rich.console import RenderableType


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
    """Multiply-adds of the leaf modules below it (see the :mod:`cnnkit.summary` docstring for what counts)."""

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
    """Multiply-adds of one forward pass over the batch (see the :mod:`cnnkit.summary` docstring)."""
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
