"""Step time of one training process against N DDP processes, and the gradient all-reduce's share.

    python bench/distributed.py                       # lenet_bn, 28 px, global batch 128, CPU (gloo)
    python bench/distributed.py resnet18 --input-size 96 --batch-size 64 --steps 10
    python bench/distributed.py resnet18 --input-size 96 --device cuda --nproc 2   # NCCL, 2+ GPUs

What ``cnnkit train`` does per step under torchrun, on synthetic batches already on the device: a
forward and backward of the rank's share of the global batch (global / N) and an optimiser step,
inside DistributedDataParallel, which all-reduces (averages) the gradients in buckets during the
backward pass. Measured per setup, the best of interleaved repeats (the machine may be shared):

- ``1 process``: the whole global batch in one process (with 1 thread, and with every core);
- ``N processes``: each with its share, 1 thread each on the CPU; and the same steps under
  DDP's ``no_sync()`` (no gradient exchange): the difference is what the all-reduce costs the step
  (the part not hidden behind the backward pass), when the machine is quiet enough to resolve it;
- a bare ``all_reduce`` of a tensor as large as the gradients: the most the exchange can add.

Processes are started with torch.multiprocessing (gloo on the CPU, NCCL on CUDA), as torchrun
would start them; the data pipeline and evaluation are left out (they shard without talking).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time
from typing import Any


def _model_and_batch(args: argparse.Namespace, batch: int, device: Any) -> tuple[Any, Any, Any, Any]:
    import torch

    import cnnkit

    torch.manual_seed(0)
    model = cnnkit.build_model(args.model, in_channels=1, num_classes=10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 1, args.input_size, args.input_size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    return model, optimizer, images, labels


def _steps(net: Any, optimizer: Any, images: Any, labels: Any, steps: int, device: Any, no_sync: bool = False) -> float:
    """Milliseconds per optimisation step over ``steps`` steps."""
    import contextlib

    import torch
    import torch.nn.functional as F

    context = net.no_sync if no_sync else contextlib.nullcontext
    start = time.perf_counter()
    for _ in range(steps):
        with context():
            loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000 / steps


def _single(args: argparse.Namespace, threads: int) -> float:
    import torch

    device = torch.device(args.device)
    torch.set_num_threads(threads)
    model, optimizer, images, labels = _model_and_batch(args, args.batch_size, device)
    model.train()
    _steps(model, optimizer, images, labels, args.warmup, device)
    return min(_steps(model, optimizer, images, labels, args.steps, device) for _ in range(args.repeats))


def _worker(rank: int, args: argparse.Namespace, port: int, results: Any) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    cuda = args.device.startswith("cuda")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.nproc,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    model, optimizer, images, labels = _model_and_batch(args, args.batch_size // args.nproc, device)
    net = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    net.train()
    _steps(net, optimizer, images, labels, args.warmup, device)
    synced, unsynced, reduce_ms = [], [], []
    flat = torch.zeros(sum(p.numel() for p in model.parameters()), device=device)
    for _ in range(args.repeats):
        dist.barrier()
        synced.append(_steps(net, optimizer, images, labels, args.steps, device))
        dist.barrier()
        unsynced.append(_steps(net, optimizer, images, labels, args.steps, device, no_sync=True))
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            dist.all_reduce(flat)
        if cuda:
            torch.cuda.synchronize(device)
        reduce_ms.append((time.perf_counter() - start) * 1000 / args.steps)
    if rank == 0:
        results.put((min(synced), min(unsynced), statistics.median(reduce_ms), flat.numel()))
    dist.barrier()
    dist.destroy_process_group()


def _distributed(args: argparse.Namespace) -> tuple[float, float, float, int]:
    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_worker, args=(args, port, results), nprocs=args.nproc, start_method="spawn")
    return results.get()  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="lenet_bn")
    parser.add_argument("--input-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=128, help="the global batch")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if args.batch_size % args.nproc:
        parser.error("--batch-size must divide evenly over --nproc")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    cores = os.cpu_count() or 1
    backend = "NCCL" if args.device.startswith("cuda") else "gloo"
    print(f"{args.model}, {args.input_size} px, global batch {args.batch_size}, {args.device} ({backend} for "
          f"{args.nproc} processes); torch {torch.__version__}, {cores} CPU cores, {platform.machine()}")  # fmt: skip
    rows: list[tuple[str, float]] = []
    if args.device == "cpu":
        rows.append((f"1 process, 1 thread, batch {args.batch_size}", _single(args, 1)))
        rows.append((f"1 process, {cores} threads, batch {args.batch_size}", _single(args, cores)))
    else:
        rows.append((f"1 process, batch {args.batch_size}", _single(args, 1)))
    synced, unsynced, reduce_ms, numel = _distributed(args)
    share = f"{args.batch_size // args.nproc} each"
    rows.append((f"{args.nproc} processes, {share}, DDP", synced))
    rows.append((f"{args.nproc} processes, {share}, no_sync (no all-reduce)", unsynced))
    best_single = min(ms for name, ms in rows if name.startswith("1 process"))
    print(f"{'setup':<46} {'ms/step':>8} {'ex/s':>9} {'vs best 1-process':>18}")
    for name, ms in rows:
        print(f"{name:<46} {ms:>8.2f} {args.batch_size * 1000 / ms:>9.0f} {best_single / ms:>17.2f}x")
    print(f"gradient all-reduce: a bare all_reduce of {numel:,} floats ({numel * 4 / 1e6:.2f} MB) takes {reduce_ms:.2f} ms, "
          f"{100 * reduce_ms / synced:.0f}% of the {synced:.2f} ms DDP step at most (DDP overlaps it with the backward "
          f"pass); DDP minus no_sync: {synced - unsynced:+.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
