"""Injectable time, so leases, scheduling and the SLO controller can be tested deterministically."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock", "clock_ms"]


class Clock(Protocol):
    """Wall-clock time source: ``now()`` is Unix time in seconds."""

    def now(self) -> float:
        """Current Unix time, seconds."""
        ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> float:
        """Current Unix time, seconds."""
        return time.time()


class ManualClock:
    """A clock that only moves when told to (tests)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._t = float(start)

    def now(self) -> float:
        """The current manual time, seconds."""
        return self._t

    def advance(self, seconds: float) -> float:
        """Move forward by ``seconds``; returns the new time."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._t += seconds
        return self._t

    def set(self, t: float) -> None:
        """Jump to ``t`` (tests only)."""
        self._t = float(t)


def clock_ms(clock: Clock) -> int:
    """``clock.now()`` in integer milliseconds."""
    return int(clock.now() * 1000)
