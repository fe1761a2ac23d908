"""Fashion-MNIST: the IDX reader, locating the files, fetching them, and `cnnkit data info|fetch`."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnkit.cli.app import app
from cnnkit.data import load_dataset
from cnnkit.data.fashion_mnist import FASHION_MNIST
from cnnkit.data.idx import read_idx
from cnnkit.errors import DataError


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file holding ``array``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(folder: Path, train: int = 50, test: int = 20, compress: bool = True, seed: int = 0) -> Path:
    """Four small IDX files in the Fashion-MNIST layout; images encode their index for checking."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            raw = idx_bytes(array)
            (folder / (stem + ".gz" if compress else stem)).write_bytes(gzip.compress(raw) if compress else raw)
    return folder


# --- the IDX reader ---------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips_gz_and_raw(tmp_path: Path, compress: bool) -> None:
    array = np.random.default_rng(1).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    raw = idx_bytes(array)
    path = tmp_path / ("x.gz" if compress else "x")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    tensor = read_idx(path, ndim=3)
    assert tensor.dtype == torch.uint8
    assert torch.equal(tensor, torch.from_numpy(array))


def test_read_idx_rejects_truncated_data(tmp_path: Path) -> None:
    path = tmp_path / "images"
    path.write_bytes(idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-100])
    with pytest.raises(DataError, match=r"images is truncated: .*shape \(4, 28, 28\)"):
        read_idx(path, ndim=3)


def test_read_idx_rejects_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(bytes([0, 0, 8, 1, 0]))
    with pytest.raises(DataError, match="shorter than an IDX header"):
        read_idx(path, ndim=1)


def test_read_idx_rejects_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "images"
    # A labels file (1 dimension) where an images file (3 dimensions) is expected.
    path.write_bytes(idx_bytes(np.zeros(10, np.uint8)))
    with pytest.raises(DataError, match=r"magic number 0x00000801, expected 0x00000803"):
        read_idx(path, ndim=3)
    path.write_bytes(b"\x1f\x8b" + idx_bytes(np.zeros(10, np.uint8))[2:])
    with pytest.raises(DataError, match="magic number"):
        read_idx(path, ndim=1)


def test_read_idx_rejects_broken_gzip(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:-20])
    with pytest.raises(DataError, match=r"labels\.gz cannot be read"):
        read_idx(path, ndim=1)


# --- loading and locating -----------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_load_fashion_mnist_from_generated_files(tmp_path: Path, compress: bool) -> None:
    folder = write_fashion(tmp_path / "fm", compress=compress)
    splits = load_dataset("fashion-mnist", folder)
    assert splits.train.images.shape == (50, 1, 28, 28) and splits.test.images.shape == (20, 1, 28, 28)
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    assert splits.train.labels.tolist() == [i % 10 for i in range(50)]
    assert splits.classes[0] == "T-shirt/top" and splits.classes[9] == "Ankle boot" and len(splits.classes) == 10
    expected = splits.train.images.double().div(255)
    assert splits.mean[0] == pytest.approx(expected.mean().item())
    assert splits.std[0] == pytest.approx(expected.std().item())
    assert splits.source == folder


def test_label_count_mismatch_is_a_data_error(tmp_path: Path) -> None:
    folder = write_fashion(tmp_path / "fm")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(49, np.uint8))))
    with pytest.raises(DataError, match="holds 49 labels but .*train-images-idx3-ubyte.gz holds 50 images"):
        load_dataset("fashion-mnist", folder)


def test_label_out_of_range_is_a_data_error(tmp_path: Path) -> None:
    folder = write_fashion(tmp_path / "fm")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(20, 12, np.uint8))))
    with pytest.raises(DataError, match="label 12; Fashion-MNIST labels are 0..9"):
        load_dataset("fashion-mnist", folder)


def test_wrong_image_dimensions_are_a_data_error(tmp_path: Path) -> None:
    folder = write_fashion(tmp_path / "fm")
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((20, 32, 32), np.uint8))))
    with pytest.raises(DataError, match=r"\(32, 32\) images, expected 28x28"):
        load_dataset("fashion-mnist", folder)


def test_found_in_cnnkit_data_under_each_spelling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNKIT_DATA", str(tmp_path))
    write_fashion(tmp_path / "FashionMNIST" / "raw", compress=False)
    assert FASHION_MNIST.locate() == tmp_path / "FashionMNIST" / "raw"
    write_fashion(tmp_path / "fashion-mnist")
    assert FASHION_MNIST.locate() == tmp_path / "fashion-mnist"
    assert len(load_dataset("fashion-mnist").train) == 50


def test_missing_folder_says_how_to_get_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cnnkit.data.fashion_mnist as fm

    monkeypatch.setenv("CNNKIT_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr(fm, "SYSTEM_FOLDER", tmp_path / "no-system-copy")
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    assert "cnnkit data fetch fashion-mnist" in message and "apt-get install dataset-fashion-mnist" in message
    assert "--data PATH" in message and "\n" not in message


def test_data_folder_is_never_written(tmp_path: Path) -> None:
    folder = write_fashion(tmp_path / "fm")
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}
    folder.chmod(0o555)
    try:
        load_dataset("fashion-mnist", folder)
        load_dataset("fashion-mnist", folder)
    finally:
        folder.chmod(0o755)
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()} == before


