"""Every prediction listed: ``evaluate(keep_examples=True)``, ``predictions_<split>.csv`` and the
``worst_<split>.png`` gallery of ``cnnkit eval --plot``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cnnkit.checkpoint import load_weights
from cnnkit.cli.app import app
from cnnkit.evaluate import ExampleScores, evaluate
from cnnkit.protocols import DatasetSplits
from cnnkit.reports import PREDICTION_COLUMNS, plot_worst, worst_examples, write_predictions_csv
from tests.test_eval import CLASSES, Lookup, tiny_dataset, tiny_split, train_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    return header, rows


# -- evaluate(keep_examples=True) -------------------------------------------------------------------


def test_keep_examples_returns_every_example_in_order() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 7, generator=gen) * 3
    labels = torch.randint(0, 7, (10,), generator=gen)
    ids = torch.arange(10)[:, None]
    batches = [(ids[:4], labels[:4]), (ids[4:9], labels[4:9]), (ids[9:], labels[9:])]

    plain = evaluate(Lookup(logits), batches, num_classes=7)
    result = evaluate(Lookup(logits), batches, num_classes=7, keep_examples=True)

    assert plain.per_example is None  # training's evaluation keeps nothing per example
    scores = result.per_example
    assert scores is not None and len(scores) == 10
    probabilities = logits.softmax(dim=1)
    assert scores.labels.tolist() == labels.tolist()
    assert scores.predicted.tolist() == logits.argmax(dim=1).tolist()
    assert scores.probability == pytest.approx(probabilities.max(dim=1).values, abs=1e-6)
    assert scores.true_probability == pytest.approx(probabilities[torch.arange(10), labels], abs=1e-6)
    assert scores.loss == pytest.approx(F.cross_entropy(logits, labels, reduction="none"), abs=1e-5)
    assert float(scores.loss.double().mean()) == pytest.approx(result.loss, abs=1e-6)
    # The summary figures are those of the plain evaluation.
    assert result.loss == pytest.approx(plain.loss, abs=1e-6)
    assert result.confusion.equal(plain.confusion) and result.top1 == plain.top1 and result.top5 == plain.top5


# -- worst_examples and the gallery -----------------------------------------------------------------


def scores_with_losses(losses: list[float], k: int = 3) -> ExampleScores:
    n = len(losses)
    loss = torch.tensor(losses)
    return ExampleScores(
        labels=torch.arange(n) % k, predicted=(torch.arange(n) + 1) % k, probability=torch.full((n,), 0.5),
        true_probability=(-loss).exp(), loss=loss,
    )  # fmt: skip


def test_worst_examples_are_the_highest_losses_worst_first() -> None:
    scores = scores_with_losses([0.1, 2.5, 0.7, 2.5, 9.0, 0.0, 1.2])
    assert worst_examples(scores, 3).tolist() == [4, 1, 3]  # ties: the earlier example first
    assert worst_examples(scores).tolist() == [4, 1, 3, 6, 2, 0, 5]  # fewer than 16: all of them
    assert worst_examples(scores, 0).tolist() == []
    many = scores_with_losses([float(i % 23) for i in range(40)])
    chosen = worst_examples(many)
    assert len(chosen) == 16
    assert sorted(many.loss[chosen].tolist(), reverse=True) == many.loss[chosen].tolist()
    assert float(many.loss[chosen].min()) >= float(many.loss[~torch.isin(torch.arange(40), chosen)].max())


@pytest.mark.parametrize("channels", [1, 3])
def test_plot_worst_draws_the_chosen_examples(tmp_path: Path, channels: int) -> None:
    scores = scores_with_losses([float(i) for i in range(20)])
    images = torch.randint(0, 256, (20, channels, 12, 10), dtype=torch.uint8)
    path = tmp_path / "worst.png"
    shown = plot_worst(path, images, scores, ["a", "b", "c"], count=5, title="lenet on tiny (test)")
    assert shown.tolist() == [19, 18, 17, 16, 15]
    assert path.read_bytes()[:8] == PNG
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temp file left
    with pytest.raises(ValueError, match="19 images for 20 examples"):
        plot_worst(path, images[:19], scores, ["a", "b", "c"])


def test_predictions_csv_names_files_or_indices(tmp_path: Path) -> None:
    scores = scores_with_losses([0.5, 1.5])
    write_predictions_csv(tmp_path / "p.csv", scores, ["a", "b", "c"])
    header, rows = read_rows(tmp_path / "p.csv")
    assert header == ["index", *PREDICTION_COLUMNS]
    assert [r[:3] for r in rows] == [["0", "a", "b"], ["1", "b", "c"]]
    write_predictions_csv(tmp_path / "p.csv", scores, ["a", "b", "c"], files=["x/1.png", "y/2.png"])
    header, rows = read_rows(tmp_path / "p.csv")
    assert header[0] == "file" and [r[0] for r in rows] == ["x/1.png", "y/2.png"]
    with pytest.raises(ValueError, match="1 file names for 2 examples"):
        write_predictions_csv(tmp_path / "p.csv", scores, ["a", "b", "c"], files=["x/1.png"])


# -- cnnkit eval ------------------------------------------------------------------------------------


def with_val(data: DatasetSplits) -> DatasetSplits:
    data.val = tiny_split(20, 3, data.channels)
    return data


@pytest.fixture
def fake_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve the tiny dataset (with a val split) through cnnkit.data.load_dataset."""
    import cnnkit.data

    monkeypatch.setattr(cnnkit.data, "load_dataset", lambda name, data=None, **options: with_val(tiny_dataset()))


