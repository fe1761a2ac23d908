"""Whole-batch pipeline over an in-memory uint8 split: index, move, resize, normalise, augment.

The seed pipelines decode, resize and convert one PIL image at a time inside a DataLoader. Here a
batch is a slice of one uint8 tensor: it is moved to the device as uint8 (4x fewer bytes than
float), and every transform runs once on the whole batch there. On a CPU, bilinear resizing of
every batch from 28 px to 96 or 224 px would dominate an epoch done with torch ops: a split is
enlarged chunk by chunk as it is read, with OpenCV, and shrunk once to a uint8 copy at the target
size (kept for the process) that batches are cut from (:mod:`cnnkit.data.resizing`).

An epoch prepares a chunk of consecutive batches at a time (gather, move, convert, normalise)
and yields row slices of it; only augmentation, which draws per example, runs per batch.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from cnnkit.data.augment import Augmentation, Draws
from cnnkit.data.resizing import enlarge_planes, enlarges, resize_uint8, resized_bytes, to_float
from cnnkit.protocols import ImageTensors

__all__ = ["BatchLoader", "resize_uint8", "to_float"]

# Batches of an epoch are prepared in chunks of up to this many consecutive batches and at most
# this many bytes of float32: on a CPU about what its caches hold (larger chunks measured slower
# there: each op of the preparation streams the chunk through memory again); on a GPU larger, as
# what counts there is how few kernels are launched. Augmentation on a CPU runs about a hundred
# small ops a chunk (TrivialAugment's fourteen operations on their slices, the crop, erasing),
# whose fixed cost per call outweighs the cache: there up to 16 batches at 28 px (TrivialAugment's
# operations took 0.46 -> 0.27 ms a batch of BN-LeNet's training, measured inside the loop).
_CHUNK_BATCHES = 16
_CHUNK_BYTES = {"cpu": 2 << 20, "cpu-augmented": 8 << 20, "cuda": 32 << 20}


_PAGE = mmap.PAGESIZE
_MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", 3)


def _madvise() -> Any:
    """libc's madvise (None where there is none): called on raw addresses, which Python's
    ``mmap.madvise`` cannot be given for a tensor that only holds the mapping's memory."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    function.restype = ctypes.c_int
    return function


_madvise_function = _madvise()


def will_need(images: torch.Tensor, rows: torch.Tensor) -> None:
    """Ask the kernel to start reading the pages of ``images[rows]`` (a memory-mapped, contiguous
    tensor) now, in the background: a hint, so any failure is ignored."""
    if _madvise_function is None or not images.is_contiguous() or rows.numel() == 0:
        return
    row_bytes = images[0].numel() * images.element_size()
    starts = images.data_ptr() + np.sort(rows.cpu().numpy().astype(np.int64)) * row_bytes
    firsts, lasts = starts // _PAGE, (starts + row_bytes - 1) // _PAGE
    # Overlapping or adjacent page ranges merged: one call per run of pages, not one per row.
    reach = np.maximum.accumulate(lasts)
    new_run = np.concatenate([[True], firsts[1:] > reach[:-1] + 1])
    run_firsts = firsts[new_run]
    run_lasts = reach[np.concatenate([np.flatnonzero(new_run)[1:] - 1, [len(firsts) - 1]])]
    for first, last in zip(run_firsts.tolist(), run_lasts.tolist(), strict=True):
        _madvise_function(first * _PAGE, (last - first + 1) * _PAGE, _MADV_WILLNEED)


def available_memory() -> int:
    """Bytes of RAM free for new allocations (a large figure where the OS cannot say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def reclaimable_memory() -> int:
    """Bytes the system can give without swapping (``MemAvailable``: free plus reclaimable page
    cache); :func:`available_memory` where the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return available_memory()


