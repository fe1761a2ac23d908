"""One process or many, behind one interface (as Lightning's strategies): the run's only owner of
ranks, the world size and collectives.

:func:`session` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, and across
restarts ``TORCHELASTIC_RESTART_COUNT`` and ``TORCHELASTIC_RUN_ID``), puts the process on its device
(``cuda:LOCAL_RANK``, or the CPU), starts the process group (NCCL on CUDA, gloo on the CPU, with a
timeout so that a hung peer fails the job instead of hanging it), and yields the strategy:

- :class:`SingleDevice` without torchrun (or with one process): every method returns its input or
  does nothing, so the single-process run is exactly the plain loop;
- :class:`DistributedDataParallelStrategy` with two or more processes: the model wrapped in DDP,
  each rank's shard of every global batch, sums over the ranks, rank 0's decisions broadcast.

Nothing outside this module tests the world size: the driver, the run and the trainer call the
strategy's methods and get the right thing for one process or many.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from cnnkit.checkpoint import unwrap
from cnnkit.errors import CnnkitError, InterruptedRun, UsageError

__all__ = [
    "Strategy",
    "SingleDevice",
    "DistributedDataParallelStrategy",
    "PeerLostError",
    "session",
    "under_torchrun",
    "torchrun_processes",
    "elastic_run_id",
    "end_rank",
]

T = TypeVar("T")


class PeerLostError(CnnkitError):
    """Another process of the job failed or stopped answering; its own error says why (exit 1)."""

    exit_code = 1


class QuietInterrupt(InterruptedRun):
    """Ctrl-C on a rank other than 0: the same exit (130), but only rank 0 says so."""

    def show(self, file: Any = None) -> None:
        pass


def under_torchrun() -> bool:
    """True in a process that torchrun (or ``cnnkit train --nproc``) started."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "LOCAL_RANK" in os.environ


def torchrun_processes() -> int:
    """How many processes torchrun started for this job (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun() else 1


def restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this job's workers (0: first attempt)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def elastic_run_id() -> str | None:
    """torchrun's rendezvous id (``--rdzv-id``; a fresh UUID with ``--standalone``); None when it is
    unset or torchrun's default ``none``, which does not tell one job from another."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "").strip()
    return run_id if run_id and run_id != "none" else None


