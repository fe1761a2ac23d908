"""cnnkit's CLI against a bare PyTorch loop and PyTorch Lightning's default, side by side.

    python bench/peers.py                                   # lenet_bn (28 px) and resnet18 (96 px), CPU
    python bench/peers.py --device cuda --repeats 5 --out bench/results/peers-cuda.txt
    python bench/peers.py --models lenet_bn --repeats 7 --examples lenet_bn=12800

Needs Lightning: ``pip install 'cnnkit[bench]'``. Each measurement runs in a fresh process, the
three sides interleaved (cnnkit, bare, Lightning, cnnkit, bare, ...); each process trains
``--epochs`` epochs of the same model, data, optimiser, schedule, batch and input size, and its
figure is the examples/s of its steady epochs (every epoch after the first, which warms caches
and allocators up). The report gives the median over the repeats and the ratios.

- **cnnkit**: ``python -m cnnkit train MODEL -q --device D --epochs E --data DIR --out RUN``; the
  figure is read from the run's ``metrics.csv`` (``examples_per_s`` x ``epoch_seconds``: the
  training loop only, without evaluation or checkpoints).
- **bare**: the shortest correct PyTorch loop (:func:`loop.bare_epochs`) over batches built before
  the clock starts, by cnnkit's ``BatchLoader`` exactly as a run builds them (normalised, and
  augmented where the recipe augments): no input pipeline at all is timed. The model comes from
  the registry (``cnnkit.get_model(name).build``), seeded and initialised as a run does it.
- **Lightning**: a ``LightningModule`` around the same model (``training_step`` logs its loss to
  the progress bar, ``configure_optimizers`` returns the same optimiser and per-step schedule) and
  ``lightning.Trainer(max_epochs=E)`` with its defaults otherwise: progress bar, logger, model
  summary and checkpointing on. It gets the same pre-built batches (a ``DataLoader`` over them
  with ``batch_size=None``), so the comparison is of the loops, not of input pipelines. Its epoch
  is timed by a callback from ``on_train_epoch_start`` to ``on_train_epoch_end`` (before
  its checkpoint is written).

Pre-built batches: one epoch's worth, made once per process and fed again every epoch (the order
of examples does not change the time of a step). On CUDA, all three sides run as ``cnnkit train``
does there: bf16 autocast (fp16 with a GradScaler where the GPU has no bf16; Lightning:
``precision="bf16-mixed"`` / ``"16-mixed"``), channels-last and ``cudnn.benchmark``.

On this project's 2-core CPU, resnet18 at 96 px trains about a hundred images a second, so its
default here is a subset (the first 1,280 training and 256 test images, written as IDX files to a
scratch folder, which all three sides read); ``--examples MODEL=N`` changes it (0: every image).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIDES = ("cnnkit", "bare", "lightning")
MARK = "PEERS-RESULT "
# Default training examples per epoch (None: the whole split), epochs and targets, per model.
CPU_EXAMPLES: dict[str, int | None] = {"lenet_bn": None, "resnet18": 1280}
TARGETS: dict[str, dict[str, float]] = {"lenet_bn": {"bare": 0.95, "lightning": 1.5}, "resnet18": {"bare": 0.98}}
LABELS = {"cnnkit": "cnnkit CLI", "bare": "bare PyTorch", "lightning": "Lightning default"}


# -- the workers (one fresh process per measurement) --------------------------------------------


def _setup(model_name: str, device_name: str, epochs: int, data_dir: str) -> dict[str, Any]:
    """Model, config, device and one epoch of pre-built batches, exactly as ``cnnkit train`` makes them."""
    import torch
    from loop import _amp_dtype

    from cnnkit import get_model
    from cnnkit.config import resolve_config
    from cnnkit.data import load_dataset
    from cnnkit.data.batches import BatchLoader
    from cnnkit.device import resolve_device
    from cnnkit.training.optim import xavier_init

    config = resolve_config(overrides={"model": model_name, "device": device_name, "epochs": epochs, "data": data_dir})
    data = load_dataset(config.dataset, config.data)
    device = resolve_device(config.device)
    cuda = device.type == "cuda"
    torch.manual_seed(config.seed)
    model = get_model(model_name).build(data.channels, len(data.classes))
    if config.init == "xavier":
        xavier_init(model)
    model.to(device)
    channels_last = config.channels_last if config.channels_last is not None else cuda
    if channels_last:
        model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = cuda  # what cnnkit train sets on CUDA
    loader = BatchLoader(
        data.train, batch_size=config.batch_size, image_size=config.input_size,
        mean=data.mean if config.normalize else None, std=data.std if config.normalize else None,
        augment=config.augment, shuffle=True, seed=config.seed, device=device, channels_last=channels_last,
    )  # fmt: skip
    batches = list(loader.epoch(1))
    if cuda:
        torch.cuda.synchronize(device)
    return {"config": config, "model": model, "device": device, "batches": batches, "amp": _amp_dtype(config, device)}


def _bare_worker(model_name: str, device_name: str, epochs: int, data_dir: str) -> list[tuple[float, int]]:
    from loop import bare_epochs

    s = _setup(model_name, device_name, epochs, data_dir)
    batches = s["batches"]
    return bare_epochs(s["model"], lambda epoch: batches, len(batches), s["config"], range(1, epochs + 1), s["amp"])


def _lightning_worker(
    model_name: str, device_name: str, epochs: int, data_dir: str, root: str
) -> list[tuple[float, int]]:
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from cnnkit.training.optim import build_optimizer, lr_schedule

    s = _setup(model_name, device_name, epochs, data_dir)
    config, device, batches, amp = s["config"], s["device"], s["batches"], s["amp"]

    class Module(L.LightningModule):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            images, labels = batch
            loss = F.cross_entropy(self.model(images).float(), labels, label_smoothing=config.label_smoothing)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> Any:
            optimizer = build_optimizer(self.model, config)
            lr_at = lr_schedule(config, len(batches))
            # Every group starts at config.lr; LambdaLR scales it to the same per-step rates.
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step) / config.lr)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.epochs: list[tuple[float, int]] = []
            self.started, self.seen = 0.0, 0

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.started, self.seen = time.perf_counter(), 0

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.seen += int(batch[1].shape[0])

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.epochs.append((time.perf_counter() - self.started, self.seen))

    cuda = device.type == "cuda"
    precision = {None: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}[amp]
    timer = Timer()
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="gpu" if cuda else "cpu", devices=[device.index or 0] if cuda else 1,
        precision=precision, callbacks=[timer], default_root_dir=root,
    )  # fmt: skip
    trainer.fit(Module(s["model"]), DataLoader(batches, batch_size=None, shuffle=False))
    return timer.epochs


def _worker(args: argparse.Namespace) -> int:
    if args.worker == "bare":
        epochs = _bare_worker(args.model, args.device, args.epochs, args.data)
    else:
        epochs = _lightning_worker(args.model, args.device, args.epochs, args.data, args.root)
    print(MARK + json.dumps({"epochs": epochs}), flush=True)
    return 0


# -- the driver --------------------------------------------------------------------------------


def _steady(epochs: list[tuple[float, int]]) -> float:
    """Examples/s over every epoch after the first (all of them if there is only one)."""
    steady = epochs[1:] or epochs
    return sum(n for _, n in steady) / sum(t for t, _ in steady)


def _write_idx(path: Path, tensor: Any) -> None:
    """An uncompressed unsigned-byte IDX file (the format the Fashion-MNIST loader reads)."""
    header = bytes([0, 0, 8, tensor.dim()]) + b"".join(int(d).to_bytes(4, "big") for d in tensor.shape)
    path.write_bytes(header + tensor.contiguous().numpy().tobytes())


def _subset(source: str | None, folder: Path, train: int, test: int) -> Path:
    """The first ``train`` training and ``test`` test images of Fashion-MNIST, as IDX files in ``folder``."""
    from cnnkit.data import load_dataset

    full = load_dataset("fashion-mnist", source)
    folder.mkdir(parents=True)
    for name, split, n in (("train", full.train, train), ("t10k", full.test, test)):
        _write_idx(folder / f"{name}-images-idx3-ubyte", split.images[:n, 0])
        _write_idx(folder / f"{name}-labels-idx1-ubyte", split.labels[:n].to(dtype=split.images.dtype))
    return folder


def _run(argv: list[str], env: dict[str, str], timeout: float) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise SystemExit(f"{' '.join(argv)} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def _measure(side: str, model: str, args: argparse.Namespace, data_dir: Path, scratch: Path, env: dict[str, str],
             tag: str) -> float:  # fmt: skip
    """One fresh process of ``side``: its steady examples/s."""
    if side == "cnnkit":
        run_dir = scratch / f"run-{tag}"
        _run([sys.executable, "-m", "cnnkit", "train", model, "-q", "--device", args.device,
              "--epochs", str(args.epochs), "--data", str(data_dir), "--out", str(run_dir)], env, args.timeout)  # fmt: skip
        with open(run_dir / "metrics.csv", encoding="utf-8") as rows:
            epochs = [(float(r["epoch_seconds"]), float(r["examples_per_s"]) * float(r["epoch_seconds"]))
                      for r in csv.DictReader(rows)]  # fmt: skip
        return _steady(epochs)  # type: ignore[arg-type]
    out = _run([sys.executable, __file__, "--worker", side, "--model", model, "--device", args.device,
                "--epochs", str(args.epochs), "--data", str(data_dir), "--root", str(scratch / f"pl-{tag}")],
               env, args.timeout)  # fmt: skip
    line = next(line for line in reversed(out.splitlines()) if line.startswith(MARK))
    return _steady([tuple(e) for e in json.loads(line[len(MARK) :])["epochs"]])  # type: ignore[misc]


def _examples(args: argparse.Namespace) -> dict[str, int | None]:
    chosen: dict[str, int | None] = dict(CPU_EXAMPLES) if args.device == "cpu" else {}
    for pair in args.examples:
        name, _, value = pair.partition("=")
        chosen[name] = int(value) or None
    return chosen


def _report_lines(args: argparse.Namespace, rows: list[dict[str, Any]], header: str) -> list[str]:
    lines = [header, ""]
    lines.append(
        f"{'model':<9} {'px':>3} {'ex/epoch':>8} {'cnnkit CLI':>11} {'bare PyTorch':>13} {'Lightning':>10} "
        f"{'cnnkit/bare':>11} {'cnnkit/Lightning':>16}"
    )
    for row in rows:
        m = row["median"]
        lines.append(
            f"{row['model']:<9} {row['px']:>3} {row['examples']:>8} {m['cnnkit']:>11.0f} {m['bare']:>13.0f} "
            f"{m['lightning']:>10.0f} {m['cnnkit'] / m['bare']:>11.3f} {m['cnnkit'] / m['lightning']:>16.2f}"
        )
    lines.append("")
    lines.append("examples/s of the steady epochs, median of the repeats; per repeat (in run order):")
    for row in rows:
        for side in SIDES:
            figures = ", ".join(f"{r:.0f}" for r in row["rates"][side])
            lines.append(f"  {row['model']:<9} {LABELS[side]:<18} {figures}")
    lines.append("")
    for row in rows:
        for peer, target in TARGETS.get(row["model"], {}).items():
            ratio = row["median"]["cnnkit"] / row["median"][peer]
            verdict = "met" if ratio >= target else "NOT met"
            lines.append(f"target {row['model']}: cnnkit / {LABELS[peer]} >= {target}: {ratio:.3f} -> {verdict}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Measure the three sides for each model, print the figures, ratios and targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (AMP, channels-last on CUDA)")
    parser.add_argument("--models", default="lenet_bn,resnet18", help="comma-separated registered models")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each side (median)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per process; the first is not counted")
    parser.add_argument("--examples", action="append", default=[], metavar="MODEL=N",
                        help="training examples per epoch (0: all; CPU default resnet18=1280)")  # fmt: skip
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (default: search path / $CNNKIT_DATA)")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the report to FILE (atomically)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds one process may take")
    parser.add_argument("--worker", choices=["bare", "lightning"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is warm-up)")
    try:
        import lightning
    except ImportError:
        print("bench/peers.py needs Lightning: pip install 'cnnkit[bench]'", file=sys.stderr)
        return 2

    import torch

    from cnnkit.data import load_dataset
    from cnnkit.registry import MODELS

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    examples = _examples(args)
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cnnkit-peers-") as folder:
        scratch = Path(folder)
        # A private dataset cache: the subsets never land in the user's, and every process reads
        # the decoded tensors the first one wrote.
        env = {**os.environ, "CNNKIT_CACHE": str(scratch / "cache"), "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
        os.environ["CNNKIT_CACHE"] = env["CNNKIT_CACHE"]
        source = load_dataset("fashion-mnist", args.data).source
        for model in models:
            px = MODELS.get(model).recipe.on("fashion-mnist").input_size
            n = examples.get(model)
            if n is None:
                data_dir, shown = source, "all"
            else:
                data_dir, shown = _subset(args.data, scratch / f"data-{model}", n, max(64, n // 5)), str(n)
            rates: dict[str, list[float]] = {side: [] for side in SIDES}
            print(f"{model} at {px} px, {shown} training examples/epoch, {args.epochs} epochs per process", flush=True)
            for repeat in range(args.repeats):
                for side in SIDES:
                    rate = _measure(side, model, args, Path(data_dir), scratch, env, f"{model}-{side}-{repeat}")
                    rates[side].append(rate)
                    print(f"  repeat {repeat + 1}/{args.repeats}  {LABELS[side]:<18} {rate:9.1f} ex/s", flush=True)
            median = {side: statistics.median(values) for side, values in rates.items()}
            rows.append({"model": model, "px": px, "examples": shown, "rates": rates, "median": median})
    load_after = os.getloadavg()
    minutes = (time.perf_counter() - started) / 60
    subset = [f"{r['model']} trains on the first {r['examples']} images" for r in rows if r["examples"] != "all"]
    header = (
        f"# bench/peers.py --device {args.device} --models {','.join(models)} --repeats {args.repeats} "
        f"--epochs {args.epochs}{''.join(f' --examples {pair}' for pair in args.examples)} "
        f"({time.strftime('%Y-%m-%d')}, {minutes:.1f} min)\n"
        f"# torch {torch.__version__}, lightning {lightning.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs; load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after\n"
        f"# fresh process per figure, sides interleaved; steady epochs = epochs 2..{args.epochs}"
        + (f"; subset: {'; '.join(subset)} (and a fifth as many test images)" if subset else "")
    )
    lines = _report_lines(args, rows, header)
    text = "\n".join(lines) + "\n"
    print()
    print(text, end="")
    if args.out:
        from cnnkit.fs import atomic_write

        def write(tmp: Path) -> None:
            tmp.write_text(text, encoding="utf-8")

        atomic_write(args.out, write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
