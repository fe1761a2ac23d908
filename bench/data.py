"""One epoch of input pipeline: cnnkit's BatchLoader against the seed's per-sample pipeline.

The seed (d2l) pipeline: torchvision.datasets.FashionMNIST + transforms.Resize + ToTensor, one PIL
image at a time through a DataLoader (best of num_workers 0 and 2). cnnkit: the uint8 tensor
in memory, resized once to a uint8 copy, batches cut and converted on the device. The time is
the pipeline alone (each batch is consumed by a sum), examples per second, and the ratio.

    python bench/data.py [--data PATH] [--sizes 28 96 224] [--seed-batches 60]

The seed side is timed over its first --seed-batches batches (it would take minutes per epoch at
224 px); cnnkit's side is a full epoch including the one-off resize.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import torch

from cnnkit.data import BatchLoader, load_dataset


def cnnkit_rate(split, size: int, batch: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    loader = BatchLoader(split, batch_size=batch, image_size=size, shuffle=True, device="cpu")
    total = torch.zeros(())
    for x, _ in loader.epoch(0):
        total += x.sum()
    return loader.num_examples / (time.perf_counter() - start)


def seed_rate(root: Path, size: int, batch: int, workers: int, batches: int) -> float:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.Resize(size), transforms.ToTensor()])
    dataset = datasets.FashionMNIST(str(root), train=True, transform=transform, download=False)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
    seen, start = 0, time.perf_counter()
    for i, (x, _) in enumerate(loader):
        x.sum()
        seen += x.shape[0]
        if i + 1 == batches:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="Fashion-MNIST folder (default: cnnkit's lookup).")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 96, 224])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed-batches", type=int, default=60)
    args = parser.parse_args()

    splits = load_dataset("fashion-mnist", args.data)
    with tempfile.TemporaryDirectory() as tmp:
        # torchvision wants uncompressed root/FashionMNIST/raw/<files>: unpack a temporary copy.
        raw = Path(tmp) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for file in splits.source.iterdir():
            opener = gzip.open if file.suffix == ".gz" else open
            with opener(file, "rb") as src:
                (raw / file.name.removesuffix(".gz")).write_bytes(src.read())
        print(f"Fashion-MNIST train split, batch {args.batch}, {torch.get_num_threads()} threads, CPU")
        print(f"{'size':>5} {'seed ex/s':>11} {'(workers)':>9} {'cnnkit ex/s':>12} {'ratio':>7}")
        for size in args.sizes:
            seed = {w: seed_rate(Path(tmp), size, args.batch, w, args.seed_batches) for w in (0, 2)}
            best = max(seed, key=seed.__getitem__)
            ours = cnnkit_rate(splits.train, size, args.batch)
            print(f"{size:>5} {seed[best]:>11,.0f} {best:>9} {ours:>12,.0f} {ours / seed[best]:>6.1f}x")


if __name__ == "__main__":
    main()
