"""``cnnkit predict`` on folders, globs and mixes of them: batched, with unreadable files listed, not fatal.

The weights are a LeNet-BN with calibrated BatchNorm statistics saved as a run directory's
``best.safetensors`` (as tests/test_export_predict.py makes them: no training loop, a second).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.checkpoint import WeightsMeta, save_weights
from cnnkit.cli import predict as predict_cli
from cnnkit.cli.app import app
from cnnkit.prediction import BATCH_SIZE, Prediction, Predictor, Unreadable, gather_images, predict_batches
from cnnkit.registry import MODELS

CLASSES = ["ant", "bee", "cow", "dog", "elk"]
pytestmark = pytest.mark.usefixtures("one_thread")


def make_run(folder: Path) -> tuple[torch.nn.Module, WeightsMeta]:
    torch.manual_seed(0)
    model = MODELS.get("lenet_bn").build(1, len(CLASSES))
    model.train()
    with torch.no_grad():
        model(torch.rand(16, 1, 28, 28) * 2)
    model.eval()
    meta = WeightsMeta(
        model="lenet_bn", in_channels=1, num_classes=len(CLASSES), input_size=28, classes=CLASSES,
        dataset="image-folder", mean=[0.3], std=[0.35], epoch=2, metrics={"test_acc": 0.5},
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(folder / "best.safetensors", model, meta)
    return model, meta


def png(path: Path, seed: int) -> Path:
    """A random 28x28 grayscale PNG (seeded, so each file is different)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
    return path


def probabilities(model: torch.nn.Module, files: list[Path]) -> list[list[float]]:
    """What the model says about each file, computed here without cnnkit's prediction code."""
    x = torch.stack([torch.from_numpy(np.array(Image.open(f), dtype=np.uint8)) for f in files])[:, None]
    with torch.no_grad():
        return model((x.float() / 255 - 0.3) / 0.35).softmax(1).tolist()


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """photos/ with nested class folders, a note, hidden files and a hidden folder."""
    root = tmp_path / "photos"
    png(root / "cat" / "0.png", 0)
    png(root / "cat" / "1.png", 1)
    png(root / "dog" / "deep" / "2.png", 2)
    png(root / "dog" / "3.PNG", 3)  # suffixes in any case
    (root / "dog" / "notes.txt").write_text("not an image by name: skipped, counted")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (root / "._0.png").write_bytes(b"AppleDouble junk")  # hidden, though named .png
    png(root / ".thumbnails" / "4.png", 4)  # hidden folder: not read
    return root


def images_of(photos: Path) -> list[Path]:
    return [
        photos / "cat" / "0.png",
        photos / "cat" / "1.png",
        photos / "dog" / "3.PNG",
        photos / "dog" / "deep" / "2.png",
    ]


def predict_json(runner: Any, run: Path, *args: str) -> tuple[Any, list[dict[str, Any]]]:
    result = runner.invoke(app, ["predict", str(run), *args, "-f", "json", "-k", "5"])
    assert result.exit_code == 0, result.output
    return result, json.loads(result.stdout)


def assert_matches_model(got: list[dict[str, Any]], model: torch.nn.Module, files: list[Path]) -> None:
    assert [p["image"] for p in got] == [str(f) for f in files]
    for prediction, expected in zip(got, probabilities(model, files), strict=True):
        ranked = sorted(range(len(CLASSES)), key=lambda c: -expected[c])
        assert [t["class"] for t in prediction["top"]] == [CLASSES[c] for c in ranked]
        assert [t["probability"] for t in prediction["top"]] == pytest.approx([expected[c] for c in ranked], abs=1e-5)


# -- which files -----------------------------------------------------------------------------------------------


def test_a_folder_with_nested_class_folders(tmp_path: Path, runner: Any, photos: Path) -> None:
    model, _ = make_run(tmp_path / "run")

    result, got = predict_json(runner, tmp_path / "run", str(photos))

    # Walked as training folders are: recursively, sorted, hidden files and folders ignored.
    assert_matches_model(got, model, images_of(photos))
    assert result.stderr.strip() == "cnnkit: warning: skipped 1 file(s) that are not images by name (.txt)"


