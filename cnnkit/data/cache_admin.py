"""What the decoded cache holds, and clearing it: the library behind ``cnnkit cache info|clear``.

Two kinds of entry live under :func:`cnnkit.data.locate.decoded_cache`:

- ``decoded``: a whole dataset's splits, one ``<dataset>-<key>.safetensors`` file
  (:mod:`cnnkit.data.cache`); its last use is the file's access time (or modification time,
  whichever is later: most systems update access times at most daily, enough for days);
- ``store``: decoded images at one size, a ``stores/<key>/`` folder (:mod:`cnnkit.data.store`);
  its last use is the modification time of its ``meta.json``, touched whenever it is opened.

Hidden ``.*.tmp`` files and folders are builds in progress or left by a killed process; ``clear``
removes those not written to for an hour (a running build is never pulled from under its feet).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cnnkit.data.locate import decoded_cache
from cnnkit.data.store import META_FILE, read_meta, stores_folder
from cnnkit.units import human_bytes

__all__ = ["CacheEntry", "cache_entries", "cache_report", "clear_cache"]

DAY = 86400.0
STALE_BUILD = 3600.0
"""A temp build not written to for this many seconds is left over from a killed process."""


@dataclass(frozen=True)
class CacheEntry:
    """One entry of the decoded cache."""

    kind: str  # "decoded" or "store"
    path: Path
    bytes: int
    created: float  # seconds since the epoch
    last_used: float
    dataset: str | None
    files: int | None
    size: int | None  # side in pixels, when one size holds for all images
    channels: int | None
    resize: str | None  # stores only

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["bytes_human"] = human_bytes(self.bytes)
        out["created"] = _iso(self.created)
        out["last_used"] = _iso(self.last_used)
        return out


def cache_entries() -> list[CacheEntry]:
    """Every complete entry, oldest last use first."""
    root = decoded_cache()
    entries: list[CacheEntry] = []
    if root.is_dir():
        for path in sorted(root.glob("*.safetensors")):
            if not path.name.startswith("."):
                with contextlib.suppress(OSError):
                    entries.append(_decoded_entry(path))
    stores = stores_folder()
    if stores.is_dir():
        for folder in sorted(stores.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            entry = _store_entry(folder)
            if entry is not None:
                entries.append(entry)
    return sorted(entries, key=lambda e: e.last_used)


def cache_report() -> dict[str, Any]:
    """``cnnkit cache info``: the folder, totals and every entry (JSON-ready)."""
    entries = cache_entries()
    unfinished = _temp_builds()
    total = sum(e.bytes for e in entries)
    return {
        "folder": str(decoded_cache()),
        "bytes": total,
        "bytes_human": human_bytes(total),
        "entries": len(entries),
        "unfinished_builds": len(unfinished),
        "unfinished_bytes": sum(_size(p) for p in unfinished),
        "items": [e.as_json() for e in entries],
    }


def clear_cache(older_than_days: float | None = None) -> tuple[list[CacheEntry], int]:
    """Remove the entries not used for ``older_than_days`` days (all when None), and temp builds
    left over by killed processes; (the entries removed, bytes freed)."""
    now = time.time()
    removed: list[CacheEntry] = []
    freed = 0
    for entry in cache_entries():
        if older_than_days is not None and now - entry.last_used < older_than_days * DAY:
            continue
        try:
            if entry.path.is_dir():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink()
        except FileNotFoundError:
            continue  # removed meanwhile (another clear)
        removed.append(entry)
        freed += entry.bytes
    for leftover in _temp_builds():
        if now - _newest_write(leftover) >= STALE_BUILD:
            size = _size(leftover)
            with contextlib.suppress(OSError):
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
                freed += size
    return removed, freed


# ---------------------------------------------------------------------------------------- entries


def _decoded_entry(path: Path) -> CacheEntry:
    stat = path.stat()
    header = _safetensors_header(path) or {}
    meta = json.loads(header.get("__metadata__", {}).get("cnnkit", "{}")) if header else {}
    shapes = [header[k]["shape"] for k in ("train_images", "test_images") if k in header]
    files = sum(int(s[0]) for s in shapes) if shapes else None
    channels = int(shapes[0][1]) if shapes and len(shapes[0]) == 4 else None
    side = int(shapes[0][2]) if shapes and len(shapes[0]) == 4 and shapes[0][2] == shapes[0][3] else None
    dataset = path.stem.rsplit("-", 1)[0] if "-" in path.stem else None
    if not shapes and isinstance(meta.get("split_files"), dict):
        files = sum(len(v) for v in meta["split_files"].values())
    return CacheEntry(
        kind="decoded", path=path, bytes=stat.st_size, created=stat.st_mtime,
        last_used=max(stat.st_atime, stat.st_mtime), dataset=dataset, files=files, size=side,
        channels=channels, resize=None,
    )  # fmt: skip


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), unparsed tensors."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            return None
        (length,) = struct.unpack("<Q", raw)
        if length > 100 << 20:
            return None
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return None
    return header if isinstance(header, dict) else None


def _store_entry(folder: Path) -> CacheEntry | None:
    meta = read_meta(folder)
    if meta is None:
        return None
    try:
        used = (folder / META_FILE).stat().st_mtime
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    except OSError:
        return None
    created = _parse_iso(meta.get("created")) or used
    return CacheEntry(
        kind="store", path=folder, bytes=size, created=created, last_used=used, dataset=meta.get("dataset"),
        files=meta.get("files"), size=meta.get("size"), channels=meta.get("channels"), resize=meta.get("resize"),
    )  # fmt: skip


def _temp_builds() -> list[Path]:
    found: list[Path] = []
    for folder in (decoded_cache(), stores_folder()):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    return found


def _size(path: Path) -> int:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return 0


def _newest_write(path: Path) -> float:
    try:
        times = [path.stat().st_mtime]
        if path.is_dir():
            times += [p.stat().st_mtime for p in path.iterdir()]
        return max(times)
    except OSError:
        return time.time()


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _parse_iso(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None

