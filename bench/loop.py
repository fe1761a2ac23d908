"""cnnkit's training loop against a bare PyTorch loop and against the seed's (d2l's) loop.

    python bench/loop.py                      # lenet_bn on Fashion-MNIST, CPU, short settings
    python bench/loop.py vgg11 -o width=0.25 --device cuda --examples 20000 --repeats 5
    python bench/loop.py resnet18 --device cuda --skip-seed --json loop.json   # figures for scripts

On CUDA it also prints the peak GPU memory of each side (``torch.cuda.max_memory_allocated``);
AMP, channels-last and cudnn.benchmark are what ``cnnkit train`` uses there (all on by default).

1. **Loop overhead**: cnnkit's :class:`StandardTrainer` (one epoch, quiet, checkpoints and all)
   against a hand-written loop on the same model, the same device-side batches (cnnkit's
   BatchLoader), the same optimiser, dtype and memory format; training time only, interleaved
   repeats, median examples/s. Target ratio >= 0.97 (>= 0.95 for the tiny LeNets, whose steps
   are so short that any per-step Python shows).
2. **End to end**: an epoch of training plus test evaluation, cnnkit (from uint8 tensors in memory,
   transforms on whole batches) against the seed's way (torchvision-style dataset: a PIL image
   and ``ToTensor``/``Resize`` per sample, through a DataLoader with workers).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def bare_epochs(
    model: Any, batches: Callable[[int], Iterable[Any]], steps_per_epoch: int, config: Any, epochs: Iterable[int],
    amp_dtype: Any,
) -> list[tuple[float, int]]:  # fmt: skip
    """The shortest correct loop: set lr, forward, loss, backward, step; one optimiser for all of
    ``epochs``, whose batches ``batches(epoch)`` yields. Returns (seconds, examples) per epoch.

    bench/peers.py runs it over pre-built batches (a list per epoch); :func:`_bare_epoch` here over
    cnnkit's BatchLoader."""
    import torch
    import torch.nn.functional as F

    from cnnkit.training.optim import build_optimizer, lr_schedule

    optimizer = build_optimizer(model, config)
    lr_at = lr_schedule(config, steps_per_epoch)  # the same learning rates, so the same numerics
    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)  # fp16 needs one to be correct
    model.train()
    step = 0
    timed: list[tuple[float, int]] = []
    for epoch in epochs:
        seen = 0
        start = time.perf_counter()
        for images, labels in batches(epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(images).float(), labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            seen += labels.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timed.append((time.perf_counter() - start, seen))
    return timed


def _bare_epoch(model: Any, loader: Any, config: Any, epoch: int, amp_dtype: Any) -> tuple[float, int]:
    """One epoch of :func:`bare_epochs` over ``loader`` (cnnkit's BatchLoader). Returns (seconds, examples)."""
    return bare_epochs(model, loader.epoch, len(loader), config, [epoch], amp_dtype)[0]


class _SeedDataset:
    """What torchvision.datasets.FashionMNIST does per item: uint8 array -> PIL image -> transform."""

    def __init__(self, images: Any, labels: Any, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        image = Image.fromarray(self.images[index].numpy(), mode="L")
        return self.transform(image), int(self.labels[index])


def _seed_epoch(model: Any, train: Any, test: Any, config: Any, workers: int) -> tuple[float, int]:
    """d2l's train_ch6 epoch: DataLoader of per-sample transforms, then evaluate on the test set."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from torchvision import transforms

    steps = [transforms.ToTensor()]
    if config.input_size != train.images.shape[-1]:
        steps.insert(0, transforms.Resize(config.input_size))
    transform = transforms.Compose(steps)
    device = next(model.parameters()).device
    loaders = [
        DataLoader(_SeedDataset(split.images[:, 0], split.labels, transform), batch_size=config.batch_size,
                   shuffle=shuffle, num_workers=workers)  # fmt: skip
        for split, shuffle in ((train, True), (test, False))
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    start = time.perf_counter()
    model.train()
    seen = 0
    for images, labels in loaders[0]:
        images, labels = images.to(device), labels.to(device)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += labels.shape[0]
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x.to(device)).argmax(1) == y.to(device)).sum()) for x, y in loaders[1])
    assert correct >= 0
    return time.perf_counter() - start, seen


def _amp_dtype(config: Any, device: Any) -> Any:
    """What ``cnnkit train`` runs under: bf16 where the device has it, else fp16; None: full precision."""
    import torch

    if not (config.amp if config.amp is not None else device.type == "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _write_json(path: str, figures: dict[str, Any]) -> None:
    """``figures`` as JSON at ``path``, atomically (a reader never sees half a file)."""
    from cnnkit.fs import atomic_write

    text = json.dumps(figures, indent=2) + "\n"

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write)


def main(argv: list[str] | None = None) -> int:
    """Run both comparisons and print the figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="lenet_bn")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--recipe", default="default", choices=["default", "d2l"])
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: search path / $CNNKIT_DATA)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (AMP and channels-last on for CUDA)")
    parser.add_argument("--examples", type=int, default=12_800, help="training examples per timed epoch")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats (the median is reported)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="seed DataLoader workers")
    parser.add_argument("--skip-seed", action="store_true", help="only the loop-overhead comparison")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the figures to PATH as JSON")
    args = parser.parse_args(argv)

    import torch

    from cnnkit.config import resolve_config
    from cnnkit.data import load_dataset
    from cnnkit.data.batches import BatchLoader
    from cnnkit.device import resolve_device
    from cnnkit.protocols import DatasetSplits, ImageTensors
    from cnnkit.training.run import build_model, train, typed_options

    options = dict(pair.split("=", 1) for pair in args.options)
    config = typed_options(resolve_config(overrides={
        "model": args.model, "model_options": options, "recipe": args.recipe, "device": args.device,
        "epochs": 1, "quiet": True,
    }))  # fmt: skip
    full = load_dataset(config.dataset, args.data)
    n = min(args.examples, len(full.train))
    data = DatasetSplits(
        full.name, ImageTensors(full.train.images[:n], full.train.labels[:n]),
        ImageTensors(full.test.images[: max(1, n // 6)], full.test.labels[: max(1, n // 6)]),
        full.classes, full.source, full.mean, full.std,
    )  # fmt: skip
    device = resolve_device(config.device)
    cuda = device.type == "cuda"
    amp = _amp_dtype(config, device)
    channels_last = config.channels_last if config.channels_last is not None else cuda
    gpu = f" ({torch.cuda.get_device_name(device)})" if cuda else ""
    print(
        f"{args.model} {' '.join(args.options)} · {n} examples/epoch · batch {config.batch_size} · "
        f"{config.input_size} px · {device}{gpu} · amp {amp} · torch {torch.__version__} · "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )

    cnnkit_rates: list[float] = []
    bare_rates: list[float] = []
    cnnkit_wall: list[float] = []
    cnnkit_peak = bare_peak = 0
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats + 1):  # repeat 0 warms caches and allocators up; not counted
            run_config = config.model_copy(update={"out": str(Path(folder) / f"run{repeat}")})
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # its closing lines, once per repeat
                result = train(run_config, data=data)
            wall = time.perf_counter() - started
            if cuda:
                cnnkit_peak = max(cnnkit_peak, torch.cuda.max_memory_allocated(device))
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)

            model = build_model(config, data).to(device)
            if channels_last:  # as the driver places it
                model = model.to(memory_format=torch.channels_last)
            loader = BatchLoader(
                data.train, batch_size=config.batch_size, image_size=config.input_size,
                mean=data.mean if config.normalize else None, std=data.std if config.normalize else None,
                augment=config.augment, shuffle=True, seed=config.seed, device=device, channels_last=channels_last,
            )  # fmt: skip
            # What cnnkit train sets on CUDA (its driver restores it after each run).
            benchmark_was = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = cuda
            try:
                seconds, seen = _bare_epoch(model, loader, config, 1, amp)
            finally:
                torch.backends.cudnn.benchmark = benchmark_was
            if cuda:
                bare_peak = max(bare_peak, torch.cuda.max_memory_allocated(device))
            del model, loader
            if repeat:
                cnnkit_rates.append(result.examples_per_s)
                bare_rates.append(seen / seconds)
                cnnkit_wall.append(wall)
    ours, bare = statistics.median(cnnkit_rates), statistics.median(bare_rates)
    target = 0.95 if args.model.startswith("lenet") else 0.97
    print(f"loop   cnnkit {ours:9.0f} ex/s   bare PyTorch {bare:9.0f} ex/s   ratio {ours / bare:.3f} (target >= {target})")
    if cuda:
        print(f"memory cnnkit peak {_gib(cnnkit_peak)}   bare PyTorch peak {_gib(bare_peak)}", flush=True)
    figures: dict[str, Any] = {
        "model": args.model, "options": args.options, "device": str(device), "device_name": gpu.strip(" ()"),
        "examples": n, "batch_size": config.batch_size, "input_size": config.input_size,
        "amp": str(amp).replace("torch.", "") if amp is not None else None, "channels_last": channels_last,
        "repeats": len(cnnkit_rates), "cnnkit_examples_per_s": ours, "bare_examples_per_s": bare,
        "ratio": ours / bare, "cnnkit_epoch_seconds": statistics.median(cnnkit_wall),
        "cnnkit_peak_bytes": cnnkit_peak if cuda else None, "bare_peak_bytes": bare_peak if cuda else None,
    }  # fmt: skip

    if not args.skip_seed:
        # End to end: an epoch of training + test evaluation, the seed's data path vs cnnkit's.
        seed_config = config.model_copy(update={"recipe": "d2l"})
        seed_walls = []
        for _ in range(max(1, args.repeats // 2)):
            model = build_model(seed_config, data).to(device)
            seconds, _ = _seed_epoch(model, data.train, data.test, seed_config, args.workers)
            seed_walls.append(seconds)
        ours_wall, seed_wall = statistics.median(cnnkit_wall), statistics.median(seed_walls)
        print(
            f"epoch  cnnkit {ours_wall:7.2f}s (train+eval+checkpoints)   seed (per-sample transforms, "
            f"DataLoader {args.workers} workers) {seed_wall:7.2f}s   speed-up {seed_wall / ours_wall:.2f}x"
        )
        figures.update({"seed_epoch_seconds": seed_wall, "speed_up": seed_wall / ours_wall})
    if args.json:
        _write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
