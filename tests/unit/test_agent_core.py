"""The agent's cycle engine, fault server, drain and detach on the sim backend with an in-memory store."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tiermem.agent.node import Agent
from tiermem.config import AgentSettings
from tiermem.errors import FailedPrecondition, InvalidArgument, NotFound
from tiermem.model import CycleMode, CycleReport, DrainProgress, EventKind, EvictionCap, EvictionPolicy
from tiermem.sim.kernel import SimKernel
from tiermem.store.memory import MemoryPageStore

PS = 4096


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(
        AgentSettings(
            node_id="n1",
            data_dir=str(tmp_path),
            stores={"default": "memory://"},
            fsync=False,
            autonomous=False,
        )
    )
    yield a
    a.close()


def attach(agent: Agent, vm: str = "vm1", pages: int = 256, **policy: object) -> SimKernel:
    opts: dict[str, object] = {"interval_ms": 10, "cold_after": 1, "prefetch_pages": 0, **policy}
    pol = EvictionPolicy(**opts)  # type: ignore[arg-type]
    agent.attach_sim(vm, pages * PS, pol)
    sim = agent.sessions[vm].backend
    assert isinstance(sim, SimKernel)
    return sim


def cycle(
    agent: Agent,
    vm: str,
    touch: list[int] | None = None,
    mode: CycleMode = CycleMode.EVICT,
    writes: bool = False,
) -> CycleReport:
    eng = agent.engines[vm]
    sim = agent.sessions[vm].backend
    assert isinstance(sim, SimKernel)
    with agent.sessions[vm].cycle_lock:
        eng.begin()
        for p in touch or []:
            sim.access(p, write=writes)
        return eng.finish(mode)


def store_of(agent: Agent) -> MemoryPageStore:
    st = agent.store("default")
    assert isinstance(st, MemoryPageStore)
    return st


def test_hot_set_detection_is_exact_and_dry_run_changes_nothing(agent: Agent) -> None:
    sim = attach(agent, pages=512)
    hot = sorted(set(np.random.default_rng(1).choice(512, 51, replace=False).tolist()))
    rep = cycle(agent, "vm1", hot, mode=CycleMode.DETECT)
    assert rep.pages_hot == len(hot)
    assert rep.pages_scanned == 512
    assert rep.pages_cold == 512 - len(hot)  # cold_after=1
    assert rep.pages_evicted == 0
    assert agent.sessions["vm1"].algorithm().ages.max() == 0  # type: ignore[attr-defined]  # a dry run keeps ages
    assert sim.populated().all()
    assert store_of(agent).usage(agent.sessions["vm1"].space).pages == 0
    rep = cycle(agent, "vm1", hot)
    assert rep.pages_evicted == 512 - len(hot)
    populated = np.flatnonzero(sim.populated()).tolist()
    assert populated == hot  # exactly the untouched pages left memory


def test_cold_after_counts_cycles(agent: Agent) -> None:
    attach(agent, pages=64, cold_after=3)
    assert cycle(agent, "vm1").pages_evicted == 0
    assert cycle(agent, "vm1").pages_evicted == 0
    assert cycle(agent, "vm1").pages_evicted == 64


@pytest.mark.parametrize(
    ("cap", "expected"),
    [
        (EvictionCap(pages=10), 10),
        (EvictionCap(bytes=5 * PS + 100), 5),
        (EvictionCap(fraction=0.25), 16),
        (EvictionCap(pages=0), 0),
    ],
)
def test_per_cycle_cap(agent: Agent, cap: EvictionCap, expected: int) -> None:
    attach(agent, pages=64, max_evict=cap)
    rep = cycle(agent, "vm1", [0, 1])
    assert rep.pages_evicted == expected
    assert rep.capped is (expected < 62)
    # oldest first, then lowest page: all ages equal, so the lowest untouched pages go first
    ev = agent.index.evicted_pages("vm1")
    assert ev == [p for p in range(64) if p not in (0, 1)][:expected]


def test_min_resident_is_never_crossed(agent: Agent) -> None:
    attach(agent, pages=64, min_resident_bytes=40 * PS)
    for _ in range(3):
        cycle(agent, "vm1")
    assert agent.sessions["vm1"].resident_count() == 40
    assert agent.index.count("vm1") == 24


def test_faults_bring_pages_back_with_their_contents(agent: Agent) -> None:
    sim = attach(agent, pages=128)
    for p in range(128):
        sim.access(p, write=True)
        if p % 3 == 0:
            sim.access(p, write=True)
    expected = sim.counters().copy()
    rep = cycle(agent, "vm1", [5])
    assert rep.pages_evicted == 127
    assert not sim.populated()[7]

    # a guest thread touches evicted pages; the agent's fault thread serves them from the store
    def touch_evicted() -> None:
        for p in range(0, 128, 2):
            sim.access(p)

    t = threading.Thread(target=touch_evicted)
    t.start()
    t.join(10)
    assert not t.is_alive()
    s = agent.sessions["vm1"]
    assert s.counters.faults_served == 64  # every even page was evicted (the hot page 5 is odd)
    assert sim.populated()[::2].all()
    got = sim.counters()
    assert np.array_equal(got[::2], expected[::2])
    assert agent.index.count("vm1") == 127 - 64


def test_prefetch_brings_neighbours_in_one_round_trip(agent: Agent) -> None:
    sim = attach(agent, pages=64, prefetch_pages=0)
    agent.set_policy("vm1", EvictionPolicy(interval_ms=10, cold_after=1, prefetch_pages=7))
    for p in range(64):
        sim.access(p, write=True)
    cycle(agent, "vm1")
    st = store_of(agent)
    gets_before = st.calls["get"]
    t = threading.Thread(target=sim.access, args=(8,))
    t.start()
    t.join(10)
    assert st.calls["get"] == gets_before + 1
    assert sim.populated()[8:16].all() and not sim.populated()[16]
    assert agent.sessions["vm1"].counters.prefetched == 7


def test_race_evict_while_guest_writes_never_loses_a_write(agent: Agent) -> None:
    sim = attach(agent, pages=64)
    expected = np.zeros(64, dtype=np.int64)
    stop = threading.Event()
    rng = np.random.default_rng(7)
    order = rng.integers(0, 64, size=200_000)

    def guest() -> None:
        for p in order:
            if stop.is_set():
                return
            sim.access(int(p), write=True)
            expected[p] += 1

    t = threading.Thread(target=guest)
    t.start()
    evicted = 0
    for _ in range(40):
        rep = cycle(agent, "vm1")
        evicted += rep.pages_evicted
        time.sleep(0.002)
    stop.set()
    t.join(20)
    assert not t.is_alive()
    assert evicted > 0  # the race was exercised
    for p in range(64):
        sim.access(p)  # fault everything back
    got = sim.counters().astype(np.int64)
    bad = np.flatnonzero(got != expected)
    assert bad.size == 0, (
        f"lost writes on pages {bad.tolist()}: got {got[bad].tolist()} expected {expected[bad].tolist()}"
    )


def test_store_outage_during_eviction_punches_nothing(agent: Agent) -> None:
    sim = attach(agent, pages=64)
    for p in range(64):
        sim.access(p, write=True)  # zero pages never reach the store; these must
    events: list[EventKind] = []
    agent.events.add_listener(lambda e: events.append(e.kind))
    store_of(agent).fail_next_puts(1)
    rep = cycle(agent, "vm1")
    assert rep.pages_evicted == 0
    assert "eviction stopped" in rep.error
    assert sim.populated().all()
    assert agent.index.count("vm1") == 0
    assert EventKind.EVICTION_STOPPED in events
    assert cycle(agent, "vm1").pages_evicted == 64  # the store is back


def test_store_outage_during_fault_waits_then_serves(agent: Agent) -> None:
    sim = attach(agent, pages=16)
    for p in range(16):
        sim.access(p, write=True)
    cycle(agent, "vm1")
    store_of(agent).fail_next_gets(3)
    t = threading.Thread(target=sim.access, args=(3,))
    t.start()
    t.join(10)
    assert not t.is_alive()
    assert sim.counters()[3] == 1  # the page's real contents, never zeros
    assert agent.sessions["vm1"].counters.store_errors >= 3


def test_corrupt_payload_is_never_installed(agent: Agent) -> None:
    sim = attach(agent, pages=16)
    for p in range(16):
        sim.access(p, write=True)
    cycle(agent, "vm1")
    e = agent.index.get("vm1", 4)
    assert e is not None
    store_of(agent).corrupt(agent.sessions["vm1"].space, 4, e.stored.generation)
    events: list[EventKind] = []
    agent.events.add_listener(lambda ev: events.append(ev.kind))
    t = threading.Thread(target=sim.access, args=(4,), daemon=True)
    t.start()
    t.join(1.0)
    assert t.is_alive()  # the vCPU waits: a bad payload is never installed
    assert not sim.populated()[4]
    assert EventKind.INTEGRITY_ERROR in events
    assert agent.index.get("vm1", 4) is not None


def test_drain_empties_the_store_and_detach_rules(agent: Agent) -> None:
    sim = attach(agent, pages=128)
    for p in range(128):
        sim.access(p, write=True)
    expected = sim.counters().copy()
    cycle(agent, "vm1")
    assert agent.index.count("vm1") == 128
    with pytest.raises(FailedPrecondition):
        agent.detach("vm1")
    seen: list[DrainProgress] = []
    prog = agent.drain("vm1", seen.append)
    assert prog.done and prog.pages_restored == 128
    assert seen and seen[-1].pages_restored == 128
    assert agent.index.count("vm1") == 0
    assert store_of(agent).usage(agent.sessions["vm1"].space).pages == 0
    assert np.array_equal(sim.counters(), expected)
    assert agent.detach("vm1") == 0
    with pytest.raises(NotFound):
        agent.status("vm1")


def test_purge_removes_everything_of_that_vm_only(agent: Agent) -> None:
    a = attach(agent, "a", pages=32)
    b = attach(agent, "b", pages=32)
    for sim in (a, b):
        for p in range(32):
            sim.access(p, write=True)
    cycle(agent, "a")
    cycle(agent, "b")
    st = store_of(agent)
    sa, sb = agent.sessions["a"].space, agent.sessions["b"].space
    assert st.usage(sa).pages == 32 and st.usage(sb).pages == 32
    assert agent.detach("a", purge=True) == 32
    assert st.usage(sa).pages == 0
    assert st.usage(sb).pages == 32
    for p in range(32):
        b.access(p)
    assert (b.counters() == 1).all()


def test_bad_requests_change_nothing(agent: Agent) -> None:
    attach(agent, pages=16)
    with pytest.raises(InvalidArgument):
        agent.attach_sim("bad id!", 16 * PS, EvictionPolicy())
    with pytest.raises(InvalidArgument):
        agent.attach_sim("vm2", 1000, EvictionPolicy())  # not page aligned
    with pytest.raises(InvalidArgument):
        agent.set_policy("vm1", EvictionPolicy(cold_after=0))
    with pytest.raises(InvalidArgument):
        agent.set_policy("vm1", EvictionPolicy(store="nope"))
    with pytest.raises(NotFound):
        agent.run_cycle("ghost", CycleMode.EVICT)
    assert agent.sessions["vm1"].policy.cold_after == 1
    assert set(agent.sessions) == {"vm1"}


def test_stale_missing_message_never_drops_the_entry_of_a_page_being_evicted(agent: Agent) -> None:
    """A MISSING message read late, for a page a cycle is evicting right now (present, new entry
    written, punch not done yet): UFFDIO_COPY says EEXIST and the new entry must survive."""
    from tiermem.kernel import uapi
    from tiermem.store.base import PageBlob

    sim = attach(agent, pages=16)
    sim.access(3, write=True)
    s = agent.sessions["vm1"]
    gen = agent.index.next_generations("vm1", 1)
    st = store_of(agent)
    entries = st.put_pages(s.space, [PageBlob(3, gen, sim.io_read(3 * PS, PS))])
    agent.index.put_many("vm1", "default", entries)  # the cycle's step before the punch
    agent.faults["vm1"].handle(uapi.UffdMsg(uapi.UFFD_EVENT_PAGEFAULT, address=sim.addr(3)))
    e = agent.index.get("vm1", 3)
    assert e is not None and e.stored.generation == gen
    sim.punch_hole(3 * PS, PS)  # the cycle goes on
    t = threading.Thread(target=sim.access, args=(3,))
    t.start()
    t.join(10)
    assert sim.counters()[3] == 1  # served from the entry, not zero-filled
    assert s.counters.zero_fills == 0


def test_remove_event_keeps_evicted_pages_of_shared_memory(agent: Agent) -> None:
    # On a shmem memfd a REMOVE event may come from MADV_DONTNEED, which keeps the data: forgetting
    # the evicted pages would turn the guest's data into zeroes (test_lost_write.py reads them back).
    from tiermem.kernel import uapi

    sim = attach(agent, pages=16)
    for p in range(16):
        sim.access(p, write=True)
    cycle(agent, "vm1")
    assert agent.index.count("vm1") == 16
    agent.faults["vm1"].handle(uapi.UffdMsg(uapi.UFFD_EVENT_REMOVE, start=sim.addr(4), end=sim.addr(8)))
    assert agent.index.count("vm1") == 16
    assert sim.read_page(5)[: len(sim.read_page(5))] == sim.io_read(5 * PS, PS)  # restored, not zeroed
    assert sim.counters()[5] == 1


def test_eight_vms_with_different_workloads_and_policies(agent: Agent) -> None:
    """Detection is exact per VM, every limit holds, faults are served, and memory verifies."""
    from tiermem.sim.workloads import ExpectedCounters, parse_workload

    specs: dict[str, tuple[str, dict[str, Any]]] = {
        "hot": ("hotset:0.1", {}),
        "zipf": ("zipf:1.1", {"max_evict": EvictionCap(pages=100)}),
        "phase": ("phases:0.2:period=2", {"cold_after": 2}),
        "scan": ("scan:batch=64", {}),
        "mix": ("mix:0.5:batch=50", {"min_resident_bytes": 300 * PS}),
        "idle": ("idle", {}),
        "rw": ("hotset:0.3:w=0.9", {"max_evict": EvictionCap(fraction=0.1)}),
        "noisy": ("hotset:0.05:noise=2", {"max_evict": EvictionCap(bytes=50 * PS)}),
    }
    n = 512
    guests: dict[str, Any] = {}
    for vm, (spec, pol) in specs.items():
        sim = attach(agent, vm, pages=n, **pol)
        for p in range(n):
            sim.access(p, write=True)
        exp = ExpectedCounters(n)
        exp.apply(np.arange(n), np.ones(n, dtype=bool))
        guests[vm] = (sim, parse_workload(spec, n, seed=len(guests)).batches(), exp)
    for _ in range(4):
        for vm, (sim, batches, exp) in guests.items():
            s = agent.sessions[vm]
            resident_before = int(sim.populated().sum())
            touched: set[int] = set()
            with s.cycle_lock:
                agent.engines[vm].begin()
                for _ in range(3):
                    pages, writes = next(batches)
                    sim.access_batch(pages, writes)  # evicted pages fault back through the fault thread
                    exp.apply(pages, writes)
                    touched.update(pages.tolist())
                rep = agent.engines[vm].finish(CycleMode.EVICT)
            assert rep.pages_hot == len(touched), vm  # every touched page is resident and hot: exact
            vm_policy = s.policy
            limit = vm_policy.max_evict.limit_pages(n, PS)
            if limit is not None:
                assert rep.pages_evicted <= limit, vm
            floor = vm_policy.min_resident_bytes // PS
            assert rep.pages_scanned - rep.pages_evicted >= floor, vm
            assert set(agent.index.evicted_pages(vm)).isdisjoint(touched), vm
            assert resident_before >= rep.pages_scanned - len(touched)  # sanity: scan saw memory as it was
    served = sum(agent.sessions[vm].counters.faults_served for vm in guests)
    assert served > 0
    assert agent.sessions["idle"].evicted_count() == n  # cold_after=1, no accesses
    for vm, (sim, _batches, exp) in guests.items():
        for p in range(n):
            sim.access(p)  # fault everything back
        assert exp.mismatches(sim.counters()).size == 0, vm


def test_fault_threads_survive_an_unexpected_error(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    # If the reader thread died on a bug, nothing would read the uffd again and the guest would hang.
    sim = attach(agent, pages=64)
    for p in range(64):
        sim.access(p, write=True)
    assert cycle(agent, "vm1").pages_evicted == 64
    fs = agent.faults["vm1"]
    real = fs._serve_missing
    blown: list[int] = []
    threads = 2  # two faults whose handler blows up on the reader thread (a memory store is served inline)

    def boom(page: int, **kw: bool) -> None:
        if len(blown) < threads:
            blown.append(page)
            raise RuntimeError("injected bug")
        real(page, **kw)

    monkeypatch.setattr(fs, "_serve_missing", boom)
    for i in range(threads):
        threading.Thread(
            target=sim.access, args=(i,), daemon=True
        ).start()  # blocked until close: never served
        deadline = time.monotonic() + 10
        while len(blown) <= i:
            assert time.monotonic() < deadline, "the fault never reached its handler"
            time.sleep(0.005)
    t = threading.Thread(target=sim.access, args=(40,), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the reader thread died: nothing serves the next fault"
    assert sim.populated()[40] and agent.sessions["vm1"].counters.faults_served == 1
