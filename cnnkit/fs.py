"""Files written so that no reader ever sees half of one: the one owner of atomic writes.

Everything cnnkit writes (weights, the resume point, config.json, metrics.csv, curves, caches,
reports) goes through :func:`atomic_write`. It imports nothing above the standard library, so the
data, weights and training code can all depend on it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "write_text"]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, fsync it, then ``os.replace`` it over ``path``.

    Readers see either the old file or the complete new one, never a half-written file, even if
    the process is killed. On any failure (KeyboardInterrupt included) the temp file is removed
    and ``path`` is left as it was. The folder must exist: callers that own a folder (a run
    directory, the cache) create it; an explicit output file never gets parents made up for it.

    The new file gets the mode a plain ``open(path, "w")`` would give it: the existing file's
    mode, else 0o666 less the umask. A failure of the operating system (disk full, file too
    large, read-only, permission), whichever library's writer hit it, is raised as an
    :class:`OSError` carrying its errno and ``path`` (never the temp name), so the CLI can print
    one line naming the file.
    """
    target = Path(path)
    folder = target.parent
    if not folder.is_dir():
        if folder.exists():
            raise OSError(errno.ENOTDIR, f"cannot write {target.name} into something that is not a folder", str(folder))
        raise OSError(errno.ENOENT, f"no such folder to write {target.name} into (create it first)", str(folder))
    # Same folder, so os.replace is a rename within one filesystem; hidden, so globs skip it.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # Some writers (safetensors) create their file 0600; the result must look like any other file.
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        failure = _os_failure(exc, target, tmp)
        if failure is not None:
            raise failure from exc
        raise
    fsync_dir(folder)


_OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")


def _os_failure(exc: BaseException, target: Path, tmp: Path) -> OSError | None:
    """The OSError (errno, message, ``target``) behind a failed write; None when it was no OS failure.

    safetensors wraps the io error in its own SafetensorError ("... (os error 28)"); Python's own
    write errors carry no file name, or the temp file's.
    """
    if isinstance(exc, OSError):
        if exc.filename not in (None, str(tmp), tmp):
            return None  # already names the real file (e.g. a source that could not be read)
        code = exc.errno
    else:
        match = _OS_ERROR_IN_MESSAGE.search(str(exc)) if isinstance(exc, Exception) else None
        if match is None:
            return None
        code = int(match[1])
    if code is None:
        return OSError(None, f"cannot write {target}: {exc}", str(target))
    return OSError(code, os.strerror(code), str(target))


def _umask() -> int:
    """The process umask, read without changing it where the system allows."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    current = os.umask(0o022)  # elsewhere, the only way to read it is to set it
    os.umask(current)
    return current


def fsync_dir(folder: Path) -> None:
    """Persist a folder's entries (a rename into it, say); not possible (nor needed) on Windows."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write)
