"""glibc's malloc keeps freed memory for a CPU run (cnnkit.allocator): freed memory is reused, not
faulted in again; the environment's own malloc settings win; the run driver makes the setting."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import cnnkit.allocator

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)

# Ten 4 MiB tensors made, filled and freed in a fresh process, then glibc's own count of the free
# bytes its heap keeps (mallinfo2). With its defaults each block is mapped and unmapped (the
# sliding threshold starts at 128 KiB), so the next batch's tensors are faulted in again; with the
# setting they stay in the heap for reuse.
_FREE_IN_HEAP = """
import ctypes, json, sys, torch
torch.set_num_threads(1)
from cnnkit.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
blocks = [torch.empty(1 << 20).fill_(1.0) for _ in range(10)]
del blocks
print(json.dumps({"applied": applied, "free_mib": mallinfo2().fordblks / 2**20}))
"""


def _free_in_heap(mode: str) -> dict[str, object]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    root = str(Path(__file__).resolve().parent.parent)
    done = subprocess.run(
        [sys.executable, "-c", _FREE_IN_HEAP, mode], capture_output=True, text=True, check=True,
        env={**environment, "PYTHONPATH": root},
    )  # fmt: skip
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_freed_memory_stays_in_the_heap_for_reuse() -> None:
    kept, plain = _free_in_heap("keep"), _free_in_heap("plain")
    assert kept["applied"] is True
    assert isinstance(kept["free_mib"], float) and isinstance(plain["free_mib"], float)
    assert kept["free_mib"] >= 40, kept  # all ten blocks, ready for the next batch
    assert plain["free_mib"] < 4, plain  # glibc's defaults: unmapped, to be faulted in again


@pytest.mark.parametrize("name, value", [("MALLOC_ARENA_MAX", "2"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")])
def test_the_environments_malloc_settings_are_left_alone(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    assert cnnkit.allocator.keep_freed_memory() is False  # returns before calling mallopt


def test_a_cpu_run_makes_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_train import fit, tiny_config

    calls: list[bool] = []
    monkeypatch.setattr(cnnkit.allocator, "keep_freed_memory", lambda: calls.append(True) or True)
    fit(tiny_config(tmp_path, epochs=1))
    assert calls == [True]
