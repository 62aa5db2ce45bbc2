"""The future-knowing bound: the fewest promotions any policy pays for a given memory saving.

Model (the one of :mod:`tiermem.sim.replay`, no caps): evictions happen only at
cycle closes (end of ticks K-1, 2K-1, ...); a page's life is cut into gaps
between its accesses (and before its first and after its last). Each gap is
evicted or not independently: evicting it at the first close after its start
saves ``next access tick - closing tick`` page-ticks and costs one promotion,
unless the gap runs to the end of the trace (free). Evicting later saves less
for the same cost, so for k promotions the most saving is the free gaps plus
the k largest costly gaps: the bound at saving S is the smallest such k.
"""

from __future__ import annotations

import numpy as np

from tiermem.sim.trace import Trace

__all__ = ["GapProfile", "bound_promotions", "gaps"]


class GapProfile:
    """A trace's evictable gaps at interval K: free saving and the costly savings, largest first."""

    def __init__(self, free: int, costly: np.ndarray, pages: int, ticks: int) -> None:
        self.free = free
        self.cum = np.cumsum(np.sort(costly)[::-1])
        self.pages = pages
        self.ticks = ticks

    def promotions_at(self, evicted_fraction: float) -> int:
        """Fewest promotions to reach ``evicted_fraction`` (the mean evicted share over ticks)."""
        target = evicted_fraction * self.pages * self.ticks - 1e-6 * max(self.pages * self.ticks, 1)
        need = target - self.free
        if need <= 0:
            return 0
        return min(int(np.searchsorted(self.cum, need, side="left")) + 1, int(self.cum.size))


def gaps(trace: Trace, interval_ticks: int, delay_cycles: int = 0) -> GapProfile:
    """The :class:`GapProfile` of ``trace`` at ``interval_ticks``.

    ``delay_cycles`` = 1 gives the bound of a policy that knows the future but, like the agent,
    may evict a page only after a whole cycle without an access to it.
    """
    k, t_total, n = interval_ticks, trace.n_ticks, trace.n_pages
    n_cycles = t_total // k
    if n_cycles == 0:
        return GapProfile(0, np.zeros(0, dtype=np.int64), n, t_total)
    key = np.unique(trace.pages * (t_total + 1) + trace.ticks)  # distinct (page, tick), sorted
    page, tick = key // (t_total + 1), key % (t_total + 1)
    first = np.ones(key.size, dtype=bool)
    first[1:] = page[1:] != page[:-1]
    last = np.ones(key.size, dtype=bool)
    last[:-1] = page[1:] != page[:-1]
    # before the first access: resident from the start, evictable at the first close (tick K-1)
    head = tick[first] - (k - 1)  # (the start is not an access: no delay)
    costly = [head[head > 0]]
    untouched = n - int(first.sum())
    free = untouched * (t_total - (k - 1))
    # between accesses: evicted at the close of the access's cycle, if that cycle has a close
    close = (tick // k + 1 + delay_cycles) * k - 1
    ok = tick // k + delay_cycles < n_cycles
    mid = ~last & ok
    save = np.zeros(key.size, dtype=np.int64)
    save[:-1] = tick[1:] - close[:-1]
    costly.append(save[mid & (save > 0)])
    # after the last access: free
    tail = t_total - close[last & ok]
    free += int(tail[tail > 0].sum())
    return GapProfile(free, np.concatenate(costly).astype(np.int64), n, t_total)


def bound_promotions(trace: Trace, interval_ticks: int, evicted_fraction: float) -> int:
    """The bound's promotions at the run's own saving."""
    return gaps(trace, interval_ticks).promotions_at(evicted_fraction)
