"""The IDX format of MNIST and Fashion-MNIST, read with real checks (``.gz`` or raw)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from cnnkit.errors import DataError

__all__ = ["read_idx"]

_UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """A uint8 IDX file as a tensor with ``ndim`` dimensions; DataError names the file and the fault."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path} is missing") from None
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path} cannot be read ({exc}); the file is damaged: fetch it again") from exc
    if len(raw) < 4:
        raise DataError(f"{path} is truncated: {len(raw)} bytes is shorter than an IDX header")
    zero, dtype, dims = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype != _UBYTE or dims != ndim:
        raise DataError(
            f"{path} has magic number 0x{raw[:4].hex()}, expected 0x000008{ndim:02x} "
            f"(an unsigned-byte IDX file with {ndim} dimension{'s' if ndim > 1 else ''})"
        )
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: {len(raw)} bytes is shorter than an IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: {len(raw)} bytes for shape {shape}, expected {expected}")
    array = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    return torch.from_numpy(array.copy())
