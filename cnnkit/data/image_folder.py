"""Any folder of class subfolders: ``root/<class>/*.png|jpg|jpeg|bmp|tif|tiff|webp|gif``.

With ``root/train/<class>`` and ``root/test/<class>`` the split is given; otherwise a seeded split,
stratified per class, holds out ``test_fraction`` of each class. Class names are the subfolder
names in sorted order (label i is the i-th name), never the order files happen to be listed in.
Images are decoded once at load time (then cached); mixed sizes are resized to a common size.

What counts as an image is decided by its name, the same way everywhere:

- hidden files and folders (names starting with ``.``: ``.DS_Store``, ``._x.jpg``,
  ``.ipynb_checkpoints``) are ignored;
- other files whose names do not end in an image suffix (``notes.txt``) are skipped, and one
  warning counts them;
- a file named as an image that is not one (zero bytes, text, truncated, larger than PIL's
  decompression-bomb limit) is an error (exit 3) naming it: remove or replace it;
- a class folder without images, or a folder with a single class, is an error (exit 3);
- symbolic links are followed, each real folder at most once (a link loop ends there);
- file and folder names need not be UTF-8: names that are not are shown (split files, class
  names) with backslash escapes.

The folder is only ever read; decoded tensors go to the cache (:mod:`cnnkit.data.cache`).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cnnkit.data.cache import cached_splits, dataset_statistics, source_key
from cnnkit.data.images import decode_images
from cnnkit.data.locate import find_folder
from cnnkit.errors import DataError
from cnnkit.image_files import IMAGE_SUFFIXES, header
from cnnkit.options import parse_options
from cnnkit.protocols import DatasetSplits, ImageTensors

__all__ = ["IMAGE_FOLDER", "ImageFolder", "ImageFolderOptions"]

HOW_TO_GET = "lay the images out as root/<class>/*.png (optionally root/train/... and root/test/...)"


class ImageFolderOptions(BaseModel):
    """How an image folder is read and split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: int | None = Field(None, description="1 (grayscale) or 3 (RGB); default: 1 if every image is grayscale.")
    image_size: int | None = Field(
        None, gt=0, description="Side every image is resized to; default: the most common size."
    )
    seed: int = Field(0, description="Seed of the split when there are no train/ and test/ subfolders.")
    test_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of each class held out when the split is not given."
    )

    @field_validator("channels")
    @classmethod
    def _one_or_three(cls, value: int | None) -> int | None:
        if value not in (None, 1, 3):
            raise ValueError("must be 1 or 3")
        return value


