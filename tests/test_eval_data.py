"""``cnnkit eval`` without --data: a run directory (or an exported file) records the folder it was
trained on, --data overrides it, and a folder that is gone is one clear line (issue #9)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cnnkit.checkpoint import load_weights, read_meta, save_weights
from cnnkit.cli.app import app
from cnnkit.testing import write_fashion_mnist_folder as write_idx_folder
from tests.helpers import train_args

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_run_dir_without_data_uses_the_recorded_folder(runner, trained: tuple[Path, Path], no_default_data: Path) -> None:  # type: ignore[no-untyped-def]
    data, run = trained
    assert read_meta(run).data == str(data.resolve())
    result = runner.invoke(app, ["eval", str(run), "--device", "cpu", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert '"examples": 80' in result.stdout


def test_eval_of_an_exported_file_elsewhere_uses_its_recorded_folder(runner, trained: tuple[Path, Path], tmp_path: Path, no_default_data: Path) -> None:  # type: ignore[no-untyped-def]
    run = trained[1]
    exported = tmp_path / "elsewhere" / "model.safetensors"
    exported.parent.mkdir()
    assert runner.invoke(app, ["export", str(run), "--out", str(exported)]).exit_code == 0
    result = runner.invoke(app, ["eval", str(exported), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "(80 examples)" in result.stdout


def test_eval_of_older_weights_reads_the_folder_from_config_json(runner, trained: tuple[Path, Path], tmp_path: Path, no_default_data: Path) -> None:  # type: ignore[no-untyped-def]
    run = shutil.copytree(trained[1], tmp_path / "run")
    model, meta = load_weights(run / "best.safetensors")
    save_weights(run / "best.safetensors", model, meta.model_copy(update={"data": None}))  # as before 'data' existed
    result = runner.invoke(app, ["eval", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_eval_prefers_data_over_the_recorded_folder(runner, trained: tuple[Path, Path], tmp_path: Path, no_default_data: Path) -> None:  # type: ignore[no-untyped-def]
    run = trained[1]
    other = write_idx_folder(tmp_path / "other", train=40, test=30, seed=1)
    result = runner.invoke(app, ["eval", str(run), "--device", "cpu", "--data", str(other)])
    assert result.exit_code == 0, result.output
    assert "(30 examples)" in result.stdout


def test_eval_when_the_recorded_folder_is_gone_says_so(runner, idx_data: Path, tmp_path: Path, no_default_data: Path) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    assert runner.invoke(app, train_args(idx_data, "--out", str(run))).exit_code == 0
    shutil.rmtree(idx_data)
    result = runner.invoke(app, ["eval", str(run), "--device", "cpu"])
    assert result.exit_code == 3
    assert f"trained on {idx_data.resolve()}, which no longer exists" in result.stderr
    assert result.stderr.count("\n") == 1
