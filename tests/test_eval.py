"""``evaluate`` and ``cnnkit eval``: metrics counted right, recorded accuracy reproduced, clear mismatches."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.checkpoint import WeightsMeta, save_weights
from cnnkit.cli.app import app
from cnnkit.errors import DataError, WeightsError
from cnnkit.evaluate import evaluate
from cnnkit.protocols import DatasetSplits, ImageTensors
from cnnkit.registry import MODELS

# -- evaluate() on a model whose answers are known -------------------------------------------------


class Lookup(nn.Module):
    """Returns the logits row stored for each input id (inputs are (N, 1) ids)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids[:, 0]]


def test_counts_loss_accuracy_and_per_class_scores() -> None:
    # Three classes; predictions 0,0,1,1,2,0 against truths 0,1,1,1,2,2.
    predicted = torch.tensor([0, 0, 1, 1, 2, 0])
    labels = torch.tensor([0, 1, 1, 1, 2, 2])
    logits = F.one_hot(predicted, 3).float() * 2.0
    ids = torch.arange(6)[:, None]
    batches = [(ids[:4], labels[:4]), (ids[4:], labels[4:])]
    model = Lookup(logits)
    model.train()

    result = evaluate(model, batches, num_classes=3)

    assert model.training  # mode restored
    assert result.confusion.tolist() == [[1, 0, 0], [1, 2, 0], [1, 0, 1]]
    assert result.examples == 6 and result.support == [1, 3, 2]
    assert result.top1 == pytest.approx(4 / 6)
    assert result.top5 is None  # 3 classes: top-5 would be meaningless
    assert result.loss == pytest.approx(F.cross_entropy(logits, labels).item())
    assert result.precision == pytest.approx([1 / 3, 1.0, 1.0])
    assert result.recall == pytest.approx([1.0, 2 / 3, 1 / 2])
    assert result.f1 == pytest.approx([0.5, 0.8, 2 / 3])
    summary = result.to_dict(["a", "b", "c"])
    assert summary["per_class"][1] == {"class": "b", "precision": 1.0, "recall": pytest.approx(2 / 3),
                                       "f1": pytest.approx(0.8), "support": 3}  # fmt: skip
    json.dumps(summary)  # JSON-ready


def test_top5_counts_the_label_among_the_five_best() -> None:
    # Seven classes; the true class ranks 1st, 5th and 6th.
    logits = torch.tensor([[7, 6, 5, 4, 3, 2, 1], [7, 6, 5, 4, 3, 2, 1], [7, 6, 5, 4, 3, 2, 1]]).float()
    labels = torch.tensor([0, 4, 5])
    result = evaluate(Lookup(logits), [(torch.arange(3)[:, None], labels)], num_classes=7)
    assert result.top1 == pytest.approx(1 / 3)
    assert result.top5 == pytest.approx(2 / 3)


def test_labels_outside_the_model_classes_are_a_data_error() -> None:
    logits = torch.zeros(2, 3)
    with pytest.raises(DataError, match=r"1 labels lie outside 0\.\.2"):
        evaluate(Lookup(logits), [(torch.arange(2)[:, None], torch.tensor([0, 3]))], num_classes=3)
    with pytest.raises(DataError, match="no examples"):
        evaluate(Lookup(logits), [], num_classes=3)
    with pytest.raises(WeightsError, match=r"outputs shape \(2, 3\), expected \(batch, 4\)"):
        evaluate(Lookup(logits), [(torch.arange(2)[:, None], torch.tensor([0, 1]))], num_classes=4)


# -- cnnkit eval on a tiny generated dataset --------------------------------------------------------

CLASSES = ("top-left", "top-right", "bottom-left", "bottom-right")


