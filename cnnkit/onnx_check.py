"""An exported graph checked against PyTorch: the same batch through ONNX Runtime and the model.

``cnnkit export --format onnx`` (with ``onnxruntime`` installed, or ``--check``) runs
:data:`CHECK_EXAMPLES` random images, prepared exactly as ``predict`` prepares files, through both
and fails when the largest logit difference exceeds the tolerance (relative to the largest logit
when that exceeds 1): nothing is written then (exit 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnkit.errors import WeightsError
from cnnkit.onnx_runtime import INPUT_NAME, OUTPUT_NAME, require, session_options
from cnnkit.prediction import prepare_batch

if TYPE_CHECKING:
    from torch import nn

    from cnnkit.checkpoint import WeightsMeta

__all__ = ["DEFAULT_TOLERANCE", "CHECK_EXAMPLES", "OnnxCheck", "check_onnx", "verified"]

DEFAULT_TOLERANCE = 1e-3
"""Largest accepted |ONNX Runtime - PyTorch| logit difference, relative to the largest logit
magnitude when that exceeds 1 (so it is absolute for small logits)."""
CHECK_EXAMPLES = 8
"""Images in the check batch (not the traced batch of 2, so the dynamic axis is exercised too)."""


@dataclass(frozen=True)
class OnnxCheck:
    """ONNX Runtime's logits against PyTorch's on the same batch."""

    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    examples: int
    runtime: str
    """E.g. ``onnxruntime 1.20.1``."""

    @property
    def limit(self) -> float:
        """The largest accepted difference: ``tolerance`` scaled by the logits' magnitude when above 1."""
        return self.tolerance * max(1.0, self.max_abs_logit)

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.limit

    def describe(self) -> str:
        return (
            f"checked with {self.runtime} on {self.examples} random images: max abs logit difference "
            f"{self.max_abs_diff:.1e} (tolerance {self.limit:.1e})"
        )


def _check_batch(meta: WeightsMeta, examples: int) -> np.ndarray:
    # Random pixel images prepared exactly as predict prepares files: inputs in the range and
    # normalisation the model sees in use, not the all-zero tensor it was traced with.
    rng = np.random.default_rng(0)
    side = meta.input_size
    pixels = [rng.integers(0, 256, (meta.in_channels, side, side), dtype=np.uint8) for _ in range(examples)]
    return prepare_batch(pixels, side, meta.mean, meta.std)


def check_onnx(
    onnx_model: bytes | str | Path,
    model: nn.Module,
    meta: WeightsMeta,
    tolerance: float = DEFAULT_TOLERANCE,
    examples: int = CHECK_EXAMPLES,
) -> OnnxCheck:
    """Run one batch through ONNX Runtime and through ``model``; the largest logit difference.

    Needs ``onnxruntime`` (UsageError, exit 2, when missing). Does not raise on a mismatch: see
    :attr:`OnnxCheck.passed`.
    """
    ort = require("onnxruntime", "checking an ONNX export")
    import torch

    batch = _check_batch(meta, examples)
    source = onnx_model if isinstance(onnx_model, bytes) else str(onnx_model)
    session = ort.InferenceSession(source, session_options(ort), providers=["CPUExecutionProvider"])
    (ort_logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            torch_logits = model(torch.from_numpy(batch).to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    if ort_logits.shape != torch_logits.shape:
        diff = math.inf
    else:
        diff = float(np.abs(ort_logits.astype(np.float64) - torch_logits).max())
    return OnnxCheck(diff, float(np.abs(torch_logits).max()), tolerance, examples, f"onnxruntime {ort.__version__}")


def verified(
    data: bytes, model: nn.Module, meta: WeightsMeta, file: Path, target: Path, check: bool | None,
    tolerance: float, unchecked: str | None,
) -> OnnxCheck | None:  # fmt: skip
    """The check of ``graph`` against ``model`` (None when skipped); a mismatch is exit 4, nothing written."""
    if check is False or unchecked is not None:
        return None
    result = check_onnx(data, model, meta, tolerance)
    if not result.passed:
        raise WeightsError(
            f"ONNX Runtime's logits for {file} differ from PyTorch's by {result.max_abs_diff:.1e} "
            f"(tolerance {result.limit:.1e}); {target} was not written; pass --no-check to write it anyway"
        )
    return result
