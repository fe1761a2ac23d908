"""Downloading Fashion-MNIST from torchvision's mirrors, MD5-checked, written atomically."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from cnnkit.data.locate import data_home
from cnnkit.errors import DataError, UsageError
from cnnkit.fs import atomic_write

__all__ = ["fetch", "FETCHABLE", "fashion_mnist_resources"]

FETCHABLE = ("fashion-mnist",)


def fashion_mnist_resources() -> tuple[list[str], list[tuple[str, str]]]:
    """torchvision's mirrors and (file, md5) list for Fashion-MNIST: one source of truth."""
    from torchvision.datasets import FashionMNIST

    return list(FashionMNIST.mirrors), list(FashionMNIST.resources)


def _download(url: str, target: Path, md5: str, timeout: float) -> None:
    def write(tmp: Path) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(f"{url} has MD5 {digest.hexdigest()}, expected {md5}; the download is damaged")

    atomic_write(target, write)


def fetch(name: str, data: Path | None = None, timeout: float = 30.0) -> Path:
    """Download dataset ``name`` into ``data`` (default ``$CNNKIT_DATA/<name>``); files already
    present with the right MD5 are kept. Returns the folder."""
    from cnnkit.registry import DATASETS

    DATASETS.get(name)  # an unknown name is a UsageError listing the close ones
    if name not in FETCHABLE:
        raise UsageError(
            f"cnnkit cannot download '{name}' (fetchable: {', '.join(FETCHABLE)}); put its files in "
            f"{data_home() / name} or any folder and pass --data PATH"
        )
    folder = Path(data) if data is not None else data_home() / name
    folder.mkdir(parents=True, exist_ok=True)
    mirrors, resources = fashion_mnist_resources()
    for filename, md5 in resources:
        target = folder / filename
        if target.is_file() and hashlib.md5(target.read_bytes(), usedforsecurity=False).hexdigest() == md5:
            continue
        errors = []
        for mirror in mirrors:
            try:
                _download(f"{mirror}{filename}", target, md5, timeout)
                break
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                errors.append(f"{mirror}: {getattr(exc, 'reason', exc)}")
        else:
            raise DataError(
                f"could not download {filename} ({'; '.join(errors)}); without internet, put the four "
                f"IDX files in {folder} ('apt-get install dataset-fashion-mnist' installs them on Debian) "
                "or pass --data PATH"
            )
    return folder
