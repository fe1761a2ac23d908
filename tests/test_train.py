"""The standard trainer in process, on tiny generated data: learning, files, determinism, resume, failures."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from cnnkit.checkpoint import load_weights
from cnnkit.config import TrainConfig, resolve_config
from cnnkit.errors import DivergedError, InterruptedRun, UsageError
from cnnkit.protocols import DatasetSplits, ImageTensors
from cnnkit.training.context import Run
from cnnkit.training.events import Events, Handler
from cnnkit.training.handlers import METRIC_COLUMNS
from cnnkit.training.run import resume, train

TIMING = {"examples_per_s", "epoch_seconds"}


pytestmark = pytest.mark.usefixtures("one_thread")


def quadrants(n: int, seed: int, size: int = 16, classes: int = 4) -> ImageTensors:
    """Noisy images whose class is the quadrant that is bright: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.rand(n, 1, size, size, generator=generator) * 90
    half = size // 2
    for c in range(classes):
        row, col = divmod(c, 2)
        images[labels == c, :, row * half : (row + 1) * half, col * half : (col + 1) * half] += 140
    return ImageTensors(images.clamp(0, 255).to(torch.uint8), labels)


def tiny_splits(train: int = 192, test: int = 64) -> DatasetSplits:
    return DatasetSplits(
        "tiny", quadrants(train, 0), quadrants(test, 1), ("nw", "ne", "sw", "se"), Path("."), (0.45,), (0.3,),
        split_files={"train": [f"nw/{i}.png" for i in range(train)], "test": [f"se/{i}.png" for i in range(test)]},
    )


def tiny_config(tmp_path: Path, name: str = "run", **overrides: Any) -> TrainConfig:
    values = {"model": "lenet_bn", "input_size": 16, "epochs": 3, "batch_size": 32, "out": str(tmp_path / name),
              "quiet": True, "device": "cpu", **overrides}  # fmt: skip
    return resolve_config(overrides=values)


def fit(config: TrainConfig, handlers: list[tuple[Events, Handler]] | None = None, again: bool = False) -> Any:
    """One run of the driver on the tiny splits; ``again`` resumes ``config.out`` up to ``config.epochs``."""
    if again:
        return resume(config.out or "", {"epochs": config.epochs, "quiet": config.quiet}, data=tiny_splits(),
                      handlers=handlers or [])  # fmt: skip
    return train(config, data=tiny_splits(), handlers=handlers or [])


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


@pytest.mark.slow
def test_loss_falls_and_accuracy_rises_on_learnable_data(tmp_path: Path) -> None:
    result = fit(tiny_config(tmp_path, epochs=4))
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < 0.5 * first["train_loss"]
    assert last["train_acc"] > first["train_acc"]
    assert last["val_acc"] >= 0.95  # chance is 0.25
    assert result.run_dir.joinpath("test.json").is_file()


@pytest.mark.slow
def test_d2l_recipe_also_learns(tmp_path: Path) -> None:
    result = fit(tiny_config(tmp_path, recipe="d2l", epochs=4, lr=0.5))
    assert result.history[-1]["val_acc"] >= 0.9