def tiny_split(n: int, seed: int, channels: int = 1) -> ImageTensors:
    """Each image is noise with one bright quadrant: the quadrant is the class."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 120, (n, channels, 28, 28), generator=gen, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, :, row * 14 : row * 14 + 14, col * 14 : col * 14 + 14] += 120
    return ImageTensors(images, labels)


def tiny_dataset(channels: int = 1, name: str = "tiny") -> DatasetSplits:
    return DatasetSplits(
        name=name, train=tiny_split(64, 1, channels), test=tiny_split(36, 2, channels), classes=CLASSES,
        source=Path("/nowhere"), mean=(0.4,) * channels, std=(0.25,) * channels,
    )  # fmt: skip


def train_tiny_run(run_dir: Path, data: DatasetSplits) -> float:
    """Train lenet_bn a few steps in a plain loop, save best.safetensors with its test accuracy."""
    torch.manual_seed(0)
    model = MODELS.get("lenet_bn").build(data.channels, len(data.classes))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = data.train.images.float() / 255, data.train.labels
    for step in range(6):
        batch = slice((step % 4) * 16, (step % 4) * 16 + 16)
        optimiser.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        predicted = model(data.test.images.float() / 255).argmax(1)
    test_acc = (predicted == data.test.labels).sum().item() / len(data.test)
    meta = WeightsMeta(
        model="lenet_bn", in_channels=data.channels, num_classes=len(data.classes), input_size=28,
        classes=list(data.classes), dataset="tiny", dataset_options={"seed": 7}, epoch=1,
        metrics={"test_acc": test_acc},
    )  # fmt: skip  (mean/std None: the d2l recipe only scales to 0..1, as the loop above does)
    save_weights(run_dir / "best.safetensors", model, meta)
    return test_acc


@pytest.fixture
def fake_datasets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, dict[str, Any]]]:
    """Serve tiny datasets through cnnkit.data.load_dataset; records every call."""
    calls: list[tuple[str, Any, dict[str, Any]]] = []

    def load_dataset(name: str, data: Any = None, *, input_size: int | None = None, **options: Any) -> DatasetSplits:
        assert input_size is not None  # eval asks for the weights' input size (image folders decode at it)
        calls.append((name, data, options))
        return tiny_dataset(3 if name == "tiny-rgb" else 1, name)

    import cnnkit.data

    monkeypatch.setattr(cnnkit.data, "load_dataset", load_dataset, raising=False)
    return calls


@pytest.mark.slow
def test_eval_reproduces_the_recorded_test_accuracy(
    tmp_path: Path, runner: Any, fake_datasets: list[Any]
) -> None:
    pytest.importorskip("cnnkit.data.batches", reason="BatchLoader (cnnkit/data/batches.py) not written yet")
    run = tmp_path / "run"
    recorded = train_tiny_run(run, tiny_dataset())
    assert 0.3 < recorded < 1.0  # neither chance nor perfect: a preprocessing slip would show

    result = runner.invoke(app, ["eval", str(run), "--format", "json", "--device", "cpu", "--batch-size", "10"])

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["top1"] == recorded == report["recorded"]["test_acc"]
    assert report["examples"] == 36 and report["top5"] is None
    # The dataset and its options came from the weights' metadata alone.
    assert fake_datasets == [("tiny", None, {"seed": 7})]
    # The confusion matrix lands in the run directory, named by class.
    with open(run / "confusion_test.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == list(CLASSES)
    assert [r[0] for r in rows[1:]] == list(CLASSES)
    counts = [[int(v) for v in r[1:]] for r in rows[1:]]
    assert counts == report["confusion"]
    assert sum(counts[i][i] for i in range(4)) == round(recorded * 36)


@pytest.mark.slow
def test_eval_table_plot_out_and_overrides(tmp_path: Path, runner: Any, fake_datasets: list[Any]) -> None:
    pytest.importorskip("cnnkit.data.batches", reason="BatchLoader (cnnkit/data/batches.py) not written yet")
    run = tmp_path / "run"
    train_tiny_run(run, tiny_dataset())
    out = tmp_path / "report"
    data = tmp_path / "data"

    result = runner.invoke(
        app, ["eval", str(run / "best.safetensors"), "--plot", "--out", str(out), "--data", str(data),
              "-d", "seed=9", "--split", "train", "--device", "cpu"],
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert "top-1" in result.stdout and "bottom-right" in result.stdout and "64 examples" in result.stdout
    assert fake_datasets == [("tiny", data, {"seed": "9"})]
    assert (out / "confusion_train.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "confusion_train.csv").is_file()
    assert not (run / "confusion_train.csv").exists()


@pytest.mark.slow
def test_eval_weights_that_do_not_fit_the_dataset_exit_4(
    tmp_path: Path, runner: Any, fake_datasets: list[Any]
) -> None:
    run = tmp_path / "run"
    train_tiny_run(run, tiny_dataset())  # 1 channel, 4 classes
    result = runner.invoke(app, ["eval", str(run), "--dataset", "tiny-rgb", "--device", "cpu"])
    assert result.exit_code == 4, result.output
    assert result.stderr.strip() == (
        f"cnnkit: error: weights {run / 'best.safetensors'} expect 1 channel and 4 classes; "
        "tiny-rgb has 3 channels and 4 classes; they were trained on tiny"
    )
    # Another dataset starts from its own default options, not the recorded ones.
    assert fake_datasets == [("tiny-rgb", None, {})]


def test_eval_without_a_recorded_dataset_asks_for_one(tmp_path: Path, runner: Any) -> None:
    meta = WeightsMeta(model="lenet", in_channels=1, num_classes=4, input_size=28, classes=list(CLASSES))
    save_weights(tmp_path / "w.safetensors", MODELS.get("lenet").build(1, 4), meta)
    result = runner.invoke(app, ["eval", str(tmp_path / "w.safetensors"), "--device", "cpu"])
    assert result.exit_code == 2
    assert "do not record the dataset they were trained on; pass --dataset" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_eval_bad_weights_exit_4(tmp_path: Path, runner: Any) -> None:
    (tmp_path / "empty-run").mkdir()
    result = runner.invoke(app, ["eval", str(tmp_path / "empty-run")])
    assert result.exit_code == 4
    assert "holds neither best.safetensors nor last.safetensors" in result.stderr
