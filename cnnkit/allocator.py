"""glibc's malloc told to keep freed memory for reuse, where training on the CPU would otherwise pay
for every batch's tensors in page faults.

torch's CPU tensors come from ``malloc``. glibc hands large blocks back to the kernel when they are
freed (``munmap``, or trimming the top of the heap) and takes them again on the next batch, and each
page of new memory costs a fault: on virtual machines 2-5 us a page. Training BN-LeNet with the
recipe kit's augmentation on, whose chunk-sized temporaries change size from chunk to chunk, took
24,000-48,000 faults an epoch of 20,000 images; with the thresholds below, under ten, at the same
peak memory (823 MB), and the loader's share of a batch of 128 fell from 1.4-1.6 ms to 0.9-1.1.

The setting is the process's (as ``torch.set_num_threads`` is): the training run driver makes it
for a CPU run. Memory stays bounded: blocks of 32 MiB or more are still mapped and returned one by
one, and the heap is trimmed once 256 MiB at its top is free. A user who sets glibc's own
``MALLOC_*_`` variables or ``GLIBC_TUNABLES`` keeps them: nothing is changed then.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its sliding threshold (64-bit)
TRIM_THRESHOLD = 256 << 20


def _user_chose() -> bool:
    """Whether glibc's malloc was configured by the environment (then it is left as it is)."""
    if "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return True
    return any(name.startswith("MALLOC_") for name in os.environ)  # MALLOC_ARENA_MAX, MALLOC_TRIM_THRESHOLD_, ...


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring; calling
    it again sets the same values). True when they are set; False on other C libraries, or where
    the environment already configures malloc."""
    applied = False
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc" and not _user_chose():
        try:
            mallopt = ctypes.CDLL(None).mallopt
        except (OSError, AttributeError):
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
            mallopt.restype = ctypes.c_int
            # Setting either threshold turns off glibc's sliding mmap threshold: set both.
            applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            )
    return applied