def test_run_directory_holds_every_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path, quiet=False)
    result = fit(config)
    folder = Path(config.out or "")
    assert result.run_dir == folder

    with open(folder / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    columns = [c for c in METRIC_COLUMNS if not c.startswith("test_")]  # test is measured once, at the end
    assert all(list(r) == columns and all(r[k] != "" for k in columns) for r in rows)
    assert float(rows[-1]["val_acc"]) == pytest.approx(result.history[-1]["val_acc"], abs=1e-5)

    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((folder / "config.json").read_text())
    assert record["config"]["model"] == "lenet_bn" and record["config"]["epochs"] == 3
    assert record["environment"]["torch"] == torch.__version__ and record["environment"]["device"] == "cpu"
    assert len((folder / "log.txt").read_text().splitlines()) >= 5
    assert (folder / "split_train.txt").read_text().splitlines()[:2] == ["nw/0.png", "nw/1.png"]
    assert len((folder / "split_test.txt").read_text().splitlines()) == 64
    val = (folder / "split_val.txt").read_text().splitlines()
    assert val and set(val).isdisjoint((folder / "split_train.txt").read_text().splitlines())
    report = json.loads((folder / "test.json").read_text())
    assert report["final"]["epoch"] == 3 and report["best"]["epoch"] == result.best_epoch
    assert 0 <= report["best"]["test_acc"] <= 1 and sum(c["support"] for c in report["final"]["per_class"].values()) == 64

    model, meta = load_weights(folder / "best.safetensors")
    assert meta.epoch == result.best_epoch and meta.metrics["val_acc"] == pytest.approx(result.best_acc)
    assert meta.mean == [0.45] and meta.input_size == 16 and meta.classes == ["nw", "ne", "sw", "se"]
    _, last = load_weights(folder / "last.safetensors")
    assert last.epoch == 3

    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("epoch ") for line in out) == 3  # plain lines: stdout is not a terminal
    last_row = result.history[-1]
    final_test = report["final"]["test_acc"]
    d2l_line = f"loss {last_row['train_loss']:.3f}, train acc {last_row['train_acc']:.3f}, test acc {final_test:.3f}"
    assert d2l_line in out
    assert out[out.index(d2l_line) + 1].endswith("examples/sec on cpu")


def test_quiet_prints_only_the_closing_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fit(tiny_config(tmp_path, epochs=1))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and out[0].startswith("loss ") and out[1].endswith("examples/sec on cpu")
    assert out[2].startswith("best epoch 1 by val acc: val acc ") and out[3].startswith("run ")


@pytest.mark.slow
def test_best_and_patience_follow_val_and_test_labels_change_nothing(tmp_path: Path) -> None:
    """Scrambling the test labels changes no checkpoint and no stopping decision: test chooses nothing."""
    options = {"epochs": 6, "patience": 1, "deterministic": True, "lr": 0.5}
    honest = fit(tiny_config(tmp_path, "honest", **options))
    scrambled = tiny_splits()
    scrambled.test.labels = (scrambled.test.labels + 1) % 4
    other = train(tiny_config(tmp_path, "scrambled", **options), data=scrambled)
    assert (other.best_epoch, len(other.history), other.stopped_early) == (
        honest.best_epoch, len(honest.history), honest.stopped_early)  # fmt: skip
    assert [r["val_acc"] for r in other.history] == [r["val_acc"] for r in honest.history]
    best = max(range(len(honest.history)), key=lambda i: honest.history[i]["val_acc"]) + 1
    assert honest.best_epoch == best  # the first epoch of the highest val accuracy
    a = json.loads((honest.run_dir / "test.json").read_text())
    b = json.loads((other.run_dir / "test.json").read_text())
    assert a["best"]["epoch"] == b["best"]["epoch"] and a["best"]["test_acc"] != b["best"]["test_acc"]


@pytest.mark.slow
def test_monitoring_val_loss_picks_the_lowest_val_loss(tmp_path: Path) -> None:
    result = fit(tiny_config(tmp_path, epochs=4, monitor="val_loss", lr=0.5))
    losses = [r["val_loss"] for r in result.history]
    assert result.best_epoch == losses.index(min(losses)) + 1


