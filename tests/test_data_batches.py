"""BatchLoader: shapes, values, normalisation, reproducible shuffling and augmentation, drop_last."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnnkit.data.batches import BatchLoader, resize_uint8
from cnnkit.protocols import ImageTensors


def make_split(n: int = 50, channels: int = 1, side: int = 12) -> ImageTensors:
    """Images whose every pixel equals their index (so an image can be traced through a batch)."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, channels, side, side).contiguous()
    images[:, :, 0, 0] = 255  # one bright corner, to see flips and crops move it
    return ImageTensors(images, torch.arange(n) % 7)


def collect(loader: BatchLoader, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader.epoch(epoch))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def test_shapes_dtypes_and_value_range() -> None:
    loader = BatchLoader(make_split(), batch_size=16, image_size=20)
    batches = list(loader.epoch(0))
    assert [b[0].shape[0] for b in batches] == [16, 16, 16, 2] and len(loader) == 4 and loader.num_examples == 50
    images, labels = batches[0]
    assert images.shape == (16, 1, 20, 20) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [i % 7 for i in range(16)]
    assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.99


def test_without_resizing_values_are_the_bytes_over_255() -> None:
    split = make_split()
    images, labels = collect(BatchLoader(split, batch_size=8, image_size=12))
    assert torch.equal(images, split.images.float() / 255) and torch.equal(labels, split.labels)


def test_resize_matches_bilinear_interpolation_within_a_grey_level() -> None:
    split = ImageTensors(torch.randint(0, 256, (10, 3, 28, 28), dtype=torch.uint8), torch.zeros(10, dtype=torch.long))
    for size in (14, 56):
        images, _ = collect(BatchLoader(split, batch_size=4, image_size=size))
        reference = F.interpolate(
            split.images.float() / 255, size=(size, size), mode="bilinear", antialias=size < 28, align_corners=False
        )
        assert images.shape == (10, 3, size, size)
        assert (images - reference.clamp(0, 1)).abs().max() <= 1.5 / 255


def test_enlarged_copy_matches_bilinear_interpolation_in_every_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2,400 planes split among 3 threads, unevenly: a plane no thread wrote would be garbage.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    images = torch.randint(0, 256, (800, 3, 28, 28), dtype=torch.uint8)
    enlarged = resize_uint8(images, 96)
    reference = F.interpolate(images.float(), size=(96, 96), mode="bilinear", align_corners=False)
    assert enlarged.shape == (800, 3, 96, 96) and enlarged.dtype == torch.uint8
    assert (enlarged.float() - reference).abs().amax(dim=(1, 2, 3)).max() <= 1
    assert (enlarged.float() - reference).abs().mean() < 0.3


def test_an_enlarged_split_is_enlarged_as_it_is_read_with_no_copy() -> None:
    images = torch.randint(0, 256, (40, 3, 28, 28), dtype=torch.uint8)
    split = ImageTensors(images, torch.arange(40) % 7)
    options = dict(
        batch_size=16, image_size=64, shuffle=True, seed=3, augment=True, mean=[0.1, 0.5, 0.9], std=[0.2, 0.3, 0.4]
    )
    loader = BatchLoader(split, **options)  # type: ignore[arg-type]
    streamed = collect(loader, 1)
    # The same epoch over a split enlarged beforehand: the same order, draws and values.
    before = ImageTensors(resize_uint8(images.clone(), 64), split.labels)
    copied = collect(BatchLoader(before, **options), 1)  # type: ignore[arg-type]
    assert loader.enlarge and loader.images is images and "_cnnkit_resized" not in images.__dict__
    assert torch.allclose(streamed[0], copied[0], atol=2e-6) and torch.equal(streamed[1], copied[1])


def test_resized_copy_is_made_once_per_split_and_size() -> None:
    split = make_split()
    first = resize_uint8(split.images, 24)
    assert first.dtype == torch.uint8 and first.shape == (50, 1, 24, 24)
    assert resize_uint8(split.images, 24) is first and resize_uint8(split.images, 12) is split.images


def test_normalisation_uses_mean_and_std() -> None:
    split = make_split()
    plain, _ = collect(BatchLoader(split, batch_size=10, image_size=12))
    normalised, _ = collect(BatchLoader(split, batch_size=10, image_size=12, mean=[0.2], std=[0.5]))
    assert torch.allclose(normalised, (plain - 0.2) / 0.5, atol=1e-6)
    rgb = make_split(channels=3)
    per_channel, _ = collect(BatchLoader(rgb, batch_size=10, image_size=12, mean=[0.1, 0.2, 0.3], std=[1, 2, 4]))
    base = rgb.images.float() / 255
    assert torch.allclose(per_channel[:, 2], (base[:, 2] - 0.3) / 4, atol=1e-6)


def test_shuffle_is_reproducible_per_seed_and_epoch() -> None:
    split = make_split()
    a = BatchLoader(split, batch_size=8, image_size=12, shuffle=True, seed=1)
    b = BatchLoader(split, batch_size=8, image_size=12, shuffle=True, seed=1)
    c = BatchLoader(split, batch_size=8, image_size=12, shuffle=True, seed=2)
    x0, y0 = collect(a, 0)
    assert torch.equal(x0, collect(b, 0)[0]) and torch.equal(y0, collect(b, 0)[1])
    order0 = (x0[:, 0, 5, 5] * 255).round().long()
    assert sorted(order0.tolist()) == list(range(50))  # a permutation: every example once
    assert order0.tolist() != list(range(50))
    assert not torch.equal(order0, (collect(a, 1)[0][:, 0, 5, 5] * 255).round().long())  # epochs differ
    assert not torch.equal(order0, (collect(c, 0)[0][:, 0, 5, 5] * 255).round().long())  # seeds differ
    assert torch.equal(y0, split.labels[order0])  # labels follow their images


