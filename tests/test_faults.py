"""Faults: kill -9, full disks, races, damaged runs, unwritable places; nothing may be lost.

A few trials of each case of ``bench/faults.py`` (which runs 30 kills and more trials, and prints
the table). Most run in process through the CLI (a full disk is ``RLIMIT_FSIZE`` with SIGXFSZ
ignored, so writes fail with EFBIG exactly as they fail with ENOSPC); the kills and races need
real processes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cnnkit.cli.app import app
from cnnkit.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("faults", ROOT / "bench" / "faults.py")
assert _spec is not None and _spec.loader is not None
faults = importlib.util.module_from_spec(_spec)
sys.modules["faults"] = faults
_spec.loader.exec_module(faults)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return faults.write_idx_folder(tmp_path_factory.mktemp("fmnist") / "data")


def train_args(data: Path, out: Path, epochs: int = 1, *extra: str) -> list[str]:
    return ["train", "lenet_bn", "--data", str(data), "--input-size", "16", "--batch-size", "32", "--device", "cpu",
            "--deterministic", "--epochs", str(epochs), "--out", str(out), "-q", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def one_epoch_template(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from typer.testing import CliRunner

    run = tmp_path_factory.mktemp("template") / "run"
    result = CliRunner().invoke(app, train_args(data, run, 1))
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture
def one_epoch_run(one_epoch_template: Path, tmp_path: Path) -> Path:
    """A run that completed 1 epoch (of 1; resume it with --epochs 2)."""
    run = tmp_path / "run"
    shutil.copytree(one_epoch_template, run)
    return run


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with EFBIG (as on a full disk) while inside."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def one_line(result: Any, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    assert faults.one_error_line(result.stderr, *needles) == ""


# -- 1. kill -9 ------------------------------------------------------------------------------------------------


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CNNKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.Popen([sys.executable, "-m", "cnnkit", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)  # fmt: skip


def _kill_when(process: subprocess.Popen[bytes], path: Path, then: float) -> None:
    deadline = time.monotonic() + 120
    while not path.exists():
        assert process.poll() is None, "training ended before the kill"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.002)
    time.sleep(then)
    process.kill()
    process.wait(timeout=60)


@pytest.mark.slow
def test_kill_9_then_resume_ends_equal_to_an_uninterrupted_run(runner: Any, data: Path, tmp_path: Path) -> None:
    epochs = faults.EPOCHS
    reference = tmp_path / "reference"
    assert runner.invoke(app, train_args(data, reference, epochs)).exit_code == 0
    chance = random.Random(7)
    # First before any epoch was saved (config.json but no state), then in the middle of training.
    for name, marker, then in (("early", "config.json", 0.0), ("late", "state.safetensors", chance.uniform(0, 0.3))):
        run = tmp_path / name
        process = _spawn(train_args(data, run, epochs))
        _kill_when(process, run / marker, then)
        if name == "early":
            assert (run / "config.json").exists() and not (run / "state.safetensors").exists()
        saved = faults._saved_epoch(run)
        result = runner.invoke(app, ["train", "--resume", str(run), "-q"])
        if saved == epochs:  # the kill came after the last save: the run is complete already
            assert result.exit_code == 2 and "already trained" in result.stderr
        else:
            assert result.exit_code == 0, result.output
        assert faults.complete_run_problems(run, reference, epochs) == [], name


def test_atomic_files_keep_the_mode_a_plain_write_gets(runner: Any, data: Path, tmp_path: Path) -> None:
    """safetensors creates its files 0600; cnnkit's files honour the umask like any other file."""
    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        previous = os.umask(umask)
        try:
            run = tmp_path / f"run{umask:o}"
            assert runner.invoke(app, train_args(data, run, 1)).exit_code == 0
            exported = tmp_path / f"export{umask:o}.safetensors"
            assert runner.invoke(app, ["export", str(run), "--out", str(exported)]).exit_code == 0
        finally:
            os.umask(previous)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*run.iterdir(), exported]}
        assert modes == dict.fromkeys(modes, mode), (oct(umask), {k: oct(v) for k, v in modes.items()})


# -- 2. disk full / file too large ----------------------------------------------------------------------------


