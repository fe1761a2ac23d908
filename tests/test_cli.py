"""The CLI skeleton: version, help, listing, one-line errors, no torch import for instant commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnkit import __version__
from cnnkit.cli.app import app
from cnnkit.registry import MODELS
from tests.test_registry import make_distribution


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"cnnkit {__version__}"


def test_help_lists_the_commands(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "eval", "summary", "export", "list", "data"):
        assert command in result.output


def test_list_models_and_pattern(runner: CliRunner) -> None:
    result = runner.invoke(app, ["list", "models"])
    assert result.exit_code == 0
    assert {"lenet", "lenet_bn"} <= set(result.output.split())
    result = runner.invoke(app, ["list", "models", "lenet*", "--format", "json"])
    assert [row["name"] for row in json.loads(result.output)] == ["lenet", "lenet_bn"]


def test_list_datasets_and_trainers(runner: CliRunner) -> None:
    assert "fashion-mnist" in runner.invoke(app, ["list", "datasets"]).output
    assert "standard" in runner.invoke(app, ["list", "trainers"]).output


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
