"""Helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path


def train_args(data: Path, *extra: str) -> list[str]:
    """``cnnkit train`` of a tiny LeNet-BN for one quiet epoch on the CPU, on a Fashion-MNIST-format folder."""
    return ["train", "lenet_bn", "--data", str(data), "--input-size", "16", "--batch-size", "32", "--device", "cpu",
            "--epochs", "1", "-q", *extra]  # fmt: skip