def test_glob_patterns(tmp_path: Path, runner: Any, photos: Path) -> None:
    model, _ = make_run(tmp_path / "run")

    _, got = predict_json(runner, tmp_path / "run", f"{photos}/**/*.png")  # ** crosses folders; .PNG is not *.png
    assert_matches_model(
        got, model, [photos / "cat" / "0.png", photos / "cat" / "1.png", photos / "dog" / "deep" / "2.png"]
    )

    _, got = predict_json(runner, tmp_path / "run", f"{photos}/c?t/*")  # matched files are kept when named as images
    assert_matches_model(got, model, [photos / "cat" / "0.png", photos / "cat" / "1.png"])

    _, got = predict_json(runner, tmp_path / "run", f"{photos}/d*")  # a matched folder is walked
    assert_matches_model(got, model, [photos / "dog" / "3.PNG", photos / "dog" / "deep" / "2.png"])


def test_files_folders_and_patterns_mixed_in_order_each_once(tmp_path: Path, runner: Any, photos: Path) -> None:
    model, _ = make_run(tmp_path / "run")
    extra = png(tmp_path / "extra.png", 9)
    odd = png(tmp_path / "odd[1].png", 10)  # an existing name with glob characters is that file

    _, got = predict_json(
        runner, tmp_path / "run", str(extra), str(photos / "dog"), str(photos / "cat" / "1.png"),
        f"{photos}/cat/*.png", str(extra), str(odd),
    )  # fmt: skip

    files = [extra, photos / "dog" / "3.PNG", photos / "dog" / "deep" / "2.png", photos / "cat" / "1.png",
             photos / "cat" / "0.png", odd]  # fmt: skip
    assert_matches_model(got, model, files)


def test_gather_images_follows_links_once(tmp_path: Path, photos: Path) -> None:
    (photos / "cat" / "loop").symlink_to(photos / "cat")  # a link back to a folder already read
    (photos / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")  # broken: listed, then unreadable
    images, skipped = gather_images([photos])
    assert images == sorted([*images_of(photos), photos / "dog" / "gone.png"])
    assert skipped == [photos / "dog" / "notes.txt"]


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("{tmp}/photos/*.jpg", "'{tmp}/photos/*.jpg' matches no files; check the pattern"),
        ("{tmp}/nowhere/**/*.png", "'{tmp}/nowhere/**/*.png' matches no files; check the pattern"),
        ("{tmp}/photoz", "{tmp}/photoz: no such file or folder; pass image files, folders or glob patterns"),
        ("{tmp}/empty", "folder {tmp}/empty holds no image files (named "),
        ("{tmp}/photos/dog/*.txt", "'{tmp}/photos/dog/*.txt' matches no image files (named "),
    ],
)
def test_an_argument_giving_no_image_exits_2_naming_it(
    tmp_path: Path, runner: Any, photos: Path, argument: str, message: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"")
    # No weights needed: the arguments are checked before the model is loaded.
    result = runner.invoke(app, ["predict", str(tmp_path / "no-run"), str(photos), argument.format(tmp=tmp_path)])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("cnnkit: error: " + message.format(tmp=tmp_path))
    assert result.stdout == ""


# -- unreadable files ---------------------------------------------------------------------------------------------