def test_augmentation_changes_images_keeps_shape_and_is_reproducible() -> None:
    split = make_split(n=64, side=16)
    plain, _ = collect(BatchLoader(split, batch_size=16, image_size=16))
    loader = BatchLoader(split, batch_size=16, image_size=16, augment=True, seed=5)
    augmented, labels = collect(loader, 0)
    assert augmented.shape == plain.shape and torch.equal(labels, split.labels)
    changed = (augmented != plain).flatten(1).any(1)
    assert changed.float().mean() > 0.5
    assert torch.equal(augmented, collect(BatchLoader(split, batch_size=16, image_size=16, augment=True, seed=5), 0)[0])
    assert not torch.equal(augmented, collect(loader, 1)[0])
    # Crops keep the content (padding is zeros; everything else is the image's own value).
    values = augmented * 255
    own = split.images[:, 0, 5, 5].float().view(-1, 1, 1, 1)
    assert torch.all((values.round() == own) | (values == 0) | (values.round() == 255))
    # Some bright corners moved (crop) or went to the right side (flip).
    corner = augmented[:, 0, 0, 0] == 1.0
    assert not corner.all()


def test_flip_mirrors_columns() -> None:
    images = torch.zeros(200, 1, 8, 8, dtype=torch.uint8)
    images[:, :, :, :4] = 200  # left half bright
    split = ImageTensors(images, torch.zeros(200, dtype=torch.long))
    out, _ = collect(BatchLoader(split, batch_size=50, image_size=8, augment=True, seed=0))
    left, right = out[:, 0, 4, 1:3].mean(1), out[:, 0, 4, 5:7].mean(1)
    flipped = (right > left).float().mean()
    assert 0.3 < flipped < 0.7  # about half are mirrored


def test_drop_last() -> None:
    loader = BatchLoader(make_split(), batch_size=16, image_size=12, drop_last=True, shuffle=True)
    sizes = [x.shape[0] for x, _ in loader.epoch(3)]
    assert sizes == [16, 16, 16] and len(loader) == 3 and loader.num_examples == 48


def test_channels_last_and_iteration() -> None:
    loader = BatchLoader(make_split(channels=3), batch_size=10, image_size=12, channels_last=True)
    images, _ = next(iter(loader))
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(make_split(), batch_size=0, image_size=12)


def test_crops_and_flips_differ_within_a_batch() -> None:
    image = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(64, 1, 1, 1)
    split = ImageTensors(image, torch.zeros(64, dtype=torch.long))
    loader = BatchLoader(split, batch_size=64, image_size=8, augment=True)
    batch, _ = next(iter(loader.epoch(0)))
    assert len({tuple(v.flatten().tolist()) for v in batch}) > 8  # drawn per example, not per batch


def test_a_mapped_split_asks_the_kernel_for_the_next_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A memory-mapped store's next chunk is asked for (madvise WILLNEED) while the current one
    trains, in this thread (a second thread's OpenMP team cost lenet_bn 30-37% of its speed); the
    batches are unchanged, and an in-memory split asks for nothing."""
    import threading

    import cnnkit.data.batches as batches

    monkeypatch.setattr(BatchLoader, "_batches_per_chunk", lambda self: 1)  # one batch a chunk: many chunks
    in_memory = make_split(n=64)
    split = ImageTensors(in_memory.images, in_memory.labels, mapped=True)  # as a store too large for memory
    monkeypatch.setattr(batches, "reclaimable_memory", lambda: 1000)  # the page cache cannot hold it
    asked: list[tuple[list[int], str]] = []
    monkeypatch.setattr(
        batches, "will_need", lambda images, rows: asked.append((rows.tolist(), threading.current_thread().name))
    )
    loader = BatchLoader(split, batch_size=8, image_size=12, shuffle=True, augment=True, seed=3)
    images, labels = collect(loader, epoch=2)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(3 * 1_000_003 + 2))
    assert torch.equal(labels, split.labels[order])
    assert [rows for rows, _ in asked] == [order[i : i + 8].tolist() for i in range(8, 64, 8)]  # each next chunk
    assert {name for _, name in asked} == {threading.current_thread().name}
    asked.clear()
    again, _ = collect(BatchLoader(in_memory, batch_size=8, image_size=12, shuffle=True, augment=True, seed=3), epoch=2)
    assert torch.equal(images, again) and asked == []
    monkeypatch.setattr(batches, "reclaimable_memory", lambda: 1 << 40)  # a store the page cache holds
    collect(BatchLoader(split, batch_size=8, image_size=12, shuffle=True, augment=True, seed=3), epoch=2)
    assert asked == []


def test_will_need_asks_for_exactly_the_rows_pages_merged(monkeypatch: pytest.MonkeyPatch) -> None:
    import mmap

    import numpy as np

    import cnnkit.data.batches as batches

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(batches, "_madvise_function", lambda address, length, advice: calls.append((address, length)))
    page = mmap.PAGESIZE
    buffer = mmap.mmap(-1, 40 * page)
    images = torch.from_numpy(np.frombuffer(buffer, dtype=np.uint8).reshape(20, 2 * page))  # rows of 2 pages
    base = images.data_ptr()
    batches.will_need(images, torch.tensor([7, 3, 4, 12]))
    assert calls == [(base + 3 * 2 * page, 4 * page), (base + 7 * 2 * page, 2 * page), (base + 12 * 2 * page, 2 * page)]
    calls.clear()
    small = images.view(-1)[: 10 * 100].view(10, 100)  # rows sharing pages: one range
    batches.will_need(small, torch.tensor([0, 9, 5]))
    assert calls == [(base // page * page, (base + 999) // page * page - base // page * page + page)]
