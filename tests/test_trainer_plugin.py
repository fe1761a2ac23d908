"""A third-party trainer written from docs/plugins.md alone, installed through entry points: it
trains from ``--trainer``, gets a full run directory, resumes, and Ctrl-C exits 130 resumably."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnnkit.checkpoint import load_weights
from cnnkit.cli.app import app
from cnnkit.registry import TRAINERS
from cnnkit.rundir import STATE_NAME
from cnnkit.testing import write_fashion_mnist_folder as write_idx_folder
from cnnkit.training.state import load_state

pytestmark = pytest.mark.usefixtures("one_thread")

# Exactly the documented protocol: name, summary, options, fit(model, data, config, run) -> RunResult.
PLAIN_TRAINER = '''
    import time

    import torch
    import torch.nn.functional as F
    from pydantic import BaseModel, ConfigDict, Field


    class PlainOptions(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        pause: float = Field(0.0, ge=0, description="Seconds to sleep after each step.")


    class PlainTrainer:
        name = "plain"
        summary = "plain SGD at a fixed rate, written from docs/plugins.md"
        options = PlainOptions

        def fit(self, model, data, config, run):
            optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
            run.start(optimizer)
            batches = run.loader("train")
            for epoch in run.epochs():
                model.train()
                loss_sum = torch.zeros(())
                correct = torch.zeros((), dtype=torch.long)
                seen = 0
                for images, labels in batches.epoch(epoch):
                    logits = model(images)
                    loss = F.cross_entropy(logits, labels)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    run.step += 1
                    loss_sum += loss.detach() * len(labels)
                    correct += (logits.argmax(1) == labels).sum()
                    seen += len(labels)
                    time.sleep(run.options.pause)
                run.iteration_completed(seen, float(loss_sum) / seen)
                metrics = {"train_loss": float(loss_sum) / seen, "train_acc": int(correct) / seen}
                run.epoch_completed({**metrics, **run.evaluate(model)}, examples=seen)
            return run.result()
'''


def install_plain_trainer(root: Path) -> Path:
    info = root / "cnnkit_plain-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cnnkit-plain\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[cnnkit.trainers]\nplain = fakeplug_plain:PlainTrainer\n")
    (root / "fakeplug_plain.py").write_text(textwrap.dedent(PLAIN_TRAINER))
    return root


@pytest.fixture
def plugin_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    root = install_plain_trainer(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    TRAINERS.refresh()
    yield root
    sys.modules.pop("fakeplug_plain", None)
    monkeypatch.undo()
    TRAINERS.refresh()


@pytest.fixture
def idx_data(tmp_path: Path) -> Path:
    return write_idx_folder(tmp_path / "fmnist", train=192, test=64)


def args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "lenet_bn", "--trainer", "plain", "--data", str(data), "--out", str(out), "--input-size", "16",
            "--batch-size", "32", "--lr", "0.05", "--device", "cpu", *extra]  # fmt: skip


def test_plugin_trainer_is_listed_with_its_options(runner, plugin_root: Path) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, ["list", "trainers", "--long"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("plain"))
    assert "written from docs/plugins.md" in line and "pause=0.0" in line and "cnnkit-plain" in line


@pytest.mark.slow
def test_plugin_trainer_trains_gets_a_run_directory_and_resumes(runner, plugin_root: Path, idx_data: Path,  # type: ignore[no-untyped-def]
                                                                tmp_path: Path) -> None:  # fmt: skip
    out = tmp_path / "run"
    result = runner.invoke(app, args(idx_data, out, "--epochs", "2", "-q"))
    assert result.exit_code == 0, result.output
    for name in ("config.json", "metrics.csv", "curves.png", "log.txt", "best.safetensors", "last.safetensors",
                 STATE_NAME):  # fmt: skip
        assert (out / name).is_file(), name
    record = json.loads((out / "config.json").read_text())
    assert record["config"]["trainer"] == "plain" and "cnnkit-plain 1.0" in record["environment"]["plugins"]
    _, meta = load_weights(out / "last.safetensors")
    assert meta.epoch == 2 and meta.metrics["train_loss"] > 0

    resumed = runner.invoke(app, ["train", "--resume", str(out), "--epochs", "4", "-q"])
    assert resumed.exit_code == 0, resumed.output
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])  # the momentum state carried over
    state = load_state(out / STATE_NAME)
    assert state.epoch == 4 and state.step == 4 * 6 and state.optimizer["state"]  # 192 / 32 steps an epoch


def test_resuming_a_run_whose_trainer_is_not_installed_names_the_distribution(  # type: ignore[no-untyped-def]
    runner, plugin_root: Path, idx_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, args(idx_data, out, "--epochs", "2", "-q"))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "config.json").read_text())
    assert record["environment"]["providers"]["trainer"] == {"name": "plain", "distribution": "cnnkit-plain",
                                                               "version": "1.0"}  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))  # the plugin uninstalled:
    sys.path.remove(str(plugin_root))
    TRAINERS.refresh()
    resumed = runner.invoke(app, ["train", "--resume", str(out), "--epochs", "3"])
    assert resumed.exit_code == 2, resumed.output
    assert resumed.output.strip().splitlines()[-1] == (
        f"cnnkit: error: {out} was trained with trainer 'plain' of cnnkit-plain 1.0, which is not installed here; "
        "install it (pip install 'cnnkit-plain==1.0') and resume again"
    )


def test_trainer_options_are_validated_by_the_trainer(runner, plugin_root: Path, idx_data: Path,  # type: ignore[no-untyped-def]
                                                      tmp_path: Path) -> None:  # fmt: skip
    result = runner.invoke(app, args(idx_data, tmp_path / "run", "-t", "pase=1"))
    assert result.exit_code == 2
    assert "bad option for trainer 'plain'" in result.output and "pause" in result.output
    assert not (tmp_path / "run").exists()  # rejected before any directory was made


@pytest.mark.slow
def test_ctrl_c_in_a_plugin_trainer_exits_130_resumably(plugin_root: Path, idx_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "cnnkit", *args(idx_data, out, "--epochs", "50", "-q", "-t", "pause=0.02")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (out / "metrics.csv").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no epoch finished"
        time.sleep(0.05)
    time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.count("\n") == 1 and f"cnnkit train --resume {out}" in stderr and "Traceback" not in stderr
    saved = load_state(out / STATE_NAME)
    _, meta = load_weights(out / "last.safetensors")
    assert saved.epoch >= 1 and meta.epoch == saved.epoch and f"holds epoch {saved.epoch}" in stderr
