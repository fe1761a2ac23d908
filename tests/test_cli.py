"""The CLI skeleton: version, help, listing, one-line errors, no torch import for instant commands."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from cnnkit import __version__
from cnnkit.cli.app import app
from cnnkit.config import TrainConfig
from cnnkit.registry import DATASETS, MODELS, TRAINERS
from tests.test_registry import make_distribution


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"cnnkit {__version__}"


def _command_paths() -> list[tuple[str, ...]]:
    """Every command of the app, groups included (``()`` is cnnkit itself), from Typer's own tree."""

    def walk(command: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        yield path
        for name, sub in sorted((getattr(command, "commands", None) or {}).items()):
            yield from walk(sub, (*path, name))

    return list(walk(typer.main.get_command(app), ()))


COMMANDS = _command_paths()


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "cnnkit")
def test_every_command_answers_help(runner: CliRunner, path: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.startswith(" ".join(["Usage: cnnkit", *path]) + " ")


def test_each_feature_has_its_command() -> None:
    assert set(COMMANDS) >= {
        ("train",), ("eval",), ("summary",), ("export",), ("predict",), ("list", "models"), ("list", "datasets"),
        ("list", "trainers"), ("data", "fetch"), ("data", "info"), ("plugins",), ("plugins", "check"),
    }  # fmt: skip


def test_train_options_are_the_config_fields() -> None:
    """Each TrainConfig field is a ``train`` option, and ``train`` has no option the config lacks
    beyond the few that choose where the config comes from."""
    train = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    given = {opt for param in train.params for opt in param.opts if opt.startswith("--")}
    tables = {"model_options": "--model-option", "dataset_options": "--dataset-option",
              "trainer_options": "--trainer-option"}  # fmt: skip
    fields = {tables.get(name, "--" + name.replace("_", "-")) for name in TrainConfig.model_fields if name != "model"}
    assert given == fields | {"--config", "--resume", "--split", "--channels"}


def test_list_models_and_pattern(runner: CliRunner) -> None:
    result = runner.invoke(app, ["list", "models"])
    assert result.exit_code == 0
    assert {"lenet", "lenet_bn"} <= set(result.output.split())
    result = runner.invoke(app, ["list", "models", "lenet*", "--format", "json"])
    assert [row["name"] for row in json.loads(result.output)] == ["lenet", "lenet_bn"]


@pytest.mark.parametrize("kind", ["models", "datasets", "trainers"])
def test_list_shows_exactly_what_is_registered(runner: CliRunner, kind: str) -> None:
    registry = {"models": MODELS, "datasets": DATASETS, "trainers": TRAINERS}[kind]
    result = runner.invoke(app, ["list", kind, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [row["name"] for row in json.loads(result.stdout)] == registry.names()
    assert {"models": "lenet", "datasets": "fashion-mnist", "trainers": "standard"}[kind] in registry.names()


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, timeout=120
    )


@pytest.mark.parametrize("argv", [["--help"], ["list", "models"], ["list", "datasets", "--format", "json"]])
def test_instant_commands_do_not_import_torch(argv: list[str]) -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from cnnkit.cli.app import app; "
        f"r = CliRunner().invoke(app, {argv!r}); assert r.exit_code == 0, r.output; "
        "print('torch' in sys.modules)"
    )
    proc = _run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_python_dash_m_works() -> None:
    proc = subprocess.run([sys.executable, "-m", "cnnkit", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and __version__ in proc.stdout


@pytest.mark.slow
def test_broken_plugin_on_sys_path_only_warns(tmp_path: Path) -> None:
    """A third-party distribution found through a dist-info folder, whose code is broken."""
    make_distribution(
        tmp_path, "cnnkit-broken", {"brokennet": "fakeplug_b:SPEC"}, {"fakeplug_b": "raise RuntimeError('boom')\n"}
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from typer.testing import CliRunner; "
        "from cnnkit.cli.app import app; "
        "r = CliRunner().invoke(app, ['list', 'models', '--long']); "
        "print(r.exit_code); print(r.stdout); print('ERR', r.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "0"
    assert any(line.startswith("brokennet") and "failed to load" in line for line in lines)
    assert any(line.startswith("lenet ") for line in lines)  # everything else still listed
    warnings = [line for line in proc.stdout.split("ERR", 1)[1].splitlines() if "brokennet" in line]
    assert len(warnings) == 1 and "cnnkit-broken" in warnings[0] and "RuntimeError: boom" in warnings[0]
    assert "Traceback" not in proc.stdout


def test_third_party_entry_point_is_discovered(tmp_path: Path) -> None:
    make_distribution(tmp_path, "cnnkit-thirdparty", {"thirdnet": "fakeplug_t:SPEC"}, {"fakeplug_t": ""})
    proc = subprocess.run(
        [sys.executable, "-m", "cnnkit", "list", "models", "third*"],
        capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["thirdnet", "[cnnkit-thirdparty", "1.0]"]


def test_unknown_model_is_one_line_exit_2(runner: CliRunner) -> None:
    MODELS.refresh()
    result = runner.invoke(app, ["summary", "lenett"])
    assert result.exit_code == 2
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "unknown model 'lenett'" in err[0] and "cnnkit list models" in err[0]
    assert "Traceback" not in result.output


def test_debug_shows_traceback(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--debug", "summary", "lenett"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "UnknownNameError" in result.stderr


def test_operating_system_errors_are_one_line_naming_the_path(runner: CliRunner) -> None:
    result = runner.invoke(app, ["data", "fetch", "fashion-mnist", "--data", "/proc/cnnkit-cannot-be-here"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "cnnkit: error: No such file or directory: /proc/cnnkit-cannot-be-here"
    ]
