"""Multi-process and multi-node training on torchrun (DistributedDataParallel): the plumbing.

torchrun (``python -m torch.distributed.run``) starts one process per device and tells each its
place through the environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and, across restarts,
``TORCHELASTIC_RESTART_COUNT`` and ``TORCHELASTIC_RUN_ID``). :func:`session` reads them, puts the
process on its device (``cuda:LOCAL_RANK``, or the CPU), starts the process group (NCCL on CUDA,
gloo on the CPU, with a timeout so that a hung peer fails the job instead of hanging it) and
ends it. Without torchrun (or with one process) it is a no-op and the run is exactly the
single-process run.

What each piece of a distributed run does, and where:

- the run driver (:mod:`cnnkit.training.run`) opens the session, lets rank 0 alone pick, create and
  write the run directory (:meth:`Topology.from_rank0` broadcasts what rank 0 decided), wraps the
  model in DDP before handing it to the trainer, and attaches the file and console handlers on
  rank 0 only;
- ``Run.loader`` shards every global batch (``BatchLoader(shard=(rank, world_size))``);
- ``Run.evaluate`` and ``Run.epoch_completed`` reduce the metrics over the processes
  (:func:`sum_over_ranks`), so every rank logs and decides (early stopping) on the same figures;
- :func:`launch` is ``cnnkit train --nproc N``: torch's own elastic launcher (what torchrun runs),
  started on this machine with the same command.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from cnnkit.errors import CnnkitError, InterruptedRun, UsageError

__all__ = [
    "Topology",
    "PeerLostError",
    "WorkersFailed",
    "under_torchrun",
    "restart_count",
    "session",
    "sum_over_ranks",
    "broadcast_buffers",
    "wrap",
    "unwrap",
    "launch",
]

T = TypeVar("T")


class PeerLostError(CnnkitError):
    """Another process of the job failed or stopped answering; its own error says why (exit 1)."""

    exit_code = 1


class WorkersFailed(CnnkitError):
    """``cnnkit train --nproc N``: a worker process failed. The worker printed its own one-line
    error; this exits with its code and adds a line only when the worker could not (a signal)."""

    def __init__(self, message: str, exit_code: int, silent: bool) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.silent = silent

    def show(self, file: Any = None) -> None:
        if not self.silent:
            super().show(file)


def under_torchrun() -> bool:
    """True in a process that torchrun (or ``cnnkit train --nproc``) started."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ and "LOCAL_RANK" in os.environ


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


@dataclass(frozen=True)
class Topology:
    """Where this process stands in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    """``nccl`` or ``gloo`` when a process group is running, else None."""
    restarts: int = 0
    """TORCHELASTIC_RESTART_COUNT: > 0 when torchrun restarted the workers after a failure."""

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints progress."""
        return self.rank == 0

    def from_rank0(self, decide: Callable[[], T]) -> T:
        """``decide()`` on rank 0 only, its value given to every rank; an expected error there is
        raised on every rank (so no rank waits for a value that never comes)."""
        if not self.distributed:
            return decide()
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


def _read_topology() -> tuple[int, int, int]:
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

    requested = spec.strip().lower()
    if requested.startswith("cuda:"):
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
def session(device_spec: str, timeout_s: float) -> Iterator[Topology]:
    """The process group for this process's share of the job (a no-op without torchrun).

    Re-entrant: inside a session that is already running, yields the same topology.
    """
    global _current
    if _current is not None:
        yield _current
        return
    restarts = restart_count()
    if not under_torchrun():
        from cnnkit.device import resolve_device

        yield Topology(device=resolve_device(device_spec), restarts=restarts)
        return
    rank, world_size, local_rank = _read_topology()
    device = _process_device(device_spec, local_rank, world_size)
    if world_size == 1:
        yield Topology(rank, 1, local_rank, device, None, restarts)
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
    _current = Topology(rank, world_size, local_rank, device, backend, restarts)
    clean = False
    try:
        yield _current
        clean = True
    finally:
        _current = None
        # After a failure a peer may be gone: tearing down NCCL could then block, and the process
        # is about to exit anyway (torchrun ends the others).
        if clean or backend == "gloo":
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


