"""Keep freed memory in the process, as an enclave's fixed heap does.

By default glibc maps every block over 32 MiB afresh and unmaps it on free, so each step's
activations fault in every page again. An SGX enclave commits its heap once, so `legrace train`
and `legrace bench` keep freed memory by raising glibc's mmap threshold and turning trimming off
(mallopt), much as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...
would, at the price of a larger resident memory (docs/performance.md).
A block over 64 MiB allocated on another thread than the main one is still mapped afresh (a
thread's arena is no larger); legrace's large trusted work runs on the main thread.

Trimming is turned off altogether (M_TRIM_THRESHOLD = -1, as mallopt(3) documents), not set to
mallopt's largest int: with a 2 GiB threshold, a step that frees more than that at the heap's top
gives it back to the OS, and the next step faults it in again (benchmarks/heap_settings.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Optional

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
LARGEST = 2**31 - 1  # mallopt takes an int: blocks over 2 GiB are still mapped afresh
NEVER = -1  # M_TRIM_THRESHOLD: never give the heap's top back
_set_here = False


# The tunables that keep freed memory: both must be set for the environment to keep the heap.
THRESHOLD_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


def _tunables() -> dict[str, str]:
    """GLIBC_TUNABLES as name -> value (it is a colon-separated list of name=value)."""
    pairs = (item.split("=", 1) for item in os.environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item)
    return {name.strip(): value for name, value in pairs}


def how_kept() -> Optional[str]:
    """How this process keeps freed memory: "GLIBC_TUNABLES" (the environment sets both of glibc's
    malloc thresholds), "mallopt" (keep_freed_memory set them), or None (glibc's defaults, or not
    glibc). Other malloc tunables (tcache_count, arena_max) keep nothing: with only those set, the
    thresholds are still glibc's defaults."""
    if all(name in _tunables() for name in THRESHOLD_TUNABLES):
        return "GLIBC_TUNABLES"
    return "mallopt" if _set_here else None


def set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's M_MMAP_THRESHOLD and M_TRIM_THRESHOLD (ints, as mallopt takes them). False where
    this is not glibc or glibc refused. keep_freed_memory uses it; benchmarks/heap_settings.py and
    the tests use it to compare other settings."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl's mallopt does nothing)
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1


def keep_freed_memory() -> Optional[str]:
    """Make glibc keep freed memory for reuse, unless GLIBC_TUNABLES already sets both of its malloc
    thresholds (left as they are; with one of them set, mallopt sets both). Returns how_kept():
    None where this is not glibc or it refused."""
    global _set_here
    if not how_kept():
        _set_here = set_malloc_thresholds(LARGEST, NEVER)
    return how_kept()
