"""What cnnkit writes to terminals and pipes: a progress bar on a terminal stderr, plain lines in
logs (never "loss nan"), lines broken between fields on a narrow terminal, and a quiet exit 0
when the reader of stdout is gone (issue #9)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cnnkit.testing import write_fashion_mnist_folder as write_idx_folder
from cnnkit.training import handlers
from tests.helpers import train_args

pytestmark = pytest.mark.usefixtures("one_thread")

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_pty(args: list[str], columns: int, stdout_on_terminal: bool) -> tuple[int, bytes, bytes]:
    """Run cnnkit with stderr (and optionally stdout) on a pseudo-terminal ``columns`` wide."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm", "COLUMNS": "", "LINES": ""}
    env.pop("COLUMNS")
    env.pop("LINES")
    process = subprocess.Popen(
        [sys.executable, "-m", "cnnkit", *args], stdin=subprocess.DEVNULL, stderr=follower,
        stdout=follower if stdout_on_terminal else subprocess.PIPE, env=env,
    )  # fmt: skip
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            chunks.append(chunk)
        elif process.poll() is not None:
            break
    piped = process.stdout.read() if process.stdout else b""
    os.close(leader)
    return process.wait(timeout=60), piped, b"".join(chunks)


def screen(data: bytes, columns: int) -> list[str]:
    """What a terminal shows after ``data``: carriage returns, line erases, cursor moves, wrapping."""
    rows: list[list[str]] = [[]]
    row = col = 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|.", data.decode("utf-8", "replace"), re.S):
        if token.startswith("\x1b"):
            count, command = int(token[2:-1] or 1) if token[2:-1].isdigit() else 1, token[-1]
            if command == "K":
                rows[row] = rows[row][:col] if token[2:-1] in ("", "0") else []
            elif command == "A":
                row = max(0, row - count)
            elif command == "B":
                row += count
            while len(rows) <= row:
                rows.append([])
        elif token == "\r":
            col = 0
        elif token == "\n" or col >= columns:
            row, col = row + 1, 0
            while len(rows) <= row:
                rows.append([])
            if token != "\n":
                rows[row].append(token)
                col = 1
        else:
            line = rows[row]
            line.extend(" " * (col - len(line)))
            line[col : col + 1] = [token]
            col += 1
    return ["".join(line).rstrip() for line in rows]


@pytest.mark.slow
def test_bar_is_drawn_on_a_terminal_stderr_while_stdout_goes_to_a_pipe(tmp_path: Path) -> None:
    data = write_idx_folder(tmp_path / "fmnist", train=640, test=64)
    args = train_args(data, "--out", str(tmp_path / "run"), "--epochs", "2", "-t", "report_every=0.01")
    args.remove("-q")
    code, stdout, terminal = run_in_pty(args, columns=100, stdout_on_terminal=False)
    assert code == 0, terminal
    # The bar (with its counts) was on the terminal; the epoch lines went to the pipe, plain.
    assert b"epoch 1/2" in terminal and "━".encode() in terminal and b"/580" in terminal
    assert b"ex/s  loss " in terminal
    assert b"nan" not in terminal  # no "loss nan" before the first report
    assert not ANSI.search(stdout)
    assert re.search(rb"^epoch 1/2  loss \d", stdout, re.M) and re.search(rb"^epoch 2/2  loss \d", stdout, re.M)
    assert b"\nrun " in stdout
    # Transient: once training ends, the terminal shows no bar.
    assert not any("━" in line for line in screen(terminal, 100))


@pytest.mark.slow
def test_on_a_narrow_terminal_lines_break_between_fields(tmp_path: Path) -> None:
    data = write_idx_folder(tmp_path / "fmnist", train=320, test=32)
    args = train_args(data, "--out", str(tmp_path / "run"), "--epochs", "2")
    args.remove("-q")
    code, _, terminal = run_in_pty(args, columns=60, stdout_on_terminal=True)
    assert code == 0, terminal
    shown = screen(terminal, 60)
    assert all(len(line) <= 60 for line in shown)
    epoch = next(i for i, line in enumerate(shown) if line.startswith("epoch 1/2  loss"))
    # The continuation starts with a whole field, indented; no field is cut in two.
    assert re.match(r"^    (train acc|val loss|val acc|lr) ", shown[epoch + 1]), shown
    fields = "  ".join(line.strip() for line in shown[epoch : epoch + 2 + 1] if not line.startswith("epoch 2"))
    assert re.search(r"val acc \d\.\d{3}", fields) and re.search(r"\d+ ex/s", fields)


@pytest.mark.slow
def test_without_a_terminal_no_control_codes(runner, idx_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    args = train_args(idx_data, "--out", str(tmp_path / "run"))
    args.remove("-q")
    result = subprocess.run(
        [sys.executable, "-m", "cnnkit", *args],
        capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not ANSI.search(result.stdout) and not ANSI.search(result.stderr)
    assert re.search(rb"^epoch 1/1  loss \d", result.stdout, re.M)


def test_logs_get_a_progress_line_during_long_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    console = handlers.Console(quiet=False, log_every=0.0)
    assert not console.live  # pytest captures stderr: no terminal
    run: Any = SimpleNamespace(
        epoch=1, seen=0, loss=None, data=SimpleNamespace(train=range(60000)), config=SimpleNamespace(epochs=10)
    )
    console.epoch_started(run)
    run.seen, run.loss = 12800, 0.7123
    console.iteration_completed(run)
    line = capsys.readouterr().out.strip()
    assert re.fullmatch(r"epoch 1/10  12800/60000 \(21%\)  \d+ ex/s  loss 0\.712", line), line
    # Not more often than log_every.
    console.log_every = 3600.0
    console.epoch_started(run)
    console.iteration_completed(run)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "args",
    [pytest.param(["eval", "{run}", "--device", "cpu"], marks=pytest.mark.slow),
     pytest.param(["eval", "{run}", "--device", "cpu", "--format", "json"], marks=pytest.mark.slow), ["list", "models"]],
    ids=["eval-table", "eval-json", "list"],
)  # fmt: skip
def test_closed_stdout_exits_0_silently(args: list[str], trained: tuple[Path, Path]) -> None:
    run = trained[1]
    # The reader is gone before cnnkit writes a byte (as `| head -1` once it has its line).
    read, write = os.pipe()
    os.close(read)
    process = subprocess.run(
        [sys.executable, "-m", "cnnkit", *[a.replace("{run}", str(run)) for a in args]],
        stdout=write, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGPIPE, signal.SIG_IGN),
    )  # fmt: skip
    os.close(write)
    assert process.returncode == 0, process.stderr
    assert process.stderr == b""
