"""Allocator tuning for the long-running agent process.

The agent allocates multi-MiB buffers for a moment on every eviction batch (pages read
out, encoded, written) and every compaction. glibc's default *dynamic* mmap threshold
rises each time such a buffer is freed, so later ones are carved from per-thread arenas
that keep the memory after ``free``: RSS then climbs by tens of MiB with no leak behind
it, and that noise would hide a real leak. A fixed threshold sends every large buffer
to ``mmap`` and back to the kernel on ``free``.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import structlog

log = structlog.get_logger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024
"""glibc's initial default: buffers above it come from mmap (and setting it turns off the dynamic rise)."""


def pin_malloc_thresholds(mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap and trim thresholds; False (and no change) on a non-glibc libc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2 * mmap_threshold)
    )
    log.debug("malloc thresholds pinned", ok=ok, mmap_threshold=mmap_threshold)
    return ok
