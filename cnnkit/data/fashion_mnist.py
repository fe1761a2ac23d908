"""Fashion-MNIST: 70,000 28x28 grayscale images of 10 clothing classes, from the four IDX files.

Xiao, Rasul, Vollgraf: "Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
Algorithms", arXiv:1708.07747, 2017. The files are found in ``--data``, ``$CNNKIT_DATA/fashion-mnist``
(or torchvision's ``FashionMNIST/raw`` layout), or where Debian's ``dataset-fashion-mnist`` package
installs them; ``cnnkit data fetch fashion-mnist`` downloads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from cnnkit.data.cache import cached_splits, dataset_statistics, source_key
from cnnkit.data.idx import read_idx
from cnnkit.data.locate import find_folder
from cnnkit.errors import DataError
from cnnkit.options import parse_options
from cnnkit.protocols import DatasetSplits, ImageTensors

__all__ = ["FashionMNIST", "FASHION_MNIST", "FILES", "HOW_TO_GET"]

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# split -> (images file, labels file, count in the published set). Smaller files of the same
# format are accepted (quick experiments, tests); images and labels must agree.
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
SYSTEM_FOLDER = Path("/usr/share/datasets/fashion-mnist")
HOW_TO_GET = (
    "get it with 'cnnkit data fetch fashion-mnist', or 'apt-get install dataset-fashion-mnist' "
    "on Debian, or put the four IDX files in a folder and pass --data PATH"
)


class FashionMNISTOptions(BaseModel):
    """Fashion-MNIST has no loading options."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FashionMNIST:
    """The registered ``fashion-mnist`` dataset."""

    name = "fashion-mnist"
    summary = "Fashion-MNIST (Zalando): 60,000 + 10,000 28x28 grayscale images, 10 clothing classes"
    classes = CLASSES
    channels = 1
    image_size = (28, 28)
    options = FashionMNISTOptions

    def locate(self, data: Path | None = None) -> Path:
        """``data``, else ``$CNNKIT_DATA/fashion-mnist`` (or ``FashionMNIST/raw``), else Debian's folder."""
        folder = find_folder(
            self.name, data, ["fashion-mnist", "FashionMNIST/raw", "fashion_mnist"], [SYSTEM_FOLDER], HOW_TO_GET
        )
        return folder

    def files(self, folder: Path) -> list[Path]:
        """The four IDX files in ``folder`` (``.gz`` preferred when both exist)."""
        found = []
        for images, labels, _ in FILES.values():
            for stem in (images, labels):
                candidates = [folder / f"{stem}.gz", folder / stem]
                path = next((c for c in candidates if c.is_file()), None)
                if path is None:
                    raise DataError(f"{folder / (stem + '.gz')} is missing; {HOW_TO_GET}")
                found.append(path)
        return found

    def load(self, data: Path | None = None, **options: Any) -> DatasetSplits:
        """Both splits from the IDX files (decoded once, then from the cache)."""
        parse_options(self.name, FashionMNISTOptions, options, kind="dataset")
        folder = self.locate(data)
        files = self.files(folder)
        key = source_key(self.name, files, {})
        return cached_splits(key, self.name, folder, lambda: self._decode(folder, files))

    def _decode(self, folder: Path, files: list[Path]) -> DatasetSplits:
        splits = {}
        for index, split in enumerate(FILES):
            images_file, labels_file = files[2 * index], files[2 * index + 1]
            images = read_idx(images_file, ndim=3)
            labels = read_idx(labels_file, ndim=1)
            if images.shape[0] != labels.shape[0]:
                raise DataError(
                    f"{labels_file} holds {labels.shape[0]} labels but {images_file} holds "
                    f"{images.shape[0]} images; the two files must come from the same split"
                )
            if images.shape[1:] != (28, 28):
                raise DataError(f"{images_file} holds {tuple(images.shape[1:])} images, expected 28x28")
            if int(labels.max()) >= len(CLASSES):
                raise DataError(f"{labels_file} has label {int(labels.max())}; Fashion-MNIST labels are 0..9")
            splits[split] = ImageTensors(images.unsqueeze(1).contiguous(), labels.long())
        mean, std = dataset_statistics(splits["train"].images)
        return DatasetSplits(self.name, splits["train"], splits["test"], CLASSES, folder, mean, std)


FASHION_MNIST = FashionMNIST()
