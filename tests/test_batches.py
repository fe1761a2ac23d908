"""BatchLoader: shapes, range, normalisation, determinism, augmentation, batching arithmetic."""

from __future__ import annotations

import pytest
import torch

from cnnkit.data.batches import BatchLoader, resize_uint8
from cnnkit.protocols import ImageTensors


@pytest.fixture
def split() -> ImageTensors:
    g = torch.Generator().manual_seed(0)
    return ImageTensors(torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8, generator=g), torch.arange(50) % 10)


def collect(loader: BatchLoader, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader.epoch(epoch), strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_shapes_dtype_and_range(split: ImageTensors) -> None:
    loader = BatchLoader(split, batch_size=16, image_size=40)
    assert len(loader) == 4 and loader.num_examples == 50
    x, y = collect(loader)
    assert x.shape == (50, 1, 40, 40) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    assert torch.equal(y, split.labels)  # no shuffle: the split's order


def test_native_size_is_exact(split: ImageTensors) -> None:
    x, _ = collect(BatchLoader(split, batch_size=64, image_size=28))
    assert torch.equal((x * 255).round().to(torch.uint8), split.images)


def test_normalisation(split: ImageTensors) -> None:
    plain, _ = collect(BatchLoader(split, batch_size=64, image_size=28))
    normed, _ = collect(BatchLoader(split, batch_size=64, image_size=28, mean=[0.5], std=[0.25]))
    assert torch.allclose(normed, (plain - 0.5) / 0.25, atol=1e-6)


def test_shuffle_is_seeded_per_epoch(split: ImageTensors) -> None:
    loader = BatchLoader(split, batch_size=8, image_size=28, shuffle=True, seed=3)
    _, a = collect(loader, 0)
    _, b = collect(loader, 0)
    _, c = collect(loader, 1)
    _, d = collect(BatchLoader(split, batch_size=8, image_size=28, shuffle=True, seed=4), 0)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert sorted(a.tolist()) == sorted(split.labels.tolist())  # a permutation, nothing lost


def test_augmentation_reproducible_and_shape_preserving(split: ImageTensors) -> None:
    loader = BatchLoader(split, batch_size=25, image_size=32, augment=True, seed=1)
    a, _ = collect(loader, 0)
    b, _ = collect(loader, 0)
    c, _ = collect(loader, 1)
    plain, _ = collect(BatchLoader(split, batch_size=25, image_size=32))
    assert a.shape == plain.shape and torch.equal(a, b)
    assert not torch.equal(a, plain) and not torch.equal(a, c)
    # A crop of a zero-padded image: every output pixel is either an input pixel or padding.
    assert (a == 0).float().mean() > (plain == 0).float().mean()


def test_flip_and_crop_are_per_example() -> None:
    image = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(64, 1, 1, 1)
    loader = BatchLoader(ImageTensors(image, torch.zeros(64, dtype=torch.long)), batch_size=64, image_size=8, augment=True)
    x, _ = collect(loader)
    distinct = {tuple(v.flatten().tolist()) for v in x}
    assert len(distinct) > 8  # different crops/flips across one batch


def test_drop_last(split: ImageTensors) -> None:
    loader = BatchLoader(split, batch_size=16, image_size=28, drop_last=True)
    assert len(loader) == 3 and loader.num_examples == 48
    assert collect(loader)[0].shape[0] == 48


def test_resized_copy_is_made_once(split: ImageTensors) -> None:
    first = resize_uint8(split.images, 56)
    assert first.dtype == torch.uint8 and first.shape == (50, 1, 56, 56)
    assert resize_uint8(split.images, 56) is first
