"""The tiering model replayed with numpy (the engine of ``tiermem simulate``) and the policy benchmark.

:func:`simulate` computes exactly what :func:`tiermem.sim.replay.replay` computes
(the model in that module's docstring: cycles every K ticks, ages, cold after A
cycles, caps oldest first then lowest page, promotions), but without running the
sim kernel, the store and the index page by page. The agent path costs tens of
microseconds per evicted or promoted page (about ten minutes for a 10-million-line
trace); this one works per cycle on whole arrays, and only on the cycles where
something can change, so the same trace takes seconds. The unit tests check that
both engines agree field by field on random traces, caps included.

Event-driven form of the model: the age of a resident page at the close of cycle c
is ``min(c - last, 255)`` where ``last`` is the cycle of its last access (-1 at
start), so a page becomes cold exactly at the close of cycle ``last + A``. With no
cap in force, a close only has work when its cycle had accesses or when cycle
``c - A`` had some; pages left cold by a cap wait in a backlog.

The benchmark (:func:`run`) replays the built-in workloads and puts each
``cold_after`` setting beside two baselines evicting the same number of pages at
every cycle close: an oracle that knows the future (it evicts the resident pages
whose next access is furthest away, Belady's choice) and random eviction.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from tiermem.errors import InvalidArgument
from tiermem.model import PAGE_SIZE, EvictionCap, EvictionPolicy
from tiermem.sim.replay import ReplayResult
from tiermem.sim.trace import Trace
from tiermem.sim.workloads import parse_workload

__all__ = ["WORKLOADS", "Model", "baseline", "make_trace", "run", "simulate"]

_AGE_MAX = 255  # the agent's ages are uint8 and saturate

WORKLOADS = (
    "hotset:0.1",
    "hotset:0.1:rate=0.5:noise=0.1",
    "zipf:1.1",
    "phases:0.1:period=100",
    "scan",
    "mix:0.25",
)
"""Built-in workloads the benchmark replays (``tiermem.sim.workloads`` specs)."""


@dataclass
class Model:
    """A model run: the result plus the evicted count after every cycle close (when asked for)."""

    result: ReplayResult
    evicted_after_close: np.ndarray | None


class _Slices:
    """The trace's accesses grouped by cycle: for each cycle with accesses, its [a, b) range."""

    def __init__(self, trace: Trace, k: int) -> None:
        cyc = trace.ticks // k
        if len(cyc):
            starts = np.concatenate(([0], np.flatnonzero(cyc[1:] != cyc[:-1]) + 1))
            self.cycles = cyc[starts].tolist()
            self.bounds = np.append(starts, len(cyc)).tolist()
        else:
            self.cycles, self.bounds = [], [0]
        self.j = 0

    def next_cycle(self) -> int | None:
        return self.cycles[self.j] if self.j < len(self.cycles) else None

    def take(self, c: int) -> tuple[int, int] | None:
        """The access range of cycle ``c`` if it has accesses (cycles are taken in order)."""
        if self.j < len(self.cycles) and self.cycles[self.j] == c:
            a, b = self.bounds[self.j], self.bounds[self.j + 1]
            self.j += 1
            return a, b
        return None


def _check(trace: Trace, interval_ticks: int, cold_after: int, max_evict: EvictionCap | None,
           min_resident_bytes: int) -> EvictionPolicy:  # fmt: skip
    if interval_ticks < 1:
        raise InvalidArgument("--interval-ticks must be >= 1")
    return EvictionPolicy(interval_ms=1, cold_after=cold_after, max_evict=max_evict or EvictionCap(),
                          min_resident_bytes=min_resident_bytes, prefetch_pages=0, store="memory").validate()  # fmt: skip


