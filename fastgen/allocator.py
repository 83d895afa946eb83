"""glibc heap settings for CPU training.

By default glibc's ``free`` hands the top of the heap back to the OS once more than ``M_TRIM_THRESHOLD``
bytes are free there, and a tensor larger than the (dynamic) ``M_MMAP_THRESHOLD`` gets its own mapping.
A training step frees most of its activations when it returns, so the next step faults the same pages in
again, zero-filled: 2,000–7,000 minor page faults and 4–7 % of a toy step on CPU (docs/benchmarks.md).
``keep_heap`` raises both thresholds so the heap is kept across steps. It changes only this process's
allocator policy; memory is still reused, not leaked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 1 << 30
"""Free bytes at the heap top before glibc returns them to the OS (1 GiB)."""
MMAP_THRESHOLD = 32 << 20
"""Allocations from this size up still get their own mapping (32 MiB, glibc's maximum is 32 MiB on 64-bit)."""


def keep_heap() -> bool:
    """Raise glibc's trim and mmap thresholds (``mallopt``); True if they were set. A no-op off glibc, and
    where ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_MMAP_THRESHOLD_`` is already set (the user's choice) or
    ``FASTGEN_KEEP_HEAP=0``."""
    if os.environ.get("FASTGEN_KEEP_HEAP") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    if "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # the mmap threshold first: setting either one turns off glibc's dynamic adjustment of both
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
