"""Where datasets and caches live: ``--data``, ``$CNNKIT_DATA``, system folders, ``$CNNKIT_CACHE``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cnnkit.errors import DataError

__all__ = ["data_home", "cache_home", "decoded_cache", "find_folder"]


def data_home() -> Path:
    """``$CNNKIT_DATA``, else ``~/.cache/cnnkit/datasets``: the folder holding one folder per dataset."""
    env = os.environ.get("CNNKIT_DATA", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cnnkit" / "datasets"


def cache_home() -> Path:
    """``$CNNKIT_CACHE``, else ``$XDG_CACHE_HOME/cnnkit/cache`` (``~/.cache/cnnkit/cache``): decoded
    tensors go here, never into a data folder nor into the default data search path beside it."""
    env = os.environ.get("CNNKIT_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    user_cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(user_cache).expanduser() if user_cache else Path.home() / ".cache") / "cnnkit" / "cache"


def decoded_cache() -> Path:
    """Where decoded datasets are cached: ``cache_home() / "decoded"``."""
    return cache_home() / "decoded"


def find_folder(
    name: str, data: Path | None, spellings: Sequence[str], system: Sequence[Path] = (), how_to_get: str = ""
) -> Path:
    """``data`` if given (it must exist), else the first existing ``$CNNKIT_DATA/<spelling>``, else ``system``."""
    hint = f"; {how_to_get}" if how_to_get else ""
    if data is not None:
        folder = Path(data).expanduser()
        if not folder.is_dir():
            raise DataError(f"{name}: data folder {folder} does not exist{hint}")
        return folder
    home = data_home()
    candidates = [home / spelling for spelling in spellings] + list(system)
    for folder in candidates:
        if folder.is_dir():
            return folder
    looked = ", ".join(str(c) for c in candidates)
    # Most hints already end in "pass --data PATH": say it once.
    fix = how_to_get if "--data" in how_to_get else f"pass --data PATH{hint}"
    raise DataError(f"{name}: no data folder found (looked in {looked}); {fix}")