class Strategy:
    """How this process takes part in the job. The base class is the single-process behaviour."""

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1, restarts: int = 0) -> None:
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.restarts = restarts
        """TORCHELASTIC_RESTART_COUNT: > 0 when torchrun restarted the workers after a failure."""

    backend: str | None = None
    """``nccl`` or ``gloo`` when a process group is running, else None."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints progress."""
        return self.rank == 0

    def check(self, batch_size: int, sync_bn: bool) -> None:
        """What the job needs of the config, checked before anything is written."""

    def wrap(self, model: nn.Module, sync_bn: bool) -> nn.Module:
        """The model as the trainer trains it."""
        return model

    def unwrap(self, net: nn.Module) -> nn.Module:
        """The bare module (what checkpoints and evaluation use)."""
        return unwrap(net)

    def shard(self) -> tuple[int, int]:
        """(this part, parts) of every global batch: what :class:`~cnnkit.data.batches.BatchLoader` takes."""
        return self.rank, self.world_size

    def drop_last(self, examples: int, batch_size: int) -> bool:
        """Every rank must take every step: a last batch too small to give each rank an example is
        left out of the epoch (its examples come in other epochs' permutations)."""
        return 0 < examples % batch_size < self.world_size

    def whole_job(self, local: int) -> int:
        """A count of this process's examples as a count of the whole job's (equal parts)."""
        return local * self.world_size

    def local_share(self, examples: int) -> int:
        """This process's part of ``examples`` split over the job (rounded up)."""
        return -(-examples // self.world_size)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the processes (float64); the values themselves for one."""
        return [float(v) for v in values]

    def reduce_epoch(self, means: dict[str, float], examples: int, rate: float) -> tuple[dict[str, float], int, float]:
        """An epoch's training figures of the whole job from this process's: ``means`` (weighted by
        ``examples``), the examples and the examples/s. One process: exactly as given."""
        return means, examples, rate

    def evaluate(self, net: nn.Module, batches: Iterator[Any], num_classes: int) -> tuple[float, float, torch.Tensor]:
        """(mean loss, top-1, confusion matrix (true, predicted) on the CPU) of ``net`` over ``batches``
        of every process."""
        from cnnkit.evaluate import evaluate

        result = evaluate(net, batches, num_classes)
        return result.loss, result.top1, result.confusion.cpu()

    def from_rank0(self, decide: Callable[[], T]) -> T:
        """``decide()`` on rank 0 only, its value given to every rank."""
        return decide()

    def seed(self, seed: int, restored_epoch: int | None = None) -> None:
        """Seed the global generator dropout draws from, each rank its own stream. After a resume
        (``restored_epoch``) the restored generator is rank 0's: only the other ranks reseed."""
        if restored_epoch is None:
            torch.manual_seed(seed + self.rank)
        elif self.rank:
            torch.manual_seed(seed + self.rank + 7919 * restored_epoch)

    def environment(self) -> dict[str, Any]:
        """What config.json records of the processes (world size, backend, torchrun's run id)."""
        return {"world_size": self.world_size, "backend": self.backend, "torchelastic_run_id": elastic_run_id()}

    def label(self, exc: CnnkitError) -> CnnkitError:
        """The error as this process reports it."""
        return exc

    def interruption(self, message: str) -> InterruptedRun:
        """The exit-130 error of Ctrl-C."""
        return InterruptedRun(message)

    def peer_failure(self, exc: BaseException) -> PeerLostError | None:
        """A peer's failure seen here (a collective that broke), as a one-line error; None: not one."""
        return None


SingleDevice = Strategy
"""One process on one device: the base behaviour, every method returning its input."""


class DistributedDataParallelStrategy(Strategy):
    """Two or more processes started by torchrun, each on its device, gradients averaged by DDP."""

    def __init__(self, device: torch.device, rank: int, world_size: int, restarts: int, backend: str) -> None:
        super().__init__(device, rank, world_size, restarts)
        self.backend = backend

    def check(self, batch_size: int, sync_bn: bool) -> None:
        world = self.world_size
        if batch_size % world:
            below, above = batch_size // world * world, -(-batch_size // world) * world
            raise UsageError(
                f"--batch-size {batch_size} is the global batch and must divide evenly over {world} processes "
                f"(each takes batch / {world}); use {below or above} or {above}"
            )
        if sync_bn and self.device.type != "cuda":
            raise UsageError(
                "--sync-bn needs CUDA (SyncBatchNorm has no CPU implementation); drop --sync-bn on the CPU"
            )

    def wrap(self, model: nn.Module, sync_bn: bool) -> nn.Module:
        """DistributedDataParallel (its construction gives every rank rank 0's weights), with
        SyncBatchNorm when asked."""
        from torch.nn.parallel import DistributedDataParallel

        if sync_bn:
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            if converted is not model:  # a bare BatchNorm model: nothing to wrap around
                raise UsageError("--sync-bn needs a model with BatchNorm layers inside a container")
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def sum(self, values: Sequence[float]) -> list[float]:
        import torch.distributed as dist

        device = self.device if self.backend == "nccl" else torch.device("cpu")
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor.tolist()]

    def reduce_epoch(self, means: dict[str, float], examples: int, rate: float) -> tuple[dict[str, float], int, float]:
        keys = list(means)
        sums = self.sum([means[key] * examples for key in keys] + [examples, rate])
        total = int(round(sums[-2]))
        return {key: value / max(total, 1) for key, value in zip(keys, sums, strict=False)}, total, sums[-1]

    def evaluate(self, net: nn.Module, batches: Iterator[Any], num_classes: int) -> tuple[float, float, torch.Tensor]:
        """Each process evaluates its part with the bare module (a DDP forward would wait for the
        others, whose parts may have one batch fewer) and rank 0's BatchNorm statistics, the ones
        the checkpoint saves; the sums are then added over the processes."""
        import itertools

        import torch.distributed as dist

        from cnnkit.evaluate import evaluate

        bare = self.unwrap(net)
        with torch.no_grad():
            for buffer in bare.buffers():
                if buffer.is_floating_point() or buffer.dtype == torch.long:
                    dist.broadcast(buffer, src=0)
        first = next(batches, None)
        confusion = torch.zeros((num_classes, num_classes), dtype=torch.long)
        loss_sum = 0.0
        if first is not None:
            result = evaluate(bare, itertools.chain([first], batches), num_classes)
            loss_sum, confusion = result.loss * result.examples, result.confusion.cpu().long()
        sums = self.sum([loss_sum, *confusion.flatten().tolist()])
        total = torch.tensor(sums[1:], dtype=torch.float64).round().long().view(num_classes, num_classes)
        count = max(float(total.sum()), 1.0)
        return sums[0] / count, float(total.diagonal().sum()) / count, total

    def from_rank0(self, decide: Callable[[], T]) -> T:
        """An expected error on rank 0 is raised on every rank (so no rank waits for a value that
        never comes)."""
        import torch.distributed as dist

        payload: list[Any] = [None]
        if self.is_main:
            try:
                payload = [("ok", decide())]
            except CnnkitError as exc:
                payload = [("error", type(exc).__name__, exc.exit_code, exc.format_message())]
            except OSError as exc:
                where = f": {exc.filename}" if exc.filename else ""
                payload = [("error", "OSError", 1, f"{exc.strerror or exc}{where}")]
        # Pickled between this job's own processes (never read from a file).
        dist.broadcast_object_list(payload, src=0)
        outcome = payload[0]
        if outcome[0] == "ok":
            return outcome[1]  # type: ignore[no-any-return]
        error = CnnkitError(outcome[3])
        error.exit_code = outcome[2]
        raise error

    def label(self, exc: CnnkitError) -> CnnkitError:
        if self.rank and not exc.message.startswith(f"rank {self.rank}:"):
            exc.message = f"rank {self.rank}: {exc.message}"  # which process said it
        return exc

    def interruption(self, message: str) -> InterruptedRun:
        return InterruptedRun(message) if self.is_main else QuietInterrupt(message)

    def peer_failure(self, exc: BaseException) -> PeerLostError | None:
        import torch.distributed as dist

        text = str(exc)
        markers = ("Connection closed by peer", "Connection reset by peer", "Timed out", "gloo")
        if not (isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and any(m in text for m in markers))):
            return None
        # A short pause so that torchrun's agent sees the failing rank exit first and reports it as
        # the root cause (it then stops this process anyway).
        time.sleep(1.0)
        return PeerLostError(
            f"rank {self.rank}: lost contact with another process of the job ({_first_line(exc)}): it failed "
            "(its own error says why) or did not answer within --dist-timeout seconds"
        )


