"""Per-VM counters and a fault-latency reservoir (for p50/p99 in status and reports)."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

__all__ = ["LatencyWindow", "VmCounters"]


class LatencyWindow:
    """The last ``size`` samples, in microseconds."""

    def __init__(self, size: int = 8192) -> None:
        self._buf: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, us: float) -> None:
        """Record one sample."""
        with self._lock:
            self._buf.append(us)

    def percentiles(self, *qs: float) -> list[float]:
        """Percentiles (0-100) of the window; zeros when empty."""
        with self._lock:
            data = np.fromiter(self._buf, dtype=np.float64, count=len(self._buf))
        if data.size == 0:
            return [0.0 for _ in qs]
        return [float(v) for v in np.percentile(data, qs)]

    def samples(self) -> np.ndarray:
        """A copy of the window."""
        with self._lock:
            return np.fromiter(self._buf, dtype=np.float64, count=len(self._buf))


@dataclass
class VmCounters:
    """Monotonic counters of one VM session."""

    faults_served: int = 0
    """MISSING faults on evicted pages served (promotions)."""
    pages_restored: int = 0
    """Pages brought back (faults + prefetch + drain)."""
    prefetched: int = 0
    zero_fills: int = 0
    """MISSING faults on never-evicted holes, served with a zero page."""
    rwp_faults: int = 0
    """Sync tracking faults seen (RWP, or MINOR surfaced by the uffd emulation)."""
    store_errors: int = 0
    integrity_errors: int = 0
    cycles: int = 0
    pages_evicted_total: int = 0
    bytes_written_total: int = 0
    promotions: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=4096))
    """(monotonic time, pages) of recent promotions, for the promotion rate."""

    def promotion_rate(self, evicted_pages: int, window_s: float = 60.0) -> float:
        """Promotions per evicted page per minute over the last ``window_s``."""
        now = time.monotonic()
        recent = sum(n for t, n in list(self.promotions) if now - t <= window_s)
        denom = max(evicted_pages + recent, 1)
        return recent / denom * (60.0 / window_s)
