"""COIL-20 "processed": 20 objects x 72 poses (5 degrees apart), 128x128 grayscale PNGs.

Nene, Nayar, Murase: "Columbia Object Image Library (COIL-20)", Technical Report CUCS-005-96,
Columbia University, 1996. The folder is flat, ``obj{N}__{k}.png``; the label is object N taken
from the file NAME (the seed project derived labels from file order, which silently mislabels
whenever the listing order changes). Three splits:

- ``random``: seeded, stratified per object, 9:1 as in the seed project (the default),
- ``pose-block``: poses 0-59 train, 60-71 test (held-out viewpoints); ``block_start`` moves the
  12 held-out poses round the circle (0: poses 0-11), so a recipe can be chosen on one block and
  reported on another,
- ``alternate``: even poses train, odd poses test.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from cnnkit.data.cache import cached_splits, dataset_statistics, source_key
from cnnkit.data.images import decode_images
from cnnkit.data.locate import find_folder
from cnnkit.errors import DataError
from cnnkit.options import parse_options
from cnnkit.protocols import DatasetSplits, ImageTensors

__all__ = ["COIL20", "Coil20", "Coil20Options", "parse_name"]

_NAME = re.compile(r"^obj(\d+)__(\d+)\.png$", re.IGNORECASE)
OBJECTS, POSES = 20, 72
BLOCK = 12  # pose-block's held-out poses: 60 degrees of the turntable
HOW_TO_GET = "put the 1,440 obj{N}__{k}.png files of COIL-20 'processed' in a folder and pass --data PATH"


class Coil20Options(BaseModel):
    """How COIL-20 is split into train and test."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    split: Literal["random", "pose-block", "alternate"] = Field(
        "random",
        description="random (seeded 9:1 per object), pose-block (poses 60-71 held out), alternate (odd poses).",
    )
    seed: int = Field(0, description="Seed of the random split.")
    block_start: int = Field(
        POSES - BLOCK, ge=0, lt=POSES,
        description="pose-block: first of the 12 held-out poses, wrapping past 71 (60: poses 60-71).",
    )  # fmt: skip
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share of each object's poses in test (random split).")


def parse_name(path: Path) -> tuple[int, int] | None:
    """(object 1..20, pose 0..71) from ``obj{N}__{k}.png``, or None when the name does not match."""
    match = _NAME.match(path.name)
    if not match:
        return None
    obj, pose = int(match[1]), int(match[2])
    return (obj, pose) if 1 <= obj <= OBJECTS and 0 <= pose < POSES else None


def _split_mask(objects: torch.Tensor, poses: torch.Tensor, options: Coil20Options) -> torch.Tensor:
    """True where a file goes to test."""
    if options.split == "pose-block":
        # poses are 5 degrees apart on a full turn, so a block past 71 wraps round to 0
        return (poses - options.block_start) % POSES < BLOCK
    if options.split == "alternate":
        return poses % 2 == 1
    generator = torch.Generator().manual_seed(options.seed)
    test = torch.zeros_like(objects, dtype=torch.bool)
    for obj in objects.unique().tolist():
        members = (objects == obj).nonzero().flatten()
        count = max(1, round(len(members) * options.test_fraction))
        test[members[torch.randperm(len(members), generator=generator)[:count]]] = True
    return test


class Coil20:
    """The registered ``coil20`` dataset."""

    name = "coil20"
    summary = "COIL-20 processed (Columbia): 20 objects x 72 poses, 128x128 grayscale; labels from file names"
    classes = tuple(f"obj{i}" for i in range(1, OBJECTS + 1))
    channels = 1
    image_size = (128, 128)
    options = Coil20Options

    def locate(self, data: Path | None = None) -> Path:
        """``data``, else ``$CNNKIT_DATA/coil20`` (or ``coil-20``, ``coil-20-proc``)."""
        return find_folder(self.name, data, ["coil20", "coil-20", "coil-20-proc", "COIL-20"], how_to_get=HOW_TO_GET)

    def load(self, data: Path | None = None, **options: Any) -> DatasetSplits:
        """Both splits under ``split`` (random, pose-block, alternate); labels from file names."""
        opts = parse_options(self.name, Coil20Options, options, kind="dataset")
        folder = self.locate(data)
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        parsed = {p: parse_name(p) for p in files}
        bad = [p.name for p, key in parsed.items() if key is None]
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise DataError(
                f"{folder}: {len(bad)} file(s) are not named obj{{N}}__{{k}}.png with N 1..20, k 0..71: "
                f"{shown}; move them out of the folder"
            )
        if not files:
            raise DataError(f"{folder} holds no COIL-20 images; {HOW_TO_GET}")
        key = source_key(self.name, files, opts.model_dump())
        return cached_splits(key, self.name, folder, lambda: self._decode(folder, files, parsed, opts))

    def _decode(
        self, folder: Path, files: list[Path], parsed: dict[Path, tuple[int, int] | None], opts: Coil20Options
    ) -> DatasetSplits:
        images = decode_images(files, channels=1)
        objects = torch.tensor([parsed[p][0] for p in files])  # type: ignore[index]
        poses = torch.tensor([parsed[p][1] for p in files])  # type: ignore[index]
        labels = objects - 1  # object N is class N-1, whatever order the files were listed in
        test = _split_mask(objects, poses, opts)
        train = ~test
        mean, std = dataset_statistics(images[train])
        names = [p.name for p in files]
        return DatasetSplits(
            name=self.name,
            train=ImageTensors(images[train].contiguous(), labels[train].contiguous()),
            test=ImageTensors(images[test].contiguous(), labels[test].contiguous()),
            classes=self.classes,
            source=folder,
            mean=mean,
            std=std,
            split_files={
                "train": [n for n, t in zip(names, test.tolist(), strict=True) if not t],
                "test": [n for n, t in zip(names, test.tolist(), strict=True) if t],
            },
        )


COIL20 = Coil20()
