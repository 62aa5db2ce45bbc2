"""Trace replay through the agent's real cycle engine: the engine behind ``tiermem simulate``.

The model is exact, so results can be reproduced by hand:

* N = 1 + the largest page index; ticks 0 .. T-1 with T = 1 + the largest tick.
  All N pages start resident with age 0.
* A cycle closes at the end of every tick t where (t + 1) mod K == 0: a resident
  page accessed during the cycle's K ticks gets age 0, any other resident page
  age + 1; then every resident page with age >= A is evicted, subject to the caps
  (oldest first, then lowest page number first).
* An access to an evicted page is a promotion: the page becomes resident with age
  0 and counts as accessed in the current cycle (UFFDIO_COPY installs it without
  the RWP marker, so the v10 hot scan reports it).
* ``evicted_fraction`` is the mean over all T ticks of (evicted pages at the end
  of the tick) / N.

The run uses the sim backend (synthetic contents), the in-memory page store, the
agent's ``CycleEngine`` and its ``FaultServer`` called inline by the sim, so the
code path is the agent's own. Prefetch is off: a prefetched neighbour would come
back without an access, which the model above does not count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tiermem.agent.cycle import CycleEngine
from tiermem.agent.faults import FaultServer
from tiermem.agent.index import PageIndex, VmRecord
from tiermem.agent.metrics import AgentMetrics
from tiermem.agent.session import VmSession
from tiermem.errors import InvalidArgument
from tiermem.events import EventBus
from tiermem.kernel import uapi
from tiermem.kernel.backend import TRACKED_REGISTER_MODE
from tiermem.model import Backend, CycleMode, EvictionCap, EvictionPolicy, VmState
from tiermem.sim.kernel import SimKernel
from tiermem.sim.trace import Trace
from tiermem.store.memory import MemoryPageStore

__all__ = ["ReplayResult", "replay"]


@dataclass
class ReplayResult:
    """What ``tiermem simulate`` reports."""

    pages: int
    ticks: int
    cycles: int
    evicted_fraction: float
    promotions: int
    promotions_per_tick: float
    interval_ticks: int
    cold_after: int
    pages_evicted_total: int
    peak_evicted: int
    policy: str = "age"
    policy_options: str = ""
    series: dict[str, list[int]] | None = None
    """Per tick: ``evicted`` (count at the end of the tick) and ``promotions`` (when asked for)."""

    @classmethod
    def of(cls, *, pages: int, ticks: int, evicted_page_ticks: int, **fields: Any) -> ReplayResult:
        """A result whose two ratios are derived from the counts: ``evicted_fraction`` from the
        page-ticks spent evicted, ``promotions_per_tick`` from ``promotions`` (every engine the same way)."""
        promotions = int(fields["promotions"])
        return cls(
            pages=pages,
            ticks=ticks,
            evicted_fraction=evicted_page_ticks / (ticks * pages) if ticks and pages else 0.0,
            promotions_per_tick=promotions / ticks if ticks else 0.0,
            **fields,
        )

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object (``series`` only when recorded)."""
        d = dict(vars(self))
        if d["series"] is None:
            del d["series"]
        return d


def replay(
    trace: Trace,
    interval_ticks: int,
    cold_after: int,
    max_evict: EvictionCap | None = None,
    min_resident_bytes: int = 0,
    *,
    policy_name: str = "age",
    options: str = "",
    series: bool = False,
) -> ReplayResult:
    """Replay ``trace`` with eviction algorithm ``policy_name`` and return the model's figures."""
    if interval_ticks < 1:
        raise InvalidArgument("--interval-ticks must be >= 1")
    policy = EvictionPolicy(
        interval_ms=1,
        cold_after=cold_after,
        max_evict=max_evict or EvictionCap(),
        min_resident_bytes=min_resident_bytes,
        prefetch_pages=0,
        store="memory",
        algorithm=policy_name,
        algorithm_options=options,
    ).validate()
    n = trace.n_pages
    sim = SimKernel(n, synthetic=True)
    sim.api(uapi.UFFD_FEATURE_RWP | uapi.UFFD_FEATURE_RWP_ASYNC)
    sim.register(sim.base, sim.size, TRACKED_REGISTER_MODE)
    store = MemoryPageStore("memory")
    index = PageIndex(":memory:", fsync=False)
    vm = "replay"
    index.add_vm(VmRecord(vm, Backend.SIM.value, n))
    s = VmSession(
        vm_id=vm,
        backend_kind=Backend.SIM,
        backend=sim,
        policy=policy,
        index=index,
        stores=lambda _name: store,
        events=EventBus(),
        metrics=AgentMetrics(),
    )
    s.state = VmState.ARMED
    faults = FaultServer(s, workers=1)
    engine = CycleEngine(s, faults)
    sim.set_fault_handler(faults.handle)
    evicted_sum = 0
    per_tick: list[int] = []
    prom_per_tick: list[int] = []
    peak = 0
    cycles = 0
    evicted_total = 0
    try:
        engine.begin()
        for tick, pages, writes in trace.by_tick():
            served = s.counters.faults_served
            if pages.size:
                sim.access_batch(pages, writes)
            prom_per_tick.append(s.counters.faults_served - served)
            if (tick + 1) % interval_ticks == 0:
                rep = engine.finish(CycleMode.EVICT)
                if rep.error:
                    raise RuntimeError(f"cycle at tick {tick} failed: {rep.error}")
                evicted_total += rep.pages_evicted
                cycles += 1
                engine.begin()
            evicted = index.count(vm)
            evicted_sum += evicted
            per_tick.append(evicted)
            peak = max(peak, evicted)
    finally:
        sim.set_fault_handler(None)
        faults.stop()
        index.close()
    ticks = trace.n_ticks
    promotions = s.counters.faults_served
    res = ReplayResult.of(
        pages=n,
        ticks=ticks,
        evicted_page_ticks=evicted_sum,
        cycles=cycles,
        promotions=promotions,
        interval_ticks=interval_ticks,
        cold_after=cold_after,
        pages_evicted_total=evicted_total,
        peak_evicted=peak,
        policy=policy_name,
        policy_options=policy.algorithm_options,
    )
    if series:
        res.series = {"evicted": per_tick, "promotions": prom_per_tick}
    return res