def test_full_disk_during_a_checkpoint_keeps_the_previous_epoch(runner: Any, one_epoch_run: Path) -> None:
    run = one_epoch_run
    before = faults.snapshot(run)
    cache = Path(os.environ["CNNKIT_CACHE"])
    cache_before = faults.snapshot(cache)
    with file_size_limit(100_000):  # the weights are 184 kB
        result = runner.invoke(app, ["train", "--resume", str(run), "--epochs", "2", "-q"])
    one_line(result, 1, "File too large", str(run))
    after = faults.snapshot(run)
    for name in ("best.safetensors", "last.safetensors", "state.safetensors"):
        assert after[name] == before[name], name
    assert faults.temp_files(run) == [] and faults.snapshot(cache) == cache_before
    retried = runner.invoke(app, ["train", "--resume", str(run), "--epochs", "2", "-q"])  # room again
    assert retried.exit_code == 0, retried.output
    assert faults.complete_run_problems(run, None, 2) == []


def test_full_disk_during_export_is_one_line_and_leaves_nothing(
    runner: Any, one_epoch_run: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    out = folder / "model.safetensors"
    with file_size_limit(50_000):
        result = runner.invoke(app, ["export", str(one_epoch_run), "--out", str(out)])
    one_line(result, 1, "File too large", str(out))
    assert list(folder.iterdir()) == []


def test_full_disk_for_the_cache_only_warns(runner: Any, tmp_path: Path) -> None:
    big = faults.write_idx_folder(tmp_path / "big", train=1000, test=100)  # a 0.9 MB cache entry
    with file_size_limit(600_000):
        result = runner.invoke(app, train_args(big, tmp_path / "run", 1))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("cnnkit: warning:")]
    assert len(warnings) == 1 and "could not cache" in warnings[0] and "File too large" in warnings[0]
    cache = Path(os.environ["CNNKIT_CACHE"]) / "decoded"
    assert list(cache.iterdir()) == []  # no entry, no temp file