def printable(name: str) -> str:
    """A file name as text that can be written anywhere: bytes that are not UTF-8 become ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, skipped visible non-image files) under ``folder``, following links, never twice."""
    images: list[Path] = []
    skipped: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        identity = os.stat(top)
        if (identity.st_dev, identity.st_ino) in seen:  # a link back to a folder already read
            dirs[:] = []
            continue
        seen.add((identity.st_dev, identity.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(top) / name
            if name.startswith("."):
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES:
                if not path.is_file():
                    raise DataError(f"{path} is not a readable image (a broken or looping link); replace or remove it")
                images.append(path)
            elif path.is_file():
                skipped.append(path)
    return sorted(images), skipped


def _class_files(root: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class subfolders; {HOW_TO_GET}")
    if len(classes) == 1:
        raise DataError(
            f"{root} has a single class folder ({printable(classes[0].name)}); a classifier needs at least two"
        )
    found: dict[str, list[Path]] = {}
    skipped: list[Path] = []
    for folder in classes:
        files, others = _image_files(folder)
        skipped += others
        if not files:
            raise DataError(
                f"class folder {folder} holds no .png/.jpg/.jpeg/.bmp images (nor .tif/.tiff/.webp/.gif); "
                "add some or remove it"
            )
        found[folder.name] = files
    if skipped:
        from cnnkit._console import warn

        suffixes = sorted({p.suffix.lower() or p.name for p in skipped})
        warn(f"{root}: skipped {len(skipped)} file(s) that are not images by name ({', '.join(suffixes[:5])})")
    return found


def _native(paths: list[Path]) -> tuple[bool, Counter[tuple[int, int]]]:
    """Whether every image is grayscale, and how common each (H, W) is (headers only, no decoding)."""
    from PIL import Image, UnidentifiedImageError

    gray, sizes = True, Counter[tuple[int, int]]()
    for path in paths:
        try:
            if path.stat().st_size == 0:
                raise DataError(f"{path} is empty (0 bytes); replace or remove it")
            is_gray, size = header(path)
        except Image.DecompressionBombError as exc:
            raise DataError(f"{path} is larger than PIL's safety limit ({exc}); shrink it or remove it") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise DataError(f"{path} is not a readable image ({reason}); replace or remove it") from exc
        gray &= is_gray
        sizes[size] += 1
    return gray, sizes


class ImageFolder:
    """The registered ``image-folder`` dataset."""

    name = "image-folder"
    summary = "Any folder of class subfolders root/<class>/*.png (train/ and test/ optional); --data PATH"
    classes: tuple[str, ...] = ()
    channels = 3
    image_size = (0, 0)
    options = ImageFolderOptions

    def locate(self, data: Path | None = None) -> Path:
        """``data`` (normally given with --data), else ``$CNNKIT_DATA/image-folder``."""
        return find_folder(self.name, data, ["image-folder"], how_to_get=HOW_TO_GET)

    def load(self, data: Path | None = None, **options: Any) -> DatasetSplits:
        """Both splits: from train/ and test/ when present, else a seeded per-class split."""
        opts = parse_options(self.name, ImageFolderOptions, options, kind="dataset")
        root = self.locate(data)
        given = (root / "train").is_dir() and (root / "test").is_dir()
        parts = {"train": _class_files(root / "train"), "test": _class_files(root / "test")} if given else None
        everything = _class_files(root) if parts is None else parts["train"]
        if parts is not None and sorted(parts["test"]) != sorted(parts["train"]):
            raise DataError(
                f"{root}: train/ and test/ hold different classes ({', '.join(sorted(parts['train']))} vs "
                f"{', '.join(sorted(parts['test']))}); give both the same class folders"
            )
        all_files = [f for group in (parts.values() if parts else [everything]) for fs in group.values() for f in fs]
        key = source_key(self.name, all_files, opts.model_dump())
        return cached_splits(key, self.name, root, lambda: self._decode(root, everything, parts, all_files, opts))

    def _decode(
        self,
        root: Path,
        everything: dict[str, list[Path]],
        parts: dict[str, dict[str, list[Path]]] | None,
        all_files: list[Path],
        opts: ImageFolderOptions,
    ) -> DatasetSplits:
        gray, sizes = _native(all_files)
        channels = opts.channels or (1 if gray else 3)
        size = (opts.image_size, opts.image_size) if opts.image_size else sizes.most_common(1)[0][0]
        classes = tuple(sorted(everything))

        def tensors(groups: dict[str, list[Path]]) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
            files = [f for c in classes for f in groups[c]]
            labels = torch.tensor([i for i, c in enumerate(classes) for _ in groups[c]], dtype=torch.long)
            return files, decode_images(files, channels, size), labels

        if parts is not None:
            train_files, train_x, train_y = tensors(parts["train"])
            test_files, test_x, test_y = tensors(parts["test"])
        else:
            files, images, labels = tensors(everything)
            generator = torch.Generator().manual_seed(opts.seed)
            test = torch.zeros(len(files), dtype=torch.bool)
            for label in range(len(classes)):
                members = (labels == label).nonzero().flatten()
                count = min(len(members) - 1, max(1, round(len(members) * opts.test_fraction)))
                test[members[torch.randperm(len(members), generator=generator)[:count]]] = True
            train_files = [f for f, t in zip(files, test.tolist(), strict=True) if not t]
            test_files = [f for f, t in zip(files, test.tolist(), strict=True) if t]
            train_x, train_y, test_x, test_y = images[~test], labels[~test], images[test], labels[test]
        mean, std = dataset_statistics(train_x)
        relative = lambda fs: [printable(str(f.relative_to(root))) for f in fs]  # noqa: E731
        return DatasetSplits(
            name=self.name,
            train=ImageTensors(train_x.contiguous(), train_y),
            test=ImageTensors(test_x.contiguous(), test_y),
            classes=tuple(printable(c) for c in classes),
            source=root,
            mean=mean,
            std=std,
            split_files={"train": relative(train_files), "test": relative(test_files)},
        )


IMAGE_FOLDER = ImageFolder()
