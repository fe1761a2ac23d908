"""``cnnkit data info`` when the data is nowhere cnnkit looks: one line, one hint to pass --data (issue #9)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnkit.cli.app import app


@pytest.mark.parametrize("name", ["coil20", "fashion-mnist"])
def test_not_found_says_pass_data_once(name: str, runner, no_default_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from cnnkit.data import fashion_mnist

    monkeypatch.setattr(fashion_mnist, "SYSTEM_FOLDER", no_default_data / "not-installed")  # Debian's folder
    result = runner.invoke(app, ["data", "info", name])
    assert result.exit_code == 3
    assert result.stderr.count("--data PATH") == 1, result.stderr