class BatchLoader:
    """Batches of one in-memory split, transformed on ``device``; reproducible per (seed, epoch).

    Yields ``(images, labels)``: float32 (B, C, image_size, image_size) scaled to 0..1 and, when
    ``mean``/``std`` are given, normalised; int64 labels. ``augment=True`` adds a random crop from a
    zero-padded image (pad = image_size / 8) and a horizontal flip, drawn per example;
    ``augmentation`` says more (TrivialAugment, RandAugment, random erasing, mixup, cutmix: see
    :mod:`cnnkit.data.augment`). With mixup or cutmix on, labels are float (B, K) probabilities.

    ``shard=(part, parts)`` (distributed training): ``batch_size`` stays the global batch; each
    process yields its contiguous part of every global batch (sizes differ by at most one; an
    empty part is skipped). Every process derives the same permutation and the same augmentation
    draws from (seed, epoch), so the shards of an epoch cover each example exactly once and the
    processes together see exactly what one process would.
    """

    def __init__(
        self,
        split: ImageTensors,
        *,
        batch_size: int,
        image_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: bool = False,
        augmentation: Augmentation | None = None,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        channels_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= shard[0] < shard[1]:
            raise ValueError(f"shard must be (part, parts) with 0 <= part < parts, got {shard}")
        self.shard = shard
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.image_size = image_size
        self.augmentation = augmentation or Augmentation(mode="crop-flip" if augment else "none")
        self.augment = self.augmentation.active
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.channels_last = channels_last
        images, labels = split.images, split.labels
        # A split enlarged on the CPU (Fashion-MNIST's 28 px to 96 or 224) is enlarged chunk by
        # chunk as it is read, converted and normalised in the same pass (_enlarge, see
        # cnnkit.data.resizing.enlarge_planes): as fast as gathering from an enlarged copy at 96 px,
        # 2-3x faster at 224, and no copy (3 GB at 224 px per process, and 3-5 s of page faults
        # before the first step on this project's machine).
        self.enlarge = self.device.type == "cpu" and enlarges(images, image_size)
        self._threads: ThreadPoolExecutor | None = None
        if (
            self.device.type == "cpu"
            and not self.enlarge
            and resized_bytes(images, image_size) <= available_memory() // 3
        ):
            # Resizing per batch would dominate a CPU epoch: resize the split once instead (when
            # the copy fits comfortably; otherwise each batch is resized on its own).
            images = resize_uint8(images, image_size)
        elif self.device.type == "cuda" and images.nbytes <= torch.cuda.mem_get_info(self.device)[0] // 4:
            # The whole uint8 split usually fits on the GPU: move it once, index it there
            # (otherwise each batch travels from pinned memory, see _move).
            images, labels = images.to(self.device), labels.to(self.device)
        self.images, self.labels = images, labels
        # Reading ahead in a thread pays where a gather waits on a copy to the GPU. On the CPU a
        # second thread running torch ops gets its own OpenMP team, whose spinning competes with
        # the step's (lenet_bn trained at 0.63-0.7x its speed with it, in memory or mapped): there
        # a memory-mapped split instead asks the kernel to read the next chunk's pages meanwhile
        # (madvise WILLNEED, many reads in flight instead of one page fault at a time).
        self.read_ahead = self.device.type == "cuda"
        # Only for a split the page cache may not hold: for one it does, the hint costs more than
        # the whole gather (3 ms a chunk of 2,048 rows at 28 px).
        self.advise = (
            split.mapped and images is split.images and self.device.type == "cpu"
            and images.nbytes > reclaimable_memory() // 2
        )  # fmt: skip
        channels = images.shape[1]
        self.mean = self._stat(mean, channels)
        self.std = self._stat(std, channels)
        # A black pixel after normalisation: what augmentation pads normalised batches with
        # (TrivialAugment and RandAugment crop before normalising: they pad with 0).
        self._pad: torch.Tensor | None = None
        if self.mean is not None and self.std is not None and not self.augmentation.policy:
            self._pad = torch.zeros_like(self.mean).sub_(self.mean).div_(self.std)
        # What _enlarge multiplies and adds per channel: _prepare's scaling and normalisation.
        self._affine = ([1 / 255] * channels, [0.0] * channels)
        if self.enlarge and self.mean is not None and self.std is not None and not self.augmentation.policy:
            std = self.std.flatten().tolist()
            shifts = [-m / s for m, s in zip(self.mean.flatten().tolist(), std, strict=True)]
            self._affine = ([1 / (255 * s) for s in std], shifts)

    def _stat(self, values: Sequence[float] | None, channels: int) -> torch.Tensor | None:
        if values is None:
            return None
        stat = torch.tensor(list(values), dtype=torch.float32, device=self.device)
        if stat.numel() == 1:
            stat = stat.expand(channels)
        return stat.view(1, channels, 1, 1)

    @property
    def num_examples(self) -> int:
        """Examples one epoch yields (fewer than the split with ``drop_last``)."""
        n = int(self.labels.shape[0])
        return (n // self.batch_size) * self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        n = int(self.labels.shape[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def part_weight(self, index: int, size: int) -> float:
        """How much this process's ``size`` examples of batch ``index`` weigh in the global batch's
        mean loss: ``size * parts / global batch``, 1.0 but in an uneven last batch."""
        whole = min(self.batch_size, self.num_examples - index * self.batch_size)
        return size * self.shard[1] / whole

    def _generator(self, epoch: int) -> torch.Generator:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(self.seed * 1_000_003 + epoch)
        return generator

    def _batches_per_chunk(self) -> int:
        """Consecutive batches prepared together (see _CHUNK_BATCHES and _CHUNK_BYTES)."""
        per_batch = self.batch_size * int(self.images.shape[1]) * self.image_size * self.image_size * 4
        kind = self.device.type if self.device.type in _CHUNK_BYTES else "cpu"
        limit = _CHUNK_BYTES["cpu-augmented" if kind == "cpu" and self.augment else kind]
        return max(1, min(_CHUNK_BATCHES, limit // max(per_batch, 1)))

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of epoch ``epoch``: the same order and augmentations for the same (seed, epoch)."""
        n = int(self.labels.shape[0])
        generator = self._generator(epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        if self.images.device != order.device:
            order = order.to(self.images.device)
        stop = len(self) * self.batch_size if self.drop_last else n
        rank, world = self.shard
        # (start, global size, low, high) per batch: rows low..high of it are this process's part.
        parts = []
        for start in range(0, stop, self.batch_size):
            size = min(self.batch_size, stop - start)
            parts.append((start, size, rank * size // world, (rank + 1) * size // world))
        per_chunk = self._batches_per_chunk()
        groups = [parts[first : first + per_chunk] for first in range(0, len(parts), per_chunk)]

        plan = self.augmentation
        # Mixing pairs row j of a global batch with row size-1-j. One process has both in its batch;
        # with several, each also gathers the rows its own are paired with (and augments them the
        # same way), so every process mixes exactly what one process would.
        partners = plan.mixing and world > 1

        def rows(group: list[tuple[int, int, int, int]]) -> torch.Tensor | None:
            kept = [part for part in group if part[2] < part[3]]
            if not kept:
                return None
            if world == 1:
                return order[group[0][0] : group[-1][0] + group[-1][1]]
            pieces = []
            for start, size, low, high in kept:
                pieces.append(order[start + low : start + high])
                if partners:
                    pieces.append(order[start + size - high : start + size - low])
            return torch.cat(pieces)

        normalize = (self.mean, self.std) if plan.policy and self.mean is not None and self.std is not None else None
        for group, gathered in zip(groups, self._prefetched([rows(g) for g in groups]), strict=True):
            # Drawn for each whole global batch, even by a process with no rows in it: every
            # process's generator stays in step, and each takes its own rows of the draws.
            draws = [plan.draw(size, self.image_size, generator) for _, size, _, _ in group] if plan.active else []
            if gathered is None:
                continue
            # A chunk of consecutive batches is gathered, moved, converted and normalised at once,
            # and its batches are row slices of the result: each op runs once per chunk, not once
            # per step (a tiny model's step is short enough for these to show, and on a loaded CPU
            # every op costs a wait for the other threads).
            chunk_images, chunk_labels = gathered
            images = self._prepare(chunk_images)
            labels = self._move(chunk_labels)
            if draws:
                # The per-image stages too run once per chunk, each image with its own batch's draws
                # (TrivialAugment's fourteen operations cost the same per call at 128 images or 2048).
                mine = []
                for batch_draws, (_, size, low, high) in zip(draws, group, strict=True):
                    if low < high:
                        mine.append(plan.rows(batch_draws, slice(low, high)))
                        if partners:
                            mine.append(plan.rows(batch_draws, slice(size - high, size - low)))
                images = plan.apply(images, plan.concat(mine), normalize=normalize, pad_value=self._pad)
            # This process's rows of each batch: consecutive in the chunk, each batch followed by its
            # partner rows when mixing with several processes.
            counts = [high - low for _, _, low, high in group if low < high]
            if plan.mixing:
                mixed = [batch_draws for batch_draws, (_, _, low, high) in zip(draws, group, strict=True) if low < high]
                images, labels = self._mixed(images, labels, counts, mixed, partners)
            offset = 0
            for n in counts:
                x, y = images[offset : offset + n], labels[offset : offset + n]
                offset += n
                if self.channels_last:  # a no-op on a slice of a channels-last chunk
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y

    def _mixed(
        self, images: torch.Tensor, labels: torch.Tensor, counts: list[int], draws: list[Draws], partners: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's batches mixed, each row with its mirror in its global batch (stage 5 of
        :mod:`cnnkit.data.augment`): one gather of the mirrors for the chunk, not a flip per batch.
        Without ``partners`` a batch's own rows are its mirrors (row j with n-1-j); with them, each
        batch's n rows are followed by the n rows they pair with, in order, and the result keeps
        only the own rows."""
        own, mirrored, offset = [], [], 0
        for n in counts:
            mirror_start = offset + n if partners else offset
            own.append(torch.arange(offset, offset + n))
            mirrored.append(torch.arange(mirror_start + n - 1, mirror_start - 1, -1))
            offset += 2 * n if partners else n
        mirror = torch.cat(mirrored).to(images.device)
        partner = (images.index_select(0, mirror), labels.index_select(0, mirror))
        if partners:
            rows = torch.cat(own).to(images.device)
            images, labels = images.index_select(0, rows), labels.index_select(0, rows)
        return self.augmentation.mix(images, labels, partner, list(zip(draws, counts, strict=True)))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of epoch 0 (evaluation loaders neither shuffle nor augment)."""
        return self.epoch(0)

    def _gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # index_select copies whole rows; plain advanced indexing goes element by element
        # and made the gather, not the arithmetic, the cost of a CPU epoch (7x slower).
        images, labels = torch.index_select(self.images, 0, index), torch.index_select(self.labels, 0, index)
        if self.device.type == "cuda" and images.device.type == "cpu":
            images, labels = images.pin_memory(), labels.pin_memory()  # so the copy to the GPU is asynchronous
        return images, labels

    def _prefetched(
        self, indices: list[torch.Tensor | None]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
        """The gathered rows of each chunk. With ``read_ahead`` (CUDA) the next one is gathered and
        pinned in a background thread while the current one trains; with ``advise`` (a memory-mapped
        split on the CPU) the kernel is asked to read the next one's pages meanwhile. One chunk
        ahead at most."""
        if len(indices) <= 1 or not self.read_ahead:
            for position, index in enumerate(indices):
                following = indices[position + 1] if self.advise and position + 1 < len(indices) else None
                if following is not None:
                    will_need(self.images, following)
                yield self._gather(index) if index is not None else None
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnkit-prefetch") as pool:
            ahead = pool.submit(self._gather, indices[0]) if indices[0] is not None else None
            for position in range(len(indices)):
                current = ahead.result() if ahead is not None else None
                following = indices[position + 1] if position + 1 < len(indices) else None
                ahead = pool.submit(self._gather, following) if following is not None else None
                yield current

    def _move(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == self.device:
            return tensor
        if self.device.type == "cuda":
            pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
            return pinned.to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _enlarge(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 rows (CPU) -> float32 enlarged to ``image_size``, scaled to 0..1 and normalised as
        :meth:`_prepare` does, in one pass per plane (values within 2e-7 of its torch ops)."""
        out = torch.empty((*batch.shape[:2], self.image_size, self.image_size), dtype=torch.float32)
        if self._threads is None and torch.get_num_threads() > 1:
            self._threads = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="cnnkit-enlarge")
            weakref.finalize(self, self._threads.shutdown, wait=False)
        enlarge_planes(batch.contiguous(), out, self._affine, self._threads)
        if self.channels_last and not self.augment:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 rows -> float32 on the device at ``image_size``, normalised when mean/std are given."""
        if self.enlarge:
            return self._enlarge(batch)
        x = to_float(self._move(batch), self.image_size)
        # TrivialAugment and RandAugment work on 0..1 images: they normalise each batch after.
        if self.mean is not None and self.std is not None and not self.augmentation.policy:
            x = x.sub_(self.mean).div_(self.std)
        if self.channels_last and not self.augment:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
