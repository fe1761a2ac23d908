"""Resizing uint8 image tensors: the whole-batch conversion to float, enlarging with OpenCV (per
chunk as a split is read, or into a copy), shrinking with PyTorch's antialiased kernel into a copy.

On a CPU, resizing a batch with torch ops costs more than the rest of its preparation; OpenCV's
bilinear kernels enlarge a plane in microseconds and release the GIL, so planes are split among
threads. Shrinking keeps PyTorch's antialiased bilinear, the filter torchvision's ``Resize`` uses.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

__all__ = ["enlarge_planes", "enlarge_uint8", "enlarges", "resize_uint8", "resized_bytes", "to_float"]

_RESIZE_CHUNK = 2048
# Output pixels each thread enlarges at least: a batch of 128 at 96 px (1.2 M) was faster in one
# thread than in two, at 224 px (6.4 M) twice as fast in two (profiled).
_PIXELS_PER_THREAD = 2 << 20


def to_float(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in 0..1 at ``size`` x ``size`` (bilinear, antialiased when shrinking)."""
    if images.dtype == torch.uint8 and torch.get_default_dtype() == torch.float32:
        x = torch.div(images, 255)  # true division: float32 in one pass, the same values as .float() / 255
    else:
        x = images.float().div_(255)
    if x.shape[-2:] != (size, size):
        shrinking = size < x.shape[-1] or size < x.shape[-2]
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
        x.clamp_(0, 1)
    return x


def _resize_chunk(chunk: torch.Tensor, size: int) -> torch.Tensor:
    shrinking = size < chunk.shape[-1] or size < chunk.shape[-2]
    if chunk.device.type == "cpu":
        # PyTorch's native uint8 bilinear kernel (the one torchvision uses): about 4x faster than
        # converting to float first, and within one grey level of it.
        return F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
    return to_float(chunk, size).mul_(255).round_().to(torch.uint8)


def resized_bytes(images: torch.Tensor, size: int) -> int:
    """Bytes a uint8 copy of ``images`` at ``size`` x ``size`` takes."""
    return int(images.shape[0]) * int(images.shape[1]) * size * size


def enlarge_planes(
    images: torch.Tensor,
    out: torch.Tensor,
    affine: tuple[Sequence[float], Sequence[float]] | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> None:
    """``out`` = CPU uint8 ``images`` enlarged bilinearly, one OpenCV call per plane; with
    ``affine`` = (scales, shifts), ``out`` is float32 and each enlarged plane of channel c becomes
    ``plane * scales[c] + shifts[c]`` in the same pass, while it is still in the CPU's cache.

    OpenCV's bilinear is the same half-pixel-centred one as PyTorch's (``align_corners=False``), in
    fixed point: within one grey level. Enlarging Fashion-MNIST's 60,000 images to 224 px took
    4.7-8.7 s with PyTorch's uint8 kernel on this project's two cores, 1.4 s with OpenCV; a batch
    of 128 enlarged, converted and normalised here takes 3.6 ms in two threads, where gathering
    it from an enlarged copy and converting it with torch ops took 10 ms (profiled). Planes are
    split among up to ``torch.get_num_threads()`` threads of ``pool`` when each gets enough
    pixels to pay for the hand-off (OpenCV releases the GIL)."""
    import cv2

    channels = int(images.shape[1])
    source = images.numpy().reshape(-1, *images.shape[-2:])
    target = out.numpy().reshape(-1, *out.shape[-2:])
    size = (int(out.shape[-1]), int(out.shape[-2]))

    def run(part: range) -> None:
        for i in part:
            if affine is None:
                cv2.resize(source[i], size, dst=target[i], interpolation=cv2.INTER_LINEAR)
                continue
            plane = cv2.resize(source[i], size, interpolation=cv2.INTER_LINEAR)
            c = i % channels
            cv2.addWeighted(plane, affine[0][c], plane, 0.0, affine[1][c], dst=target[i], dtype=cv2.CV_32F)

    workers = max(1, min(torch.get_num_threads(), target.size // _PIXELS_PER_THREAD, len(source)))
    step = -(-len(source) // workers)
    parts = [range(lo, min(lo + step, len(source))) for lo in range(0, len(source), step)]
    if len(parts) <= 1:
        for part in parts:
            run(part)
        return
    if pool is not None:
        list(pool.map(run, parts))
        return
    with ThreadPoolExecutor(len(parts)) as own:
        list(own.map(run, parts))


def enlarges(images: torch.Tensor, size: int) -> bool:
    """Whether ``images`` go to ``size`` x ``size`` by enlarging alone on the CPU (OpenCV's path)."""
    return (
        images.device.type == "cpu" and images.dtype == torch.uint8
        and images.shape[-2:] != (size, size) and size >= max(images.shape[-2:])
    )  # fmt: skip


def populated_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor whose pages the kernel maps all at once (``MAP_POPULATE``)
    instead of one page fault at a time as it is first written: a 3 GB copy took 2-4 s of page
    faults on this project's virtual machine, 0.7 s populated (profiled). ``torch.empty`` where
    the system has no such flag."""
    size = math.prod(shape)
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if not populate or size < (64 << 20):
        return torch.empty(shape, dtype=torch.uint8)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    # The tensor holds a reference to the mapping: it is unmapped when the tensor is freed.
    return torch.frombuffer(memory, dtype=torch.uint8).view(shape)


def enlarge_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 copy of CPU ``images`` enlarged to ``size`` x ``size`` (bilinear, see enlarge_planes)."""
    out = populated_uint8((*images.shape[:2], size, size))
    enlarge_planes(images.contiguous(), out)
    return out


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 copy of ``images`` at ``size`` x ``size``, made once per (tensor, size), in chunks."""
    if images.shape[-2:] == (size, size):
        return images
    # Kept on the source tensor itself, so it lives exactly as long as the split: a run, its
    # evaluations and a benchmark resize once; a freed split can never hand out a stale copy.
    cache: dict[int, torch.Tensor] = images.__dict__.setdefault("_cnnkit_resized", {})
    if size in cache:
        return cache[size]
    if enlarges(images, size):
        cache[size] = enlarge_uint8(images, size)
        return cache[size]
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8, device=images.device)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK]
        out[start : start + chunk.shape[0]] = _resize_chunk(chunk, size)
    cache[size] = out
    return out
