"""The run directory's format on disk does not move: a run written by cnnkit 0.1.0 before the run was
taken apart (tests/fixtures/run-0.1.0: lenet_bn on a generated Fashion-MNIST folder, 4 epochs,
interrupted after epoch 2, --deterministic) still evaluates and resumes, and the resumed run ends
where that version's uninterrupted run ended."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnkit.cli.app import app
from cnnkit.rundir import RunDir
from cnnkit.testing import write_fashion_mnist_folder
from cnnkit.training.state import load_state

FIXTURES = Path(__file__).parent / "fixtures"


def _rows(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


@pytest.fixture
def old_run(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the 0.1.0 run, pointed at the same generated data made here (it was trained from a
    folder that is gone: the one edit is the data path in its config.json)."""
    data = write_fashion_mnist_folder(tmp_path / "data", train=200, test=50, seed=0)
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run-0.1.0", run)
    record = json.loads((run / "config.json").read_text())
    record["config"]["data"] = record["environment"]["dataset_source"] = str(data)
    (run / "config.json").write_text(json.dumps(record, indent=2))
    return run, data


def test_the_old_run_reads_through_the_run_directory(old_run: tuple[Path, Path]) -> None:
    run, _ = old_run
    folder = RunDir(run)
    assert folder.holds_run() and folder.holds_resume_point()
    config = folder.read_config()
    assert (config.model, config.epochs, config.deterministic) == ("lenet_bn", 4, True)
    saved = load_state(folder.state)
    assert (saved.epoch, len(saved.history), saved.trainer) == (2, 2, {})
    assert saved.optimizer["state"]  # SGD's momentum buffers came back


def test_the_old_run_evaluates(runner: CliRunner, old_run: tuple[Path, Path]) -> None:
    run, data = old_run
    result = runner.invoke(app, ["eval", str(run), "--data", str(data), "--device", "cpu", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["model"] == "lenet_bn" and report["recorded"]["test_acc"] == pytest.approx(0.1)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.slow
def test_the_old_run_resumes_to_where_its_uninterrupted_twin_ended(runner: CliRunner, old_run: tuple[Path, Path]) -> None:
    run, _ = old_run
    result = runner.invoke(app, ["train", "--resume", str(run), "-q"])
    assert result.exit_code == 0, result.output
    got, want = _rows(run / "metrics.csv"), _rows(FIXTURES / "run-0.1.0-uninterrupted-metrics.csv")
    assert [r["epoch"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, want, strict=True):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["epoch"], key)
