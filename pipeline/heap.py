"""Keep the process heap's pages between steps (glibc ``mallopt``), for training and predict on a CPU.

By default glibc gives a freed block above its dynamic mmap threshold (at most 32 MiB) back to
the kernel, and trims the heap top above 128 KiB: a step's activation buffers are then faulted
in again, page by page, every step (~66,000-99,000 minor faults per training step of the fast
recipe). A fixed mmap threshold of 1 GiB with a ~2 GiB trim threshold and a 64 MiB top pad
keeps them in the heap: the pages are reused, the faults go to ~0 and the step runs 1.11-1.18x
faster (measured as GLIBC_TUNABLES with a 4 GiB trim threshold: ``benchmarks/bench_recipe.py``, "Levers"; docs/accuracy.md). The memory a step peaks
at stays mapped while the process lives, which training and predict reuse anyway.

``PIPELINE_HEAP=default`` leaves glibc as it is; other C libraries (no ``mallopt``) are left alone.
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3      # glibc's malloc.h
SETTINGS = ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 2 ** 31 - 1), (M_TOP_PAD, 64 << 20))   # mallopt takes an int

_done: bool | None = None


def keep_pages() -> bool:
    """Set :data:`SETTINGS` once per process; True when glibc took them all."""
    global _done
    if _done is None:
        _done = False
        if os.environ.get("PIPELINE_HEAP", "") != "default":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):      # not glibc
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _done = all(mallopt(p, v) == 1 for p, v in SETTINGS)
    return _done
