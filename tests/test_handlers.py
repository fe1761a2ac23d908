"""The run's handlers on their own: a fake run (the members of a Run each handler reads) with a
real RunDir in tmp_path, no training loop."""

from __future__ import annotations

import ast
import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from cnnkit.config import TrainConfig, describe_config
from cnnkit.rundir import RunDir
from cnnkit.training import events
from cnnkit.training.events import EventBus, Events
from cnnkit.training.handlers import (
    METRIC_COLUMNS,
    Checkpointer,
    Console,
    CurvesPlot,
    EarlyStopping,
    LogFile,
    MetricsCSV,
    RunFiles,
    checkpoints,
    closing_lines,
    default_handlers,
    epoch_line,
)


def row(epoch: int, val_acc: float, train_loss: float = 0.5) -> dict[str, float]:
    return {
        "epoch": epoch, "train_loss": train_loss, "train_acc": 0.8, "val_loss": 0.4, "val_acc": val_acc,
        "lr": 0.001, "examples_per_s": 1234.5678, "epoch_seconds": 2.25,
    }  # fmt: skip


def fake_run(tmp_path: Path, accs: list[float], **members: Any) -> Any:
    """A run after ``len(accs)`` epochs with those test accuracies."""
    history = [row(i + 1, acc, train_loss=1.0 / (i + 1)) for i, acc in enumerate(accs)]
    best = max(range(len(history)), key=lambda i: history[i]["val_acc"]) if history else -1
    run = SimpleNamespace(
        dir=RunDir(tmp_path),
        config=TrainConfig(model="lenet", epochs=5, patience=2),
        history=history,
        metrics=history[-1] if history else {},
        epoch=len(history),
        best_epoch=best + 1,
        best_acc=history[best]["val_acc"] if history else 0.0,
        saved_epoch=0,
        should_stop=False,
        resumed=False,
        error=None,
        device="cpu",
        amp_dtype=None,
        train_examples=6000,
        train_seconds=3.0,
        seen=0,
        loss=None,
        data=SimpleNamespace(
            name="fashion-mnist", train=range(60), val=range(10), test=range(20), classes=["a", "b"],
            split_files={"train": ["a/1.png", "b/2.png"], "test": ["a/3.png"]}, source=tmp_path / "data",
        ),  # fmt: skip
        environment={"cnnkit": "0.0", "device": "cpu", "world_size": 1},
        resumes=(),
        test_report={},
        inference_model=None,
    )
    for name, value in members.items():
        setattr(run, name, value)
    return run


# -- the bus ------------------------------------------------------------------------------------
def test_the_bus_calls_handlers_in_order_and_imports_nothing_of_cnnkit() -> None:
    calls: list[str] = []
    bus = EventBus([(Events.STARTED, lambda run: calls.append(f"a{run}")), (Events.COMPLETED, calls.append)])
    bus.on(Events.STARTED, lambda run: calls.append(f"b{run}"))
    bus.emit(Events.STARTED, 1)
    bus.emit(Events.EPOCH_STARTED, 2)
    assert calls == ["a1", "b1"]
    tree = ast.parse(Path(events.__file__).read_text(encoding="utf-8"))
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith("cnnkit")]


def test_default_handlers_order_and_options() -> None:
    plain = default_handlers(TrainConfig(model="lenet", quiet=True))
    names = [type(f).__name__ for f in plain]
    assert names == ["RunFiles", "MetricsCSV", "Checkpointer", "LogFile", "CurvesPlot", "Console"]
    patient = default_handlers(TrainConfig(model="lenet", quiet=True, patience=3))
    stopper = [f for f in patient if isinstance(f, EarlyStopping)]
    assert [type(f).__name__ for f in patient][-2:] == ["EarlyStopping", "Console"] and stopper[0].patience == 3


