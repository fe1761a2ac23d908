"""The real Fashion-MNIST and COIL-20 (run with CNNKIT_DATA=/work/shared/datasets)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnnkit.data import BatchLoader, load_dataset


@pytest.mark.realdata
def test_real_fashion_mnist(real_data: Path) -> None:
    splits = load_dataset("fashion-mnist", real_data / "fashion-mnist")
    assert (len(splits.train), len(splits.test)) == (60_000, 10_000)
    assert splits.train.images.shape == (60_000, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert torch.bincount(splits.train.labels).tolist() == [6000] * 10
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    assert splits.mean[0] == pytest.approx(0.2860, abs=1e-3) and splits.std[0] == pytest.approx(0.3530, abs=1e-3)
    again = load_dataset("fashion-mnist", real_data / "fashion-mnist")  # from the cache
    assert torch.equal(again.test.images, splits.test.images)


@pytest.mark.realdata
@pytest.mark.slow
def test_real_fashion_mnist_found_via_cnnkit_data(real_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNKIT_DATA", str(real_data))
    images, labels = next(iter(BatchLoader(load_dataset("fashion-mnist").test, batch_size=256, image_size=96)))
    assert images.shape == (256, 1, 96, 96) and labels.shape == (256,)


@pytest.mark.realdata
@pytest.mark.slow
def test_real_coil20(real_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNKIT_DATA", str(real_data))  # found under the folder name coil-20
    splits = load_dataset("coil20")
    labels = torch.cat([splits.train.labels, splits.test.labels])
    assert labels.numel() == 1440 and torch.bincount(labels).tolist() == [72] * 20
    assert torch.bincount(splits.test.labels).tolist() == [7] * 20
    assert splits.train.images.shape[1:] == (1, 128, 128)
    # The label of every image is the object in its file name.
    for names, part in ((splits.split_files["train"], splits.train), (splits.split_files["test"], splits.test)):
        objects = [int(name[3 : name.index("__")]) for name in names]
        assert part.labels.tolist() == [o - 1 for o in objects]
    block = load_dataset("coil20", split="pose-block")
    assert all(int(n.split("__")[1].split(".")[0]) >= 60 for n in block.split_files["test"]) and len(block.test) == 240
