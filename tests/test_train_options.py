"""One schema, many faces: every TrainConfig field is a ``cnnkit train`` option with the same
validation as a config file, and docs/config.md is generated from the same schema."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest

import cnnkit.training.run
from cnnkit.cli.app import app
from cnnkit.config import TrainConfig, config_reference

FIELDS = [name for name in TrainConfig.model_fields if name != "model"]
TABLE_FLAGS = {"model_options": "-o", "dataset_options": "-d", "trainer_options": "-t"}
# Valid values that differ from every default, so that the assertion sees the option's effect.
SAMPLES: dict[str, tuple[str, Any]] = {
    "dataset": ("coil20", "coil20"), "data": ("somewhere", "somewhere"), "trainer": ("standard", "standard"),
    "recipe": ("d2l", "d2l"), "device": ("cpu", "cpu"), "out": ("elsewhere", "elsewhere"),
    "runs_dir": ("experiments", "experiments"), "momentum": ("0.5", 0.5), "label_smoothing": ("0.25", 0.25),
    "init_from": ("torchvision:resnet18", "torchvision:resnet18"),
}  # fmt: skip


def sample(name: str) -> tuple[list[str], Any]:
    """Command-line words that set ``name`` and the value the config must then hold."""
    field = TrainConfig.model_fields[name]
    if name in TABLE_FLAGS:
        return [TABLE_FLAGS[name], "some_key=7"], {"some_key": "7"}
    flag = "--" + name.replace("_", "-")
    if name in SAMPLES:
        word, value = SAMPLES[name]
        return [flag, word], value
    kind = field.annotation
    if typing.get_origin(kind) is not typing.Literal and type(None) in typing.get_args(kind):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is typing.Literal:
        choice = typing.get_args(kind)[-1]
        return [flag, choice], choice
    if kind is bool:
        return ([f"--no-{flag[2:]}"], False) if field.default is True else ([flag], True)
    if kind is int:
        return [flag, "3"], 3
    if kind is float:
        return [flag, "0.375"], 0.375
    raise AssertionError(f"no sample for {name}: {field.annotation}")


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, TrainConfig]:
    seen: dict[str, TrainConfig] = {}
    monkeypatch.setattr(cnnkit.training.run, "train", lambda config: seen.setdefault("config", config))
    return seen


@pytest.mark.parametrize("name", FIELDS)
def test_every_config_field_is_settable_from_the_command_line(runner, captured, name: str) -> None:  # type: ignore[no-untyped-def]
    words, expected = sample(name)
    result = runner.invoke(app, ["train", "lenet", *words])
    assert result.exit_code == 0, result.output
    assert getattr(captured["config"], name) == expected


def test_command_line_and_file_errors_read_alike(runner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from_cli = runner.invoke(app, ["train", "lenet", "--momentum", "1.5"])
    file = tmp_path / "run.toml"
    file.write_text("model = 'lenet'\nmomentum = 1.5\n")
    from_file = runner.invoke(app, ["train", "--config", str(file)])
    assert from_cli.exit_code == from_file.exit_code == 2
    assert "command line: momentum = 1.5: Input should be less than 1" in from_cli.output
    assert f"{file}: momentum = 1.5: Input should be less than 1" in from_file.output
    bad_choice = runner.invoke(app, ["train", "lenet", "--schedule", "linear"])
    assert bad_choice.exit_code == 2 and "schedule = 'linear'" in bad_choice.output and "onecycle" in bad_choice.output


def test_docs_config_reference_is_current() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert docs.read_text(encoding="utf-8") == config_reference(), "run 'make docs' to regenerate docs/config.md"
    for name in TrainConfig.model_fields:
        assert f"| `{name}` |" in docs.read_text(encoding="utf-8")
