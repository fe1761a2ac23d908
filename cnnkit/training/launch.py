"""``cnnkit train --nproc N``: this process starts N training processes with torch's own elastic
launcher (what torchrun runs), waits for them, and reads the run they trained back.

On a Linux machine without CUDA, with one OpenMP thread a rank (torchrun's default for N > 1), the
ranks are forked from this process rather than started as new Pythons: they then share the pages
torch's libraries filled at import (about 290 MB of anonymous memory a process) instead of each
holding its own copy. Otherwise (CUDA cannot be used in a forked child once the parent touched it;
GNU libgomp hangs a forked child's first multi-threaded op once the parent ran one) they are new
processes, as torchrun starts them.
"""

from __future__ import annotations

import gc
import io
import json
import os
import signal
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnkit.config import TrainConfig
from cnnkit.errors import CnnkitError, UsageError
from cnnkit.protocols import DatasetSplits, RunResult
from cnnkit.rundir import RunDir
from cnnkit.training.state import load_state

if TYPE_CHECKING:
    from cnnkit.training.events import Events, Handler

__all__ = ["WorkersFailed", "launch", "launch_train", "launch_resume"]


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

    # The launcher's own chatter (rendezvous details, OMP_NUM_THREADS notes, "shutting down
    # workers") is not the run's output: each worker prints its own one-line error.
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("torch.distributed")]  # fmt: skip
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    forked = False
    try:
        arguments = get_args_parser().parse_args(
            ["--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint",
             "localhost:0", "--rdzv-id", str(uuid.uuid4()), "--max-restarts", "0", "--monitor-interval", "0.1",
             "-m", "cnnkit", *cli_args]
        )  # fmt: skip
        config, command, command_args = config_from_args(arguments)  # sets OMP_NUM_THREADS=1 when unset
        forked = _fork_is_safe()
        if forked:
            config.start_method = "fork"
            command, command_args = _forked_rank, list(cli_args)
            sys.stdout.flush()  # or each child would print what this process had buffered again
            sys.stderr.flush()
            gc.freeze()  # the collector would otherwise write to (and so copy) every shared object
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
        if forked:
            gc.unfreeze()
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        sys.stdout.flush()


def _fork_is_safe() -> bool:
    """Whether the ranks may be forked from this process (the module docstring says why these)."""
    import torch

    return (
        sys.platform.startswith("linux")
        and os.environ.get("OMP_NUM_THREADS", "").strip() == "1"
        and not torch.cuda.is_initialized()
        and not torch.cuda.is_available()
    )


def _forked_rank(*cli_args: str) -> None:
    """A forked rank: what ``python -u -m cnnkit CLI_ARGS`` would be, in a copy of the launcher."""
    import runpy

    import torch

    # A new Python would start with these: the launcher's handlers (torch's agent raises its own
    # exception on SIGINT/SIGTERM) must not run in a rank, which handles Ctrl-C itself.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    torch.set_num_threads(1)  # libgomp read the launcher's environment, before torchrun set it
    # A new Python writes to the real stdout and stderr, not to a caller's capture (a notebook's,
    # a CliRunner's), whose copy in this process nobody would read.
    sys.stdout = sys.__stdout__ or sys.stdout
    sys.stderr = sys.__stderr__ or sys.stderr
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True)  # as -u: lines as they come, not at exit
    sys.argv = ["cnnkit", *cli_args]
    runpy.run_module("cnnkit", run_name="__main__", alter_sys=True)  # python -m cnnkit, by name as there



def _refuse_in_memory(data: DatasetSplits | None, handlers: Iterable[tuple[Events, Handler]]) -> None:
    if data is not None or list(handlers):
        raise UsageError(
            "nproc > 1 starts new processes, which cannot receive in-memory data or handlers; "
            "run under torchrun instead, or pass a dataset by name"
        )


def launch_train(
    config: TrainConfig, data: DatasetSplits | None, handlers: Iterable[tuple[Events, Handler]]
) -> RunResult:
    import tempfile

    _refuse_in_memory(data, handlers)
    assert config.nproc is not None
    if config.out is not None:
        folder = RunDir(Path(config.out))
        folder.check_fresh()
        created = folder.create()
    else:
        folder, created = RunDir.next_numbered(config.runs_dir, config.model, config.dataset), True
    # The workers read the resolved config from a file: the same run, whatever the caller was.
    values = config.model_dump(mode="json") | {"nproc": None, "out": str(folder)}
    with tempfile.TemporaryDirectory(prefix="cnnkit-launch-") as scratch:
        file = Path(scratch) / "launch.json"
        file.write_text(json.dumps(values), encoding="utf-8")
        try:
            launch(config.nproc, ["train", "--config", str(file)])
        except CnnkitError:
            if created and not folder.holds_resume_point():
                folder.discard()  # nothing was saved: no empty run left behind
            raise
    return _result_from(folder)


def launch_resume(
    folder: RunDir, overrides: dict[str, Any], data: DatasetSplits | None, handlers: Iterable[tuple[Events, Handler]]
) -> RunResult:  # fmt: skip
    _refuse_in_memory(data, handlers)
    nproc = overrides.pop("nproc")
    flags: list[str] = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            flags += [flag, str(value)]
    launch(nproc, ["train", "--resume", str(folder), *flags])
    return _result_from(folder)


def _result_from(folder: RunDir) -> RunResult:
    """The RunResult of a run the workers finished, read back from its files."""
    state = load_state(folder.state)
    record = folder.read_record()
    history = list(state.history)
    seconds = sum(row["epoch_seconds"] for row in history)
    examples = sum(row["examples_per_s"] * row["epoch_seconds"] for row in history)
    config = record["config"]
    stopped = config.get("patience") is not None and state.epoch < int(config["epochs"])
    return RunResult(
        folder.path, history, state.best_acc, state.best_epoch, examples / max(seconds, 1e-9),
        str(record["environment"]["device"]), stopped,
    )  # fmt: skip
