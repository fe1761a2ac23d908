"""Input-pipeline throughput: cnnkit's BatchLoader against the seed's per-sample torchvision pipeline.

The seed (d2l) pipeline: ``torchvision.datasets.FashionMNIST`` + ``transforms.Resize`` +
``ToTensor``, one PIL image at a time through a ``DataLoader`` (the better of ``num_workers`` 0
and 2). cnnkit: the uint8 split in memory, resized once to a uint8 copy, batches cut from it and
converted as a whole. Both sides consume each batch (a sum) so no work can be skipped; the figure
is examples per second of the pipeline alone, and the ratio.

The seed side is slow, so only its first ``--seed-batches`` batches are timed. cnnkit's side runs
full epochs: "steady" is the better of two epochs, "first" adds any one-off resized copy to the
first epoch. torchvision reads ``root/FashionMNIST/raw/`` with unpacked files: that layout is built
in a temp folder (symlinks to unpacked files, ``.gz`` unpacked there); nothing is downloaded and
the data folder is only read. The machine's load average is printed, since other processes
sharing the cores change every figure.

    CNNKIT_DATA=/work/shared/datasets .venv/bin/python bench/data.py [--sizes 28 96 224] [--threads 1]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from cnnkit.protocols import ImageTensors


def consume(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], limit: int | None = None) -> tuple[int, float]:
    """Examples seen and seconds taken to sum the first ``limit`` batches (all when None)."""
    seen, total = 0, torch.zeros(())
    start = time.perf_counter()
    for i, (images, labels) in enumerate(batches):
        if limit is not None and i >= limit:
            break
        total += images.sum()
        seen += labels.shape[0]
    float(total)
    return seen, time.perf_counter() - start


def cnnkit_rate(split: ImageTensors, size: int, batch: int, epochs: int = 2) -> tuple[float, float, float]:
    """(steady examples/s: the best epoch; first-epoch examples/s including preparation; prepare s)."""
    from cnnkit.data.batches import BatchLoader

    start = time.perf_counter()
    loader = BatchLoader(split, batch_size=batch, image_size=size, shuffle=True, seed=0)
    prepare = time.perf_counter() - start
    times, seen = [], 0
    for epoch in range(epochs):
        seen, seconds = consume(loader.epoch(epoch))
        times.append(seconds)
    return seen / min(times), seen / (prepare + times[0]), prepare


def seed_rate(root: Path, size: int, batch: int, batches: int) -> tuple[float, int]:
    """(examples/s, num_workers) of the faster seed DataLoader over its first ``batches`` batches."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.Resize(size), transforms.ToTensor()])
    dataset = datasets.FashionMNIST(str(root), train=True, transform=transform, download=False)
    best = (0.0, 0)
    for workers in (0, 2):
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
        seen, seconds = consume(loader, batches)
        best = max(best, (seen / seconds, workers))
    return best


def torchvision_layout(source: Path, into: Path) -> Path:
    """``into/FashionMNIST/raw/`` with the four IDX files unpacked, as torchvision reads them."""
    raw = into / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        if "-idx" not in file.name:
            continue
        if file.suffix == ".gz":
            with gzip.open(file, "rb") as packed, open(raw / file.stem, "wb") as out:
                shutil.copyfileobj(packed, out)
        elif not (raw / file.name).exists():
            (raw / file.name).symlink_to(file.resolve())
    return into


def main() -> None:
    """Print the table: one row per image size."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="Fashion-MNIST folder (default: cnnkit's lookup)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 96, 224])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed-batches", type=int, default=100, help="batches timed on the slow seed side")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per size (medians printed)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    from cnnkit.data import load_dataset
    from cnnkit.data.fashion_mnist import FASHION_MNIST

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = FASHION_MNIST.locate(args.data)
    split = load_dataset("fashion-mnist", folder).train
    threads = torch.get_num_threads()
    print(f"Fashion-MNIST train, {len(split):,} images from {folder}; batch {args.batch}; {threads} threads")
    print(
        "seed: torchvision per-sample Resize + ToTensor + DataLoader (best of workers 0/2), "
        f"first {args.seed_batches} batches"
    )
    print(
        "cnnkit: BatchLoader full epochs; steady = best of 2 epochs; first = epoch 0 + any one-off "
        f"resized copy; medians of {args.repeats} interleaved repeats\n"
    )
    columns = ("size", 5), ("seed ex/s", 10), ("steady ex/s", 12), ("ratio", 6), ("first ex/s", 11), ("ratio", 6)
    print(" ".join(f"{name:>{width}}" for name, width in (*columns, ("prep s", 7), ("load", 5))))
    with tempfile.TemporaryDirectory() as tmp:
        root = torchvision_layout(folder, Path(tmp))
        for size in args.sizes:
            # Sides interleaved, each repeat on a fresh copy of the split (so the first epoch pays any
            # resized copy again); the medians are printed, as single runs on this shared machine
            # differ by up to 3x.
            seeds, runs = [], []
            for _ in range(args.repeats):
                seeds.append(seed_rate(root, size, args.batch, args.seed_batches)[0])
                runs.append(cnnkit_rate(ImageTensors(split.images.clone(), split.labels), size, args.batch))
            seed = statistics.median(seeds)
            steady, first, prepare = (statistics.median(column) for column in zip(*runs, strict=True))
            print(
                f"{size:>5} {seed:>10,.0f} {steady:>12,.0f} {steady / seed:>5.1f}x {first:>11,.0f} "
                f"{first / seed:>5.1f}x {prepare:>7.2f} {os.getloadavg()[0]:>5.1f}",
                flush=True,
            )
    print(
        "\nfirst: what a run pays before and during its first epoch; a split enlarged past 1 GiB "
        "(224 px) is enlarged per chunk as it is read, so it has no copy to prepare"
        "\ntargets (issue 18): first epoch >= 5x the seed at 96 px, >= 3x at 224 px"
    )


if __name__ == "__main__":
    main()
