"""The tiering model replayed with numpy: the ``fast`` engine of ``tiermem simulate``.

It computes exactly what :func:`tiermem.sim.replay.replay` computes (the model in
that module's docstring) without running the sim kernel, the store and the index
page by page: per cycle, whole-array numpy. The decision at every close is the
eviction algorithm's own :meth:`tiermem.evict.Algorithm.close`, the code the
agent's cycle engine runs; only the kernel, store and index are replaced by
arrays. The unit tests check that both engines agree field by field.

Per-tick accounting: the evicted count at the end of a tick; a page promoted at
tick f is out of the count from tick f on (its first access in the cycle), and
pages evicted at a close count at the closing tick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tiermem import evict
from tiermem.errors import InvalidArgument
from tiermem.model import PAGE_SIZE, EvictionCap, EvictionPolicy
from tiermem.sim.replay import ReplayResult
from tiermem.sim.trace import Trace

__all__ = ["Model", "simulate"]


@dataclass
class Model:
    """A model run: the result plus the evicted count after every cycle close (when asked for)."""

    result: ReplayResult
    evicted_after_close: np.ndarray | None


def _check(
    interval_ticks: int,
    cold_after: int,
    max_evict: EvictionCap | None,
    min_resident_bytes: int,
    policy: str,
    options: str,
) -> EvictionPolicy:
    if interval_ticks < 1:
        raise InvalidArgument("--interval-ticks must be >= 1")
    return EvictionPolicy(
        interval_ms=1,
        cold_after=cold_after,
        max_evict=max_evict or EvictionCap(),
        min_resident_bytes=min_resident_bytes,
        prefetch_pages=0,
        store="memory",
        algorithm=policy,
        algorithm_options=options,
    ).validate()


def simulate(
    trace: Trace,
    interval_ticks: int,
    cold_after: int,
    max_evict: EvictionCap | None = None,
    min_resident_bytes: int = 0,
    *,
    page_size: int = PAGE_SIZE,
    record_closes: bool = False,
    policy: str = "age",
    options: str = "",
    series: bool = False,
) -> Model:
    """Replay ``trace`` through the model with eviction algorithm ``policy``.

    ``record_closes`` keeps the evicted count per close; ``series`` puts the per-tick
    evicted count and promotions in ``result.series``.
    """
    pol = _check(interval_ticks, cold_after, max_evict, min_resident_bytes, policy, options)
    n, t_total, k = trace.n_pages, trace.n_ticks, interval_ticks
    algo = evict.create(pol.algorithm, n, cold_after, pol.algorithm_options)
    n_cycles = t_total // k
    cap = pol.max_evict.limit_pages(n, page_size)
    floor = math.ceil(min_resident_bytes / page_size)
    evicted = np.zeros(n, dtype=bool)
    closes = np.zeros(n_cycles, dtype=np.int64) if record_closes else None
    # per tick: pages that left the evicted set (promotions) and entered it (evictions)
    prom_at = np.zeros(t_total + 1, dtype=np.int64)
    ev_at = np.zeros(t_total + 1, dtype=np.int64)
    cyc = trace.ticks // k
    bounds = np.searchsorted(cyc, np.arange(n_cycles + 2))
    n_ev = promotions = total_ev = peak = 0
    for c in range(n_cycles + 1):
        a, b = int(bounds[c]), int(bounds[c + 1])
        hot = np.zeros(n, dtype=bool)
        prom = np.zeros(0, dtype=np.int64)
        if b > a:
            pc = trace.pages[a:b]
            u, first = np.unique(pc, return_index=True)
            was = evicted[u]
            if was.any():
                prom = u[was]
                evicted[prom] = False
                n_ev -= int(prom.size)
                promotions += int(prom.size)
                np.add.at(prom_at, trace.ticks[a:b][first[was]], 1)
            hot[u] = True
        if c == n_cycles:  # the trailing ticks after the last close: promotions only
            break
        room = max(n - n_ev - floor, 0)
        limit = room if cap is None else min(cap, room)
        view = evict.CloseView(hot=hot, candidates=~evicted & ~hot, promoted=prom, limit=limit)
        chosen, _ = algo.close(view)
        if chosen.size:
            evicted[chosen] = True
            n_ev += int(chosen.size)
            total_ev += int(chosen.size)
            ev_at[c * k + k - 1] += int(chosen.size)
            peak = max(peak, n_ev)
        if closes is not None:
            closes[c] = n_ev
    per_tick = np.cumsum(ev_at[:t_total] - prom_at[:t_total])
    ev_sum = int(per_tick.sum())
    res = ReplayResult.of(
        pages=n,
        ticks=t_total,
        evicted_page_ticks=ev_sum,
        cycles=n_cycles,
        promotions=promotions,
        interval_ticks=k,
        cold_after=cold_after,
        pages_evicted_total=total_ev,
        peak_evicted=peak,
        policy=policy,
        policy_options=pol.algorithm_options,
    )
    if series:
        res.series = {"evicted": per_tick.tolist(), "promotions": prom_at[:t_total].tolist()}
    return Model(res, closes)
