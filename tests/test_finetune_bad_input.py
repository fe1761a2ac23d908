"""``cnnkit train --init-from`` refuses what it cannot use in one line and the documented exit code:
a pickle that would run code (nothing in it runs), truncated files, another architecture's
weights, torchvision:NAME absent from the hub cache (never downloaded) or damaged there, and
freezing or resuming requests that cannot be honoured."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_config import fancy_plugin  # noqa: F401  (a fixture: a plugin model whose spec names no head)

import cnnkit
from cnnkit.cli.app import app
from tests.helpers import train_args

pytestmark = pytest.mark.usefixtures("one_thread")


def lines(result: Any) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def refused(result: Any, code: int, *needles: str) -> str:
    """The one error line of a run that exited ``code``, checked to contain every needle."""
    assert result.exit_code == code, result.output
    shown = lines(result)
    assert len(shown) == 1 and "Traceback" not in result.output, shown
    for needle in needles:
        assert needle in shown[0], shown[0]
    return shown[0]


class _Touch:
    """Unpickling this would create a file and print; weights_only=True must refuse it first."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"echo UNPICKLED; touch {self.path}",))


def test_a_pickle_that_would_run_code_is_refused_and_nothing_in_it_runs(runner: Any, idx_data: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pth"
    torch.save({"0.weight": torch.zeros(1), "payload": _Touch(marker)}, evil)
    result = runner.invoke(app, train_args(idx_data, "--init-from", str(evil), "--out", str(tmp_path / "run")))
    line = refused(result, 4, f"--init-from {evil} refused: its pickle holds more than tensors", "weights_only=True")
    assert "posix.system" in line or "os.system" in line
    assert not marker.exists() and "UNPICKLED" not in result.output
    assert not (tmp_path / "run").exists()


def test_truncated_files_exit_4(runner: Any, idx_data: Path, tmp_path: Path, trained: tuple[Path, Path]) -> None:
    state = tmp_path / "state.pth"
    torch.save(cnnkit.build_model("lenet_bn", 1, 10).state_dict(), state)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    refused(runner.invoke(app, train_args(idx_data, "--init-from", str(cut))), 4, f"--init-from {cut} is truncated")
    weights = tmp_path / "cut.safetensors"
    best = trained[1] / "best.safetensors"
    weights.write_bytes(best.read_bytes()[: best.stat().st_size - 100])
    refused(runner.invoke(app, train_args(idx_data, "--init-from", str(weights))), 4, str(weights), "corrupt")


def test_another_architecture_s_state_dict_names_the_first_mismatching_keys(runner: Any, idx_data: Path, tmp_path: Path) -> None:
    other = tmp_path / "lenet.pth"
    torch.save(cnnkit.build_model("lenet", 1, 10).state_dict(), other)
    line = refused(runner.invoke(app, train_args(idx_data, "--init-from", str(other))), 4,
                   f"--init-from {other} does not fit model 'lenet_bn'", "missing ", "(+")  # fmt: skip
    assert "1.running_mean" in line


def test_another_cnnkit_model_s_run_exits_4(runner: Any, idx_data: Path, trained: tuple[Path, Path]) -> None:
    args = ["train", "lenet", "--data", str(idx_data), "--input-size", "16", "--device", "cpu", "-e", "1", "-q"]
    refused(runner.invoke(app, [*args, "--init-from", str(trained[1])]), 4, "holds weights of cnnkit model 'lenet_bn'")


def test_init_from_with_resume_exits_2(runner: Any, trained: tuple[Path, Path]) -> None:
    result = runner.invoke(app, ["train", "--resume", str(trained[1]), "--init-from", str(trained[1])])
    refused(result, 2, "--init-from starts a new run", "--resume continues a run")


def test_freeze_on_a_spec_without_a_head_exits_2_naming_the_model(runner: Any, idx_data: Path, fancy_plugin: Any) -> None:  # noqa: F811
    args = ["train", "fancy", "--data", str(idx_data), "--input-size", "16", "--device", "cpu", "-e", "1", "-q",
            "--init", "default"]  # its recipe's Xavier init cannot reach its lazy layer
    refused(runner.invoke(app, [*args, "--freeze", "backbone"]), 2, "model 'fancy'", "head")
    refused(runner.invoke(app, [*args, "--head-lr-mult", "10"]), 2, "model 'fancy'", "head")


def test_freeze_epochs_without_freeze_exits_2(runner: Any, idx_data: Path) -> None:
    refused(runner.invoke(app, train_args(idx_data, "--freeze-epochs", "2")), 2, "add --freeze backbone")


def test_a_missing_path_or_format_exits_2(runner: Any, idx_data: Path, tmp_path: Path) -> None:
    refused(runner.invoke(app, train_args(idx_data, "--init-from", str(tmp_path / "nope.pth"))), 2, "does not exist")
    odd = tmp_path / "weights.h5"
    odd.write_bytes(b"x")
    refused(runner.invoke(app, train_args(idx_data, "--init-from", str(odd))), 2, "'.h5' is not a weights format")


def test_torchvision_name_absent_from_the_hub_cache_names_the_url_and_path(
    runner: Any, idx_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    args = ["train", "resnet18", "--data", str(idx_data), "--input-size", "32", "--device", "cpu", "-e", "1", "-q"]
    refused(runner.invoke(app, [*args, "--init-from", "torchvision:resnet18"]), 2,
            "https://download.pytorch.org/models/resnet18-f37072fd.pth", f"put it at {expected}", "never downloads")  # fmt: skip
    assert not expected.exists()
    # A file at that path whose sha256 is not the one its name promises: damaged.
    expected.parent.mkdir(parents=True)
    torch.save(cnnkit.build_model("resnet18", 3, 1000).state_dict(), expected)
    refused(runner.invoke(app, [*args, "--init-from", "torchvision:resnet18"]), 4, "is damaged", "f37072fd")


def test_torchvision_name_found_in_the_hub_cache_loads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from test_torchvision_weights import torchvision_model

    import cnnkit.weights_init as weights_init

    reference = torchvision_model("resnet18")
    made = tmp_path / "made.pth"
    torch.save(reference.state_dict(), made)
    cached = tmp_path / f"resnet18-{hashlib.sha256(made.read_bytes()).hexdigest()[:8]}.pth"
    shutil.move(made, cached)
    monkeypatch.setattr(weights_init, "torchvision_file", lambda name: ("https://example.invalid/x.pth", cached))
    ours = cnnkit.build_model("resnet18", 3, 1000, weights="torchvision:resnet18").eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(images) - reference(images)).abs().max().item() <= 1e-5
