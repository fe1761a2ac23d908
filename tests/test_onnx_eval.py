"""``cnnkit eval FILE.onnx``: the split the file's metadata records, run in ONNX Runtime, prepared as
the metadata says, reported as ``cnnkit eval`` reports weights; a file that is not such a graph is
exit 4 naming it.

One randomised LeNet-BN whose metadata records a tiny Fashion-MNIST-format folder (and a
validation share carved from its training split) is exported once; its evaluation in ONNX Runtime
is compared with the PyTorch evaluation of the same weights, example by example.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import cnnkit
from cnnkit.checkpoint import WeightsMeta, save_weights
from cnnkit.cli.app import app
from cnnkit.testing import write_fashion_mnist_folder
from tests.test_onnx import randomise, skip_without_extra

pytestmark = pytest.mark.usefixtures("one_thread")
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def fmnist_weights(folder: Path, data: Path, num_classes: int = 10) -> Path:
    """A randomised LeNet-BN at 28 px whose metadata records fashion-mnist in ``data``, with a 10%
    validation share carved from train and mean/std normalisation."""
    model = randomise(cnnkit.build_model("lenet_bn", 1, num_classes))
    meta = WeightsMeta(
        model="lenet_bn", in_channels=1, num_classes=num_classes, input_size=28, classes=FMNIST_CLASSES[:num_classes],
        dataset="fashion-mnist", data=str(data), validation={"from": "train", "fraction": 0.1, "seed": 0},
        mean=[0.4], std=[0.3], epoch=3, metrics={"test_acc": 0.5},
    )  # fmt: skip
    weights = folder / f"lenet_bn-{num_classes}.safetensors"
    save_weights(weights, model, meta)
    return weights


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(weights, their .onnx export in another folder, the data folder of 320 + 80 images)."""
    skip_without_extra()
    root = tmp_path_factory.mktemp("onnx-eval")
    data = write_fashion_mnist_folder(root / "fmnist")
    weights = fmnist_weights(root, data)
    out = root / "exported" / "lenet_bn.onnx"
    out.parent.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CNNKIT_CACHE", str(root / "cache"))
        result = CliRunner().invoke(app, ["export", str(weights), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return weights, out, data


def run_eval(runner: Any, target: Path, folder: Path, *extra: str) -> dict[str, Any]:
    result = runner.invoke(app, ["eval", str(target), "--out", str(folder), "-f", "json", *extra])
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("split", ["test", "val"])
def test_eval_of_the_onnx_file_matches_eval_of_its_weights(
    tmp_path: Path, runner: Any, graph: tuple[Path, Path, Path], split: str
) -> None:
    weights, onnx_file, _ = graph

    from_onnx = run_eval(runner, onnx_file, tmp_path / "onnx", "--split", split)
    from_torch = run_eval(runner, weights, tmp_path / "torch", "--split", split)

    assert from_onnx["runtime"].startswith("onnxruntime ") and "runtime" not in from_torch
    assert from_onnx["weights"] == str(onnx_file) and from_onnx["split"] == split
    assert from_onnx["dataset"] == from_torch["dataset"] == "fashion-mnist"
    assert from_onnx["examples"] == from_torch["examples"] == (80 if split == "test" else 30)
    assert from_onnx["top1"] == from_torch["top1"]
    assert from_onnx["loss"] == pytest.approx(from_torch["loss"], abs=1e-5)
    assert from_onnx["confusion"] == from_torch["confusion"]
    assert from_onnx["recorded"] == {"test_acc": 0.5}
    # Every example: the same true and predicted class, the same probabilities.
    rows_onnx = predictions(tmp_path / "onnx" / f"predictions_{split}.csv")
    rows_torch = predictions(tmp_path / "torch" / f"predictions_{split}.csv")
    assert [(r["true"], r["predicted"]) for r in rows_onnx] == [(r["true"], r["predicted"]) for r in rows_torch]
    assert [float(r["probability"]) for r in rows_onnx] == pytest.approx(
        [float(r["probability"]) for r in rows_torch], abs=1e-5
    )
    assert (tmp_path / "onnx" / f"confusion_{split}.csv").read_text() == (
        tmp_path / "torch" / f"confusion_{split}.csv"
    ).read_text()


def test_eval_table_names_the_runtime_and_writes_beside_the_file(runner: Any, graph: tuple[Path, Path, Path]) -> None:
    _, onnx_file, _ = graph
    result = runner.invoke(app, ["eval", str(onnx_file), "--plot"])
    assert result.exit_code == 0, result.output
    first, second = result.stdout.splitlines()[:2]
    assert first.startswith("lenet_bn on fashion-mnist test (80 examples) from ") and " in onnxruntime " in first
    assert second.startswith("loss ") and "top-1 " in second and "(recorded at epoch 3: 0.5000)" in second
    for name in ("confusion_test.csv", "predictions_test.csv", "confusion_test.png", "worst_test.png"):
        assert (onnx_file.parent / name).is_file()
        assert f"wrote {onnx_file.parent / name}" in result.stdout


def test_eval_onnx_never_builds_the_pytorch_model(
    tmp_path: Path, runner: Any, graph: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import cnnkit.checkpoint
    import cnnkit.evaluate

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the PyTorch model was loaded")

    for module in (cnnkit.checkpoint, cnnkit.evaluate):
        monkeypatch.setattr(module, "load_weights", refuse)
    _, onnx_file, _ = graph
    report = run_eval(runner, onnx_file, tmp_path)
    assert report["examples"] == 80


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def test_running_a_split_needs_no_torch(tmp_path: Path, runner: Any, graph: tuple[Path, Path, Path]) -> None:
    """What eval does with the graph (open it, prepare every batch from the metadata, run, top-1) runs
    with torch made unimportable; only loading the dataset needs torch (see cnnkit.onnx_eval)."""
    _, onnx_file, data = graph
    expected = run_eval(runner, onnx_file, tmp_path)["top1"]
    images = _read_idx(data / "t10k-images-idx3-ubyte.gz")[:, None]
    labels = _read_idx(data / "t10k-labels-idx1-ubyte.gz")
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    code = (
        "import sys; sys.modules['torch'] = None; import numpy as np\n"
        "from cnnkit.onnx_runtime import load_onnx, split_logits, top1\n"
        f"model = load_onnx({str(onnx_file)!r}, device='cpu')\n"
        f"logits = split_logits(model.predictor(), np.load({str(tmp_path / 'images.npy')!r}), batch_size=7)\n"
        f"print(top1(logits, np.load({str(tmp_path / 'labels.npy')!r})), logits.shape)\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch') and sys.modules[m] is not None))"
    )

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ)

    assert proc.returncode == 0, proc.stderr
    measured, imported = proc.stdout.strip().splitlines()
    accuracy, shape = measured.split(" ", 1)
    assert float(accuracy) == expected and shape == "(80, 10)"
    assert imported == "[]"


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["garbage", "empty", "truncated", "safetensors", "foreign", "missing", "folder", "text-file"]
)
def test_eval_of_a_file_that_is_not_an_onnx_graph_exits_4_naming_it(
    tmp_path: Path, runner: Any, graph: tuple[Path, Path, Path], case: str
) -> None:
    import onnx

    weights, good, _ = graph
    bad = tmp_path / ("notes.txt" if case == "text-file" else "bad.onnx")
    if case == "garbage":
        bad.write_bytes(b"\x08\x07garbage" * 40)
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "safetensors":  # PyTorch weights under an .onnx name
        bad.write_bytes(weights.read_bytes())
    elif case == "foreign":  # a valid graph without cnnkit's metadata
        proto = onnx.load(str(good))
        del proto.metadata_props[:]
        onnx.save(proto, str(bad))
    elif case == "folder":
        bad.mkdir()
    elif case == "text-file":
        bad.write_text("not a model\n")

    result = runner.invoke(app, ["eval", str(bad)])

    assert result.exit_code == 4, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("cnnkit: error: ") and str(bad) in line
    assert not list(tmp_path.glob("confusion_*")) and not list(tmp_path.glob("predictions_*"))


def test_eval_onnx_data_errors_are_exit_3(tmp_path: Path, runner: Any, graph: tuple[Path, Path, Path]) -> None:
    _, onnx_file, _ = graph
    missing = tmp_path / "nowhere"
    result = runner.invoke(app, ["eval", str(onnx_file), "--data", str(missing), "--out", str(tmp_path)])
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.strip().splitlines()
    assert str(missing) in line


def test_eval_onnx_on_a_dataset_of_other_classes_is_exit_4(
    tmp_path: Path, runner: Any, graph: tuple[Path, Path, Path]
) -> None:
    """A graph for 5 classes against the 10-class folder its metadata names: the mismatch, named.
    (Written by the TorchScript exporter, in a fraction of the time: only eval is under test.)"""
    from cnnkit.checkpoint import load_weights
    from cnnkit.onnx_export import export_graph, write_graph

    _, _, data = graph
    model, meta = load_weights(fmnist_weights(tmp_path, data, num_classes=5))
    out = tmp_path / "five.onnx"
    write_graph(out, export_graph(model, meta, exporter="torchscript").data)

    result = runner.invoke(app, ["eval", str(out), "--out", str(tmp_path)])

    assert result.exit_code == 4, result.output
    (line,) = result.stderr.strip().splitlines()
    assert str(out) in line and "5 classes" in line and "10 classes" in line
