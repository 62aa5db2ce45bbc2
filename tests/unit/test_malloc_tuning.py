"""The agent's allocator tuning: freed multi-MiB buffers go back to the kernel."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from tiermem.agent.malloc import pin_malloc_thresholds
if sys.argv[1] == "pin":
    assert pin_malloc_thresholds()
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
b = bytearray(16 << 20); del b  # by default this free raises glibc's mmap threshold to 16 MiB ...
base = anon()
bufs = [bytearray(8 << 20) for _ in range(4)]  # ... so these come from the heap
bufs[0:3] = []                                   # freed below the heap top: glibc keeps them
print(anon() - base)
"""


def _retained(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60, check=True
    )
    return int(out.stdout.split()[-1])  # the last line: structlog may print to stdout first


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and /proc are Linux-only")
def test_pinned_thresholds_return_freed_buffers() -> None:
    pinned = _retained("pin")
    default = _retained("default")
    # one 8 MiB buffer is still alive in both runs; the default allocator also keeps the three freed ones
    assert pinned < 12 << 20, pinned
    assert default > pinned + (16 << 20), (default, pinned)
