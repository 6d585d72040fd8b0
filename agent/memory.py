"""Allocator tuning for batch processing, applied once when the agent's process starts.

Each batch allocates numpy temporaries of a few hundred kilobytes. glibc serves blocks that
large with fresh mmap() pages and hands them back to the kernel when freed, so every batch
page-faults its memory in again; measured on the RAV4 and Tesla logs, the faults cost as
much as the decoding itself. Serving them from the heap and keeping a bounded amount of
freed memory removes the faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks below this come from the heap, not from mmap().
MMAP_THRESHOLD = 16 * 1024 * 1024
#: Freed heap memory kept for reuse before glibc returns it to the kernel.
TRIM_THRESHOLD = 64 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Tune glibc's allocator for batch reuse; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False  # musl and others: mallopt is absent or ignores these parameters
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
