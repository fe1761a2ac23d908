"""The ONNX parts of the documentation follow the code: docs/cli.md's ``export`` and ``eval`` sections
are what ``make docs`` generates from the CLI, and README's int8 table is bench/results/onnx.txt's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def section(markdown: str, title: str) -> str:
    """The text under a ``## `cnnkit TITLE` `` heading, up to the next ``## `` heading."""
    match = re.search(rf"^## `cnnkit {title}`\n(.*?)(?=^## |\Z)", markdown, flags=re.M | re.S)
    assert match is not None, f"no section for cnnkit {title}"
    return match.group(1)


@pytest.mark.slow
def test_cli_reference_export_and_eval_sections_are_generated(tmp_path: Path) -> None:
    out = tmp_path / "cli.md"
    command = [sys.executable, "-m", "typer", "cnnkit.cli.app", "utils", "docs", "--name", "cnnkit",
               "--title", "cnnkit command-line reference", "--output", str(out)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    generated, committed = out.read_text(encoding="utf-8"), (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    for title in ("export", "eval"):
        assert section(committed, title) == section(generated, title), f"run 'make docs': cnnkit {title} changed"
    export = section(committed, "export")
    for flag in ("--quantize <int8>", "--calibration-data <path>", "--max-drop <float>"):
        assert f"* `{flag}`" in export


def test_readme_int8_table_is_the_benchmarks() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = (ROOT / "bench" / "results" / "onnx.txt").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if re.match(r"^\| `\w+` \| \d+ px \| (float32|int8) \|", line)]
    models = {row.split("`")[1] for row in rows}
    assert {"lenet_bn", "resnet18", "efficientnet_b0"} <= models
    assert len(rows) == 2 * len(models)  # a float32 and an int8 row per model
    for row in rows:
        assert row in results.splitlines(), f"README row not in bench/results/onnx.txt: {row}"