def direct_forward(weights: Path, images: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities of the saved model on uint8 images (28 px, scaled to 0..1 as trained)."""
    model, _ = load_weights(weights)
    model.eval()
    with torch.no_grad():
        return model(images.float() / 255).softmax(dim=1)


def check_rows(rows: list[list[str]], probabilities: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]) -> None:
    """Each row agrees with a direct forward pass of the model on that example."""
    assert len(rows) == len(labels)
    for row, p, label in zip(rows, probabilities, labels.tolist(), strict=True):
        _, true, predicted, probability, true_probability, loss = row
        assert true == classes[label]
        assert predicted == classes[int(p.argmax())]
        assert float(probability) == pytest.approx(float(p.max()), abs=1e-5)
        assert float(true_probability) == pytest.approx(float(p[label]), abs=1e-5)
        assert float(loss) == pytest.approx(-float(p[label].log()), abs=1e-4)


@pytest.mark.slow
def test_eval_writes_every_prediction(tmp_path: Path, runner: Any, fake_datasets: None) -> None:
    run = tmp_path / "run"
    train_tiny_run(run, tiny_dataset())

    result = runner.invoke(app, ["eval", str(run), "--format", "json", "--device", "cpu", "--batch-size", "10"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    path = run / "predictions_test.csv"
    assert report["predictions"] == str(path) and str(path) in report["files"]
    header, rows = read_rows(path)
    assert header == ["index", "true", "predicted", "probability", "true_probability", "loss"]
    assert [int(r[0]) for r in rows] == list(range(36)) == list(range(report["examples"]))
    test = tiny_dataset().test
    check_rows(rows, direct_forward(run / "best.safetensors", test.images), test.labels, CLASSES)
    mean_loss = sum(float(r[5]) for r in rows) / len(rows)
    assert mean_loss == pytest.approx(report["loss"], abs=1e-5)
    assert sum(r[1] == r[2] for r in rows) == round(report["top1"] * 36)
    assert not (run / "worst_test.png").exists()  # the gallery comes with --plot


def test_eval_plot_writes_the_worst_gallery_for_the_val_split(tmp_path: Path, runner: Any, fake_datasets: None) -> None:
    run, out = tmp_path / "run", tmp_path / "report"
    train_tiny_run(run, tiny_dataset())

    result = runner.invoke(app, ["eval", str(run), "--split", "val", "--plot", "--out", str(out), "--device", "cpu"])

    assert result.exit_code == 0, result.output
    for name in ("confusion_val.csv", "predictions_val.csv", "confusion_val.png", "worst_val.png"):
        assert f"wrote {out / name}" in result.stdout
    assert (out / "worst_val.png").read_bytes()[:8] == PNG
    _, rows = read_rows(out / "predictions_val.csv")
    val = with_val(tiny_dataset()).val
    assert val is not None
    check_rows(rows, direct_forward(run / "best.safetensors", val.images), val.labels, CLASSES)
    assert not (run / "predictions_val.csv").exists()


def test_eval_on_an_image_folder_lists_the_files(tmp_path: Path, runner: Any) -> None:
    # Class names in the folder's (alphabetical) order, so its labels are the weights' labels.
    classes = tuple(f"{i}-{name}" for i, name in enumerate(CLASSES))
    data = DatasetSplits(
        name="tiny", train=tiny_split(64, 1), test=tiny_split(24, 2), classes=classes, source=tmp_path,
        mean=(0.4,), std=(0.25,),
    )  # fmt: skip
    run, root = tmp_path / "run", tmp_path / "folder"
    train_tiny_run(run, data)
    written: list[str] = []
    for split, part in (("train", data.train), ("test", data.test)):
        for i, (image, label) in enumerate(zip(part.images, part.labels.tolist(), strict=True)):
            path = root / split / classes[label] / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), mode="L").save(path)
            if split == "test":
                written.append(str(Path(split) / classes[label] / path.name))

    result = runner.invoke(
        app, ["eval", str(run), "--dataset", "image-folder", "--data", str(root), "--device", "cpu", "--plot"]
    )

    assert result.exit_code == 0, result.output
    header, rows = read_rows(run / "predictions_test.csv")
    assert header[0] == "file"
    assert sorted(r[0] for r in rows) == sorted(written)
    for row in rows:
        assert Path(row[0]).parent.name == row[1]  # the file's class folder is its true class
    # Each row is that file's own prediction: decode the listed files and run the model on them.
    images = torch.stack([torch.from_numpy(np.array(Image.open(root / r[0])))[None] for r in rows])
    labels = torch.tensor([classes.index(r[1]) for r in rows])
    check_rows(rows, direct_forward(run / "best.safetensors", images), labels, classes)
    assert (run / "worst_test.png").read_bytes()[:8] == PNG