def spoil(folder: Path) -> dict[Path, str]:
    """Four files named as images that are not readable ones, and the start of why each is skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "text.png").write_text("hello")
    (folder / "empty.jpg").write_bytes(b"")
    cut = folder / "truncated.png"
    Image.fromarray(np.random.default_rng(6).integers(0, 256, (64, 64), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:200])
    (folder / "zgone.png").symlink_to(folder / "nowhere.png")
    return {
        folder / "empty.jpg": "empty (0 bytes)",
        folder / "text.png": "cannot identify image file",
        folder / "truncated.png": "",
        folder / "zgone.png": "no such file",
    }


def test_unreadable_files_are_listed_not_fatal(tmp_path: Path, runner: Any, photos: Path) -> None:
    model, _ = make_run(tmp_path / "run")
    bad = spoil(photos / "bad")

    result, got = predict_json(runner, tmp_path / "run", str(photos))

    assert_matches_model(got, model, images_of(photos))  # the table and JSON hold the predicted images only
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "cnnkit: warning: skipped 1 file(s) that are not images by name (.txt)"
    assert len(lines) == 1 + len(bad)
    for line, (path, reason) in zip(lines[1:], sorted(bad.items()), strict=True):
        assert line.startswith(f"cnnkit: warning: skipped {path}: {reason}")


def test_many_unreadable_files_are_summarised(tmp_path: Path, runner: Any) -> None:
    make_run(tmp_path / "run")
    folder = tmp_path / "imgs"
    png(folder / "good.png", 0)
    for i in range(12):
        (folder / f"bad{i:02}.png").write_text("not a picture")

    result = runner.invoke(app, ["predict", str(tmp_path / "run"), str(folder)])

    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert [line.split(":")[2].strip() for line in lines[:5]] == [f"skipped {folder}/bad{i:02}.png" for i in range(5)]
    assert lines[5:] == [
        "cnnkit: warning: 12 of 13 images could not be read and were skipped (the first 5 are above); "
        "--out FILE.csv lists each with its reason"
    ]
    assert result.stdout.splitlines()[0] == str(folder / "good.png")


def test_none_readable_exits_3_naming_the_first(tmp_path: Path, runner: Any) -> None:
    make_run(tmp_path / "run")
    bad = spoil(tmp_path / "bad")
    out = tmp_path / "predictions.csv"
    out.write_text("precious")

    for extra in ([], ["--out", str(out)]):
        result = runner.invoke(app, ["predict", str(tmp_path / "run"), str(tmp_path / "bad"), *extra])

        assert result.exit_code == 3, result.output
        (line,) = result.stderr.strip().splitlines()
        first = min(bad)
        assert line == (
            f"cnnkit: error: none of the 4 images can be read; the first, {first}: empty (0 bytes); "
            "pass PNG, JPEG or other files PIL opens"
        )
        assert result.stdout == ""
    assert out.read_text() == "precious"  # written atomically: nothing replaces it
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".predictions.csv")]


# -- --out: the CSV -----------------------------------------------------------------------------------------------


def test_csv_has_one_row_per_image_in_order(tmp_path: Path, runner: Any, photos: Path) -> None:
    model, _ = make_run(tmp_path / "run")
    bad = spoil(photos / "cat" / "bad")
    out = tmp_path / "predictions.csv"
    out.write_text("old")

    result = runner.invoke(
        app, ["predict", str(tmp_path / "run"), str(photos), "--out", str(out), "-k", "2", "-b", "3"]
    )

    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {out} (4 images predicted, 4 unreadable skipped)\n"
    assert len(result.stderr.strip().splitlines()) == 1 + len(bad)  # warned as without --out
    rows = list(csv.reader(out.open(newline="", encoding="utf-8")))
    assert rows[0] == ["file", "class_1", "probability_1", "class_2", "probability_2", "error"]
    # The walk's order: cat/*.png, then cat/bad/, then dog/.
    files = [photos / "cat" / "0.png", photos / "cat" / "1.png", *sorted(bad), *images_of(photos)[2:]]
    assert [row[0] for row in rows[1:]] == [str(f) for f in files]
    good = [f for f in files if f not in bad]
    expected = dict(zip(good, probabilities(model, good), strict=True))
    for row in rows[1:]:
        assert len(row) == 6
        file = Path(row[0])
        if file in bad:
            assert row[1:5] == ["", "", "", ""] and row[5].startswith(bad[file])
            continue
        probs = expected[file]
        ranked = sorted(range(len(CLASSES)), key=lambda c: -probs[c])[:2]
        assert [row[1], row[3]] == [CLASSES[c] for c in ranked]
        for cell, c in zip([row[2], row[4]], ranked, strict=True):
            assert re.fullmatch(r"0\.\d+", cell), cell  # plain decimals: no exponent, no percent sign
            assert float(cell) == pytest.approx(probs[c], abs=1e-5)
        assert row[5] == ""


def test_csv_probabilities_are_those_of_the_json(tmp_path: Path, runner: Any, photos: Path) -> None:
    make_run(tmp_path / "run")
    out = tmp_path / "p.csv"
    _, got = predict_json(runner, tmp_path / "run", str(photos))
    assert (
        runner.invoke(app, ["predict", str(tmp_path / "run"), str(photos), "--out", str(out), "-k", "9"]).exit_code == 0
    )
    rows = list(csv.DictReader(out.open(newline="", encoding="utf-8")))
    assert len(rows) == len(got)
    for row, prediction in zip(rows, got, strict=True):
        assert row["file"] == prediction["image"] and row["error"] == ""
        # --top beyond the class count gives every class; the same batch, so the same digits.
        assert [row[f"class_{i + 1}"] for i in range(len(CLASSES))] == [t["class"] for t in prediction["top"]]
        assert [float(row[f"probability_{i + 1}"]) for i in range(len(CLASSES))] == [
            t["probability"] for t in prediction["top"]
        ]
    assert set(rows[0]) == {"file", "error"} | {f"{k}_{i}" for i in range(1, 6) for k in ("class", "probability")}


def test_csv_into_a_missing_folder_exits_1_naming_it(tmp_path: Path, runner: Any, photos: Path) -> None:
    make_run(tmp_path / "run")
    result = runner.invoke(
        app, ["predict", str(tmp_path / "run"), str(photos), "--out", str(tmp_path / "no" / "p.csv")]
    )
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1].endswith(str(tmp_path / "no"))


# -- batches, the table, the progress bar --------------------------------------------------------------------------


def test_batches_bound_what_is_decoded_at_once(tmp_path: Path) -> None:
    files = [png(tmp_path / f"{i}.png", i) for i in range(7)]
    (tmp_path / "3.png").write_text("spoilt")
    seen: list[int] = []

    def logits(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        return np.tile(np.arange(3, dtype=np.float32), (len(batch), 1))

    predictor = Predictor(tmp_path, ["a", "b", "c"], 1, 28, None, None, logits)
    batches = list(predict_batches(predictor, files, top=1, batch_size=3))

    assert [len(b) for b in batches] == [3, 3, 1] and seen == [3, 2, 1]  # the unreadable file is not run
    flat = [r for b in batches for r in b]
    assert [r.image for r in flat] == files
    assert isinstance(flat[3], Unreadable) and flat[3].reason.startswith("cannot identify image file")
    assert all(isinstance(r, Prediction) and r.top[0][0] == "c" for i, r in enumerate(flat) if i != 3)
    assert predict_cli.DEFAULT_BATCH == BATCH_SIZE


def test_batch_size_does_not_change_the_answer(tmp_path: Path, runner: Any, photos: Path) -> None:
    make_run(tmp_path / "run")
    _, whole = predict_json(runner, tmp_path / "run", str(photos))
    _, by_one = predict_json(runner, tmp_path / "run", str(photos), "--batch-size", "1")
    assert [p["image"] for p in by_one] == [p["image"] for p in whole]
    for a, b in zip(by_one, whole, strict=True):
        assert [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        assert [t["probability"] for t in a["top"]] == pytest.approx([t["probability"] for t in b["top"]], abs=1e-6)
    result = runner.invoke(app, ["predict", str(tmp_path / "run"), str(photos), "-b", "0"])
    assert result.exit_code == 2 and "--batch-size must be >= 1" in result.stderr


def test_table_and_json_stream_in_todays_format(tmp_path: Path, runner: Any, photos: Path) -> None:
    make_run(tmp_path / "run")
    _, got = predict_json(runner, tmp_path / "run", str(photos))
    result = runner.invoke(app, ["predict", str(tmp_path / "run"), str(photos), "-f", "json", "-k", "5", "-b", "3"])
    # Written as the predictions come, yet the very text of json.dumps(..., indent=2).
    assert result.stdout == json.dumps(json.loads(result.stdout), indent=2) + "\n"

    table = runner.invoke(app, ["predict", str(tmp_path / "run"), str(photos), "-k", "2", "-b", "3"])

    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[::3] == [p["image"] for p in got] and len(lines) == 3 * len(got)
    for i, prediction in enumerate(got):
        for line, entry in zip(lines[3 * i + 1 : 3 * i + 3], prediction["top"][:2], strict=True):
            name, percent = line.split()
            assert line.startswith("  ") and name == entry["class"] and percent == f"{entry['probability']:.2%}"


def test_progress_bar_only_on_a_terminal_and_not_with_quiet(
    tmp_path: Path, runner: Any, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_run(tmp_path / "run")
    out = tmp_path / "p.csv"
    argv = ["predict", str(tmp_path / "run"), str(photos / "cat"), "--out", str(out)]
    assert runner.invoke(app, argv).stderr == ""  # stderr is no terminal: silent

    monkeypatch.setenv("TTY_INTERACTIVE", "1")  # rich: treat stderr as an interactive terminal
    monkeypatch.setenv("FORCE_COLOR", "1")
    shown = runner.invoke(app, argv)
    quiet = runner.invoke(app, [*argv, "-q"])

    assert shown.exit_code == 0 and quiet.exit_code == 0
    assert "predicting" in shown.stderr and "2/2" in shown.stderr
    assert quiet.stderr == ""
    assert quiet.stdout == shown.stdout == f"wrote {out} (2 images predicted)\n"


# -- ONNX ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_onnx_predicts_folders_the_same_without_torch(tmp_path: Path, runner: Any, photos: Path) -> None:
    for module in ("onnx", "onnxruntime"):
        pytest.importorskip(module, reason=f"the onnx extra is not installed (pip install 'cnnkit[onnx]'): no {module}")
    make_run(tmp_path / "run")
    graph = tmp_path / "model.onnx"
    assert runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(graph), "--no-check"]).exit_code == 0
    spoil(photos / "bad")
    from_torch, from_onnx = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    argv = [str(photos / "cat"), f"{photos}/dog/**/*.png", str(photos / "bad"), "-k", "3", "-b", "2"]
    assert runner.invoke(app, ["predict", str(tmp_path / "run"), *argv, "--out", str(from_torch)]).exit_code == 0
    code = (
        "import sys; from typer.testing import CliRunner; from cnnkit.cli.app import app; "
        f"r = CliRunner().invoke(app, {['predict', str(graph), *argv, '--out', str(from_onnx)]!r}); "
        "assert r.exit_code == 0, r.output; print('torch' in sys.modules)"
    )

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    torch_rows = list(csv.reader(from_torch.open(newline="", encoding="utf-8")))
    onnx_rows = list(csv.reader(from_onnx.open(newline="", encoding="utf-8")))
    assert len(onnx_rows) == len(torch_rows) == 1 + 3 + 4
    assert onnx_rows[0] == torch_rows[0]
    for a, b in zip(onnx_rows[1:], torch_rows[1:], strict=True):
        assert a[0] == b[0] and a[1::2] == b[1::2]  # file, class names, error
        assert [float(x) for x in a[2:7:2] if x] == pytest.approx([float(x) for x in b[2:7:2] if x], abs=1e-4)


# -- images as the model's training images were made square ---------------------------------------------------


def test_a_wide_photo_is_cropped_as_the_image_folder_store_cropped_it(tmp_path: Path, runner: Any) -> None:
    """An image-folder model saw the centre square of each photo (``-d resize=crop``, the default):
    ``predict`` feeds it the same, not the whole photo squashed; ``-d resize=squash`` runs squash."""
    model, meta = make_run(tmp_path / "run")
    wide = tmp_path / "wide.png"
    pixels = np.random.default_rng(7).integers(0, 256, (28, 56), dtype=np.uint8)
    Image.fromarray(pixels).save(wide)
    centre = tmp_path / "centre.png"
    Image.fromarray(pixels[:, 14:42]).save(centre)
    squashed = tmp_path / "squashed.png"
    Image.fromarray(pixels).resize((28, 28), Image.Resampling.BILINEAR).save(squashed)

    _, got = predict_json(runner, tmp_path / "run", str(wide))
    assert_matches_model([{**got[0], "image": str(centre)}], model, [centre])  # the centre crop, exactly

    squash_meta = meta.model_copy(update={"dataset_options": {"resize": "squash"}})
    save_weights(tmp_path / "squash" / "best.safetensors", model, squash_meta)
    _, got = predict_json(runner, tmp_path / "squash", str(wide))
    assert_matches_model([{**got[0], "image": str(squashed)}], model, [squashed])

    # the bundled datasets' images were square: a photo is resized whole, as before
    save_weights(tmp_path / "fmnist" / "best.safetensors", model, meta.model_copy(update={"dataset": "fashion-mnist"}))
    _, got = predict_json(runner, tmp_path / "fmnist", str(wide))
    plane = Image.fromarray(pixels.astype(np.float32) / np.float32(255)).resize((28, 28), Image.Resampling.BILINEAR)
    with torch.no_grad():
        expected = model((torch.from_numpy(np.array(plane))[None, None] - 0.3) / 0.35).softmax(1)[0]
    assert got[0]["top"][0]["class"] == CLASSES[int(expected.argmax())]
    assert got[0]["top"][0]["probability"] == pytest.approx(float(expected.max()), abs=1e-5)


def test_an_onnx_graph_crops_as_its_weights_did(tmp_path: Path) -> None:
    """The exported graph's metadata carries the dataset and its options: ONNX Runtime's predictor
    makes photos square the same way as the weights' own."""
    from cnnkit.onnx_runtime import OnnxInfo

    _, meta = make_run(tmp_path / "run")
    for options, expected in (({}, "crop"), ({"resize": "pad"}, "pad")):
        info = OnnxInfo(
            model="lenet_bn", classes=CLASSES, in_channels=1, input_size=28, mean=[0.3], std=[0.35],
            cnnkit_version="0", meta_json=meta.model_copy(update={"dataset_options": options}).model_dump_json(),
        )  # fmt: skip
        assert info.resize == expected
    info = OnnxInfo(
        model="lenet_bn", classes=CLASSES, in_channels=1, input_size=28, mean=None, std=None, cnnkit_version="0",
        meta_json=meta.model_copy(update={"dataset": "fashion-mnist"}).model_dump_json(),
    )  # fmt: skip
    assert info.resize is None
