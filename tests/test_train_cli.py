"""``cnnkit train`` end to end: in process on a tiny Fashion-MNIST-format folder, and in subprocesses
for Ctrl-C (SIGINT) and kills (SIGKILL) at random moments."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cnnkit.checkpoint import load_weights, read_meta
from cnnkit.cli.app import app
from cnnkit.rundir import STATE_NAME
from cnnkit.testing import write_fashion_mnist_folder as write_idx_folder
from cnnkit.training.state import load_state

CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture
def idx_data(tmp_path: Path) -> Path:
    return write_idx_folder(tmp_path / "fmnist")


def tiny_args(data: Path, *extra: str) -> list[str]:
    return ["train", "lenet_bn", "--data", str(data), "--input-size", "16", "--batch-size", "32", "--device", "cpu",
            *extra]  # fmt: skip


@pytest.mark.slow
def test_train_numbers_runs_and_eval_reads_the_weights(runner, idx_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    runs = tmp_path / "runs"
    result = runner.invoke(app, tiny_args(idx_data, "--epochs", "2", "--runs-dir", str(runs)))
    assert result.exit_code == 0, result.output
    run = runs / "lenet_bn-fashion-mnist" / "1"
    lines = result.output.splitlines()
    assert "recipe default" in lines[0]  # the resolved config, compactly
    assert sum(line.startswith("epoch ") for line in lines) == 2
    assert any(line.startswith("loss ") and ", test acc " in line for line in lines)
    assert any(line.endswith("examples/sec on cpu") for line in lines)
    assert str(run) in lines[-1] and "best.safetensors" in lines[-1]
    for name in ("config.json", "metrics.csv", "curves.png", "log.txt", "best.safetensors", "last.safetensors"):
        assert (run / name).is_file(), name

    again = runner.invoke(app, tiny_args(idx_data, "--epochs", "1", "--runs-dir", str(runs), "-q"))
    assert again.exit_code == 0 and (runs / "lenet_bn-fashion-mnist" / "2").is_dir()

    evaluated = runner.invoke(app, ["eval", str(run), "--data", str(idx_data), "--format", "json", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output[: evaluated.output.rindex("}") + 1])
    tested = json.loads((run / "test.json").read_text())
    assert report["top1"] == pytest.approx(tested["best"]["test_acc"], abs=1e-6)
    on_val = runner.invoke(app, ["eval", str(run), "--split", "val", "--format", "json", "--device", "cpu"])
    assert on_val.exit_code == 0, on_val.output
    _, meta = load_weights(run / "best.safetensors")  # the run's own val split, carved again the same way
    assert json.loads(on_val.output[: on_val.output.rindex("}") + 1])["top1"] == pytest.approx(meta.metrics["val_acc"], abs=1e-6)


@pytest.mark.slow
def test_resume_extends_a_run(runner, idx_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    assert runner.invoke(app, tiny_args(idx_data, "--epochs", "1", "--out", str(out), "-q")).exit_code == 0
    refused = runner.invoke(app, ["train", "--resume", str(out), "--batch-size", "64"])
    assert refused.exit_code == 2 and "batch_size cannot change" in refused.output
    taken = runner.invoke(app, tiny_args(idx_data, "--epochs", "1", "--out", str(out)))
    assert taken.exit_code == 2 and "--resume" in taken.output
    resumed = runner.invoke(app, ["train", "--resume", str(out), "--epochs", "2", "--data", str(idx_data)])
    assert resumed.exit_code == 2 and "data cannot change" in resumed.output
    resumed = runner.invoke(app, ["train", "--resume", str(out), "--epochs", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and "epoch 2/2" in resumed.output
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    assert "schedule: from lr" in resumed.output  # the plan of the extension, in one line
    restarted = runner.invoke(app, ["train", "--resume", str(out), "--epochs", "4", "--lr", "0.02"])
    assert restarted.exit_code == 0, restarted.output
    assert "warm restart" in restarted.output and "to lr 0.02" in restarted.output
    record = json.loads((out / "config.json").read_text())
    assert [(r["epochs"], r["lr"]) for r in record["resumes"]] == [(2, None), (4, 0.02)]
    lrs = [float(line.split(",")[-3]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert max(lrs[2:]) <= 0.02 + 1e-9 and lrs[3] < lrs[2]  # up to the restart's peak, then down


def test_missing_cuda_exits_2_listing_devices(runner, idx_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    runs = tmp_path / "runs"
    result = runner.invoke(app, [*tiny_args(idx_data, "--runs-dir", str(runs)), "--device", "cuda"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "available: cpu" in result.output
    assert not runs.exists()  # no empty run directory left behind


def test_huge_lr_exits_5(runner, idx_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    args = ["train", "lenet", "--recipe", "d2l", "--lr", "1e38", "--data", str(idx_data), "--out", str(out)]
    result = runner.invoke(app, [*args, "--device", "cpu", "-q"])
    assert result.exit_code == 5
    assert "loss became" in result.output and "epoch 1, step" in result.output and "Traceback" not in result.output
    assert not (out / "best.safetensors").exists()


def test_tensorboard_without_the_package_is_one_line(runner, idx_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed")
    result = runner.invoke(app, tiny_args(idx_data, "--out", str(tmp_path / "run"), "--tensorboard"))
    assert result.exit_code == 2 and "pip install 'cnnkit[tensorboard]'" in result.output


def _start(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "cnnkit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _wait_for(path: Path, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_saves_last_and_exits_130(idx_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = _start(tiny_args(idx_data, "--epochs", "1000", "--out", str(out), "-q"))
    _wait_for(out / "state.safetensors", process)  # the first epoch is saved
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.strip().count("\n") == 0 and f"cnnkit train --resume {out}" in stderr
    assert "Traceback" not in stderr
    model, meta = load_weights(out / "last.safetensors")
    saved = load_state(out / STATE_NAME)
    assert saved.epoch >= 1 and len(saved.history) == saved.epoch
    assert f"end of epoch {saved.epoch}" in stderr


@pytest.mark.slow
def test_repeated_ctrl_c_during_the_save_does_not_corrupt_it(idx_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = _start(tiny_args(idx_data, "--epochs", "1000", "--out", str(out), "-q"))
    _wait_for(out / "state.safetensors", process)  # the first epoch is saved
    for _ in range(8):  # the first interrupts; the rest land while `last` is being saved, or after
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGINT)
        time.sleep(0.02)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    model, meta = load_weights(out / "last.safetensors")
    assert meta.epoch is not None and load_state(out / STATE_NAME).epoch >= 1


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_loadable_checkpoints(idx_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    chance = random.Random(1234)
    args = tiny_args(idx_data, "--epochs", "1000", "--out", str(out), "-q")
    for round_ in range(4):
        process = _start(args if round_ == 0 else ["train", "--resume", str(out), "-q"])
        _wait_for(out / "last.safetensors", process)
        time.sleep(chance.uniform(0.0, 1.5))  # each epoch here saves last, state, csv and curves
        process.kill()
        process.wait(timeout=30)
        model, meta = load_weights(out / "last.safetensors")
        assert meta.metrics and meta.epoch is not None and meta.epoch >= 1
        saved = load_state(out / STATE_NAME)
        assert len(saved.history) == saved.epoch


@pytest.mark.realdata
@pytest.mark.slow
def test_lenet_bn_one_epoch_on_real_fashion_mnist(runner, real_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    args = ["train", "lenet_bn", "--data", str(real_data / "fashion-mnist"), "--epochs", "1", "--out", str(out)]
    result = runner.invoke(app, [*args, "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    _, meta = load_weights(out / "best.safetensors")
    assert meta.metrics["val_acc"] >= 0.80
    assert json.loads((out / "test.json").read_text())["final"]["test_acc"] >= 0.80


def test_image_folder_with_channels_and_its_split_files(runner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (20, 20), tuple(min(255, c + 3 * i) for c in colour)).save(tmp_path / "imgs" / name / f"{i}.png")
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "train", "lenet", "--dataset", "image-folder", "--data", str(tmp_path / "imgs"), "--channels", "1",
        "--input-size", "16", "--epochs", "1", "--batch-size", "8", "--out", str(out), "-q",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = read_meta(out / "best.safetensors")
    assert (meta.in_channels, meta.classes, meta.dataset_options) == (1, ["blue", "red"], {"channels": 1})
    held_out = (out / "split_test.txt").read_text().split()
    assert len(held_out) == 2 and all(line.split("/")[0] in {"blue", "red"} for line in held_out)
    assert not set(held_out) & set((out / "split_train.txt").read_text().split())
