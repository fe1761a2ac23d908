"""The layouts a folder of the user's own images comes in, recognised by what is there:

- **class folders**: ``root/<class>/*.jpg``; the split is cnnkit's (seeded, stratified);
- **split folders**: ``root/train/<class>/``, and any of ``root/val/`` (also ``valid/``,
  ``validation/``) and ``root/test/``, each holding class folders (torchvision's ImageFolder per
  split, Kaggle sets, Ultralytics' classify layout); a missing val or test is carved from train;
- **a CSV manifest**: ``--data labels.csv`` (or a folder whose only CSV file it is) with a header
  naming a path column and a label column (``path,label`` unless the options say otherwise) and
  an optional ``split`` column (train / val / test); paths are relative to the CSV's folder.

:func:`find_layout` reads names only (no image is opened); :func:`assign_splits` turns a layout
into the three file lists, carving what the layout does not give with a seeded split stratified
per class. Class names are sorted (label i is the i-th name), never the order files are listed in.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from cnnkit.errors import DataError
from cnnkit.image_files import image_files

__all__ = ["Layout", "find_layout", "assign_splits", "SPLITS", "printable", "image_files"]

SPLITS = ("train", "val", "test")
SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
HOW_TO_LAY_OUT = (
    "lay the images out as root/<class>/*.jpg, or root/train/<class>/ (with val/ and test/ if you have them), "
    "or pass a CSV manifest with path,label columns"
)

Item = tuple[Path, str]
"""An image file and its class name."""


def printable(name: str) -> str:
    """A file name as text that can be written anywhere: bytes that are not UTF-8 become ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


@dataclass
class Layout:
    """What :func:`find_layout` found: the kind, the classes, and the files of each split it gives."""

    kind: Literal["class folders", "split folders", "csv"]
    root: Path
    """The folder relative to which files are named (the CSV's folder for a manifest)."""
    classes: tuple[str, ...]
    given: dict[str, list[Item]]
    """Split name (train, val, test) -> its files, for the splits the layout itself gives; class
    folders give ``{"all": [...]}``."""
    notes: list[str] = field(default_factory=list)
    """One-line remarks worth telling the user (a class missing from a split, skipped files)."""


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_items(root: Path, notes: list[str], need_two: bool = True) -> dict[str, list[Path]]:
    classes = _subfolders(root)
    if not classes:
        raise DataError(f"{root} has no class subfolders; {HOW_TO_LAY_OUT}")
    if need_two and len(classes) == 1:
        raise DataError(
            f"{root} has a single class folder ({printable(classes[0].name)}); a classifier needs at least two"
        )
    found: dict[str, list[Path]] = {}
    skipped: list[Path] = []
    for folder in classes:
        files, others = image_files(folder)
        skipped += others
        if not files:
            raise DataError(
                f"class folder {folder} holds no .png/.jpg/.jpeg/.bmp images (nor .tif/.tiff/.webp/.gif); "
                "add some or remove it"
            )
        found[printable(folder.name)] = files
    if skipped:
        suffixes = sorted({p.suffix.lower() or p.name for p in skipped})
        notes.append(f"{root}: skipped {len(skipped)} file(s) that are not images by name ({', '.join(suffixes[:5])})")
    return found


