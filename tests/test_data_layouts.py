"""The user's own images: every common layout recognised (class folders, train/ val/ test/ folders,
a CSV manifest), the split carved from what the layout does not give, each bad layout one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.cli.app import app
from cnnkit.data.layouts import assign_splits, find_layout
from cnnkit.errors import DataError


def image(path: Path, value: int = 128, size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def class_folders(root: Path, counts: dict[str, int], prefix: str = "") -> Path:
    for name, count in counts.items():
        for i in range(count):
            image(root / name / f"{prefix}{i}.png", value=(10 * i) % 256)
    return root


def info(runner, folder: Path, *options: str) -> dict:  # type: ignore[no-untyped-def]
    result = runner.invoke(app, ["data", "info", "image-folder", "--data", str(folder), "--format", "json", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_class_folders_are_split_into_train_val_test_stratified_and_seeded(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    root = class_folders(tmp_path / "pets", {"cat": 20, "dog": 30})
    report = info(runner, root)
    assert report["layout"] == "class folders" and report["classes"] == ["cat", "dog"]
    assert (report["train"], report["val"], report["test"]) == (40, 5, 5)
    assert report["per_class"]["cat"] == {"train": 16, "val": 2, "test": 2}
    layout = find_layout(root)
    first, again = assign_splits(layout, 0.1, 0.1, seed=0), assign_splits(layout, 0.1, 0.1, seed=0)
    assert first == again and assign_splits(layout, 0.1, 0.1, seed=1) != first
    names = [p for split in first.values() for p, _ in split]
    assert len(names) == len(set(names)) == 50  # every image in exactly one split
    assert info(runner, root, "-d", "val_fraction=0")["val"] == 0


def test_train_val_test_folders_are_the_splits_not_classes(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "kaggle"
    class_folders(root / "train", {"cat": 8, "dog": 8})
    class_folders(root / "valid", {"cat": 2, "dog": 2})
    class_folders(root / "test", {"cat": 3, "dog": 3})
    report = info(runner, root)
    assert report["layout"] == "split folders" and report["classes"] == ["cat", "dog"]
    assert (report["train"], report["val"], report["test"]) == (16, 4, 6)  # nothing carved: all given


def test_a_missing_val_or_test_is_carved_from_train(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "two"
    class_folders(root / "train", {"a": 10, "b": 10})
    class_folders(root / "val", {"a": 3, "b": 3})
    report = info(runner, root)
    assert (report["train"], report["val"], report["test"]) == (18, 6, 2)


def test_classes_are_the_union_and_a_missing_one_is_said(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "uneven"
    class_folders(root / "train", {"a": 5, "b": 5, "c": 5})
    class_folders(root / "test", {"a": 2, "b": 2})
    result = runner.invoke(app, ["data", "info", "image-folder", "--data", str(root)])
    assert result.exit_code == 0, result.output
    assert "no folder for class(es) c" in result.stderr and "classes   3: a, b, c" in result.stdout


def test_a_csv_manifest_with_a_split_column(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "kaggle-csv"
    rows = ["path,label,split"]
    for i in range(12):
        image(root / "images" / f"{i}.png", value=i)
        rows.append(f"images/{i}.png,{'ship' if i % 2 else 'car'},{'test' if i >= 10 else 'train'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    for data in (root / "labels.csv", root):  # the file itself, or the folder whose only CSV it is
        report = info(runner, data)
        assert report["layout"] == "csv" and report["classes"] == ["car", "ship"]
        assert (report["train"], report["val"], report["test"]) == (8, 2, 2)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["path,klass", "a.png,x"], "has no 'label' column (its columns: path, klass); name the column with -d label_column=NAME"),
        (["path,label", "gone.png,x", "a.png,y"], "line 2: gone.png does not exist"),
        (["path,label", "a.png,x", "a.png,y"], "line 3: a.png is listed twice (also on line 2)"),
        (["path,label", "a.png,", "b.png,y"], "line 2: a.png has an empty label"),
        (["path,label", "../outside.png,x", "a.png,y"], "line 2: ../outside.png is outside"),
    ],
)
def test_bad_manifests_are_one_line_naming_the_line(tmp_path: Path, runner, rows: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "m"
    image(root / "a.png")
    image(root / "b.png")
    image(tmp_path / "outside.png")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    result = runner.invoke(app, ["data", "info", "image-folder", "--data", str(root / "labels.csv")])
    assert result.exit_code == 3, result.output
    assert message in " ".join(result.stderr.split()) and len(result.stderr.strip().splitlines()) == 1


def test_a_custom_label_column(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "m"
    for i in range(6):
        image(root / f"{i}.png")
    (root / "labels.csv").write_text("file,category\n" + "".join(f"{i}.png,{'ab'[i % 2]}\n" for i in range(6)))
    report = info(runner, root / "labels.csv", "-d", "path_column=file", "-d", "label_column=category",
                  "-d", "val_fraction=0.2", "-d", "test_fraction=0.2")  # fmt: skip
    assert report["classes"] == ["a", "b"] and report["train"] + report["val"] + report["test"] == 6


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda r: (class_folders(r / "train", {"a": 3, "b": 3}), class_folders(r, {"extra": 2})),
         "mixes split folders (train/) with other folders (extra/)"),
        (lambda r: (r / "train" / "a").mkdir(parents=True), "class folder"),
        (lambda r: (r / "train").mkdir(parents=True), "has no class subfolders"),
        (lambda r: (class_folders(r / "val", {"a": 2, "b": 2})), "but no train/ folder"),
        (lambda r: (class_folders(r / "val", {"a": 2}), class_folders(r / "valid", {"a": 2}),
                    class_folders(r / "train", {"a": 2, "b": 2})), "has val/ and valid/"),
        (lambda r: class_folders(r, {"a": 2, "b": 9}), "class 'a' has 2 image(s), too few for one each in train and val, test"),
    ],
)
def test_bad_layouts_are_one_line(tmp_path: Path, runner, make, message: str) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "bad"
    root.mkdir()
    make(root)
    result = runner.invoke(app, ["data", "info", "image-folder", "--data", str(root)])
    assert result.exit_code == 3, result.output
    assert message in " ".join(result.stderr.split())


def test_class_folders_with_the_default_dataset_suggest_image_folder(tmp_path: Path, runner) -> None:  # type: ignore[no-untyped-def]
    root = class_folders(tmp_path / "pets", {"cat": 4, "dog": 4})
    result = runner.invoke(app, ["train", "lenet_bn", "--data", str(root), "--epochs", "1"])
    assert result.exit_code == 2, result.output
    assert "holds your own images (class folders, 2 classes), not fashion-mnist's files; add --dataset image-folder" in (
        " ".join(result.stderr.split())
    )
    assert not (tmp_path / "runs").exists()


def test_layout_errors_are_data_errors() -> None:
    with pytest.raises(DataError, match="is a file, not a folder"):
        find_layout(Path(__file__))
