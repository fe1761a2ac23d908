"""Distributed training on torchrun: 2 CPU processes (gloo) against 1, through the real launchers.

A plugin distribution on PYTHONPATH (as tests/test_trainer_plugin.py installs one) provides a small
model without BatchNorm, whose 2-process run must match the 1-process run, and a trainer that fails
on rank 1, so that no test hook lives in cnnkit itself.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cnnkit.cli.app import app
from cnnkit.config import resolve_config
from cnnkit.data.batches import BatchLoader
from cnnkit.errors import UsageError
from cnnkit.protocols import ImageTensors
from cnnkit.registry import MODELS, TRAINERS
from cnnkit.testing import write_fashion_mnist_folder as write_idx_folder
from cnnkit.training.run import train
from cnnkit.training.strategy import DistributedDataParallelStrategy

pytestmark = pytest.mark.usefixtures("one_thread")

PLUGIN = """
    import os

    from pydantic import BaseModel, ConfigDict, Field
    from torch import nn

    from cnnkit.errors import DataError
    from cnnkit.models import Architecture
    from cnnkit.protocols import Recipe
    from cnnkit.training.events import Events
    from cnnkit.training.trainer import StandardOptions, StandardTrainer


    class NoOptions(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)


    def _tiny(in_channels, num_classes, options):
        return nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(64, num_classes),
        )


    TINY = Architecture(
        name="tinynet", summary="two convolutions, no BatchNorm (tests)", paper="none", options=NoOptions,
        builder=_tiny,
        recipe=Recipe(input_size=16, batch_size=32, epochs=3, optimizer="sgd", lr=0.1, momentum=0.9,
                      weight_decay=0.0, schedule="constant", warmup=0.0, label_smoothing=0.0, normalize=True),
    )


    class FlakyOptions(StandardOptions):
        fail_epoch: int = Field(1, description="Epoch in which rank 1 fails (after its first step).")
        first_attempt_only: bool = Field(False, description="Fail only before torchrun's first restart.")
        report: str = Field("", description="Folder each rank writes its memory and threads into, at its first step.")


    class FlakyTrainer(StandardTrainer):
        name = "flaky"
        summary = "the standard trainer, but rank 1 fails in a chosen epoch (tests)"
        options = FlakyOptions

        def fit(self, model, data, config, run):
            def fail(run):
                restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
                if run.rank == 1 and run.epoch == run.options.fail_epoch and not (
                    run.options.first_attempt_only and restarted
                ):
                    raise DataError("cannot read its shard (injected failure)")

            # After rank 1's first step of the epoch, not at its start: that step's gradient
            # average waits for rank 0, so rank 0 has written the previous epoch's files and lines.
            # Failing at the epoch's start raced with them: torchrun stops rank 0 as soon as
            # rank 1 exits, and could cut it between the resume point and its log and stdout line.
            def report(run):
                folder = run.options.report
                if folder and not os.path.exists(f"{folder}/rank{run.rank}.json"):
                    import json, torch
                    with open("/proc/self/status") as status, open("/proc/self/smaps_rollup") as rollup:
                        kb = {line.split(":")[0]: int(line.split()[1]) for line in [*status, *rollup]
                              if line.startswith(("RssAnon:", "Pss_Anon:"))}
                    kb["threads"] = torch.get_num_threads()
                    with open(f"{folder}/rank{run.rank}.json", "w") as out:
                        json.dump(kb, out)

            run.events.on(Events.ITERATION_COMPLETED, fail)
            run.events.on(Events.ITERATION_COMPLETED, report)
            return super().fit(model, data, config, run)
"""

TOLERANCE = 1e-4
"""Loss (and accuracy) of 2 processes vs 1: only the order of float additions differs (DDP's
gradient average, the sharded evaluation's sums), a few 1e-7 per epoch on this model."""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("site")
    info = root / "cnnkit_distplug-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cnnkit-distplug\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[cnnkit.models]\ntinynet = fakeplug_dist:TINY\n[cnnkit.trainers]\nflaky = fakeplug_dist:FlakyTrainer\n"
    )
    (root / "fakeplug_dist.py").write_text(textwrap.dedent(PLUGIN))
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        MODELS.refresh()
        TRAINERS.refresh()
        yield root
    sys.modules.pop("fakeplug_dist", None)
    MODELS.refresh()
    TRAINERS.refresh()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_idx_folder(tmp_path_factory.mktemp("fmnist"), train=192, test=64)


def env(site: Path, cache: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "CNNKIT_CACHE": str(cache), "CNNKIT_DEBUG": "0"}  # fmt: skip


def train_args(data: Path, *extra: str) -> list[str]:
    return ["train", "tinynet", "--data", str(data), "--device", "cpu", *extra]


