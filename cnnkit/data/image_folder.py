"""The user's own images: any of the layouts of :mod:`cnnkit.data.layouts` (class folders, train/ val/
test/ split folders, a CSV manifest), decoded once at the run's size into a memory-mapped store.

Each image is decoded once, resized on the way to the run's input size (``-d resize=crop``: the
shorter side to the size, then a centre crop; ``squash``; ``pad``) and written into a uint8 store
in ``$CNNKIT_CACHE`` keyed by the files, the size, the channels and the resize mode
(:mod:`cnnkit.data.store`); the splits are views of it, so a folder larger than memory trains in
bounded memory. The run's input size arrives as the ``image_size`` option (the driver fills it in
unless ``-d image_size=N`` is given).

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

The folder is only ever read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cnnkit.data.layouts import SPLITS, Item, Layout, assign_splits, describe, find_layout, printable
from cnnkit.data.locate import find_folder
from cnnkit.errors import DataError
from cnnkit.image_files import header
from cnnkit.options import parse_options
from cnnkit.protocols import DatasetSplits, ImageTensors

__all__ = ["IMAGE_FOLDER", "ImageFolder", "ImageFolderOptions", "printable"]

HOW_TO_GET = "pass --data PATH: a folder of class folders, train/ val/ test/ folders, or a CSV manifest"


class ImageFolderOptions(BaseModel):
    """How an image folder is read and split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channels: int | None = Field(None, description="1 (grayscale) or 3 (RGB); default: 1 if every image is grayscale.")
    image_size: int | None = Field(
        None, gt=0, description="Side images are decoded at; default: the run's input size (else the most common size)."
    )
    resize: Literal["crop", "squash", "pad"] = Field(
        "crop", description="crop: shorter side to the size, then the centre; squash: stretch; pad: fit and pad."
    )
    seed: int = Field(0, description="Seed of the split of what the layout does not split itself.")
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of each class held out for validation when there is no val/ split."
    )
    test_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of each class held out for testing when there is no test/ split."
    )
    path_column: str = Field("path", min_length=1, description="CSV manifests: the column holding image paths.")
    label_column: str = Field("label", min_length=1, description="CSV manifests: the column holding class names.")

    @field_validator("channels")
    @classmethod
    def _one_or_three(cls, value: int | None) -> int | None:
        if value not in (None, 1, 3):
            raise ValueError("must be 1 or 3")
        return value