def end_rank(code: int | str | None) -> None:
    """End the ``cnnkit`` program with ``code`` when it is one of several processes of a job, without
    the interpreter's shutdown (as multiprocessing ends its children); otherwise return.

    Why: torch 2.14's gloo process group outlives ``destroy_process_group`` (nothing from Python can
    join its worker threads), and a worker that is still releasing its last collective's tensors
    needs the GIL; when the interpreter is already shutting down, that thread is stopped mid-C++ and
    the process aborts (SIGABRT, "terminate called without an active exception") after a run that
    finished. Streams are flushed first; nothing else of a finished rank's is left to clean up.
    A rank forked by ``cnnkit train --nproc`` returns: multiprocessing, which started it, hands its
    outcome to the launcher and ends it so already.
    """
    import multiprocessing

    if torchrun_processes() < 2 or multiprocessing.parent_process() is not None:
        return
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)


def _read_ranks() -> tuple[int, int, int]:
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError) as exc:
        raise UsageError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers; start distributed runs with torchrun "
            "or cnnkit train --nproc N"
        ) from exc


def _process_device(spec: str, local_rank: int, world_size: int) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` for auto/cuda when CUDA is here, else the CPU."""
    from cnnkit.device import resolve_device

    if spec.strip().lower().startswith("cuda:"):
        raise UsageError(
            f"--device {spec}: under torchrun each of the {world_size} processes uses cuda:LOCAL_RANK; "
            "pass --device cuda (or auto), and choose GPUs with CUDA_VISIBLE_DEVICES"
        )
    device = resolve_device(spec)
    if device.type == "mps":
        raise UsageError(f"--device {spec}: distributed training runs on CUDA (NCCL) or the CPU (gloo), not MPS")
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UsageError(
            f"process with LOCAL_RANK {local_rank} has no GPU: this node has {count}; "
            f"start at most {count} processes per node (torchrun --nproc_per_node {count})"
        )
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def session(device_spec: str, timeout_s: float) -> Iterator[Strategy]:
    """The strategy for this process's share of the job, with its process group for the duration."""
    restarts = restart_count()
    if not under_torchrun():
        from cnnkit.device import resolve_device

        yield SingleDevice(resolve_device(device_spec), restarts=restarts)
        return
    rank, world_size, local_rank = _read_ranks()
    device = _process_device(device_spec, local_rank, world_size)
    if world_size == 1:
        yield SingleDevice(device, rank, 1, restarts)
        return
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
        # torchrun keeps one store across restarts: without a prefix per attempt, a restarted rank
        # can read the address a dead process of the previous attempt left there, and hang.
        store = dist.PrefixStore(f"cnnkit/attempt_{restarts}", store)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )  # fmt: skip
    except Exception as exc:  # rendezvous problems: a wrong address, a port in use, a peer never came
        raise UsageError(
            f"could not join the distributed job as rank {rank} of {world_size} ({_first_line(exc)}); "
            "check torchrun's --rdzv-endpoint / MASTER_ADDR and that every node can reach it"
        ) from exc
    clean = False
    try:
        yield DistributedDataParallelStrategy(device, rank, world_size, restarts, backend)
        clean = True
    finally:
        # After a failure a peer may be gone: tearing down NCCL could then block, and the process
        # is about to exit anyway (torchrun ends the others).
        if clean or backend == "gloo":
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
