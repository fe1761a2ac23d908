"""Layer-by-layer model summaries computed on the meta device, and the smallest input a model takes.

The model is built under ``torch.device("meta")`` and run on a meta tensor: every shape is real,
no weight is allocated and no arithmetic happens, so the pass over VGG-16 at 224 px takes tens of
milliseconds (see :func:`cnnkit.summary.trace._dynamo_import_skipped` for the second it would
otherwise spend on an import). Forward hooks record each module's output shape and multiply-adds;
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

This package's ``__init__`` only re-exports the public names. The work is split into
:mod:`~cnnkit.summary.units` (parsing ``--input``, human-readable numbers),
:mod:`~cnnkit.summary.trace` (the meta-device forward pass and its per-layer records),
:mod:`~cnnkit.summary.search` (smallest input, 1x1-collapse bound), :mod:`~cnnkit.summary.report`
(:class:`LayerRow`, :class:`ModelSummary`, their JSON and table) and :mod:`~cnnkit.summary.core`
(:func:`summarize`, which puts them together).
"""

from __future__ import annotations

from cnnkit.summary.core import summarize
from cnnkit.summary.report import LayerRow, ModelSummary
from cnnkit.summary.search import MAX_SIDE as MAX_SIDE  # not in __all__, importable as before
from cnnkit.summary.search import smallest_input_size
from cnnkit.summary.units import Shape as Shape  # not in __all__, importable as before
from cnnkit.summary.units import human_bytes, human_count, parse_input_shape

__all__ = [
    "LayerRow",
    "ModelSummary",
    "summarize",
    "parse_input_shape",
    "smallest_input_size",
    "human_count",
    "human_bytes",
]