def test_full_disk_as_metrics_are_written(runner: Any, one_epoch_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnkit.training.handlers import metrics

    run = one_epoch_run
    before = faults.snapshot(run)
    original = metrics.MetricsCSV.write
    limits: list[contextlib.ExitStack] = []

    def write_on_a_full_disk(self: Any, run_: Any) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(file_size_limit(64))
        limits.append(stack)
        original(self, run_)

    monkeypatch.setattr(metrics.MetricsCSV, "write", write_on_a_full_disk)
    try:
        result = runner.invoke(app, ["train", "--resume", str(run), "--epochs", "2", "-q"])
    finally:
        for stack in limits:
            stack.close()
    one_line(result, 1, "File too large", str(run / "metrics.csv"))
    after = faults.snapshot(run)
    for name in ("metrics.csv", "best.safetensors", "last.safetensors", "state.safetensors"):
        assert after[name] == before[name], name
    assert faults.temp_files(run) == []


def test_full_disk_at_the_start_removes_the_new_run(runner: Any, data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with file_size_limit(500):  # config.json is over 1 kB
        result = runner.invoke(app, train_args(data, run, 1))
    one_line(result, 1, "File too large", str(run / "config.json"))
    assert not run.exists()


@pytest.mark.parametrize("where", ["missing folder", "parent is a file", "/proc"])
def test_export_never_makes_up_folders(runner: Any, one_epoch_run: Path, tmp_path: Path, where: str) -> None:
    if where == "missing folder":
        out, needle = tmp_path / "no" / "such" / "x.safetensors", str(tmp_path / "no" / "such")
    elif where == "parent is a file":
        (tmp_path / "file").write_text("")
        out, needle = tmp_path / "file" / "x.safetensors", str(tmp_path / "file")
    else:
        out, needle = Path("/proc/cnnkit-x.safetensors"), "/proc/cnnkit-x.safetensors"
    result = runner.invoke(app, ["export", str(one_epoch_run), "--out", str(out)])
    one_line(result, 1, needle)
    assert not (tmp_path / "no").exists()


# -- 3. races ----------------------------------------------------------------------------------------------------


def test_parallel_run_numbers_are_distinct(tmp_path: Path) -> None:
    taken: list[Path] = []
    start = threading.Barrier(16)

    def claim() -> None:
        start.wait()
        taken.append(RunDir.next_numbered(tmp_path, "lenet_bn", "fashion-mnist").path)

    threads = [threading.Thread(target=claim) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(int(p.name) for p in taken) == list(range(1, 17))


def _claim_run_dir(runs: str) -> str:
    return str(RunDir.next_numbered(runs, "lenet_bn", "fashion-mnist").path)


def test_parallel_processes_get_distinct_run_numbers(tmp_path: Path) -> None:
    """What two ``cnnkit train`` into one runs folder do first (bench/faults.py runs the whole trains)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(6) as pool:
        claimed = pool.map(_claim_run_dir, [str(tmp_path)] * 24)
    assert sorted(int(Path(p).name) for p in claimed) == list(range(1, 25))


@pytest.mark.slow
def test_two_loads_filling_one_cache_entry(tmp_path: Path) -> None:
    ws = faults.Workspace(tmp_path / "ws")
    trial = faults.two_loads_one_cache(ws)
    assert trial.ok, trial.detail


# -- 4. resume against changed ground -------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(faults.DAMAGE))
def test_resume_of_a_damaged_run_writes_nothing(runner: Any, data: Path, tmp_path: Path, case: str) -> None:
    make_damage, code, needle, extra = faults.DAMAGE[case]
    run = tmp_path / "run"
    if case.startswith("dataset changed"):
        own = faults.write_idx_folder(tmp_path / "own")
        assert runner.invoke(app, train_args(own, run, 1)).exit_code == 0
    else:
        assert runner.invoke(app, train_args(data, run, 1)).exit_code == 0
    make_damage(None)(run)
    before = faults.snapshot(run)
    result = runner.invoke(app, ["train", *extra, "--resume", str(run), "--epochs", "2", "-q"])
    one_line(result, code, needle)
    assert faults.snapshot(run) == before


def test_resume_after_a_class_was_renamed_exits_3(runner: Any, tmp_path: Path) -> None:
    images = faults.write_image_folder(tmp_path / "images")
    run = tmp_path / "run"
    args = ["train", "lenet_bn", "--dataset", "image-folder", "--data", str(images), "--input-size", "16",
            "--epochs", "1", "--device", "cpu", "--out", str(run), "-q"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    (images / "c").rename(images / "z")
    before = faults.snapshot(run)
    result = runner.invoke(app, ["train", "--resume", str(run), "--epochs", "2", "-q"])
    # The run's own split files name images that are no longer where they were.
    one_line(result, 3, str(images / "c"), "is listed in the run's", "split but is gone")
    assert faults.snapshot(run) == before


# -- 5. read-only places -----------------------------------------------------------------------------------------


def test_read_only_data_folder_trains_and_is_never_written(runner: Any, tmp_path: Path) -> None:
    data = faults.write_idx_folder(tmp_path / "ro")
    before = faults.snapshot(data), sorted((p.name, p.stat().st_mtime_ns) for p in [data, *data.iterdir()])
    with faults.immutable(data) as how:
        if not how:
            pytest.skip("no way to make a folder read-only for this user here (root without chattr or mount)")
        with pytest.raises(OSError):  # it really is read-only, even for root
            (data / "probe").write_text("x")
        result = runner.invoke(app, train_args(data, tmp_path / "run", 1))
    assert result.exit_code == 0, result.output
    assert (faults.snapshot(data), sorted((p.name, p.stat().st_mtime_ns) for p in [data, *data.iterdir()])) == before


@pytest.mark.parametrize("kind", ["parent is a file", "under /proc", "immutable folder"])
def test_unwritable_runs_dir_is_exit_1_before_training(runner: Any, data: Path, tmp_path: Path, kind: str) -> None:
    if kind == "parent is a file":
        (tmp_path / "file").write_text("")
        runs, needle = tmp_path / "file" / "runs", str(tmp_path / "file")
    elif kind == "under /proc":
        runs, needle = Path("/proc/cnnkit-runs"), "/proc/cnnkit-runs"
    else:
        runs, needle = tmp_path / "runs", str(tmp_path / "runs")
        runs.mkdir()
    args = [a for a in train_args(data, Path("unused"), 1) if a not in ("--out", "unused")] + ["--runs-dir", str(runs)]
    with faults.immutable(runs) if kind == "immutable folder" else contextlib.nullcontext("n/a") as how:
        if not how:
            pytest.skip("no way to make a folder read-only for this user here")
        result = runner.invoke(app, args)
    one_line(result, 1, needle)
    assert "epoch" not in result.stdout
