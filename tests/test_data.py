"""Datasets: IDX reading, COIL-20 names and splits, image folders, the cache, bad input, the CLI."""

from __future__ import annotations

import gzip
import os
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnkit.cli.app import app
from cnnkit.data import load_dataset
from cnnkit.data.idx import read_idx
from cnnkit.errors import DataError


# -- generated files -------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_fashion(folder: Path, n_train: int = 40, n_test: int = 20, compress: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), compress)
    return folder


def make_coil(folder: Path, objects: int = 20, poses: int = 72, size: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for obj in range(1, objects + 1):
        for pose in range(poses):
            # Brightness encodes the object, so a label can be checked against its pixels.
            Image.fromarray(np.full((size, size), obj * 10, np.uint8)).save(folder / f"obj{obj}__{pose}.png")
    return folder


# -- IDX ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx(tmp_path: Path, compress: bool) -> None:
    folder = make_fashion(tmp_path / "fm", compress=compress)
    splits = load_dataset("fashion-mnist", folder)
    assert splits.train.images.shape == (40, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert splits.test.labels.dtype == torch.int64 and len(splits.test) == 20
    assert splits.classes[0] == "T-shirt/top" and splits.classes[9] == "Ankle boot"
    expected = splits.train.images.double().mean().item() / 255
    assert splits.mean[0] == pytest.approx(expected)


def test_idx_truncated(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((5, 28, 28)), compress=False)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"x-idx3-ubyte is truncated"):
        read_idx(path, 3)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x-idx1-ubyte", np.zeros((5,)), compress=False)
    with pytest.raises(DataError, match="magic number 0x00000801, expected 0x00000803"):
        read_idx(path, 3)


def test_idx_count_mismatch_exits_3(tmp_path: Path, runner: CliRunner) -> None:
    folder = make_fashion(tmp_path / "fm")
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros((7,)))
    result = runner.invoke(app, ["data", "info", "fashion-mnist", "--data", str(folder)])
    assert result.exit_code == 3
    assert "t10k-labels-idx1-ubyte.gz holds 7 labels" in result.stderr and len(result.stderr.splitlines()) == 1


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path, runner: CliRunner) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["data", "info", "fashion-mnist", "--data", str(tmp_path / "empty")])
    assert result.exit_code == 3
    assert "train-images-idx3-ubyte.gz is missing" in result.stderr and "cnnkit data fetch" in result.stderr


# -- COIL-20 ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coil(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_coil(tmp_path_factory.mktemp("coil") / "coil-20")