def _native(paths: Sequence[Path]) -> tuple[bool, Counter[tuple[int, int]]]:
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
    summary = "Your own images: class folders, train/ val/ test/ folders or a CSV manifest; --data PATH"
    classes: tuple[str, ...] = ()
    channels = 3
    image_size = (0, 0)
    options = ImageFolderOptions

    def locate(self, data: Path | None = None) -> Path:
        """``data`` (normally given with --data; a folder or a .csv manifest), else ``$CNNKIT_DATA/image-folder``."""
        if data is not None and Path(data).expanduser().is_file():
            return Path(data).expanduser()
        return find_folder(self.name, data, ["image-folder"], how_to_get=HOW_TO_GET)

    def layout(self, data: Path | None = None, **options: Any) -> tuple[Layout, dict[str, list[Item]]]:
        """The layout found and the three splits' files (nothing decoded)."""
        opts = parse_options(self.name, ImageFolderOptions, options, kind="dataset")
        layout = find_layout(self.locate(data), opts.path_column, opts.label_column)
        return layout, assign_splits(layout, opts.val_fraction, opts.test_fraction, opts.seed)

    def describe(self, data: Path | None = None, **options: Any) -> dict[str, Any]:
        """Layout, classes and split sizes from the file names, channels and the commonest size from
        the images' headers (each one checked, none decoded): what ``cnnkit data info`` shows."""
        layout, splits = self.layout(data, **options)
        gray, sizes = _native([path for items in splits.values() for path, _ in items])
        (height, width), _ = sizes.most_common(1)[0]
        return {**describe(layout, splits), "channels": 1 if gray else 3, "image_size": [height, width]}

    def load(self, data: Path | None = None, **options: Any) -> DatasetSplits:
        """train, val and test as the layout gives them or as the seeded split carves them."""
        from cnnkit._console import warn

        layout, splits = self.layout(data, **options)
        for note in layout.notes:
            warn(note)
        return self._stored(layout, splits, parse_options(self.name, ImageFolderOptions, options, kind="dataset"))

    def load_recorded(
        self, data: Path | None, split_files: Mapping[str, Sequence[str]], classes: Sequence[str], **options: Any
    ) -> DatasetSplits:
        """Exactly the files a run recorded in each split (names relative to the data folder), labelled
        with the run's ``classes``: what eval and resume use, whatever was added to the folder since."""
        opts = parse_options(self.name, ImageFolderOptions, options, kind="dataset")
        layout = find_layout(self.locate(data), opts.path_column, opts.label_column)
        labelled = {printable(str(path.relative_to(layout.root))): name for items in layout.given.values()
                    for path, name in items}  # fmt: skip
        recorded = Layout(layout.kind, layout.root, tuple(classes), {}, [])
        splits: dict[str, list[Item]] = {split: [] for split in SPLITS}
        for split, names in split_files.items():
            for name in names:
                path = layout.root / name
                if not path.is_file():
                    raise DataError(
                        f"{path} is listed in the run's {split} split but is gone; restore it "
                        "(the run's split files say which images it used)"
                    )
                label = labelled.get(name)
                if label is None or label not in classes:
                    raise DataError(
                        f"{path} of the run's {split} split no longer has a class the run knows "
                        f"({label or 'none'}); restore the folder as it was"
                    )
                splits.setdefault(split, []).append((path, label))
        added = len(labelled) - len({name for names in split_files.values() for name in names} & set(labelled))
        if added:
            from cnnkit._console import warn

            warn(f"{layout.root} has {added} image(s) the run did not record (added since); using the recorded files")
        return self._stored(recorded, splits, opts)

    def _stored(self, layout: Layout, splits: dict[str, list[Item]], opts: ImageFolderOptions) -> DatasetSplits:
        from cnnkit.data.store import stored_images

        ordered = [(split, item) for split in SPLITS for item in splits.get(split, [])]
        files = [path for _, (path, _) in ordered]
        if not splits.get("train"):
            raise DataError(f"{layout.root}: the train split holds no images; {HOW_TO_GET}")
        channels, size = opts.channels, opts.image_size
        if channels is None or size is None:
            gray, sizes = _native(files)
            channels = channels or (1 if gray else 3)
            size = size or min(sizes.most_common(1)[0][0])
        stored = stored_images(
            files, size=size, channels=channels, resize=opts.resize, dataset=self.name,
            stats_count=len(splits["train"]),
        )  # fmt: skip
        index = {name: i for i, name in enumerate(layout.classes)}
        tensors: dict[str, ImageTensors] = {}
        start = 0
        for split in SPLITS:
            items = splits.get(split, [])
            labels = torch.tensor([index[name] for _, name in items], dtype=torch.long)
            tensors[split] = ImageTensors(stored.images[start : start + len(items)], labels, mapped=stored.mapped)
            start += len(items)
        relative = lambda items: [printable(str(p.relative_to(layout.root))) for p, _ in items]  # noqa: E731
        return DatasetSplits(
            name=self.name,
            train=tensors["train"],
            test=tensors["test"],
            val=tensors["val"] if splits.get("val") else None,
            classes=tuple(layout.classes),
            source=layout.root,
            mean=stored.mean,
            std=stored.std,
            split_files={split: relative(splits[split]) for split in SPLITS if splits.get(split)},
        )


IMAGE_FOLDER = ImageFolder()
