"""Shared fixtures. Every test gets its own cnnkit cache folder; real data comes from CNNKIT_DATA."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cnnkit._console import reset_warnings
from cnnkit.testing import write_fashion_mnist_folder

REAL_DATA = Path(os.environ["CNNKIT_DATA"]) if os.environ.get("CNNKIT_DATA") else None


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's ~/.cache/cnnkit from a test; warnings show afresh in each test."""
    monkeypatch.setenv("CNNKIT_CACHE", str(tmp_path_factory.mktemp("cnnkit-cache")))
    monkeypatch.setenv("CNNKIT_DEBUG", "0")  # restored after the test even if --debug sets it
    reset_warnings()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from more threads, and on a busy machine OpenMP spinning costs a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def real_data() -> Path:
    """The folder holding fashion-mnist/ and coil-20/ (skips when CNNKIT_DATA is not set)."""
    if REAL_DATA is None or not REAL_DATA.is_dir():
        pytest.skip("CNNKIT_DATA does not point at the real datasets")
    return REAL_DATA


@pytest.fixture
def idx_data(tmp_path: Path) -> Path:
    """A tiny Fashion-MNIST-format folder (cnnkit.testing's default sizes)."""
    return write_fashion_mnist_folder(tmp_path / "fmnist")


@pytest.fixture
def no_default_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cnnkit's default search finds nothing (as for a user whose data lives elsewhere)."""
    empty = tmp_path / "empty-data-home"
    empty.mkdir()
    monkeypatch.setenv("CNNKIT_DATA", str(empty))
    return empty


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data folder, run directory) of one tiny run (tests.helpers.train_args), shared by the tests
    that only read it."""
    from cnnkit.cli.app import app
    from tests.helpers import train_args

    root = tmp_path_factory.mktemp("trained")
    data, run = write_fashion_mnist_folder(root / "fmnist"), root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CNNKIT_CACHE", str(root / "cache"))
            assert CliRunner().invoke(app, train_args(data, "--out", str(run))).exit_code == 0
    finally:
        torch.set_num_threads(threads)
    return data, run