def rows(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv", newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def assert_same_metrics(got: list[dict[str, float]], want: list[dict[str, float]]) -> None:
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for a, b in zip(got, want, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert a[key] == pytest.approx(b[key], abs=TOLERANCE), (a["epoch"], key)


@pytest.fixture(scope="module")
def one_process(site: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, float]]:
    """The reference: 4 epochs in one process (in process, through the library)."""
    out = tmp_path_factory.mktemp("one") / "run"
    config = resolve_config(overrides={"model": "tinynet", "data": str(data), "device": "cpu", "epochs": 4,
                                       "out": str(out), "quiet": True})  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = train(config).history
    finally:
        torch.set_num_threads(before)
    assert history[-1]["val_acc"] > 0.3  # it learns (chance is 0.1), so equal figures mean something
    return rows(out)


@pytest.fixture(scope="module")
def restarted(
    site: Path, data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """torchrun, 2 processes, --max-restarts 1: rank 1 fails in epoch 2 of the first attempt; the
    restarted workers find the run by torchrun's run id (no --out) and continue it."""
    runs = tmp_path_factory.mktemp("runs")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "1", "--monitor-interval", "0.1", "-m", "cnnkit",
               *train_args(data, "--runs-dir", str(runs), "--trainer", "flaky", "-t", "fail_epoch=2",
                           "-t", "first_attempt_only=true")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=240,
                          env=env(site, tmp_path_factory.mktemp("cache")))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    found = list(runs.glob("*/*"))
    assert len(found) == 1, found  # one run directory: rank 0's, reused by the restart
    return found[0], done


@pytest.mark.slow
def test_two_processes_match_one_and_a_restart_continues_the_run(
    restarted: tuple[Path, subprocess.CompletedProcess[str]], one_process: list[dict[str, float]]
) -> None:
    run, done = restarted
    assert_same_metrics(rows(run), one_process[:3])
    # The first attempt's failure was rank 1's one line; the restart resumed after epoch 1.
    assert "cnnkit: error: rank 1: cannot read its shard (injected failure)" in done.stderr
    log = (run / "log.txt").read_text()
    assert "resumed after epoch 1" in log
    # Only rank 0 printed and wrote: every epoch once in the log and on stdout.
    for epoch in (1, 2, 3):
        assert log.count(f"  epoch {epoch}/3 ") == 1
        assert done.stdout.count(f"epoch {epoch}/3 ") == 1
    record = json.loads((run / "config.json").read_text())
    assert record["environment"]["world_size"] == 2 and record["environment"]["backend"] == "gloo"
    assert record["config"]["batch_size"] == 32  # the global batch, as given
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["best.safetensors", "config.json", "curves.png", "last.safetensors", "log.txt", "metrics.csv",
         "state.safetensors", "test.json"]
    )  # fmt: skip


@pytest.mark.slow
def test_a_two_process_run_resumes_in_one_process(
    runner, restarted: tuple[Path, subprocess.CompletedProcess[str]], one_process: list[dict[str, float]],  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:  # fmt: skip
    run = tmp_path / "run"
    shutil.copytree(restarted[0], run)
    result = runner.invoke(app, ["train", "--resume", str(run), "--epochs", "4", "-q"])
    assert result.exit_code == 0, result.output
    assert_same_metrics(rows(run), one_process)
    record = json.loads((run / "config.json").read_text())
    assert record["environment"]["world_size"] == 1 and record["environment"]["backend"] is None


@pytest.mark.slow
def test_a_failing_rank_ends_an_nproc_job_with_its_error_and_exit_code(
    site: Path, data: Path, tmp_path: Path, one_process: list[dict[str, float]]
) -> None:
    out = tmp_path / "run"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cnnkit", *train_args(data, "--out", str(out), "--trainer", "flaky", "-t",
                                                    "fail_epoch=2", "--nproc", "2", "-q")],
        capture_output=True, text=True, timeout=180, env=env(site, tmp_path / "cache"),
    )  # fmt: skip
    assert done.returncode == 3, done.stderr  # the failing rank's own exit code (DataError)
    assert time.monotonic() - started < 120  # no hang: the other rank did not wait for its timeout
    assert "cnnkit: error: rank 1: cannot read its shard (injected failure)" in done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    assert_same_metrics(rows(out), one_process[:1])  # epoch 1 of --nproc 2 was saved, and equal


def test_shards_of_every_global_batch_add_up_to_the_whole_batch() -> None:
    images = torch.randint(0, 256, (70, 1, 8, 8), dtype=torch.uint8)
    split = ImageTensors(images, torch.arange(70))
    options: dict[str, Any] = {"batch_size": 16, "image_size": 8, "augment": True, "shuffle": True, "seed": 3}
    whole = list(BatchLoader(split, **options).epoch(2))
    parts = [list(BatchLoader(split, shard=(rank, 3), **options).epoch(2)) for rank in range(3)]
    assert all(len(p) == len(whole) for p in parts)
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[step][1] for p in parts]), y)  # every example once
        assert torch.equal(torch.cat([p[step][0] for p in parts]), x)  # and augmented the same
    assert [p[-1][1].shape[0] for p in parts] == [2, 2, 2]  # the last batch (6) split evenly


