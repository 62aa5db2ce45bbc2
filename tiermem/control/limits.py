"""Rate limits and backoff used by the scheduler: token buckets and exponential backoff."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

__all__ = ["Backoff", "TokenBucket", "phase_fraction"]


class TokenBucket:
    """A byte budget refilled at ``rate`` bytes/s, up to ``burst`` bytes.

    Cycles are admitted while the balance is not negative and debited afterwards
    with the bytes they actually wrote, so one large cycle may overdraw the bucket
    and the next ones wait until it has refilled: the long-run rate is ``rate``.
    A rate of 0 means unlimited.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = max(0.0, rate)
        self.burst = max(0.0, burst)
        self.tokens = self.burst
        self._t = now

    @classmethod
    def mbps(cls, mbps: float, now: float, burst_s: float = 1.0) -> TokenBucket:
        """A bucket of ``mbps`` MB/s (decimal megabytes) with ``burst_s`` seconds of burst."""
        rate = max(0.0, mbps) * 1e6
        return cls(rate, rate * burst_s, now)

    @property
    def unlimited(self) -> bool:
        """True when the rate is 0 (no limit)."""
        return self.rate <= 0

    def _refill(self, now: float) -> None:
        if now > self._t:
            self.tokens = min(self.burst, self.tokens + (now - self._t) * self.rate)
        self._t = max(self._t, now)

    def admits(self, now: float) -> bool:
        """True if a cycle may start now."""
        if self.unlimited:
            return True
        self._refill(now)
        return self.tokens >= 0

    def debit(self, nbytes: int, now: float) -> None:
        """Charge ``nbytes`` written."""
        if self.unlimited:
            return
        self._refill(now)
        self.tokens -= max(0, nbytes)

    def wait_s(self, now: float) -> float:
        """Seconds until :meth:`admits` is true (0 if it is now)."""
        if self.admits(now):
            return 0.0
        return -self.tokens / self.rate

    def set_rate(self, mbps: float, burst_s: float = 1.0) -> None:
        """Change the limit, keeping the current balance."""
        self.rate = max(0.0, mbps) * 1e6
        self.burst = self.rate * burst_s
        self.tokens = min(self.tokens, self.burst)


@dataclass
class Backoff:
    """Exponential backoff: ``base_s * 2**(failures-1)``, at most ``max_s``; reset on success."""

    base_s: float = 1.0
    max_s: float = 60.0
    failures: int = 0
    until: float = 0.0

    def fail(self, now: float) -> float:
        """Record a failure; returns the delay and sets ``until``."""
        self.failures += 1
        delay = float(min(self.max_s, self.base_s * 2.0 ** min(self.failures - 1, 30)))
        self.until = now + delay
        return delay

    def succeed(self) -> None:
        """Forget past failures."""
        self.failures = 0
        self.until = 0.0

    def blocked(self, now: float) -> bool:
        """True while backing off."""
        return now < self.until


def phase_fraction(key: str) -> float:
    """A stable pseudo-random number in [0, 1) for ``key`` (the same on every replica and run)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return math.ldexp(h, -64)