# -- files --------------------------------------------------------------------------------------
def test_run_files_write_the_record_and_the_splits(tmp_path: Path) -> None:
    (tmp_path / ".metrics.csv.123.abcd.tmp").write_text("half")
    run = fake_run(tmp_path, [])
    RunFiles().started(run)
    record = run.dir.read_record()
    assert record["environment"] == run.environment
    assert record["config"]["model"] == "lenet" and record["config"]["out"] == str(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == record
    assert (tmp_path / "split_train.txt").read_text() == "a/1.png\nb/2.png\n"
    assert run.dir.read_split_files() == run.data.split_files
    assert not list(tmp_path.glob(".*.tmp"))


def test_metrics_csv_has_one_row_per_epoch(tmp_path: Path) -> None:
    run = fake_run(tmp_path, [0.5, 0.7])
    MetricsCSV().write(run)
    text = (tmp_path / "metrics.csv").read_text()
    assert text.splitlines()[0] == ",".join(c for c in METRIC_COLUMNS if not c.startswith("test_"))
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert rows[1] == {
        "epoch": "2", "train_loss": "0.5", "train_acc": "0.8", "val_loss": "0.4", "val_acc": "0.7",
        "lr": "0.001", "examples_per_s": "1234.57", "epoch_seconds": "2.25",
    }  # fmt: skip
    # Rewritten whole: a shorter history (a resumed run) leaves no stale rows.
    run.history = run.history[:1]
    MetricsCSV().write(run)
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 2


def test_curves_png_is_written(tmp_path: Path) -> None:
    run = fake_run(tmp_path, [0.5, 0.7, 0.6])
    CurvesPlot().plot(run)
    assert run.dir.curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


# -- checkpoints --------------------------------------------------------------------------------
def test_checkpointer_saves_best_only_when_it_improves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved: list[tuple[str, Any]] = []
    monkeypatch.setattr(checkpoints, "save_weights", lambda path, model, meta: saved.append((Path(path).name, meta)))
    monkeypatch.setattr(checkpoints, "save_state", lambda path, state: saved.append((Path(path).name, state)))
    meta = SimpleNamespace(model_copy=lambda update: update)
    run = fake_run(tmp_path, [0.5, 0.7], model="the model", meta=meta, resume_point=lambda: "resume point")
    Checkpointer().epoch_completed(run)
    assert [name for name, _ in saved] == ["best.safetensors", "last.safetensors", "state.safetensors"]
    assert saved[0][1] == {"epoch": 2, "metrics": run.metrics, "ema": None} and saved[2][1] == "resume point"
    assert run.saved_epoch == 2
    saved.clear()
    run.epoch, run.metrics = 3, row(3, 0.6)
    Checkpointer().epoch_completed(run)
    assert [name for name, _ in saved] == ["last.safetensors", "state.safetensors"] and run.saved_epoch == 3


# -- early stopping -----------------------------------------------------------------------------
def test_early_stopping_after_patience_epochs_without_a_better_best(tmp_path: Path) -> None:
    stopper, run = EarlyStopping(patience=2), fake_run(tmp_path, [])
    for epoch, best_epoch, stops in [(1, 1, False), (2, 2, False), (3, 2, False), (4, 2, True)]:
        run.epoch, run.best_epoch = epoch, best_epoch
        stopper.check(run)
        assert run.should_stop is stops, epoch


# -- the console and the log --------------------------------------------------------------------
EPOCH_LINE = "epoch 2/5  loss 0.500  train acc 0.800  val loss 0.400  val acc 0.700  lr 0.001  1235 ex/s  2.2s"


def test_console_prints_the_epoch_line_and_the_closing_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    console = Console(quiet=False)
    run = fake_run(tmp_path, [0.5, 0.7])
    assert epoch_line(run) == EPOCH_LINE
    console.started(run)
    console.epoch_completed(run)
    run.should_stop = True
    per_class = {"a": {"acc": 0.9, "support": 10}, "b": {"acc": 0.5, "support": 10}}
    run.test_report = {"final": {"epoch": 2, "test_acc": 0.7, "per_class": per_class},
                       "best": {"epoch": 2, "test_acc": 0.7, "per_class": per_class}}  # fmt: skip
    console.completed(run)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == describe_config(run.config)
    assert out[1] == f"fashion-mnist: 60 train / 10 val / 20 test, 2 classes · cpu · run {tmp_path}"
    assert out[2] == EPOCH_LINE
    assert out[3:6] == [
        "test accuracy per class (best weights, epoch 2):", "  a  0.900  (10 images)", "  b  0.500  (10 images)",
    ]  # fmt: skip
    assert out[6:] == [
        "loss 0.500, train acc 0.800, test acc 0.700",
        "2000.0 examples/sec on cpu",
        "stopped early after epoch 2: no better val acc for 2 epochs",
        "best epoch 2 by val acc: val acc 0.700, test acc 0.700; final epoch 2: test acc 0.700",
        f"run {tmp_path}  curves {tmp_path / 'curves.png'}  best weights {tmp_path / 'best.safetensors'}",
    ]
    assert out[6:] == closing_lines(run)


def test_console_says_resuming_and_quiet_prints_only_the_closing_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path, [0.5, 0.7], resumed=True)
    Console(quiet=False).started(run)
    assert capsys.readouterr().out.splitlines()[1].endswith(f"· resuming {tmp_path} after epoch 2")
    quiet = Console(quiet=True)
    quiet.started(run)
    quiet.epoch_started(run)
    quiet.epoch_completed(run)
    quiet.completed(run)
    assert capsys.readouterr().out.splitlines() == closing_lines(run)


def test_log_file_records_the_run(tmp_path: Path) -> None:
    log = LogFile()
    bus = EventBus(log.attach())
    run = fake_run(tmp_path, [0.5, 0.7])
    bus.emit(Events.STARTED, run)
    bus.emit(Events.EPOCH_COMPLETED, run)
    bus.emit(Events.COMPLETED, run)
    run.resumed, run.error = True, SimpleNamespace(format_message=lambda: "diverged")
    bus.emit(Events.STARTED, run)
    bus.emit(Events.FAILED, run)
    lines = (tmp_path / "log.txt").read_text(encoding="utf-8").splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  "
    assert all(re.match(stamp, line) for line in lines)
    texts = [re.sub(stamp, "", line, count=1) for line in lines]
    assert texts[0] == f"started: {describe_config(run.config)} · cpu"
    assert texts[1] == EPOCH_LINE
    assert texts[2:6] == closing_lines(run) and len(texts) == 8
    assert texts[6] == f"resumed after epoch 2: {describe_config(run.config)} · cpu"
    assert texts[7] == "error: diverged"


def test_log_file_names_itself_when_it_cannot_be_written(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "gone", [0.5])
    with pytest.raises(OSError) as caught:
        LogFile().started(run)
    assert caught.value.filename == str(tmp_path / "gone" / "log.txt")