def simulate(trace: Trace, interval_ticks: int, cold_after: int, max_evict: EvictionCap | None = None,
             min_resident_bytes: int = 0, *, page_size: int = PAGE_SIZE,
             record_closes: bool = False) -> Model:  # fmt: skip
    """Replay ``trace`` through the exact model; ``record_closes`` keeps the evicted count per close."""
    policy = _check(trace, interval_ticks, cold_after, max_evict, min_resident_bytes)
    n, t_total, k, a = trace.n_pages, trace.n_ticks, interval_ticks, cold_after
    n_cycles = t_total // k
    cap = policy.max_evict.limit_pages(n, page_size)
    floor = math.ceil(min_resident_bytes / page_size)
    last = np.full(n, -1, dtype=np.int64)
    evicted = np.zeros(n, dtype=bool)
    closes = np.zeros(n_cycles, dtype=np.int64) if record_closes else None
    touched: deque[tuple[int, np.ndarray]] = deque([(-1, np.arange(n, dtype=np.int64))])
    backlog = np.zeros(0, dtype=np.int64)
    sl = _Slices(trace, k)
    n_ev = promotions = total_ev = peak = 0
    ev_sum = 0  # sum over ticks of the evicted count at the end of the tick
    done_ticks = 0
    c = 0
    while True:
        # The next cycle where anything can change; the ones before it keep n_ev at every tick.
        cands = [n_cycles]
        if (nc := sl.next_cycle()) is not None:
            cands.append(nc)
        if touched:
            cands.append(touched[0][0] + a)
        c = max(c, min(cands)) if not backlog.size else c
        if c > n_cycles:
            break
        t0, t_end = c * k, min(c * k + k, t_total)
        if closes is not None and done_ticks < t0:
            closes[done_ticks // k : c] = n_ev
        ev_sum += (t0 - done_ticks) * n_ev
        ev_start = n_ev
        adjust = 0
        if (rng := sl.take(c)) is not None:
            pc, tc = trace.pages[rng[0] : rng[1]], trace.ticks[rng[0] : rng[1]]
            u, first = np.unique(pc, return_index=True)
            was = evicted[u]
            if was.any():
                prom = u[was]
                evicted[prom] = False
                n_ev -= int(prom.size)
                promotions += int(prom.size)
                # a page promoted at tick f is absent from the evicted count at ticks f .. t_end-1
                adjust = int(prom.size) * t_end - int(tc[first[was]].sum())
            last[u] = c
            touched.append((c, u))
        ev_sum += (t_end - t0) * ev_start - adjust
        done_ticks = t_end
        if c == n_cycles:  # the trailing ticks after the last close: promotions only
            break
        while touched and touched[0][0] < c - a:
            touched.popleft()
        cold = backlog[last[backlog] <= c - a] if backlog.size else backlog
        if touched and touched[0][0] == c - a:
            entr = touched.popleft()[1]
            entr = entr[last[entr] == c - a]
            cold = np.concatenate((cold, entr)) if cold.size else entr
        room = max(n - n_ev - floor, 0)
        limit = room if cap is None else min(cap, room)
        if cold.size <= limit:
            chosen, backlog = cold, np.zeros(0, dtype=np.int64)
        else:  # oldest first, then lowest page, as the cycle engine's choose_cold
            age = np.minimum(c - last[cold], _AGE_MAX)
            order = np.lexsort((cold, -age))
            chosen, backlog = cold[order[:limit]], cold[order[limit:]]
        if chosen.size:
            evicted[chosen] = True
            n_ev += int(chosen.size)
            total_ev += int(chosen.size)
            ev_sum += int(chosen.size)  # the closing tick ends with them evicted
            peak = max(peak, n_ev)
        if closes is not None:
            closes[c] = n_ev
        c += 1
    ev_sum += (t_total - done_ticks) * n_ev
    if closes is not None and done_ticks < n_cycles * k:
        closes[done_ticks // k :] = n_ev
    res = ReplayResult(
        pages=n, ticks=t_total, cycles=n_cycles,
        evicted_fraction=ev_sum / (t_total * n) if t_total and n else 0.0,
        promotions=promotions, promotions_per_tick=promotions / t_total if t_total else 0.0,
        interval_ticks=k, cold_after=a, pages_evicted_total=total_ev, peak_evicted=peak,
    )  # fmt: skip
    return Model(res, closes)


def _next_access(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """(tick of the next access to the same page after access i, first access tick of every page)."""
    big = np.iinfo(np.int64).max
    order = np.lexsort((np.arange(len(trace.pages)), trace.pages))
    sp = trace.pages[order]
    nxt = np.full(len(order), big, dtype=np.int64)
    same = sp[1:] == sp[:-1]
    nxt[order[:-1][same]] = trace.ticks[order[1:][same]]
    first = np.full(trace.n_pages, big, dtype=np.int64)
    if len(order):
        heads = np.concatenate(([True], ~same))
        first[sp[heads]] = trace.ticks[order[heads]]
    return nxt, first


def baseline(
    trace: Trace, interval_ticks: int, targets: np.ndarray, kind: str, seed: int = 0
) -> ReplayResult:
    """Evict, at every cycle close, up to ``targets[c]`` pages in all: ``oracle`` or ``random`` choice.

    The oracle evicts the resident pages whose next access is furthest in the
    future (never-again first); random eviction picks resident pages uniformly.
    Promotions are counted as in the model. O(pages) per cycle: meant for the
    benchmark's sizes, not for 10-million-line traces.
    """
    if kind not in ("oracle", "random"):
        raise InvalidArgument(f"baseline must be 'oracle' or 'random', not {kind!r}")
    n, t_total, k = trace.n_pages, trace.n_ticks, interval_ticks
    n_cycles = t_total // k
    if len(targets) != n_cycles:
        raise InvalidArgument(f"need one target per cycle ({n_cycles}), got {len(targets)}")
    nxt, nextacc = _next_access(trace) if kind == "oracle" else (None, None)
    rng = np.random.default_rng(seed)
    evicted = np.zeros(n, dtype=bool)
    sl = _Slices(trace, k)
    n_ev = promotions = total_ev = peak = ev_sum = 0
    for c in range(n_cycles + 1):
        t0, t_end = c * k, min(c * k + k, t_total)
        if t0 >= t_end and c == n_cycles:
            break
        ev_start, adjust = n_ev, 0
        if (r := sl.take(c)) is not None:
            pc, tc = trace.pages[r[0] : r[1]], trace.ticks[r[0] : r[1]]
            u, first = np.unique(pc, return_index=True)
            was = evicted[u]
            if was.any():
                prom = u[was]
                evicted[prom] = False
                n_ev -= int(prom.size)
                promotions += int(prom.size)
                adjust = int(prom.size) * t_end - int(tc[first[was]].sum())
            if nxt is not None and nextacc is not None:
                _, last_rev = np.unique(pc[::-1], return_index=True)
                nextacc[u] = nxt[r[0] + len(pc) - 1 - last_rev]
        ev_sum += (t_end - t0) * ev_start - adjust
        if c == n_cycles:
            break
        need = int(targets[c]) - n_ev
        if need > 0:
            resident = np.flatnonzero(~evicted)
            need = min(need, int(resident.size))
            if nextacc is not None:
                far = (
                    np.argpartition(-nextacc[resident], need - 1)[:need]
                    if need < resident.size
                    else slice(None)
                )
                chosen = resident[far]
            else:
                chosen = rng.choice(resident, need, replace=False)
            evicted[chosen] = True
            n_ev += need
            total_ev += need
            ev_sum += need
            peak = max(peak, n_ev)
    return ReplayResult(
        pages=n, ticks=t_total, cycles=n_cycles,
        evicted_fraction=ev_sum / (t_total * n) if t_total and n else 0.0,
        promotions=promotions, promotions_per_tick=promotions / t_total if t_total else 0.0,
        interval_ticks=k, cold_after=0, pages_evicted_total=total_ev, peak_evicted=peak,
    )  # fmt: skip


def make_trace(spec: str, n_pages: int, ticks: int, seed: int = 1) -> Trace:
    """A trace of ``ticks`` batches of a built-in workload (one batch per tick)."""
    w = parse_workload(spec, n_pages, seed)
    it = w.batches()
    ts, ps, ws = [], [], []
    for t in range(ticks):
        p, wr = next(it)
        ts.append(np.full(len(p), t, dtype=np.int64))
        ps.append(np.asarray(p, dtype=np.int64))
        ws.append(np.asarray(wr, dtype=bool))
    return Trace(
        np.concatenate(ts), np.concatenate(ps), np.concatenate(ws), n_pages, ticks, f"workload:{spec}"
    )


def _rate(r: ReplayResult) -> float:
    """Promotions per cycle as a fraction of the mean evicted pages (Google's SLO unit if a cycle is 1 min)."""
    mean_ev = r.evicted_fraction * r.pages
    return r.promotions / r.cycles / mean_ev if r.cycles and mean_ev else 0.0


def run(quick: bool = False, pages: int = 16384, ticks: int = 1000, interval_ticks: int = 10,
        cold_after: tuple[int, ...] = (1, 2, 4, 8), workloads: tuple[str, ...] = WORKLOADS,
        seed: int = 1) -> dict[str, Any]:  # fmt: skip
    """Memory saved versus promotions per workload and cold-after, beside the oracle and random eviction."""
    if quick:
        pages, ticks = min(pages, 2048), min(ticks, 200)
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for spec in workloads:
        trace = make_trace(spec, pages, ticks, seed)
        for a in cold_after:
            t0 = time.perf_counter()
            m = simulate(trace, interval_ticks, a, record_closes=True)
            dt = time.perf_counter() - t0
            assert m.evicted_after_close is not None
            orc = baseline(trace, interval_ticks, m.evicted_after_close, "oracle", seed)
            rnd = baseline(trace, interval_ticks, m.evicted_after_close, "random", seed)
            r = m.result
            rows.append({
                "workload": spec, "cold_after": a, "accesses": len(trace),
                "saved": round(r.evicted_fraction, 4), "promotions": r.promotions,
                "promotions_per_tick": round(r.promotions_per_tick, 3), "promotion_rate": round(_rate(r), 5),
                "oracle_saved": round(orc.evicted_fraction, 4), "oracle_promotions": orc.promotions,
                "random_saved": round(rnd.evicted_fraction, 4), "random_promotions": rnd.promotions,
                "vs_oracle": round(r.promotions / orc.promotions, 3) if orc.promotions else None,
                "random_vs_policy": round(rnd.promotions / r.promotions, 3) if r.promotions else None,
                "model_s": round(dt, 4),
            })  # fmt: skip
    return {
        "pages": pages, "ticks": ticks, "interval_ticks": interval_ticks, "seed": seed,
        "baselines": "oracle (furthest next access) and random eviction, same evicted count at every close",
        "rows": rows, "seconds": round(time.perf_counter() - t_all, 2),
    }  # fmt: skip
