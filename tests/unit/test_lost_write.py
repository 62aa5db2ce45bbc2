"""The lost write (issue 16), reproduced on the sim: pages in the memfd but unmapped in the guest.

A ``pwrite``-style write through the I/O mapping puts a page in the page cache without mapping
it in the guest (ST_CACHED). UFFDIO_RWPROTECT cannot protect it and a guest access to it never
raises an RWP fault, not even in sync mode. The old rule ("resident and not hot") evicted it, so
a guest write landing between the read-out and the punch was lost. The cycle now evicts only
pages its frozen scan shows present and not accessed, and reports the others.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tiermem.agent.node import Agent
from tiermem.config import AgentSettings
from tiermem.kernel import uapi
from tiermem.model import CycleMode, CycleReport, EvictionPolicy
from tiermem.sim import content
from tiermem.sim.kernel import SimKernel

PS = 4096
N = 16
MAPPED = list(range(8))  # written by the guest: mapped, protectable
PREFILLED = list(range(8, N))  # written through the I/O mapping only: cached, unmapped


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


def setup_vm(agent: Agent, register: int | None = None) -> SimKernel:
    agent.attach_sim("vm1", N * PS, EvictionPolicy(interval_ms=10, cold_after=1, prefetch_pages=0))
    sim = agent.sessions["vm1"].backend
    assert isinstance(sim, SimKernel)
    if register is not None:
        sim.register(sim.base, sim.size, register)
    sim.madvise(sim.base, sim.size, uapi.MADV_REMOVE)  # a fresh memfd: nothing in it
    for p in MAPPED:
        sim.access(p, write=True)  # counter 1
    for p in PREFILLED:
        sim.io_write(p * PS, content.page_bytes(p, 5, PS))  # counter 5, like --prefill's pwrite
    return sim


def cycle_with_writes_during_eviction(agent: Agent, sim: SimKernel) -> CycleReport:
    """One evicting cycle; the first eviction read-out triggers guest writes to every prefilled page."""
    writers: list[threading.Thread] = []
    real_read = sim.io_read

    def read_then_guest_writes(offset: int, length: int) -> bytes:
        data = real_read(offset, length)
        if not writers:
            for p in PREFILLED:  # other vCPUs; on a MINOR-registered VMA they block until served
                t = threading.Thread(target=sim.access, args=(p, True))
                t.start()
                writers.append(t)
            for t in writers:
                t.join(0.2)  # long enough for an unblocked write to land before any punch
        return data

    sim.io_read = read_then_guest_writes  # type: ignore[method-assign]
    try:
        eng = agent.engines["vm1"]
        with agent.sessions["vm1"].cycle_lock:
            eng.begin()
            rep = eng.finish(CycleMode.EVICT)
    finally:
        sim.io_read = real_read  # type: ignore[method-assign]
    for t in writers:
        t.join(10)
        assert not t.is_alive()
    return rep


def test_sim_represents_cached_but_unmapped_pages(agent: Agent) -> None:
    """The hazard exists: protect skips them and a sync-mode write to one raises no fault."""
    mode = uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_RWP
    sim = setup_vm(agent, register=mode)
    assert sim.populated()[PREFILLED].all()
    sim.rwprotect(sim.base, sim.size, protect=True)
    sim.set_mode(disable=uapi.UFFD_FEATURE_RWP_ASYNC)
    present = sim.pagemap_scan(sim.base, sim.base + sim.size, category_mask=uapi.PAGE_IS_PRESENT)
    assert np.flatnonzero(present.page_mask(sim.base, sim.base + sim.size, PS)).tolist() == MAPPED
    before = sim.stats.rwp_faults
    sim.access(PREFILLED[0], write=True)  # no fault, no block, even frozen
    assert sim.stats.rwp_faults == before and sim.stats.cache_maps == 1
    sim.set_mode(enable=uapi.UFFD_FEATURE_RWP_ASYNC)


@pytest.mark.parametrize("minor", [False, True], ids=["missing-rwp", "missing-minor-rwp"])
def test_guest_writes_during_eviction_are_never_lost(agent: Agent, minor: bool) -> None:
    # Without MINOR (the old registration) the scan rule alone must save the writes; with MINOR
    # (rwp mode now) the writes fault MINOR and are mapped by CONTINUE.
    register = None if minor else uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_RWP
    sim = setup_vm(agent, register)
    rep = cycle_with_writes_during_eviction(agent, sim)
    assert rep.error == ""
    assert rep.pages_unproven == len(PREFILLED)  # reported, not evicted
    assert rep.pages_evicted == len(MAPPED)
    assert agent.index.count("vm1") == len(MAPPED)
    assert all(agent.index.get("vm1", p) is None for p in PREFILLED)
    expected = np.array([1] * len(MAPPED) + [6] * len(PREFILLED), dtype=np.uint32)
    for p in range(N):  # read back through the guest: evicted pages fault back from the store
        assert content.counter_of(sim.read_page(p)) == expected[p], p
    assert sim.stats.minor_faults == (len(PREFILLED) if minor else 0)
    # Now mapped, the prefilled pages are protectable: the next cycle proves and evicts them.
    rep2 = cycle_with_writes_during_eviction(agent, sim)
    assert rep2.pages_unproven == 0
    assert rep2.pages_evicted == N
    expected[PREFILLED] += 1  # the second cycle's writes (after their MISSING restore)
    for p in range(N):
        assert content.counter_of(sim.read_page(p)) == expected[p], p


def test_vmm_dontneed_keeps_data_and_evicted_pages(agent: Agent) -> None:
    """A shmem MADV_DONTNEED (UFFD_EVENT_REMOVE) is not "reads as zero": nothing is forgotten."""
    sim = setup_vm(agent)
    cycle_with_writes_during_eviction(agent, sim)
    assert agent.index.count("vm1") == len(MAPPED)
    sim.madvise(sim.addr(0), N * PS, uapi.MADV_DONTNEED)  # evicted pages stay holes, others cached
    agent.faults["vm1"].handle(uapi.UffdMsg(uapi.UFFD_EVENT_REMOVE, start=sim.addr(0), end=sim.addr(N)))
    assert agent.index.count("vm1") == len(MAPPED)  # entries kept: the guest still owns that data
    for p in MAPPED:
        assert content.counter_of(sim.read_page(p)) == 1  # MISSING: restored from the store
    for p in PREFILLED:
        assert content.counter_of(sim.read_page(p)) == 6  # MINOR: the page cache was kept