def test_the_global_batch_must_divide_over_the_processes(tmp_path: Path) -> None:
    config = resolve_config(overrides={"model": "lenet", "batch_size": 30})
    with pytest.raises(UsageError, match="global batch and must divide evenly over 4 processes.*use 28 or 32"):
        DistributedDataParallelStrategy(torch.device("cpu"), 0, 4, 0, "gloo").check(config.batch_size, False)
    with pytest.raises(UsageError, match="--sync-bn needs CUDA"):
        DistributedDataParallelStrategy(torch.device("cpu"), 1, 2, 0, "gloo").check(32, True)


@pytest.mark.slow
@pytest.mark.parametrize("threads", ["1", "2"])
def test_nproc_ranks_are_forked_and_share_the_launchers_pages_when_that_is_safe(
    site: Path, data: Path, tmp_path: Path, threads: str
) -> None:
    """One OpenMP thread a rank, no CUDA: the ranks are forked from the launcher and share the pages
    torch filled at import. More threads: new processes (libgomp would hang a forked child)."""
    report = tmp_path / "report"
    report.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "cnnkit", *train_args(data, "--out", str(tmp_path / "run"), "--epochs", "1",
                                                    "--trainer", "flaky", "-t", "fail_epoch=99", "-t",
                                                    f"report={report}", "--nproc", "2", "-q")],
        capture_output=True, text=True, timeout=180, env={**env(site, tmp_path / "cache"), "OMP_NUM_THREADS": threads},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    forked = threads == "1" and not torch.cuda.is_available()
    for rank in (0, 1):
        kb = json.loads((report / f"rank{rank}.json").read_text())
        assert kb["threads"] == int(threads)  # a forked rank sets the thread count torchrun chose
        shared_mb = (kb["RssAnon"] - kb["Pss_Anon"]) * 2 / 1024  # shared by k processes: Pss counts 1/k
        assert (shared_mb > 100) == forked, (rank, kb)


@pytest.mark.slow
def test_ctrl_c_stops_an_nproc_job_with_130_and_keeps_its_last_epoch(site: Path, data: Path, tmp_path: Path) -> None:
    import signal

    out = tmp_path / "run"
    job = subprocess.Popen(
        [sys.executable, "-m", "cnnkit", *train_args(data, "--out", str(out), "--epochs", "200", "--nproc", "2")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(site, tmp_path / "cache"),
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not ((out / "metrics.csv").exists() and rows(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process of the job
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 130, stderr
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr
    assert "interrupted" in stderr
    saved = rows(out)
    assert saved and [r["epoch"] for r in saved] == list(range(1, len(saved) + 1))


@pytest.mark.slow
def test_forked_ranks_of_a_process_that_ran_multithreaded_ops_do_not_hang(site: Path, data: Path, tmp_path: Path) -> None:
    """The launcher has an OpenMP team (a 2-thread matmul, as a notebook that trained before
    would): a forked rank that started a team of its own would hang in libgomp. It takes one thread."""
    import signal

    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(2)
        _ = torch.randn(300, 300) @ torch.randn(300, 300)
        from cnnkit.cli.app import main
        sys.argv = ["cnnkit", *{train_args(data, "--epochs", "1", "--nproc", "2", "--out", str(out), "-q")!r}]
        main()
    """)
    environment = env(site, tmp_path / "cache")
    del environment["OMP_NUM_THREADS"]  # torchrun's default then: one thread a rank
    job = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=environment, start_new_session=True)  # fmt: skip
    try:
        _, stderr = job.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        pytest.fail("the --nproc 2 job hung")
    assert job.returncode == 0, stderr
    assert [r["epoch"] for r in rows(out)] == [1.0]


@pytest.mark.parametrize(("args", "code"), [(["list", "models"], 0), (["summary", "no-such-model"], 2)])
def test_a_rank_of_a_job_ends_with_its_exit_code_and_without_the_interpreters_shutdown(
    tmp_path: Path, args: list[str], code: int
) -> None:
    """torch 2.14's gloo workers abort a process whose interpreter is shutting down while they
    release a collective's tensors: a rank of a several-process job skips that shutdown. One
    process (or a rank of a one-process job) shuts down as any program does."""
    script = textwrap.dedent(f"""
        import atexit, sys
        import cnnkit.training.strategy  # what a training session imports
        from cnnkit.cli.app import main
        atexit.register(lambda: print("interpreter shut down", flush=True))
        sys.argv = ["cnnkit", *{args!r}]
        main()
    """)
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    for world, shut_down in (("2", False), ("1", True), (None, True)):
        ranks = {"WORLD_SIZE": world, "RANK": "1" if world == "2" else "0", "LOCAL_RANK": "0"} if world else {}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              env={**base, **ranks}, cwd=tmp_path)  # fmt: skip
        assert done.returncode == code, (world, done.stderr)
        assert ("interpreter shut down" in done.stdout) == shut_down, (world, done.stdout[-300:])
        assert done.stdout.strip() or code, "a rank's output is flushed before it ends"