# --- the CLI --------------------------------------------------------------------------------------


def test_info_json(tmp_path: Path, runner) -> None:
    folder = write_fashion(tmp_path / "fm")
    result = runner.invoke(app, ["data", "info", "fashion-mnist", "--data", str(folder), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["train"] == 50 and report["test"] == 20 and report["channels"] == 1
    assert report["image_size"] == [28, 28] and report["source"] == str(folder)
    assert len(report["classes"]) == 10 and len(report["mean"]) == 1


def test_info_table(tmp_path: Path, runner) -> None:
    folder = write_fashion(tmp_path / "fm")
    result = runner.invoke(app, ["data", "info", "fashion-mnist", "--data", str(folder)])
    assert result.exit_code == 0, result.output
    assert "train 50, test 20" in result.stdout and str(folder) in result.stdout and "Ankle boot" in result.stdout


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "t10k-images-idx3-ubyte.gz").unlink(), "t10k-images-idx3-ubyte.gz is missing"),
        (lambda f: (f / "train-images-idx3-ubyte.gz").write_bytes(b""), "train-images-idx3-ubyte.gz"),
        (
            lambda f: (f / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(8))),
            "magic number 0x00000803",
        ),
        (
            lambda f: (f / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8)))),
            "holds 3 labels",
        ),
    ],
    ids=["missing-file", "zero-bytes", "wrong-magic", "count-mismatch"],
)
def test_bad_files_exit_3_with_one_line(tmp_path: Path, runner, damage, message: str) -> None:
    folder = write_fashion(tmp_path / "fm")
    damage(folder)
    result = runner.invoke(app, ["data", "info", "fashion-mnist", "--data", str(folder)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnkit: error: ") and message in lines[0]
    assert "Traceback" not in result.output


def test_missing_data_folder_exits_3(tmp_path: Path, runner) -> None:
    result = runner.invoke(app, ["data", "info", "fashion-mnist", "--data", str(tmp_path / "absent")])
    assert result.exit_code == 3
    assert "absent does not exist" in result.stderr and "cnnkit data fetch fashion-mnist" in result.stderr


def test_unknown_dataset_option_exits_2(tmp_path: Path, runner) -> None:
    folder = write_fashion(tmp_path / "fm")
    result = runner.invoke(app, ["data", "info", "fashion-mnist", "--data", str(folder), "-d", "split=random"])
    assert result.exit_code == 2 and "bad option for dataset 'fashion-mnist'" in result.stderr


# --- fetching --------------------------------------------------------------------------------------


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A local HTTP server on 127.0.0.1 serving generated .gz IDX files; the fetcher points at it."""
    served = write_fashion(tmp_path / "served", train=30, test=10)
    resources = [(p.name, hashlib.md5(p.read_bytes()).hexdigest()) for p in sorted(served.iterdir())]

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    import cnnkit.data.fetch as fetch

    monkeypatch.setattr(fetch, "fashion_mnist_resources", lambda: (["http://127.0.0.1:9/dead/", url], resources))
    try:
        yield url, served
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_downloads_verifies_and_loads(tmp_path: Path, runner, mirror) -> None:
    _, served = mirror
    target = tmp_path / "downloaded"
    result = runner.invoke(app, ["data", "fetch", "fashion-mnist", "--data", str(target)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in served.iterdir())
    for file in served.iterdir():
        assert (target / file.name).read_bytes() == file.read_bytes()
    assert len(load_dataset("fashion-mnist", target).train) == 30


def test_fetch_defaults_to_cnnkit_data(tmp_path: Path, runner, mirror, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNKIT_DATA", str(tmp_path / "home"))
    result = runner.invoke(app, ["data", "fetch", "fashion-mnist"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "home" / "fashion-mnist").glob("*-idx*-ubyte.gz"))) == 4


def test_fetch_rejects_a_corrupt_download(tmp_path: Path, mirror, monkeypatch: pytest.MonkeyPatch) -> None:
    import cnnkit.data.fetch as fetch

    url, served = mirror
    resources = [(p.name, "0" * 32) for p in sorted(served.iterdir())]
    monkeypatch.setattr(fetch, "fashion_mnist_resources", lambda: ([url], resources))
    with pytest.raises(DataError, match="expected 00000000"):
        fetch.fetch("fashion-mnist", tmp_path / "bad")
    # Nothing half-written is left behind under the final name.
    assert not list((tmp_path / "bad").glob("*.gz"))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_fetch_offline_fails_in_one_line(tmp_path: Path, runner, monkeypatch: pytest.MonkeyPatch) -> None:
    import cnnkit.data.fetch as fetch

    dead = f"http://127.0.0.1:{_closed_port()}/"
    monkeypatch.setattr(fetch, "fashion_mnist_resources", lambda: ([dead], [("train-images-idx3-ubyte.gz", "0" * 32)]))
    target = tmp_path / "offline"
    result = runner.invoke(app, ["data", "fetch", "fashion-mnist", "--data", str(target)])
    assert result.exit_code == 3, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0]
    assert "apt-get install dataset-fashion-mnist" in lines[0] and "could not download train-images" in lines[0]


def test_fetch_other_datasets_is_refused(runner) -> None:
    result = runner.invoke(app, ["data", "fetch", "coil20"])
    assert result.exit_code == 2
    assert "cannot download 'coil20'" in result.stderr and "--data PATH" in result.stderr
