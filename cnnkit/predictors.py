"""Which runtime runs a weights file for ``cnnkit predict``: the one module that knows both, so that
neither the torch-free prediction code nor the ONNX runtime module imports the other's side."""

from __future__ import annotations

from pathlib import Path

from cnnkit.prediction import Predictor

__all__ = ["open_predictor"]


def open_predictor(weights: str | Path, device: str = "auto") -> Predictor:
    """The model in ``weights``: a ``.onnx`` file in ONNX Runtime (torch is not imported), anything
    else (a ``.safetensors`` file, a run directory) in PyTorch."""
    if Path(weights).suffix.lower() == ".onnx":
        from cnnkit.onnx_runtime import load_onnx

        return load_onnx(weights, device).predictor()
    from cnnkit.evaluate import load_predictor

    return load_predictor(weights, device)