_current: Topology | None = None


def current() -> Topology | None:
    """The running session's topology (None outside a distributed session)."""
    return _current


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def is_peer_failure(exc: BaseException) -> bool:
    """An error of a collective: a peer closed its connection, or did not answer within the timeout."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Timed out", "gloo")
    )


def peer_lost(topology: Topology, exc: BaseException) -> PeerLostError:
    """The one-line error of a rank whose peer failed; its own error is the one that says why."""
    # A short pause so that torchrun's agent sees the failing rank exit first and reports it as
    # the root cause (it then stops this process anyway).
    time.sleep(1.0)
    return PeerLostError(
        f"rank {topology.rank}: lost contact with another process of the job ({_first_line(exc)}): it failed "
        "(its own error says why) or did not answer within --dist-timeout seconds"
    )


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Each value summed over every process (float64); the values themselves when not distributed."""
    topology = _current
    if topology is None or not topology.distributed:
        return [float(v) for v in values]
    import torch.distributed as dist

    device = topology.device if topology.backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, so that every shard of an
    evaluation uses the statistics the checkpoint saves."""
    topology = _current
    if topology is None or not topology.distributed:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point() or buffer.dtype == torch.long:
                dist.broadcast(buffer, src=0)


def wrap(model: nn.Module, topology: Topology, sync_bn: bool) -> nn.Module:
    """The model as the trainer trains it: DistributedDataParallel when distributed (gradients
    averaged over the processes), with SyncBatchNorm when asked; the model itself otherwise."""
    if not topology.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if sync_bn:
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if converted is not model:  # a bare BatchNorm model: nothing to wrap around
            raise UsageError("--sync-bn needs a model with BatchNorm layers inside a container")
    device_ids = [topology.device.index] if topology.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(net: nn.Module) -> nn.Module:
    """The module inside torch.compile and DDP wrappers (what checkpoints and evaluation use)."""
    net = getattr(net, "_orig_mod", net)
    return getattr(net, "module", net) if type(net).__name__ == "DistributedDataParallel" else net


def launch(nproc: int, cli_args: Sequence[str]) -> None:
    """``cnnkit train --nproc N``: torch's elastic launcher (torchrun's own machinery) starts
    ``python -m cnnkit CLI_ARGS`` N times on this machine and waits for them.

    A worker's failure ends the job; its exit code becomes this one's (the worker printed its own
    error). Ctrl-C reaches every worker (rank 0 leaves the files at the last completed epoch) and
    exits 130.
    """
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, get_args_parser

    arguments = get_args_parser().parse_args(
        ["--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint",
         "localhost:0", "--rdzv-id", str(uuid.uuid4()), "--max-restarts", "0", "--monitor-interval", "0.1",
         "-m", "cnnkit", *cli_args]
    )  # fmt: skip
    config, command, command_args = config_from_args(arguments)
    # The launcher's own chatter (rendezvous details, OMP_NUM_THREADS notes, "shutting down
    # workers") is not the run's output: each worker prints its own one-line error.
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("torch.distributed")]  # fmt: skip
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, entrypoint=command)(*command_args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.values(), key=lambda f: (f.exitcode in (1, -15), f.local_rank))
        first = failures[0]
        if first.exitcode < 0:
            raise WorkersFailed(
                f"training process {first.local_rank} was killed by signal {-first.exitcode}; the job stopped",
                1,
                silent=False,
            ) from None
        raise WorkersFailed(f"training process {first.local_rank} failed", first.exitcode, silent=True) from None
    except (SignalException, KeyboardInterrupt) as exc:
        signum = getattr(exc, "sigval", 2)
        raise WorkersFailed("interrupted", 130 if int(signum) == 2 else 128 + int(signum), silent=True) from None
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        sys.stdout.flush()


class QuietInterrupt(InterruptedRun):
    """Ctrl-C on a rank other than 0: the same exit (130), but only rank 0 says so."""

    def show(self, file: Any = None) -> None:
        pass
