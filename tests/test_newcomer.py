"""What a new user tripped on (issue #9): eval without --data, readable curves, progress on the
right stream, no empty run directories, a quiet end on a closed pipe, clear messages."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from cnnkit.checkpoint import load_weights, read_meta, save_weights
from cnnkit.cli.app import app
from cnnkit.rundir import RunDir
from cnnkit.testing import write_fashion_mnist_folder as write_idx_folder
from cnnkit.training import handlers

pytestmark = pytest.mark.usefixtures("one_thread")

ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def idx_data(tmp_path: Path) -> Path:
    return write_idx_folder(tmp_path / "fmnist")


@pytest.fixture
def no_default_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cnnkit's default search finds nothing (as for a user whose data lives elsewhere)."""
    empty = tmp_path / "empty-data-home"
    empty.mkdir()
    monkeypatch.setenv("CNNKIT_DATA", str(empty))
    return empty


def train_args(data: Path, *extra: str) -> list[str]:
    return ["train", "lenet_bn", "--data", str(data), "--input-size", "16", "--batch-size", "32", "--device", "cpu",
            "--epochs", "1", "-q", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data folder, run directory) of one tiny run, shared by the tests that only read it."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("trained")
    data, run = write_idx_folder(root / "fmnist"), root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CNNKIT_CACHE", str(root / "cache"))
            assert CliRunner().invoke(app, train_args(data, "--out", str(run))).exit_code == 0
    finally:
        torch.set_num_threads(threads)
    return data, run


def numbered_dirs(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_dir() and p.name.isdigit()] if root.exists() else []


