"""Per-VM state of the segment engine: the map, the segments, and the accounting between them.

Callers hold ``VmState.lock`` around every method here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from tiermem.store.segfile import Key, Loc

__all__ = ["Record", "SegInfo", "VmState", "idle"]

Record = list[tuple[Key, int, int, int, bytes]]
"""``(key, codec, checksum, seq, payload)`` per page of one record."""


@dataclass
class SegInfo:
    """What the engine knows about one segment blob."""

    name: str
    payload_bytes: int = 0
    keys: list[Key] = field(default_factory=list)
    live: int = 0
    live_bytes: int = 0
    busy: bool = False
    """Being deleted or compacted, or damaged: never compacted or dropped."""
    unindexed_from: int | None = None
    """Offset from which the index could not be read at load."""
    pending: int = 0
    """Records written but not yet linked into the map."""


def idle(seg: SegInfo) -> bool:
    """Whether the segment may be dropped or compacted now."""
    return not seg.busy and seg.pending == 0


@dataclass
class VmState:
    """One VM's map and segments."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    load_lock: threading.Lock = field(default_factory=threading.Lock)
    append_lock: threading.Lock = field(default_factory=threading.Lock)
    loaded: bool = False
    map: dict[Key, Loc] = field(default_factory=dict)
    segs: dict[str, SegInfo] = field(default_factory=dict)
    tombs: dict[str, set[str]] = field(default_factory=dict)
    """Tombstone blob -> the segments it names."""
    live_bytes: int = 0
    active: str | None = None
    """Appendable backends: the segment that takes new records."""
    active_size: int = 0

    def link(self, key: Key, loc: Loc, seg: SegInfo) -> None:
        """Make ``loc`` (in ``seg``) the live copy of ``key``."""
        old = self.map.get(key)
        if old is not None:
            prev = self.segs.get(old.seg)
            if prev is not None:
                prev.live -= 1
                prev.live_bytes -= old.length
            self.live_bytes -= old.length
        self.map[key] = loc
        seg.live += 1
        seg.live_bytes += loc.length
        self.live_bytes += loc.length

    def unlink(self, key: Key) -> Loc | None:
        """Forget ``key``; returns where it was."""
        loc = self.map.pop(key, None)
        if loc is not None:
            seg = self.segs.get(loc.seg)
            if seg is not None:
                seg.live -= 1
                seg.live_bytes -= loc.length
            self.live_bytes -= loc.length
        return loc

    def linked(self, name: str) -> None:
        """One pending record of segment ``name`` is now linked (or abandoned)."""
        seg = self.segs.get(name)
        if seg is not None:
            seg.pending -= 1
