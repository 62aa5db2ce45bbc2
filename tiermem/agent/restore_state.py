"""What one Firecracker restore of an imported snapshot has done so far.

A restored VM's index entries are the **snapshot**: they are never removed when a
page is installed (unlike an evicted page, whose entry goes once it is back), so the
same snapshot can be restored again after this Firecracker process exits. This
restore's own progress lives here instead: the pages it installed (never fetched
again, never prefetched as a neighbour) and the pages the guest gave back with the
balloon (read as zeroes from then on, whatever the snapshot holds).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np

__all__ = ["RestoreState", "RestoreSummary"]


class RestoreSummary(TypedDict):
    """The figures of one restore (the RESTORE_FINISHED event's attributes)."""

    first_fault_ms: float | None
    pages_on_demand: int
    pages_prefaulted: int
    zero_pages: int
    store_bytes_read: int
    removed_pages: int
    pages_remaining: int
    seconds: float


@dataclass
class RestoreState:
    """Per-restore progress and the figures reported in metrics and events."""

    n_pages: int
    prefault_pages_per_s: float = 0.0
    """Background prefault rate once the guest has resumed (0: on demand only)."""
    started: float = field(default_factory=time.monotonic)
    first_fault_s: float | None = None
    """Seconds from the handshake to the first page served."""
    on_demand: int = 0
    """Pages installed because the guest touched them (the faulting page and its prefetched neighbours)."""
    prefaulted: int = 0
    """Pages installed by the background prefault."""
    zero_pages: int = 0
    """Pages answered with UFFDIO_ZEROPAGE (zero in the snapshot, or given back by the balloon)."""
    bytes_read: int = 0
    """Payload bytes fetched from the store."""
    removed_pages: int = 0

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.done = np.zeros(self.n_pages, dtype=bool)
        """Pages installed (or given back) during this restore: never fetched again."""
        self.removed = np.zeros(self.n_pages, dtype=bool)
        """Pages the guest gave back (UFFD_EVENT_REMOVE): they read as zeroes from now on."""
        self.resumed = threading.Event()
        """Set at the first fault served: the guest runs (the prefault starts after it)."""

    def installed(self, pages: list[int], payload_bytes: int, *, prefault: bool) -> None:
        """Record pages this restore installed with UFFDIO_COPY."""
        with self.lock:
            self.done[pages] = True
            self.bytes_read += payload_bytes
            if prefault:
                self.prefaulted += len(pages)
            else:
                self.on_demand += len(pages)
            self._first()

    def zero_filled(self, pages: list[int]) -> None:
        """Record pages this restore answered with UFFDIO_ZEROPAGE."""
        with self.lock:
            self.done[pages] = True
            self.zero_pages += len(pages)
            self._first()

    def remove(self, first: int, last: int) -> None:
        """The guest gave ``[first, last)`` back: zeroes from now on, never the snapshot's bytes."""
        with self.lock:
            self.removed_pages += int(np.count_nonzero(~self.removed[first:last]))
            self.removed[first:last] = True
            self.done[first:last] = True

    def _first(self) -> None:
        if self.first_fault_s is None:
            self.first_fault_s = time.monotonic() - self.started
            self.resumed.set()

    def remaining(self) -> int:
        """Pages not installed yet."""
        with self.lock:
            return int(self.n_pages - np.count_nonzero(self.done))

    def summary(self) -> RestoreSummary:
        """The figures of this restore (events, logs, the bench)."""
        with self.lock:
            return RestoreSummary(
                first_fault_ms=None if self.first_fault_s is None else round(self.first_fault_s * 1000, 3),
                pages_on_demand=self.on_demand,
                pages_prefaulted=self.prefaulted,
                zero_pages=self.zero_pages,
                store_bytes_read=self.bytes_read,
                removed_pages=self.removed_pages,
                pages_remaining=int(self.n_pages - np.count_nonzero(self.done)),
                seconds=round(time.monotonic() - self.started, 3),
            )