# -- 1. a run directory (or an exported file) is enough to evaluate it ---------------------------
def test_eval_run_dir_without_data_uses_the_recorded_folder(runner, trained: tuple[Path, Path], no_default_data: Path) -> None:  # type: ignore[no-untyped-def]
    data, run = trained
    assert read_meta(run).data == str(data.resolve())
    result = runner.invoke(app, ["eval", str(run), "--device", "cpu", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert '"examples": 80' in result.stdout


def test_eval_of_an_exported_file_elsewhere_uses_its_recorded_folder(runner, trained: tuple[Path, Path], tmp_path: Path, no_default_data: Path) -> None:  # type: ignore[no-untyped-def]
    run = trained[1]
    exported = tmp_path / "elsewhere" / "model.safetensors"
    exported.parent.mkdir()
    assert runner.invoke(app, ["export", str(run), "--out", str(exported)]).exit_code == 0
    result = runner.invoke(app, ["eval", str(exported), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "(80 examples)" in result.stdout


def test_eval_of_older_weights_reads_the_folder_from_config_json(runner, trained: tuple[Path, Path], tmp_path: Path, no_default_data: Path) -> None:  # type: ignore[no-untyped-def]
    run = shutil.copytree(trained[1], tmp_path / "run")
    model, meta = load_weights(run / "best.safetensors")
    save_weights(run / "best.safetensors", model, meta.model_copy(update={"data": None}))  # as before 'data' existed
    result = runner.invoke(app, ["eval", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output


def test_eval_prefers_data_over_the_recorded_folder(runner, trained: tuple[Path, Path], tmp_path: Path, no_default_data: Path) -> None:  # type: ignore[no-untyped-def]
    run = trained[1]
    other = write_idx_folder(tmp_path / "other", train=40, test=30, seed=1)
    result = runner.invoke(app, ["eval", str(run), "--device", "cpu", "--data", str(other)])
    assert result.exit_code == 0, result.output
    assert "(30 examples)" in result.stdout


def test_eval_when_the_recorded_folder_is_gone_says_so(runner, idx_data: Path, tmp_path: Path, no_default_data: Path) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    assert runner.invoke(app, train_args(idx_data, "--out", str(run))).exit_code == 0
    shutil.rmtree(idx_data)
    result = runner.invoke(app, ["eval", str(run), "--device", "cpu"])
    assert result.exit_code == 3
    assert f"trained on {idx_data.resolve()}, which no longer exists" in result.stderr
    assert result.stderr.count("\n") == 1


# -- 2. curves.png: two panels, train and test apart, the best epoch marked ----------------------
def fake_run(tmp_path: Path, losses: list[tuple[float, float]], accs: list[tuple[float, float]]) -> Any:
    history = [
        {"epoch": i + 1, "train_loss": tl, "test_loss": vl, "train_acc": ta, "test_acc": va}
        for i, ((tl, vl), (ta, va)) in enumerate(zip(losses, accs, strict=True))
    ]
    best = max(range(len(history)), key=lambda i: history[i]["test_acc"])
    return SimpleNamespace(
        history=history, best_epoch=best + 1, best_acc=history[best]["test_acc"], dir=RunDir(tmp_path),
        config=SimpleNamespace(epochs=len(history), model="resnet18", dataset="coil20"),
    )  # fmt: skip


def test_curves_have_a_loss_panel_and_an_accuracy_panel_with_the_best_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    def no_global_backend(*args: object, **kwargs: object) -> None:
        raise AssertionError("curves must not set matplotlib's global backend")

    monkeypatch.setattr(matplotlib, "use", no_global_backend)
    run = fake_run(tmp_path, [(3.4, 135.7), (6.8, 372.2), (2.4, 4.4)], [(0.26, 0.05), (0.21, 0.05), (0.47, 0.16)])
    plot = handlers.CurvesPlot()
    figure = plot.figure(run)
    loss_axes, acc_axes = figure.axes
    assert loss_axes.get_yscale() == "log" and "loss" in loss_axes.get_ylabel()  # 2.4 .. 372: log scale
    assert acc_axes.get_ylabel() == "accuracy" and acc_axes.get_ylim()[1] <= 1.01
    # Train and test differ in colour and in line style.
    train, test = acc_axes.get_lines()[:2]
    assert train.get_color() != test.get_color() and train.get_linestyle() != test.get_linestyle()
    labels = [text.get_text() for text in acc_axes.get_legend().get_texts()]
    assert labels == ["train", "test", "best test 0.160 (epoch 3)"]
    # The best epoch is a vertical line on both panels.
    for axes in (loss_axes, acc_axes):
        assert any(list(line.get_xdata()) == [3, 3] for line in axes.get_lines())
    plot.plot(run)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_figure_is_freed_before_plot_returns(tmp_path: Path) -> None:
    # Else the garbage collector frees it at a random later moment, and a Ctrl-C landing in one
    # of matplotlib's weakref callbacks then is only printed: the run would not stop.
    import weakref

    plot, refs = handlers.CurvesPlot(), []
    draw = plot.figure

    def recorded(run: Any) -> Any:
        figure = draw(run)
        refs.append(weakref.ref(figure))
        return figure

    plot.figure = recorded  # type: ignore[method-assign]
    plot.plot(fake_run(tmp_path, [(0.9, 0.5), (0.4, 0.4)], [(0.6, 0.8), (0.8, 0.85)]))
    assert refs and refs[0]() is None


def test_small_losses_keep_a_linear_axis(tmp_path: Path) -> None:
    run = fake_run(tmp_path, [(0.93, 0.52), (0.43, 0.41)], [(0.65, 0.79), (0.84, 0.85)])
    loss_axes, _ = handlers.CurvesPlot().figure(run).axes
    assert loss_axes.get_yscale() == "linear"


# -- 3 and 6. progress: a bar on a terminal stderr, lines in logs, never "loss nan" --------------
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


def test_bar_is_drawn_on_a_terminal_stderr_while_stdout_goes_to_a_pipe(tmp_path: Path) -> None:
    data = write_idx_folder(tmp_path / "fmnist", train=640, test=64)
    args = train_args(data, "--out", str(tmp_path / "run"), "--epochs", "2", "-t", "report_every=0.01")
    args.remove("-q")
    code, stdout, terminal = run_in_pty(args, columns=100, stdout_on_terminal=False)
    assert code == 0, terminal
    # The bar (with its counts) was on the terminal; the epoch lines went to the pipe, plain.
    assert b"epoch 1/2" in terminal and "━".encode() in terminal and b"/640" in terminal
    assert b"ex/s  loss " in terminal
    assert b"nan" not in terminal  # no "loss nan" before the first report
    assert not ANSI.search(stdout)
    assert re.search(rb"^epoch 1/2  loss \d", stdout, re.M) and re.search(rb"^epoch 2/2  loss \d", stdout, re.M)
    assert b"\nrun " in stdout
    # Transient: once training ends, the terminal shows no bar.
    assert not any("━" in line for line in screen(terminal, 100))


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
    assert re.match(r"^    (train acc|test loss|test acc|lr) ", shown[epoch + 1]), shown
    fields = "  ".join(line.strip() for line in shown[epoch : epoch + 2 + 1] if not line.startswith("epoch 2"))
    assert re.search(r"test acc \d\.\d{3}", fields) and re.search(r"\d+ ex/s", fields)


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


# -- 4. a train that fails leaves no run directory ----------------------------------------------
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


def test_ctrl_c_before_the_first_save_leaves_no_run_directory(runner, idx_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    def ctrl_c(self: object, run: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(handlers.Console, "epoch_started", ctrl_c)
    runs = tmp_path / "runs"
    result = runner.invoke(app, train_args(idx_data, "--runs-dir", str(runs)))
    assert result.exit_code == 130
    assert "before any epoch was saved" in result.stderr and "removed" in result.stderr
    assert numbered_dirs(runs) == []


# -- 7. a closed stdout is a normal end ---------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [["eval", "{run}", "--device", "cpu"], ["eval", "{run}", "--device", "cpu", "--format", "json"], ["list", "models"]],
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


# -- 10. messages ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["coil20", "fashion-mnist"])
def test_not_found_says_pass_data_once(name: str, runner, no_default_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from cnnkit.data import fashion_mnist

    monkeypatch.setattr(fashion_mnist, "SYSTEM_FOLDER", no_default_data / "not-installed")  # Debian's folder
    result = runner.invoke(app, ["data", "info", name])
    assert result.exit_code == 3
    assert result.stderr.count("--data PATH") == 1, result.stderr


def test_summary_warns_when_the_maps_collapse_to_1x1(runner) -> None:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, ["summary", "googlenet", "--input", "1x8x8"])
    assert result.exit_code == 0 and "Total params" in result.stdout
    warning = result.stderr.strip()
    assert warning.count("\n") == 0 and warning.startswith("cnnkit: warning: googlenet at 1x8x8")
    assert re.search(r"1x1 from b2\.\d+ \(MaxPool2d\) on", warning), warning
    assert warning.endswith("an input of at least 1x33x33 avoids it")
    result = runner.invoke(app, ["summary", "googlenet", "--input", "1x1x1"])
    assert result.exit_code == 0 and "1x1 from the input on" in result.stderr


def test_the_smallest_uncollapsed_input_is_exact() -> None:
    from cnnkit.summary import summarize

    assert summarize("googlenet", (1, 33, 33)).collapsed_at is None
    assert summarize("googlenet", (1, 32, 32)).uncollapsed_side == 33


@pytest.mark.parametrize(
    "model", ["lenet", "lenet_bn", "alexnet", "vgg11", "nin", "googlenet", "resnet18", "densenet"]
)
def test_no_collapse_warning_at_the_recipe_size(model: str) -> None:
    from cnnkit.summary import summarize

    assert summarize(model).collapse_warning is None



# -- 1 and 5. make demo: data found, else fetched, else Debian's package (as root only); linked --
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
