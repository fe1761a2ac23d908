"""``make demo`` (scripts/demo.sh): data found, else fetched, else Debian's package (as root only);
linked where a plain shell finds it (issue #9). cnnkit, id and apt-get are stubs that log their calls."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

STUB_CNNKIT = """#!/usr/bin/env bash
echo "cnnkit $*" >> "$STUB_LOG"
case "$1 $2" in
"data fetch") exit 3 ;;  # no internet
"data info")  # cnnkit's default search, as far as the demo relies on it
    home="${CNNKIT_DATA:-$HOME/.cache/cnnkit/datasets}"
    compgen -G "$home/fashion-mnist/train-images-idx3-ubyte*" >/dev/null ;;
"train lenet_bn") echo "run runs/lenet_bn-fashion-mnist/1  curves ..." ;;
esac
"""


def run_demo(tmp_path: Path, env: dict[str, str], uid: int = 1000) -> tuple[subprocess.CompletedProcess[str], str]:
    """scripts/demo.sh in a copy of the repo whose cnnkit, id and apt-get are stubs that log their calls."""
    if Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Debian's dataset-fashion-mnist is installed here")
    repo, bin_dir, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "calls.log"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(Path(__file__).parents[1] / "scripts" / "demo.sh", repo / "scripts" / "demo.sh")
    stubs = {
        repo / ".venv" / "bin" / "cnnkit": STUB_CNNKIT,
        bin_dir / "id": f"#!/bin/sh\necho {uid}\n",
        bin_dir / "apt-get": '#!/bin/sh\necho "apt-get $*" >> "$STUB_LOG"\n',
        bin_dir / "dpkg": f'#!/bin/sh\necho "{tmp_path}/debian/fashion-mnist/train-images-idx3-ubyte.gz"\n',
    }
    for path, text in stubs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    log.touch()
    result = subprocess.run(
        ["bash", str(repo / "scripts" / "demo.sh")], capture_output=True, text=True, stdin=subprocess.DEVNULL,
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path / "home"), "STUB_LOG": str(log), **env},
        timeout=60,
    )  # fmt: skip
    return result, log.read_text()


def fmnist_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    return path


def test_demo_uses_data_that_is_there_and_links_it_for_a_plain_shell(tmp_path: Path) -> None:
    data = fmnist_folder(tmp_path / "datasets" / "fashion-mnist")
    result, calls = run_demo(tmp_path, {"CNNKIT_DATA": str(data.parent), "CNNKIT_DATA_ORIGIN": "file"})
    assert result.returncode == 0, result.stderr
    assert "data fetch" not in calls and "apt-get" not in calls
    link = tmp_path / "home" / ".cache" / "cnnkit" / "datasets" / "fashion-mnist"
    assert link.is_symlink() and link.resolve() == data.resolve()
    assert f"demo: linked {link} -> {data.resolve()}" in result.stdout
    assert "cnnkit eval runs/lenet_bn-fashion-mnist/1" in calls  # no --data: the run records it


def test_demo_links_nothing_when_a_plain_shell_already_finds_the_data(tmp_path: Path) -> None:
    fmnist_folder(tmp_path / "home" / ".cache" / "cnnkit" / "datasets" / "fashion-mnist")
    result, calls = run_demo(tmp_path, {})
    assert result.returncode == 0, result.stderr
    assert "linked" not in result.stdout and "data fetch" not in calls


def test_demo_fetches_before_apt_and_never_runs_apt_when_not_root(tmp_path: Path) -> None:
    result, calls = run_demo(tmp_path, {}, uid=1000)
    assert result.returncode == 1
    assert "cnnkit data fetch fashion-mnist" in calls and "apt-get" not in calls
    assert "demo:   sudo apt-get install dataset-fashion-mnist" in result.stdout
    # The failed download leaves no empty folder that would hide other places from cnnkit.
    assert not (tmp_path / "home" / ".cache" / "cnnkit" / "datasets" / "fashion-mnist").exists()


def test_demo_as_root_says_what_apt_installs_and_why_after_the_download_failed(tmp_path: Path) -> None:
    debian = fmnist_folder(tmp_path / "debian" / "fashion-mnist")
    result, calls = run_demo(tmp_path, {}, uid=0)
    assert result.returncode == 0, result.stderr
    lines = calls.splitlines()
    fetch = lines.index(next(line for line in lines if line.startswith("cnnkit data fetch")))
    install = lines.index("apt-get install -y -qq dataset-fashion-mnist")
    assert fetch < install
    assert "the download failed; Debian's package dataset-fashion-mnist holds the same four files" in result.stdout
    assert f"demo: Fashion-MNIST from {debian}" in result.stdout
