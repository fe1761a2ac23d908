"""``cnnkit export`` (standalone and float16 files) and ``cnnkit predict`` (image files in, classes out)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from cnnkit.checkpoint import WeightsMeta, load_weights, read_meta, save_weights
from cnnkit.cli.app import app
from cnnkit.registry import MODELS

CLASSES = ["zero", "one", "two", "three", "four", "five", "six"]


def make_run(folder: Path, channels: int = 1, normalise: bool = True) -> tuple[torch.nn.Module, WeightsMeta]:
    """A lenet_bn with non-trivial BatchNorm statistics saved as ``folder/best.safetensors``."""
    torch.manual_seed(0)
    model = MODELS.get("lenet_bn").build(channels, len(CLASSES))
    model.train()
    with torch.no_grad():
        model(torch.rand(16, channels, 28, 28) * 2)
    model.eval()
    meta = WeightsMeta(
        model="lenet_bn", in_channels=channels, num_classes=len(CLASSES), input_size=28, classes=CLASSES,
        dataset="fashion-mnist", mean=[0.3] * channels if normalise else None,
        std=[0.35] * channels if normalise else None, epoch=4, metrics={"test_acc": 0.5},
    )  # fmt: skip
    save_weights(folder / "best.safetensors", model, meta)
    return model, meta


# -- export -----------------------------------------------------------------------------------------


def test_export_round_trip(tmp_path: Path, runner: Any) -> None:
    model, meta = make_run(tmp_path / "run")
    out = tmp_path / "exported" / "model.safetensors"
    out.parent.mkdir()  # export never makes up folders for --out (see test_faults)

    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    loaded, loaded_meta = load_weights(out)
    assert loaded_meta == meta
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))


def test_export_half_stores_float16_and_loads_as_float32(tmp_path: Path, runner: Any) -> None:
    model, meta = make_run(tmp_path / "run")
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    assert runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(full)]).exit_code == 0

    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(half), "--half"])

    assert result.exit_code == 0, result.output
    with safe_open(str(half), framework="pt") as handle:
        assert handle.get_tensor("0.weight").dtype == torch.float16
        assert handle.get_tensor("1.num_batches_tracked").dtype == torch.int64  # integers stay integers
    assert read_meta(half).weights_dtype == "float16"
    assert read_meta(half).model_copy(update={"weights_dtype": "float32"}) == meta
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = load_weights(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), atol=2e-2, rtol=2e-2)


def test_export_refuses_to_overwrite_without_force(tmp_path: Path, runner: Any) -> None:
    make_run(tmp_path / "run")
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"precious")

    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(out)])

    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"cnnkit: error: {out} already exists; pass --force to overwrite it or choose another --out"
    )
    assert out.read_bytes() == b"precious"
    assert runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(out), "--force"]).exit_code == 0
    assert read_meta(out).model == "lenet_bn"


def test_export_wants_a_safetensors_name(tmp_path: Path, runner: Any) -> None:
    make_run(tmp_path / "run")
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "model.pt")])
    assert result.exit_code == 2
    assert "must end in .safetensors" in result.stderr
    assert not (tmp_path / "model.pt").exists()


# -- predict ----------------------------------------------------------------------------------------


def write_png(path: Path, pixels: torch.Tensor) -> Path:
    """Save a uint8 (H, W) or (H, W, 3) tensor as a PNG."""
    Image.fromarray(pixels.numpy()).save(path)
    return path


def expected_probabilities(model: torch.nn.Module, images: torch.Tensor, meta: WeightsMeta) -> torch.Tensor:
    x = images.float() / 255
    if meta.mean is not None and meta.std is not None:
        x = (x - meta.mean[0]) / meta.std[0]
    with torch.no_grad():
        return model(x).softmax(1)


def test_predict_matches_the_model_on_the_same_pixels(tmp_path: Path, runner: Any) -> None:
    model, meta = make_run(tmp_path / "run")
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (2, 28, 28), generator=gen, dtype=torch.uint8)
    files = [write_png(tmp_path / f"img{i}.png", pixels[i]) for i in range(2)]

    result = runner.invoke(app, ["predict", str(tmp_path / "run"), *map(str, files), "--top", "3", "-f", "json"])

    assert result.exit_code == 0, result.output
    predictions = json.loads(result.stdout)
    expected = expected_probabilities(model, pixels[:, None], meta)
    for prediction, file, probs in zip(predictions, files, expected, strict=True):
        assert prediction["image"] == str(file)
        best = probs.topk(3)
        assert [t["class"] for t in prediction["top"]] == [CLASSES[i] for i in best.indices.tolist()]
        assert [t["probability"] for t in prediction["top"]] == pytest.approx(best.values.tolist(), abs=1e-5)


def test_predict_converts_colour_and_resizes(tmp_path: Path, runner: Any) -> None:
    model, meta = make_run(tmp_path / "run", normalise=False)
    # A flat grey RGB image of another size is the same flat grey 28 px grayscale image.
    grey = write_png(tmp_path / "grey.png", torch.full((40, 52, 3), 150, dtype=torch.uint8))

    result = runner.invoke(app, ["predict", str(tmp_path / "run" / "best.safetensors"), str(grey), "--top", "99",
                                 "--format", "json"])  # fmt: skip

    assert result.exit_code == 0, result.output
    (prediction,) = json.loads(result.stdout)
    assert len(prediction["top"]) == len(CLASSES)  # --top beyond the class count shows them all
    expected = expected_probabilities(model, torch.full((1, 1, 28, 28), 150, dtype=torch.uint8), meta)[0]
    got = {t["class"]: t["probability"] for t in prediction["top"]}
    assert [got[c] for c in CLASSES] == pytest.approx(expected.tolist(), abs=1e-5)


def test_predict_table_output(tmp_path: Path, runner: Any) -> None:
    make_run(tmp_path / "run")
    image = write_png(tmp_path / "a.png", torch.zeros(28, 28, dtype=torch.uint8))
    result = runner.invoke(app, ["predict", str(tmp_path / "run"), str(image), "-k", "2"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == str(image) and len(lines) == 3
    assert all(line.rstrip().endswith("%") for line in lines[1:])


@pytest.mark.parametrize("kind", ["not an image", "empty", "truncated"])
def test_predict_unreadable_image_is_skipped_and_alone_exits_3(tmp_path: Path, runner: Any, kind: str) -> None:
    make_run(tmp_path / "run")
    good = write_png(tmp_path / "good.png", torch.zeros(28, 28, dtype=torch.uint8))
    bad = tmp_path / "bad.png"
    if kind == "not an image":
        bad.write_text("hello")
    elif kind == "empty":
        bad.write_bytes(b"")
    else:
        write_png(bad, torch.randint(0, 256, (64, 64), dtype=torch.uint8))
        bad.write_bytes(bad.read_bytes()[:200])

    result = runner.invoke(app, ["predict", str(tmp_path / "run"), str(good), str(bad)])

    assert result.exit_code == 0, result.output  # listed, not fatal (tests/test_predict_folders.py has more)
    assert result.stdout.splitlines()[0] == str(good) and str(bad) not in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"cnnkit: warning: skipped {bad}: ")

    result = runner.invoke(app, ["predict", str(tmp_path / "run"), str(bad)])

    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    expected = f"cnnkit: error: {bad} is empty" if kind == "empty" else f"cnnkit: error: image {bad} cannot be read"
    assert len(lines) == 1 and lines[0].startswith(expected)


def test_predict_missing_file_exits_2_naming_it(tmp_path: Path, runner: Any) -> None:
    make_run(tmp_path / "run")
    good = write_png(tmp_path / "good.png", torch.zeros(28, 28, dtype=torch.uint8))
    result = runner.invoke(app, ["predict", str(tmp_path / "run"), str(good), str(tmp_path / "gone.png")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"cnnkit: error: {tmp_path / 'gone.png'}: no such file or folder; pass image files, folders or glob patterns"
    )


def test_predict_with_bad_weights_exits_4(tmp_path: Path, runner: Any) -> None:
    image = write_png(tmp_path / "a.png", torch.zeros(28, 28, dtype=torch.uint8))
    (tmp_path / "w.safetensors").write_bytes(b"")
    result = runner.invoke(app, ["predict", str(tmp_path / "w.safetensors"), str(image)])
    assert result.exit_code == 4
    assert "is empty" in result.stderr
