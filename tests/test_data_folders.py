"""Folder datasets: COIL-20 names and splits, generic image folders, and the decoded-tensor cache."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.cli.app import app
from cnnkit.data import load_dataset
from cnnkit.errors import DataError

SIDE = 8  # tiny stand-ins for COIL's 128x128 images keep 1,440 files fast


def write_coil(folder: Path, objects: int = 20, poses: int = 72) -> Path:
    """``obj{N}__{k}.png`` files whose first two pixels hold N and k, so labels can be checked."""
    folder.mkdir(parents=True, exist_ok=True)
    for obj in range(1, objects + 1):
        for pose in range(poses):
            pixels = np.full((SIDE, SIDE), 100, np.uint8)
            pixels[0, 0], pixels[0, 1] = obj, pose
            Image.fromarray(pixels, mode="L").save(folder / f"obj{obj}__{pose}.png")
    return folder


@pytest.fixture(scope="module")
def coil(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_coil(tmp_path_factory.mktemp("data") / "coil-20")


def encoded(images: torch.Tensor) -> tuple[list[int], list[int]]:
    """(object, pose) read back from the pixels of each image."""
    return images[:, 0, 0, 0].tolist(), images[:, 0, 0, 1].tolist()


# --- COIL-20 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["random", "pose-block", "alternate"])
def test_coil_splits_are_complete_disjoint_and_labelled_by_name(coil: Path, split: str) -> None:
    splits = load_dataset("coil20", coil, split=split)
    assert len(splits.train) + len(splits.test) == 1440
    assert splits.train.images.shape[1:] == (1, SIDE, SIDE) and splits.classes == tuple(f"obj{i}" for i in range(1, 21))
    pairs = []
    for part in (splits.train, splits.test):
        objects, poses = encoded(part.images)
        assert part.labels.tolist() == [o - 1 for o in objects]  # object N is class N-1
        pairs += list(zip(objects, poses, strict=True))
    assert sorted(pairs) == [(o, p) for o in range(1, 21) for p in range(72)]  # each file exactly once
    assert set(splits.split_files["train"]).isdisjoint(splits.split_files["test"])
    assert len(splits.split_files["train"]) == len(splits.train) and len(splits.split_files["test"]) == len(splits.test)
    # The listed file names are the images in the split, in order.
    objects, poses = encoded(splits.test.images)
    assert splits.split_files["test"] == [f"obj{o}__{p}.png" for o, p in zip(objects, poses, strict=True)]


def test_random_split_is_stratified_9_to_1_and_seeded(coil: Path) -> None:
    a = load_dataset("coil20", coil, seed=3)
    per_object = torch.bincount(a.test.labels, minlength=20)
    assert per_object.tolist() == [7] * 20  # round(72 * 0.1) from every object
    again = load_dataset("coil20", coil, seed=3)
    assert a.split_files == again.split_files
    other = load_dataset("coil20", coil, seed=4)
    assert other.split_files["test"] != a.split_files["test"]
    quarter = load_dataset("coil20", coil, seed=3, test_fraction=0.25)
    assert torch.bincount(quarter.test.labels).tolist() == [18] * 20


def test_pose_block_holds_out_poses_60_to_71(coil: Path) -> None:
    splits = load_dataset("coil20", coil, split="pose-block")
    assert set(encoded(splits.test.images)[1]) == set(range(60, 72))
    assert set(encoded(splits.train.images)[1]) == set(range(60))
    assert len(splits.train) == 1200 and len(splits.test) == 240


@pytest.mark.parametrize(("start", "held"), [(0, range(12)), (66, [66, 67, 68, 69, 70, 71, 0, 1, 2, 3, 4, 5])])
def test_pose_block_start_moves_the_held_out_block_round_the_turntable(coil: Path, start: int, held) -> None:
    splits = load_dataset("coil20", coil, split="pose-block", block_start=start)
    assert set(encoded(splits.test.images)[1]) == set(held)
    assert set(encoded(splits.train.images)[1]) == set(range(72)) - set(held)
    assert torch.bincount(splits.test.labels).tolist() == [12] * 20


def test_pose_block_start_outside_the_poses_is_a_usage_error(coil: Path, runner) -> None:
    result = runner.invoke(app, ["data", "info", "coil20", "--data", str(coil), "-d", "split=pose-block",
                                      "-d", "block_start=72"])
    assert result.exit_code == 2 and "block_start" in result.stderr and "72" in result.stderr


def test_alternate_split_takes_odd_poses_for_test(coil: Path) -> None:
    splits = load_dataset("coil20", coil, split="alternate")
    assert all(p % 2 == 1 for p in encoded(splits.test.images)[1])
    assert all(p % 2 == 0 for p in encoded(splits.train.images)[1])
    assert torch.bincount(splits.test.labels).tolist() == [36] * 20


def test_labels_come_from_names_whatever_the_listing_order(coil: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_iterdir = Path.iterdir

    def shuffled(self: Path):
        entries = list(real_iterdir(self))
        random.Random(7).shuffle(entries)
        return iter(entries)

    monkeypatch.setattr(Path, "iterdir", shuffled)
    splits = load_dataset("coil20", coil, split="alternate")
    objects, _ = encoded(splits.train.images)
    assert splits.train.labels.tolist() == [o - 1 for o in objects]


def test_coil_statistics_come_from_train_split(coil: Path) -> None:
    splits = load_dataset("coil20", coil, split="pose-block")
    expected = splits.train.images.double().div(255)
    assert splits.mean[0] == pytest.approx(expected.mean().item())
    assert splits.std[0] == pytest.approx(expected.std().item())


def test_unparsable_names_are_listed(tmp_path: Path) -> None:
    folder = write_coil(tmp_path / "coil", objects=1, poses=3)
    for name in ["readme.txt", "obj21__0.png", "obj1_3.png", "obj1__72.png", "a.png", "b.png", "c.png"]:
        (folder / name).write_bytes(b"x")
    with pytest.raises(DataError) as info:
        load_dataset("coil20", folder)
    message = str(info.value)
    assert "7 file(s) are not named obj{N}__{k}.png" in message and "and 2 more" in message
    assert "a.png" in message and "\n" not in message


def test_coil_cli_errors_exit_3(tmp_path: Path, runner) -> None:
    folder = write_coil(tmp_path / "coil", objects=2, poses=4)
    (folder / "obj2__1.png").write_bytes(b"")
    result = runner.invoke(app, ["data", "info", "coil20", "--data", str(folder)])
    assert result.exit_code == 3 and "obj2__1.png is empty (0 bytes)" in result.stderr
    (folder / "obj2__1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = runner.invoke(app, ["data", "info", "coil20", "--data", str(folder)])
    assert result.exit_code == 3 and "obj2__1.png is not a readable image" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    (folder / "junk.png").write_bytes(b"")
    result = runner.invoke(app, ["data", "info", "coil20", "--data", str(folder)])
    assert result.exit_code == 3 and "junk.png" in result.stderr


def test_coil_found_as_coil_20_under_cnnkit_data(coil: Path, runner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CNNKIT_DATA", str(coil.parent))
    result = runner.invoke(app, ["data", "info", "coil20", "-d", "split=pose-block", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert f'"source": "{coil}"' in result.stdout and '"test": 240' in result.stdout


def test_bad_split_option_is_a_usage_error(coil: Path, runner) -> None:
    result = runner.invoke(app, ["data", "info", "coil20", "--data", str(coil), "-d", "split=diagonal"])
    assert result.exit_code == 2 and "split" in result.stderr and "pose-block" in result.stderr


# --- image folders -----------------------------------------------------------------------------------


def _save(path: Path, mode: str, size: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value,) * (4 if mode == "RGBA" else 3)
    Image.new(mode, size, colour).save(path)


def test_image_folder_mixed_modes_and_sizes(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    for i in range(10):
        _save(root / "circle" / f"{i}.png", "L", (12, 10), 10)
        _save(root / "square" / f"{i}.JPG", "RGB", (12, 10), 200)
    _save(root / "square" / "odd.png", "RGBA", (20, 30), 200)  # a different size and mode
    (root / "square" / "notes.txt").write_text("ignored")
    splits = load_dataset("image-folder", root)
    assert splits.classes == ("circle", "square")
    # RGB present -> 3 channels; the most common size's shorter side, square (a centre crop)
    assert splits.train.images.shape[1:] == (3, 10, 10)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 21
    assert torch.bincount(splits.test.labels).tolist() == [1, 1]  # 10% of each class, at least one
    assert torch.bincount(splits.val.labels).tolist() == [1, 1]
    parts = (splits.train, splits.val, splits.test)
    square = torch.cat([part.images[part.labels == 1] for part in parts])
    assert (square.float().mean((1, 2, 3)) - 200).abs().max() < 3
    gray = load_dataset("image-folder", root, channels=1, image_size=16)
    assert gray.train.images.shape[1:] == (1, 16, 16) and gray.channels == 1


def test_image_folder_all_gray_defaults_to_one_channel(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        for i in range(3):
            _save(tmp_path / "g" / cls / f"{i}.bmp", "L", (6, 6), 50)
    assert load_dataset("image-folder", tmp_path / "g").channels == 1


def test_image_folder_train_test_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "given"
    for split, count in (("train", 4), ("test", 2)):
        for cls, value in (("cat", 30), ("dog", 90)):
            for i in range(count):
                _save(root / split / cls / f"{i}.jpeg", "L", (5, 5), value)
    splits = load_dataset("image-folder", root)
    # val is carved from train (1 of each class's 4), test is the given folder
    assert len(splits.train) == 6 and len(splits.val) == 2 and len(splits.test) == 4
    assert splits.classes == ("cat", "dog")
    assert splits.split_files["test"][0] == str(Path("test") / "cat" / "0.jpeg")
    assert splits.test.labels.tolist() == [0, 0, 1, 1]


def test_image_folder_empty_class_is_a_data_error(tmp_path: Path, runner) -> None:
    _save(tmp_path / "r" / "a" / "0.png", "L", (4, 4), 1)
    (tmp_path / "r" / "empty").mkdir()
    result = runner.invoke(app, ["data", "info", "image-folder", "--data", str(tmp_path / "r")])
    assert result.exit_code == 3
    assert "class folder" in result.stderr and "empty holds no .png/.jpg/.jpeg/.bmp images" in result.stderr


def test_image_folder_corrupt_image_is_a_data_error(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        _save(tmp_path / "r" / cls / "0.png", "L", (4, 4), 1)
        _save(tmp_path / "r" / cls / "1.png", "L", (4, 4), 1)
        _save(tmp_path / "r" / cls / "2.png", "L", (4, 4), 1)
    (tmp_path / "r" / "b" / "1.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"1\.png is not a readable image"):
        load_dataset("image-folder", tmp_path / "r")


# --- the decoded-tensor cache ----------------------------------------------------------------------------


@pytest.fixture
def decode_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import cnnkit.data.coil20 as coil20

    calls: list[int] = []
    real = coil20.decode_images

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(coil20, "decode_images", counting)
    return calls


def _cache_files() -> list[Path]:
    return sorted((Path(os.environ["CNNKIT_CACHE"]) / "decoded").glob("*.safetensors"))


def test_second_load_comes_from_the_cache(tmp_path: Path, decode_counter: list[int]) -> None:
    folder = write_coil(tmp_path / "coil", objects=3, poses=10)
    first = load_dataset("coil20", folder, split="alternate")
    second = load_dataset("coil20", folder, split="alternate")
    assert len(decode_counter) == 1
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.test.labels, second.test.labels)
    assert first.split_files == second.split_files and first.mean == second.mean and second.source == folder
    load_dataset("coil20", folder, split="pose-block")  # other options, other entry
    assert len(decode_counter) == 2 and len(_cache_files()) == 2
    from safetensors.torch import load_file

    assert set(load_file(str(_cache_files()[0]))) == {"train_images", "train_labels", "test_images", "test_labels"}


def test_changed_file_invalidates_the_cache(tmp_path: Path, decode_counter: list[int]) -> None:
    folder = write_coil(tmp_path / "coil", objects=2, poses=4)
    load_dataset("coil20", folder)
    target = folder / "obj1__0.png"
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touched
    load_dataset("coil20", folder)
    assert len(decode_counter) == 2
    Image.new("L", (SIDE, SIDE), 255).save(target)  # modified
    reloaded = load_dataset("coil20", folder)
    assert len(decode_counter) == 3
    assert reloaded.train.images.max() == 255 or reloaded.test.images.max() == 255
    (folder / "obj2__3.png").unlink()  # removed
    assert len(load_dataset("coil20", folder).train) + len(load_dataset("coil20", folder).test) == 7


def test_corrupt_cache_is_rebuilt(tmp_path: Path, decode_counter: list[int]) -> None:
    folder = write_coil(tmp_path / "coil", objects=2, poses=4)
    good = load_dataset("coil20", folder)
    (entry,) = _cache_files()
    entry.write_bytes(entry.read_bytes()[:100])
    rebuilt = load_dataset("coil20", folder)
    assert len(decode_counter) == 2 and torch.equal(rebuilt.train.images, good.train.images)
    assert entry.stat().st_size > 100  # rewritten whole
    load_dataset("coil20", folder)
    assert len(decode_counter) == 2


def test_unwritable_cache_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_coil(tmp_path / "coil", objects=2, poses=4)
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("CNNKIT_CACHE", str(blocker))
    assert len(load_dataset("coil20", folder).train) > 0


def test_read_only_data_folder_is_untouched(tmp_path: Path) -> None:
    folder = write_coil(tmp_path / "coil", objects=2, poses=4)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
    folder.chmod(0o555)
    try:
        load_dataset("coil20", folder)
        load_dataset("coil20", folder)
    finally:
        folder.chmod(0o755)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before


def test_the_default_cache_is_outside_the_default_data_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnkit.data.locate import cache_home, data_home, decoded_cache

    for name in ("CNNKIT_CACHE", "CNNKIT_DATA", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_home() == tmp_path / ".cache" / "cnnkit" / "cache"
    assert not decoded_cache().is_relative_to(data_home()) and not data_home().is_relative_to(cache_home())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_home() == tmp_path / "xdg" / "cnnkit" / "cache"
