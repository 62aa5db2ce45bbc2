"""The policy benchmark: memory saved versus promotions, beside the future-knowing bound.

:func:`run` replays the built-in workloads and any trace files (the real-program
corpus in ``traces/``) through the ``fast`` model (:mod:`tiermem.sim.fast`, the
same eviction algorithms the agent runs), for ``age`` at several ``cold_after``
and every other algorithm. Each row carries the bound's promotions at the row's
own saving (:mod:`tiermem.sim.bound`) and the ratio. Workload rows also carry two
baselines evicting the same number of pages at every cycle close: an oracle that
evicts the resident pages whose next access is furthest away (Belady's choice)
and random eviction.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from tiermem import evict
from tiermem.errors import InvalidArgument
from tiermem.sim.bound import GapProfile, gaps
from tiermem.sim.fast import Model, simulate
from tiermem.sim.replay import ReplayResult
from tiermem.sim.trace import Trace, load_trace
from tiermem.sim.workloads import parse_workload

__all__ = ["POLICIES", "WORKLOADS", "Model", "baseline", "make_trace", "run", "simulate"]

POLICIES = tuple(n for n in evict.NAMES if n not in evict.ALIASES)
"""Every eviction algorithm (aliases left out: they repeat a row)."""

WORKLOADS = (
    "hotset:0.1",
    "hotset:0.1:rate=0.5:noise=0.1",
    "zipf:1.1",
    "phases:0.1:period=100",
    "scan",
    "mix:0.25",
)
"""Built-in workloads the benchmark replays (``tiermem.sim.workloads`` specs)."""


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
    return ReplayResult.of(
        pages=n,
        ticks=t_total,
        evicted_page_ticks=ev_sum,
        cycles=n_cycles,
        promotions=promotions,
        interval_ticks=k,
        cold_after=0,
        pages_evicted_total=total_ev,
        peak_evicted=peak,
    )


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


def _row(
    name: str,
    trace: Trace,
    k: int,
    algo: str,
    a: int,
    prof: GapProfile,
    delayed: GapProfile,
    seed: int,
    baselines: bool,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    m = simulate(trace, k, a, policy=algo, record_closes=baselines)
    dt = time.perf_counter() - t0
    r = m.result
    bound = prof.promotions_at(r.evicted_fraction)
    late = delayed.promotions_at(r.evicted_fraction)
    row: dict[str, Any] = {
        "workload": name,
        "policy": algo,
        "cold_after": a,
        "accesses": len(trace),
        "pages": trace.n_pages,
        "ticks": trace.n_ticks,
        "saved": round(r.evicted_fraction, 4),
        "promotions": r.promotions,
        "promotions_per_tick": round(r.promotions_per_tick, 3),
        "promotion_rate": round(_rate(r), 5),
        "bound_promotions": bound,
        "vs_bound": round(r.promotions / bound, 3) if bound else None,
        "bound_delayed_promotions": late,
        "vs_bound_delayed": round(r.promotions / late, 3) if late else None,
        "model_s": round(dt, 4),
    }
    if baselines and m.evicted_after_close is not None:
        orc = baseline(trace, k, m.evicted_after_close, "oracle", seed)
        rnd = baseline(trace, k, m.evicted_after_close, "random", seed)
        row.update(
            {
                "oracle_saved": round(orc.evicted_fraction, 4),
                "oracle_promotions": orc.promotions,
                "random_saved": round(rnd.evicted_fraction, 4),
                "random_promotions": rnd.promotions,
                "vs_oracle": round(r.promotions / orc.promotions, 3) if orc.promotions else None,
                "random_vs_policy": round(rnd.promotions / r.promotions, 3) if r.promotions else None,
            }
        )
    return row


def cycle_cost(pages: int = 262144, cycles: int = 8, seed: int = 1) -> list[dict[str, Any]]:
    """Agent CPU per cycle with each algorithm: a sim VM of ``pages``, 10% of them touched per cycle.

    Dry-run cycles (protect, freeze, scan, decide, resume; no eviction, whose store cost is the
    same whatever decides) through the agent's own cycle engine; process CPU time per cycle, and
    the decide phase alone. The first cycle (allocations) is not counted.
    """
    import tempfile

    from tiermem.agent.node import Agent
    from tiermem.config import AgentSettings
    from tiermem.model import CycleMode, EvictionPolicy
    from tiermem.sim.kernel import SimKernel

    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        agent = Agent(AgentSettings(node_id="cost", data_dir=tmp, autonomous=False, fsync=False))
        try:
            for name in POLICIES:
                vm = f"cost-{name}"
                pol = EvictionPolicy(interval_ms=1, cold_after=2, prefetch_pages=0, algorithm=name)
                agent.attach_sim(vm, pages * 4096, pol, synthetic=True, vcpus=0)
                b = agent.sessions[vm].backend
                assert isinstance(b, SimKernel)
                b.access_batch(np.arange(pages, dtype=np.int64), np.ones(pages, dtype=bool))
                cpu, decide = [], []
                for c in range(cycles + 1):
                    eng = agent.engines[vm]
                    with agent.sessions[vm].cycle_lock:
                        t0 = time.process_time()
                        eng.begin()
                        used = time.process_time() - t0
                        hot = rng.choice(pages, pages // 10, replace=False)  # the guest's part: not counted
                        b.access_batch(np.sort(hot), np.zeros(hot.size, dtype=bool))
                        t0 = time.process_time()
                        rep = eng.finish(CycleMode.DETECT)
                        used += time.process_time() - t0
                    if c:
                        cpu.append(used)
                        decide.append(rep.phases.decide_us)
                agent.detach(vm, purge=True)
                out.append(
                    {
                        "policy": name,
                        "pages": pages,
                        "cpu_ms_per_cycle": round(1e3 * float(np.median(cpu)), 2),
                        "decide_ms": round(float(np.median(decide)) / 1e3, 2),
                        "state_bytes_per_page": evict.resolve(name).state_bytes_per_page,
                    }
                )
        finally:
            agent.close()
    base = float(out[0]["cpu_ms_per_cycle"]) or 1.0
    for r in out:
        r["cpu_vs_age"] = round(r["cpu_ms_per_cycle"] / base, 2)
    return out


def _settings(cold_after: tuple[int, ...], policies: tuple[str, ...]) -> list[tuple[str, int]]:
    """``age`` at every A, then each other policy at its defaults (A = 2, the issue's reference)."""
    return [("age", a) for a in cold_after] + [(p, 2) for p in policies if p != "age"]


def run(
    quick: bool = False,
    pages: int = 16384,
    ticks: int = 1000,
    interval_ticks: int = 10,
    cold_after: tuple[int, ...] = (1, 2, 4, 8),
    workloads: tuple[str, ...] = WORKLOADS,
    seed: int = 1,
    traces: tuple[str, ...] = (),
    policies: tuple[str, ...] = POLICIES,
    cost_pages: int = 262144,
) -> dict[str, Any]:
    """Memory saved versus promotions per workload or trace file, policy and cold-after.

    Every row carries the future-knowing bound at its own saving (:mod:`tiermem.sim.bound`);
    workload rows also the oracle and random eviction at the same evicted count per close.
    """
    if quick:
        pages, ticks = min(pages, 2048), min(ticks, 200)
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    todo: list[tuple[str, Trace, bool]] = [(w, make_trace(w, pages, ticks, seed), True) for w in workloads]
    todo += [(os.path.basename(t), load_trace(t), False) for t in traces]
    for name, trace, baselines in todo:
        prof, delayed = gaps(trace, interval_ticks), gaps(trace, interval_ticks, delay_cycles=1)
        for algo, a in _settings(cold_after, policies):
            rows.append(_row(name, trace, interval_ticks, algo, a, prof, delayed, seed, baselines))
    return {
        "pages": pages,
        "ticks": ticks,
        "interval_ticks": interval_ticks,
        "seed": seed,
        "baselines": "bound: fewest promotions for the same saving (future known, evictions at closes); "
        "bound_delayed: the same with evictions only after a whole untouched cycle (the agent's rule); "
        "workloads also: oracle (furthest next access) and random eviction, same evicted count "
        "at every close",
        "rows": rows,
        "cycle_cost": cycle_cost(
            pages=min(cost_pages, 16384) if quick else cost_pages, cycles=3 if quick else 8
        ),
        "seconds": round(time.perf_counter() - t_all, 2),
    }
