"""A train that fails before its first epoch is saved leaves no run directory behind (issue #9)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from cnnkit.cli.app import app
from cnnkit.training import handlers
from tests.helpers import train_args

pytestmark = pytest.mark.usefixtures("one_thread")


def numbered_dirs(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_dir() and p.name.isdigit()] if root.exists() else []


def test_missing_data_path_leaves_no_run_directory(runner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    runs = tmp_path / "runs"
    result = runner.invoke(app, train_args(tmp_path / "nowhere", "--runs-dir", str(runs)))
    assert result.exit_code == 3 and "does not exist" in result.stderr
    assert numbered_dirs(runs) == []


def test_empty_data_folder_leaves_no_run_directory(runner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    empty, runs = tmp_path / "empty", tmp_path / "runs"
    empty.mkdir()
    result = runner.invoke(app, train_args(empty, "--runs-dir", str(runs)))
    assert result.exit_code == 3 and "missing" in result.stderr
    assert numbered_dirs(runs) == []


def test_corrupt_image_leaves_no_run_directory(runner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, runs = tmp_path / "images", tmp_path / "runs"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (16, 16), color=40 * i).save(root / name / f"{i}.png")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    args = ["train", "lenet_bn", "--dataset", "image-folder", "--data", str(root), "--input-size", "16",
            "--device", "cpu", "--epochs", "1", "-q", "--runs-dir", str(runs)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 3 and "broken.png" in result.stderr
    assert numbered_dirs(runs) == []


@pytest.mark.slow
def test_ctrl_c_before_the_first_save_leaves_no_run_directory(runner, idx_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    def ctrl_c(self: object, run: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(handlers.Console, "epoch_started", ctrl_c)
    runs = tmp_path / "runs"
    result = runner.invoke(app, train_args(idx_data, "--runs-dir", str(runs)))
    assert result.exit_code == 130
    assert "before any epoch was saved" in result.stderr and "removed" in result.stderr
    assert numbered_dirs(runs) == []