def test_no_validation_means_no_best_and_no_patience(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = fit(tiny_config(tmp_path, epochs=2, val_fraction=0, quiet=False))
    assert result.best_epoch == 0 and not (result.run_dir / "best.safetensors").exists()
    assert "val_acc" not in result.history[-1]
    assert any(line.startswith("no validation split, so no best epoch") for line in capsys.readouterr().out.splitlines())
    with pytest.raises(UsageError, match="--patience 2 stops on the validation split, and this run has none"):
        fit(tiny_config(tmp_path, "p", epochs=2, val_fraction=0, patience=2))


def test_test_every_epoch_adds_test_columns_that_choose_nothing(tmp_path: Path) -> None:
    result = fit(tiny_config(tmp_path, epochs=2, test_every_epoch=True))
    assert {"val_acc", "test_acc"} <= set(result.history[-1])
    header = (result.run_dir / "metrics.csv").read_text().splitlines()[0]
    assert header.split(",")[:7] == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"]


@pytest.mark.slow
def test_two_deterministic_runs_are_identical(tmp_path: Path) -> None:
    # Dropout (vgg's classifier would need more time) is covered by the seeded global generator;
    # here AdamW, augmentation and BatchNorm all take part.
    options = {"deterministic": True, "augment": True, "optimizer": "adamw", "lr": 0.01}
    first = fit(tiny_config(tmp_path, "a", **options))
    second = fit(tiny_config(tmp_path, "b", **options))
    assert without_timing(first.history) == without_timing(second.history)
    a, b = load_file(tmp_path / "a" / "last.safetensors"), load_file(tmp_path / "b" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


@pytest.mark.slow
def test_resume_from_an_epoch_boundary_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    options = {"deterministic": True, "epochs": 4, "schedule": "cosine", "warmup": 1.0}
    whole = fit(tiny_config(tmp_path, "whole", **options))

    def stop_after_two(run: Run) -> None:
        if run.epoch == 2:
            raise KeyboardInterrupt

    config = tiny_config(tmp_path, "split", **options)
    with pytest.raises(InterruptedRun, match="--resume") as caught:
        fit(config, [(Events.EPOCH_COMPLETED, stop_after_two)])
    assert "holds epoch 2" in caught.value.format_message()
    _, meta = load_weights(tmp_path / "split" / "last.safetensors")  # last is a completed epoch, labelled so
    assert meta.epoch == 2 and meta.metrics["epoch"] == 2

    resumed = fit(config, again=True)
    assert [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]
    assert without_timing(resumed.history) == without_timing(whole.history)
    a, b = load_file(tmp_path / "whole" / "last.safetensors"), load_file(tmp_path / "split" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 5  # header + all four epochs, across the interruption


def test_resume_needs_more_epochs(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, epochs=1)
    fit(config)
    with pytest.raises(UsageError, match="--epochs N with N > 1"):
        fit(config, again=True)
    extended = fit(config.model_copy(update={"epochs": 2}), again=True)
    assert [row["epoch"] for row in extended.history] == [1, 2]


def test_non_finite_loss_stops_with_diverged_and_keeps_best(tmp_path: Path) -> None:
    def poison(run: Run) -> None:
        # After epoch 1 (best saved), make every later forward pass produce NaN.
        if run.epoch == 1:
            with torch.no_grad():
                next(run.model.parameters()).fill_(float("nan"))

    config = tiny_config(tmp_path)
    best = Path(config.out or "") / "best.safetensors"
    with pytest.raises(DivergedError) as caught:
        fit(config, [(Events.EPOCH_COMPLETED, poison)])
    message = caught.value.format_message()
    assert "epoch 2, step 1" in message and "lr " in message and "\n" not in message
    _, meta = load_weights(best)
    assert meta.epoch == 1 and meta.metrics["val_acc"] > 0
    assert "error: loss became nan" in (Path(config.out or "") / "log.txt").read_text()


def test_huge_learning_rate_diverges(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, model="lenet", recipe="d2l", lr=1e38)
    with pytest.raises(DivergedError, match="epoch 1, step"):
        fit(config)
    assert not Path(config.out or "").exists()  # nothing was saved, so no empty run directory is left


@pytest.mark.slow
def test_patience_stops_early(tmp_path: Path) -> None:
    result = fit(tiny_config(tmp_path, epochs=30, patience=2))
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 2 < 30
