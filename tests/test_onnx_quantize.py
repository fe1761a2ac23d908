"""``cnnkit export RUN --out FILE.onnx --quantize int8``: a QDQ graph with per-channel int8 weights
(7-bit range), calibrated on the run's own training images through its preprocessing, whose test
top-1 is measured against the float32 graph's; a drop over 1 point warns, or fails with ``--max-drop``.

A randomised LeNet-BN recording a tiny Fashion-MNIST-format folder is quantised once for the fast
tests (its top-1 is near chance, but both graphs' top-1 must still be what ``cnnkit eval``
measures). The slow tests train one for two epochs on that folder (a learnable one: each class is
a bright band): calibrated on its own images it keeps its accuracy, calibrated on black images
it loses it, which warns or, with ``--max-drop``, fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import cnnkit
from cnnkit.checkpoint import read_meta, save_weights
from cnnkit.cli.app import app
from cnnkit.testing import write_fashion_mnist_folder
from tests.test_onnx import make_weights, props_of, skip_without_extra, write_images
from tests.test_onnx_eval import fmnist_weights

pytestmark = pytest.mark.usefixtures("one_thread")
TOP1 = re.compile(r"^top-1 on fashion-mnist test \(80 examples\): float32 (\d\.\d{4}), int8 (\d\.\d{4}) \(([-+]\d+\.\d\d) points\)$", re.M)


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(weights, data folder): a randomised LeNet-BN whose metadata records 320 + 80 images."""
    skip_without_extra()
    root = tmp_path_factory.mktemp("quantize-random")
    data = write_fashion_mnist_folder(root / "fmnist")
    return fmnist_weights(root, data), data


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run directory, data folder) of LeNet-BN trained 2 epochs at 28 px on 320 + 80 images."""
    skip_without_extra()
    root = tmp_path_factory.mktemp("quantize")
    data, out = write_fashion_mnist_folder(root / "fmnist"), root / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CNNKIT_CACHE", str(root / "cache"))
            args = ["train", "lenet_bn", "--data", str(data), "--input-size", "28", "--batch-size", "32",
                    "--device", "cpu", "--epochs", "2", "-q", "--out", str(out)]  # fmt: skip
            assert CliRunner().invoke(app, args).exit_code == 0
    finally:
        torch.set_num_threads(threads)
    return out, data


def quantized(source: Path, out: Path) -> tuple[Path, str]:
    """(the int8 file ``cnnkit export SOURCE --quantize int8`` wrote, what it printed)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CNNKIT_CACHE", str(out.parent / "cache"))
        result = CliRunner().invoke(app, ["export", str(source), "--out", str(out), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    return out, result.stdout


@pytest.fixture(scope="module")
def int8(random_weights: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(the int8 file quantised from the randomised weights, what the export printed)."""
    return quantized(random_weights[0], tmp_path_factory.mktemp("int8") / "lenet_bn-int8.onnx")


def black_images(folder: Path, count: int = 12) -> Path:
    folder.mkdir()
    for i in range(count):
        Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(folder / f"black{i}.png")
    return folder


def eval_top1(runner: Any, target: Path, folder: Path) -> float:
    result = runner.invoke(app, ["eval", str(target), "--out", str(folder), "-f", "json"])
    assert result.exit_code == 0, result.output
    return float(json.loads(result.stdout)["top1"])


def check_printed(printed: str, out: Path, weights: Path, data: Path, runner: Any, folder: Path) -> tuple[float, float]:
    """The lines of an int8 export, and its two top-1 as ``cnnkit eval`` measures the two files."""
    lines = printed.splitlines()
    assert lines[0].startswith(f"wrote {out} (lenet_bn, ONNX opset 18, int8 weights and activations, input batch x 1x28x28")
    assert lines[1].startswith("checked with onnxruntime") and lines[1].endswith("for the float32 graph before quantisation")
    assert lines[2] == (
        f"quantised to int8 (QDQ, per-channel weights), calibrated on 256 training images of fashion-mnist "
        f"({data}) through the run's preprocessing"
    )
    (match,) = TOP1.findall(printed)
    float_top1, int8_top1, points = float(match[0]), float(match[1]), float(match[2])
    # The float32 graph scores what PyTorch scores; the int8 file what `cnnkit eval` measures of it.
    assert float_top1 == pytest.approx(eval_top1(runner, weights, folder / "torch"), abs=1e-4)
    assert int8_top1 == pytest.approx(eval_top1(runner, out, folder / "int8"), abs=1e-4)
    assert points == pytest.approx((int8_top1 - float_top1) * 100, abs=0.01)
    return float_top1, int8_top1


def test_int8_export_prints_both_top1_as_eval_measures_them(
    tmp_path: Path, runner: Any, random_weights: tuple[Path, Path], int8: tuple[Path, str]
) -> None:
    check_printed(int8[1], int8[0], random_weights[0], random_weights[1], runner, tmp_path)


@pytest.mark.slow
def test_a_trained_model_calibrated_on_its_own_images_keeps_its_accuracy(
    tmp_path: Path, runner: Any, run: tuple[Path, Path]
) -> None:
    out, printed = quantized(run[0], tmp_path / "lenet_bn-int8.onnx")
    float_top1, int8_top1 = check_printed(printed, out, run[0], run[1], runner, tmp_path)
    assert float_top1 > 0.5, "the model must have learnt something for the comparison to mean anything"
    # At most one of the 80 test images changes its answer (1.25 points). On a CPU without VNNI,
    # full-range weights changed six (their sums saturate), 7-bit ones one; on 10,000 test images
    # 7-bit ones lose under 0.1 point there (README, int8 export).
    assert round(abs(float_top1 - int8_top1) * 80) <= 1


def test_the_int8_file_is_a_qdq_graph_with_per_channel_int8_weights(tmp_path: Path, int8: tuple[Path, str]) -> None:
    import onnx
    from onnx import numpy_helper

    from cnnkit.onnx_runtime import METADATA_KEYS, QUANTIZATION_KEY

    out, _ = int8
    proto = onnx.load(str(out))
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8
    assert {"Conv", "Gemm"} <= set(ops)  # float operators between the pairs, fused by ONNX Runtime
    initializers = {i.name: i for i in proto.graph.initializer}
    int8_weights = []
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            weight = initializers[node.input[0]]
            if weight.data_type == onnx.TensorProto.INT8 and len(weight.dims) == 4:  # a convolution's
                scale = numpy_helper.to_array(initializers[node.input[1]])
                assert scale.shape == (weight.dims[0],)  # one scale per output channel
                # 7 bits (reduce_range): full-range weights saturate int8 kernels of CPUs without VNNI.
                values = numpy_helper.to_array(weight)
                assert values.min() >= -64 and values.max() <= 64 and abs(values).max() > 32
                int8_weights.append(weight.name)
    assert len(int8_weights) == 2  # LeNet-BN's two convolutions
    assert (proto.graph.input[0].type.tensor_type.elem_type, proto.graph.output[0].type.tensor_type.elem_type) == (
        onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT,
    )  # fmt: skip

    props = props_of(out)
    assert set(METADATA_KEYS) | {QUANTIZATION_KEY} == set(props)
    assert props["exporter"].startswith("torch.export (torch.onnx.export dynamo=True), PyTorch ")  # the float graph's
    assert props["model"] == "lenet_bn" and json.loads(props["classes"])[0] == "T-shirt/top"
    report = json.loads(props[QUANTIZATION_KEY])
    assert report["format"] == "QDQ" and report["calibration_images"] == 256
    assert report["evaluated_on"] == "fashion-mnist test (80 examples)"
    assert 0 < report["int8_top1"] <= 1 and 0 < report["float32_top1"] <= 1


def test_the_int8_file_is_smaller_and_predicts(
    tmp_path: Path, runner: Any, random_weights: tuple[Path, Path], int8: tuple[Path, str]
) -> None:
    out, _ = int8
    # Against the float32 weights (a float32 graph is their size and a little more).
    assert out.stat().st_size < 0.5 * random_weights[0].stat().st_size
    image = write_images(tmp_path, 1, 28, count=1)[0]
    result = runner.invoke(app, ["predict", str(out), str(image), "-k", "3", "-f", "json"])
    assert result.exit_code == 0, result.output
    (prediction,) = json.loads(result.stdout)
    assert len(prediction["top"]) == 3 and sum(t["probability"] for t in prediction["top"]) <= 1 + 1e-6


def test_calibration_batches_are_the_runs_training_images_as_it_fed_them(random_weights: tuple[Path, Path]) -> None:
    from cnnkit.data.batches import BatchLoader
    from cnnkit.onnx_eval import recorded_splits
    from cnnkit.onnx_quantize import calibrate_on_split
    from cnnkit.protocols import ImageTensors

    weights = random_weights[0]
    meta = read_meta(weights)
    splits = recorded_splits(weights, meta)
    assert len(splits.train) == 290 and splits.val is not None and len(splits.val) == 30  # val held out, as in training

    calibration = calibrate_on_split(splits, meta)

    assert calibration.count == 256 and all(batch.shape[1:] == (1, 28, 28) for batch in calibration.batches)
    got = np.concatenate(calibration.batches)
    # The same images through the training pipeline's own loader (normalised by the run's mean/std).
    chosen = torch.from_numpy(np.sort(np.random.default_rng(0).choice(290, 256, replace=False)))
    subset = ImageTensors(splits.train.images[chosen], splits.train.labels[chosen])
    loader = BatchLoader(subset, batch_size=64, image_size=28, mean=meta.mean, std=meta.std, device=torch.device("cpu"))
    expected = torch.cat([images for images, _ in loader]).numpy()
    assert meta.mean is not None and meta.std is not None
    np.testing.assert_allclose(got, expected, atol=1e-5 / min(meta.std), rtol=0)


# -- a drop -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_drop_over_one_point_is_a_warning_and_the_file_is_written(
    tmp_path: Path, runner: Any, run: tuple[Path, Path]
) -> None:
    """Black calibration images give activation ranges real images overflow: the accuracy collapses."""
    out = tmp_path / "bad.onnx"
    folder = black_images(tmp_path / "black")

    result = runner.invoke(
        app, ["export", str(run[0]), "--out", str(out), "--quantize", "int8", "--calibration-data", str(folder)]
    )

    assert result.exit_code == 0, result.output
    assert f"calibrated on 12 images of {folder} through the graph's preprocessing" in result.stdout
    (match,) = TOP1.findall(result.stdout)
    drop = float(match[0]) - float(match[1])
    assert drop > 0.01
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"cnnkit: warning: the int8 graph's top-1 is {drop * 100:.2f} points below the float32")
    assert "more than 1" in line and "--calibration-data" in line and "--max-drop" in line
    assert json.loads(props_of(out)["quantization"])["int8_top1"] == pytest.approx(float(match[1]), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(("max_drop", "code"), [("1", 4), ("100", 0)])
def test_max_drop_makes_a_larger_drop_an_error_that_writes_nothing(
    tmp_path: Path, runner: Any, run: tuple[Path, Path], max_drop: str, code: int
) -> None:
    out = tmp_path / "gate" / "m.onnx"
    out.parent.mkdir()
    folder = black_images(tmp_path / "black")
    args = ["export", str(run[0]), "--out", str(out), "--quantize", "int8", "--calibration-data", str(folder)]

    result = runner.invoke(app, [*args, "--max-drop", max_drop])

    assert result.exit_code == code, result.output
    if code == 4:
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("cnnkit: error: the int8 graph's top-1 on fashion-mnist test (80 examples) is ")
        assert "points below the float32 graph's" in line and f"(--max-drop {max_drop})" in line
        assert f"{out} was not written" in line
        assert list(out.parent.iterdir()) == []  # no temporary file either
    else:
        assert result.stderr == "" and out.is_file()  # within the allowed drop: no warning


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "m.safetensors", "--quantize", "int8"], "--quantize int8 applies to ONNX graphs only"),
        (["--out", "m.onnx", "--calibration-data", "."], "--calibration-data applies to --quantize int8 only"),
        (["--out", "m.onnx", "--max-drop", "1"], "--max-drop applies to --quantize int8 only"),
        (["--out", "m.onnx", "--quantize", "int8", "--max-drop", "-1"], "--max-drop must be >= 0"),
        (["--out", "m.onnx", "--quantize", "int8", "--half"], "--half applies to --format safetensors only"),
        (["--out", "m.onnx", "--quantize", "int4"], "Invalid value for '--quantize'"),
    ],
)
def test_quantize_usage_errors_exit_2(tmp_path: Path, runner: Any, args: list[str], message: str) -> None:
    skip_without_extra()
    _, _, weights = make_weights(tmp_path, "lenet")
    args = [str(tmp_path / a) if a.startswith("m.") else a for a in args]
    result = runner.invoke(app, ["export", str(weights), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.safetensors"]


@pytest.mark.parametrize("case", ["missing", "file", "no-images", "unreadable"])
def test_calibration_data_without_images_exits_3_naming_it(
    tmp_path: Path, runner: Any, random_weights: tuple[Path, Path], case: str
) -> None:
    folder = tmp_path / "calibration"
    named = folder
    if case == "file":
        folder.write_text("not a folder")
    elif case == "no-images":
        folder.mkdir()
        (folder / "notes.txt").write_text("no images here")
    elif case == "unreadable":
        folder.mkdir()
        named = folder / "broken.png"
        named.write_bytes(b"not a png")
    out = tmp_path / "m.onnx"

    result = runner.invoke(
        app, ["export", str(random_weights[0]), "--out", str(out), "--quantize", "int8", "--calibration-data", str(folder)]
    )

    assert result.exit_code == 3, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("cnnkit: error: ") and str(named) in line
    assert not out.exists()


def test_no_data_to_calibrate_with_exits_3_naming_where_it_looked(
    tmp_path: Path, runner: Any, random_weights: tuple[Path, Path], no_default_data: Path
) -> None:
    """Weights whose recorded data folder is gone, outside any run directory, and no default data."""
    meta = read_meta(random_weights[0])
    gone = tmp_path / "moved-away"
    weights = tmp_path / "alone.safetensors"
    save_weights(weights, cnnkit.build_model("lenet_bn", 1, 10), meta.model_copy(update={"data": str(gone)}))
    out = tmp_path / "m.onnx"

    result = runner.invoke(app, ["export", str(weights), "--out", str(out), "--quantize", "int8"])

    assert result.exit_code == 3, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("cnnkit: error: no images to calibrate with: fashion-mnist: no data folder found (looked in ")
    assert str(no_default_data) in line and str(gone) in line and "--calibration-data DIR" in line
    assert not out.exists()


def test_weights_without_a_dataset_calibrate_on_a_folder_and_say_top1_was_not_measured(
    tmp_path: Path, runner: Any
) -> None:
    skip_without_extra()
    _, meta, weights = make_weights(tmp_path, "lenet_bn")  # records no dataset
    out = tmp_path / "m.onnx"

    without = runner.invoke(app, ["export", str(weights), "--out", str(out), "--quantize", "int8"])
    assert without.exit_code == 3, without.output
    assert "does not record the dataset it was trained on" in without.stderr and "--calibration-data DIR" in without.stderr

    images = tmp_path / "images"
    images.mkdir()
    write_images(images, 1, meta.input_size, count=5)
    args = ["export", str(weights), "--out", str(out), "--quantize", "int8", "--calibration-data", str(images)]
    gated = runner.invoke(app, [*args, "--max-drop", "1"])
    assert gated.exit_code == 3, gated.output
    assert "--max-drop needs the test split" in gated.stderr and not out.exists()

    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"calibrated on 5 images of {images}" in result.stdout and "top-1" not in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("cnnkit: warning: the int8 graph's accuracy was not measured: ")
    assert json.loads(props_of(out)["quantization"])["evaluated_on"] is None


def test_weight_bits_other_than_seven_or_eight_is_a_usage_error(tmp_path: Path) -> None:
    from cnnkit.errors import UsageError
    from cnnkit.onnx_quantize import export_int8

    with pytest.raises(UsageError, match="weight_bits must be 7 or 8"):
        export_int8(tmp_path / "run", tmp_path / "out.onnx", weight_bits=6)
    assert not (tmp_path / "out.onnx").exists()
