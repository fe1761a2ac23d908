"""Adaptive average pooling in a form every ONNX exporter writes compactly, for :mod:`cnnkit.onnx_export`.

Adaptive average pooling whose output side does not divide its input side (AlexNet and VGG at
small inputs, LeNet away from its recipe size) has overlapping windows of unequal sizes, which no
ONNX AveragePool expresses. PyTorch's TorchScript exporter refuses it; ``torch.export`` writes it
as a Transpose, a GatherND and a ReduceMean, which ran 3x slower in ONNX Runtime than this
module's form for LeNet-BN at 32 px: at the one input size a graph is exported for, the pooling
is a fixed linear map, ``rows @ x @ cols`` with two constant averaging matrices (two MatMuls,
which the int8 quantiser also quantises). :func:`exportable_pooling` swaps such layers for that
form while the model is exported, and puts them back afterwards.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["exportable_pooling"]


def _pool_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) weights of 1-D adaptive average pooling: window i is floor(i*n/m)..ceil((i+1)*n/m)."""
    import torch

    matrix = torch.zeros(size_out, size_in)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -(-(i + 1) * size_in // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


@functools.cache
def _matrix_pool_class() -> type[nn.Module]:
    from torch import nn

    class MatrixAveragePool(nn.Module):
        """Adaptive average pooling at one fixed input size, as ``rows @ x @ cols`` (two MatMuls in ONNX)."""

        def __init__(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
            super().__init__()
            self.rows, self.cols = rows, cols

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.rows @ x) @ self.cols

    return MatrixAveragePool


@contextlib.contextmanager
def exportable_pooling(model: nn.Module, example: torch.Tensor) -> Iterator[None]:
    """Within the block, adaptive average pools the exporter cannot express are matrix products."""
    import torch
    from torch import nn

    def is_global(size: Any) -> bool:
        return all(side == 1 for side in (size if isinstance(size, tuple) else (size, size)))

    # Pooling to 1x1 (a GlobalAveragePool) always exports; only the others need the input size.
    pools = {
        name: m for name, m in model.named_modules()
        if isinstance(m, nn.AdaptiveAvgPool2d) and not is_global(m.output_size)
    }  # fmt: skip
    if not pools:
        yield
        return
    seen: dict[str, set[tuple[int, int]]] = {name: set() for name in pools}

    def record(name: str, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen[name].add((int(args[0].shape[-2]), int(args[0].shape[-1])))

    hooks = [m.register_forward_pre_hook(functools.partial(record, name)) for name, m in pools.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, pool in pools.items():
            if len(seen[name]) != 1:
                continue  # not run, or shared between inputs of several sizes: left to the exporter
            ((height, width),) = seen[name]
            out = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
            out_h, out_w = out[0] or height, out[1] or width
            if height % out_h == 0 and width % out_w == 0:
                continue  # the exporter writes a plain AveragePool (or GlobalAveragePool) here
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            rows = _pool_matrix(height, out_h).to(example.device)
            cols = _pool_matrix(width, out_w).T.contiguous().to(example.device)
            replacement = _matrix_pool_class()(rows, cols)
            setattr(parent, attribute, replacement)
            swapped.append((parent, attribute, pool))
        yield
    finally:
        for parent, attribute, original in swapped:
            setattr(parent, attribute, original)