def test_coil_labels_come_from_names_not_order(coil: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    listing = list(coil.iterdir())
    random.Random(3).shuffle(listing)
    monkeypatch.setattr(Path, "iterdir", lambda self: iter(listing) if self == coil else iter([]))
    splits = load_dataset("coil20", coil, split="alternate")
    for part in (splits.train, splits.test):
        brightness = part.images[:, 0, 0, 0].long()
        assert torch.equal(brightness, (part.labels + 1) * 10)


@pytest.mark.parametrize("split", ["random", "pose-block", "alternate"])
def test_coil_splits_are_stratified_disjoint_complete(coil: Path, split: str) -> None:
    splits = load_dataset("coil20", coil, split=split)
    train, test = set(splits.split_files["train"]), set(splits.split_files["test"])
    assert not train & test and len(train | test) == 1440
    per_object = torch.bincount(splits.test.labels, minlength=20)
    assert per_object.min() == per_object.max()  # stratified: every object equally held out
    poses = {int(name.split("__")[1].split(".")[0]) for name in test}
    if split == "pose-block":
        assert poses == set(range(60, 72))
    if split == "alternate":
        assert all(p % 2 == 1 for p in poses)
    if split == "random":
        assert len(test) == 140


def test_coil_random_split_is_deterministic_per_seed(coil: Path) -> None:
    a = load_dataset("coil20", coil, seed=1).split_files["test"]
    b = load_dataset("coil20", coil, seed=1).split_files["test"]
    c = load_dataset("coil20", coil, seed=2).split_files["test"]
    assert a == b and a != c


def test_coil_bad_names_are_listed(tmp_path: Path, runner: CliRunner) -> None:
    folder = make_coil(tmp_path / "c", objects=1, poses=2)
    (folder / "notes.txt").write_text("x")
    (folder / "obj99__1.png").write_bytes(b"")
    result = runner.invoke(app, ["data", "info", "coil20", "--data", str(folder)])
    assert result.exit_code == 3 and "notes.txt" in result.stderr and "obj99__1.png" in result.stderr


def test_coil_corrupt_png_exits_3(tmp_path: Path, runner: CliRunner) -> None:
    folder = make_coil(tmp_path / "c", objects=2, poses=3)
    (folder / "obj2__1.png").write_bytes(b"\x89PNG not really")
    result = runner.invoke(app, ["data", "info", "coil20", "--data", str(folder)])
    assert result.exit_code == 3 and "obj2__1.png is not a readable image" in result.stderr


# -- image folders ----------------------------------------------------------------------------------
def make_folder(root: Path, classes: dict[str, list[tuple[str, tuple[int, int]]]]) -> Path:
    rng = np.random.default_rng(0)
    for name, images in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, (mode, (w, h)) in enumerate(images):
            shape = (h, w) if mode == "L" else (h, w, len(mode))
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")
    return root


def test_image_folder_mixed_modes_and_sizes(tmp_path: Path) -> None:
    spec = [("L", (12, 12)), ("RGB", (12, 12)), ("RGBA", (16, 10)), ("RGB", (12, 12))] * 3
    root = make_folder(tmp_path / "imgs", {"b": spec, "a": spec})
    splits = load_dataset("image-folder", root)
    assert splits.classes == ("a", "b")  # sorted folder names, not listing order
    assert splits.train.images.shape[1:] == (3, 12, 12)  # RGB present -> 3 channels; most common size
    assert len(splits.train) + len(splits.test) == 24 and torch.bincount(splits.test.labels).tolist() == [1, 1]
    gray = load_dataset("image-folder", root, channels=1, image_size=8)
    assert gray.train.images.shape[1:] == (1, 8, 8)


def test_image_folder_train_test_subfolders(tmp_path: Path) -> None:
    spec = [("L", (8, 8))] * 3
    make_folder(tmp_path / "r" / "train", {"x": spec, "y": spec})
    make_folder(tmp_path / "r" / "test", {"x": spec[:1], "y": spec[:2]})
    splits = load_dataset("image-folder", tmp_path / "r")
    assert splits.channels == 1 and len(splits.train) == 6 and splits.test.labels.tolist() == [0, 1, 1]


def test_image_folder_empty_class_exits_3(tmp_path: Path, runner: CliRunner) -> None:
    root = make_folder(tmp_path / "r", {"x": [("L", (8, 8))] * 2})
    (root / "empty").mkdir()
    result = runner.invoke(app, ["data", "info", "image-folder", "--data", str(root)])
    assert result.exit_code == 3 and "empty holds no" in result.stderr


# -- cache ------------------------------------------------------------------------------------------
def test_cache_hit_and_invalidation(tmp_path: Path) -> None:
    folder = make_fashion(tmp_path / "fm")
    first = load_dataset("fashion-mnist", folder)
    cached = list((Path(os.environ["CNNKIT_CACHE"]) / "datasets").glob("fashion-mnist-*.safetensors"))
    assert len(cached) == 1
    again = load_dataset("fashion-mnist", folder)
    assert torch.equal(first.train.images, again.train.images)
    make_fashion(folder, seed=1)  # same names, new content: a new key
    changed = load_dataset("fashion-mnist", folder)
    assert not torch.equal(first.train.images, changed.train.images)
    cached[0].write_bytes(b"garbage")  # a damaged entry is rebuilt, never an error
    make_fashion(folder, seed=0)
    os.utime(folder / "train-images-idx3-ubyte.gz", ns=(1, 1))
    assert load_dataset("fashion-mnist", folder).train.images.shape == (40, 1, 28, 28)


def test_data_folder_is_never_written(tmp_path: Path) -> None:
    folder = make_fashion(tmp_path / "fm")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    folder.chmod(0o555)
    try:
        load_dataset("fashion-mnist", folder)
    finally:
        folder.chmod(0o755)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before


def test_cnnkit_data_env_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_coil(tmp_path / "coil-20", objects=2, poses=4)
    monkeypatch.setenv("CNNKIT_DATA", str(tmp_path))
    assert load_dataset("coil20").source == tmp_path / "coil-20"


# -- CLI and fetch ----------------------------------------------------------------------------------
def test_data_info_json(tmp_path: Path, runner: CliRunner) -> None:
    import json

    folder = make_fashion(tmp_path / "fm")
    result = runner.invoke(app, ["data", "info", "fashion-mnist", "--data", str(folder), "-f", "json"])
    report = json.loads(result.output)
    assert (report["train"], report["test"], report["channels"], report["image_size"]) == (40, 20, 1, [28, 28])


def test_fetch_downloads_and_checks_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import http.server
    import threading

    served = make_fashion(tmp_path / "served")
    resources = [(p.name, hashlib.md5(p.read_bytes()).hexdigest()) for p in sorted(served.iterdir())]
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        mirror = f"http://127.0.0.1:{server.server_address[1]}/"
        monkeypatch.setattr("cnnkit.data.fetch.fashion_mnist_resources", lambda: ([mirror], resources))
        from cnnkit.data.fetch import fetch

        folder = fetch("fashion-mnist", tmp_path / "got")
        assert sorted(p.name for p in folder.iterdir()) == sorted(n for n, _ in resources)
        assert load_dataset("fashion-mnist", folder).train.images.shape == (40, 1, 28, 28)
        bad = [(resources[0][0], "0" * 32)] + resources[1:]
        monkeypatch.setattr("cnnkit.data.fetch.fashion_mnist_resources", lambda: ([mirror], bad))
        (folder / resources[0][0]).unlink()
        with pytest.raises(DataError, match="expected 0000"):
            fetch("fashion-mnist", folder)
        assert not (folder / resources[0][0]).exists()  # nothing half-written left behind
    finally:
        server.shutdown()


def test_fetch_offline_is_one_line_exit_3(tmp_path: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "cnnkit.data.fetch.fashion_mnist_resources", lambda: (["http://127.0.0.1:9/"], [("a.gz", "0" * 32)])
    )
    result = runner.invoke(app, ["data", "fetch", "fashion-mnist", "--data", str(tmp_path / "fm")])
    assert result.exit_code == 3
    assert len(result.stderr.splitlines()) == 1 and "dataset-fashion-mnist" in result.stderr


# -- the real sets ----------------------------------------------------------------------------------
@pytest.mark.realdata
def test_real_fashion_mnist(real_data: Path) -> None:
    splits = load_dataset("fashion-mnist", real_data / "fashion-mnist")
    assert (len(splits.train), len(splits.test)) == (60_000, 10_000)
    assert torch.bincount(splits.train.labels).tolist() == [6000] * 10


@pytest.mark.realdata
def test_real_coil20(real_data: Path) -> None:
    splits = load_dataset("coil20", real_data / "coil-20")
    labels = torch.cat([splits.train.labels, splits.test.labels])
    assert labels.numel() == 1440 and torch.bincount(labels).tolist() == [72] * 20
    assert splits.train.images.shape[1:] == (1, 128, 128)