def _split_folders(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split, names in SPLIT_FOLDERS.items():
        present = [root / name for name in names if (root / name).is_dir()]
        if len(present) > 1:
            raise DataError(
                f"{root} has {' and '.join(p.name + '/' for p in present)}: both would be the {split} split; "
                "keep one of them"
            )
        if present:
            found[split] = present[0]
    return found


def find_layout(data: Path, path_column: str = "path", label_column: str = "label") -> Layout:
    """The layout of ``data`` (a folder, or a CSV manifest file); DataError (exit 3) naming what is wrong."""
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise DataError(f"{data} is a file, not a folder of images nor a .csv manifest; {HOW_TO_LAY_OUT}")
        return _csv_layout(data, path_column, label_column)
    notes: list[str] = []
    splits = _split_folders(data)
    if not splits:
        manifests = sorted(p for p in data.glob("*.csv") if p.is_file())
        if len(manifests) == 1 and (not _subfolders(data) or _names_columns(manifests[0], path_column, label_column)):
            return _csv_layout(manifests[0], path_column, label_column)
        items = _class_items(data, notes)
        classes = tuple(sorted(items))
        return Layout("class folders", data, classes, {"all": _flat(items, classes)}, notes)
    others = [p for p in _subfolders(data) if p not in splits.values()]
    if others:
        raise DataError(
            f"{data} mixes split folders ({', '.join(p.name + '/' for p in splits.values())}) with other folders "
            f"({', '.join(printable(p.name) + '/' for p in others[:5])}); move the class folders into "
            f"{splits.get('train', data / 'train').name}/ or remove them"
        )
    if "train" not in splits:
        raise DataError(
            f"{data} has {', '.join(p.name + '/' for p in splits.values())} but no train/ folder; add train/<class>/"
        )
    per_split = {split: _class_items(folder, notes, need_two=split == "train") for split, folder in splits.items()}
    classes = tuple(sorted(set().union(*(set(items) for items in per_split.values()))))
    if len(classes) < 2:
        raise DataError(f"{data} has a single class ({classes[0]}); a classifier needs at least two")
    for split, items in per_split.items():
        missing = [c for c in classes if c not in items]
        if missing:
            notes.append(f"{splits[split]}: no folder for class(es) {', '.join(missing[:5])}")
    given = {split: _flat(items, classes) for split, items in per_split.items()}
    return Layout("split folders", data, classes, given, notes)


def _flat(items: dict[str, list[Path]], classes: tuple[str, ...]) -> list[Item]:
    return [(path, name) for name in classes for path in items.get(name, [])]


def _names_columns(manifest: Path, path_column: str, label_column: str) -> bool:
    """Whether the CSV's header names the path and label columns (a manifest, not some other table)."""
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            header = [c.strip().lower() for c in next(csv.reader(handle), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return path_column.lower() in header and label_column.lower() in header


def _csv_layout(manifest: Path, path_column: str, label_column: str) -> Layout:
    root = manifest.parent
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{manifest} cannot be read as CSV ({exc}); fix or replace it") from exc
    lowered = {c.strip().lower(): c for c in columns}
    for wanted, option in ((path_column, "path_column"), (label_column, "label_column")):
        if wanted.lower() not in lowered:
            raise DataError(
                f"{manifest} has no '{wanted}' column (its columns: {', '.join(columns) or 'none'}); name the "
                f"column with -d {option}=NAME"
            )
    path_key, label_key = lowered[path_column.lower()], lowered[label_column.lower()]
    split_key = lowered.get("split")
    given: dict[str, list[Item]] = {}
    seen: dict[Path, int] = {}
    resolved_root = root.resolve()
    for line, row in enumerate(rows, start=2):
        raw, label = (row.get(path_key) or "").strip(), (row.get(label_key) or "").strip()
        where = f"{manifest}, line {line}"
        if not raw:
            raise DataError(f"{where}: the path is empty; fill it in or remove the line")
        if not label:
            raise DataError(f"{where}: {raw} has an empty label; fill it in or remove the line")
        path = root / raw
        if Path(raw).is_absolute() or not path.resolve().is_relative_to(resolved_root):
            raise DataError(f"{where}: {raw} is outside {root}; paths must be relative to the CSV's folder")
        if path in seen:
            raise DataError(f"{where}: {raw} is listed twice (also on line {seen[path]}); remove one")
        seen[path] = line
        if not path.is_file():
            raise DataError(f"{where}: {raw} does not exist; fix the path or remove the line")
        split = "train"
        if split_key is not None and (row.get(split_key) or "").strip():
            named = row[split_key].strip().lower()
            split = next((s for s, names in SPLIT_FOLDERS.items() if named in names), "")
            if not split:
                raise DataError(f"{where}: split '{row[split_key]}' is not train, val or test")
        given.setdefault(split, []).append((path, label))
    if not given:
        raise DataError(f"{manifest} lists no images; add path,label rows")
    classes = tuple(sorted({label for items in given.values() for _, label in items}))
    if len(classes) < 2:
        raise DataError(f"{manifest} names a single class ({classes[0]}); a classifier needs at least two")
    if split_key is None:
        given = {"all": given["train"]}
    elif "train" not in given:
        raise DataError(f"{manifest} puts no image in the train split; mark some rows split=train")
    return Layout("csv", root, classes, given, [])


def assign_splits(layout: Layout, val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[Item]]:
    """train, val and test file lists: what the layout gives, the rest carved from train by a
    seeded split stratified per class (``val_fraction`` 0: no val split)."""
    pool = layout.given.get("train", layout.given.get("all", []))
    carve = {"val": val_fraction if "val" not in layout.given else 0.0,
             "test": test_fraction if "test" not in layout.given else 0.0}  # fmt: skip
    out: dict[str, list[Item]] = {split: list(layout.given.get(split, [])) for split in ("val", "test")}
    if any(carve.values()):
        generator = torch.Generator().manual_seed(seed)
        by_class: dict[str, list[Item]] = {}
        for item in pool:
            by_class.setdefault(item[1], []).append(item)
        kept: list[Item] = []
        for name in layout.classes:
            members = by_class.get(name, [])
            counts = {split: max(1, round(len(members) * f)) if f else 0 for split, f in carve.items()}
            if members and len(members) - sum(counts.values()) < 1:
                needed = ", ".join(s for s, n in counts.items() if n)
                raise DataError(
                    f"class '{name}' has {len(members)} image(s), too few for one each in train and {needed}; "
                    "add images, or set -d val_fraction=0 / -d test_fraction=... (or give val/ and test/ folders)"
                )
            order = torch.randperm(len(members), generator=generator).tolist()
            shuffled = [members[i] for i in order]
            start = 0
            for split in ("test", "val"):
                out[split] += shuffled[start : start + counts[split]]
                start += counts[split]
            chosen = {id(item) for item in shuffled[:start]}
            kept += [item for item in members if id(item) not in chosen]
        pool = kept
    out["train"] = pool
    rank = {name: i for i, name in enumerate(layout.classes)}
    return {split: sorted(out[split], key=lambda item: (rank[item[1]], item[0])) for split in SPLITS}


def describe(layout: Layout, splits: dict[str, list[Item]]) -> dict[str, object]:
    """What ``cnnkit data info`` shows: the layout, the classes and each split's size per class."""
    counts = {split: Counter(name for _, name in items) for split, items in splits.items()}
    return {
        "layout": layout.kind,
        "source": str(layout.root),
        "classes": list(layout.classes),
        **{split: len(items) for split, items in splits.items()},
        "per_class": {name: {split: counts[split][name] for split in SPLITS} for name in layout.classes},
        "notes": list(layout.notes),
    }
