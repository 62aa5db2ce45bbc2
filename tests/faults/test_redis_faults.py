"""Redis outages under a sim guest: killed mid-eviction, partitioned, truncated, slow, and full.

Each scenario ends with the guest verifying every page. The data-safety checks
are those of the brief (§5): no page is punched without an acknowledged write
and a durable index entry (every hole has an entry whose payload reads back and
verifies), faults wait through an outage and then succeed (never zeros), and
a full store stops eviction loudly without punching anything.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import redis

from tests.faults.common import (
    EventLog,
    ServeLog,
    check_payloads,
    entries_for,
    fill,
    holes_of,
    open_direct,
    record,
    sim_of,
    unbacked_punches,
)
from tests.faults.conftest import AgentFactory, redis_url
from tests.faults.toxic_proxy import ToxicProxy
from tests.helpers.servers import RedisServer
from tests.helpers.wait import wait_until
from tiermem.agent.cycle import EVICT_BATCH_PAGES
from tiermem.model import CycleMode, CycleReport, EventKind, EvictionPolicy
from tiermem.sim.kernel import SimKernel

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

PS = 4096


def start_readers(sim: SimKernel, pages: list[int]) -> threading.Thread:
    """A vCPU thread reading ``pages`` (each an evicted page: a MISSING fault)."""

    def read() -> None:
        for p in pages:
            sim.access(int(p))

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


def test_redis_killed_mid_eviction_batch_then_restarted(
    make_agent: AgentFactory, redis_own: RedisServer, redis_proxy: ToxicProxy
) -> None:
    agent = make_agent({"redis": redis_url(redis_proxy.port, timeout=5)})
    log = EventLog(agent)
    pol = EvictionPolicy(interval_ms=50, cold_after=1, prefetch_pages=4, store="redis")
    n = 4 * EVICT_BATCH_PAGES  # four batches: the kill lands after the first and before the last
    agent.attach_sim("vm1", n * PS, pol, workload="hotset:0.05", vcpus=0, seed=3)
    sim, guest = sim_of(agent, "vm1")
    fill(guest)  # no zero pages: every evicted page must reach Redis
    redis_proxy.latency(0.005)  # a few hundred ms per batch
    out: list[CycleReport] = []
    stop = threading.Event()

    def vcpu() -> None:  # the guest keeps running through the outage
        while not stop.is_set():
            guest.step(1)
            time.sleep(0.005)

    cyc = threading.Thread(target=lambda: out.append(agent.run_cycle("vm1", CycleMode.EVICT, 50)))
    vt = threading.Thread(target=vcpu, daemon=True)
    cyc.start()
    vt.start()
    wait_until(lambda: agent.index.count("vm1") > 0, 30, "the first batch to be acknowledged and indexed")
    redis_own.kill()
    cyc.join(30)
    assert not cyc.is_alive()
    rep = out[0]
    evicted = agent.index.count("vm1")
    assert "eviction stopped" in rep.error, rep
    assert 0 < rep.pages_evicted == evicted < n
    assert log.of(EventKind.EVICTION_STOPPED, "vm1")

    # While Redis is down no page can come back, so holes and index entries are stable: compare them.
    holes = holes_of(agent, "vm1")
    assert unbacked_punches(agent.index, "vm1", holes) == []
    assert holes == set(agent.index.evicted_pages("vm1"))

    # A vCPU touching evicted pages waits (loudly), and never gets zeros.
    victims = sorted(holes)[:: max(1, len(holes) // 16)][:16]
    reader = start_readers(sim, victims)
    reader.join(1.5)
    assert reader.is_alive(), "a fault returned while the store was down"
    assert not sim.populated()[victims].any()
    wait_until(lambda: log.of(EventKind.STORE_ERROR, "vm1"), 10, "a store_error event")
    assert agent.sessions["vm1"].counters.store_errors > 0

    redis_own.start()  # same port, same AOF: acknowledged writes survived the SIGKILL
    reader.join(30)
    assert not reader.is_alive(), "faults did not resume after Redis came back"
    stop.set()
    vt.join(30)
    assert not vt.is_alive()

    # Every page still evicted is readable and verifies, read straight from Redis (not via the proxy).
    direct = open_direct(redis_url(redis_own.port), "redis", agent.data_dir)
    space = agent.sessions["vm1"].space
    still = agent.index.evicted_pages("vm1")
    bad = check_payloads(direct, space, [e.stored for e in entries_for(agent.index, "vm1", still)])
    orphans = direct.usage(space).pages - len(still)
    direct.close()
    assert bad == 0

    redis_proxy.clear()
    rep2 = agent.run_cycle("vm1", CycleMode.EVICT, 50)
    assert rep2.error == "" and rep2.pages_evicted > 0
    checked, lost = guest.verify()
    assert lost == 0
    record(
        "redis killed mid-eviction batch, restarted",
        pages_verified=checked,
        pages_lost=lost,
        evicted_before_kill=evicted,
        faults_waited=len(victims),
        orphan_payloads=max(orphans, 0),
        store_errors=agent.sessions["vm1"].counters.store_errors,
    )


def test_faults_wait_through_partition_truncation_and_latency(
    make_agent: AgentFactory, redis_own: RedisServer, redis_proxy: ToxicProxy
) -> None:
    agent = make_agent({"redis": redis_url(redis_proxy.port)})
    log = EventLog(agent)
    pol = EvictionPolicy(interval_ms=20, cold_after=1, prefetch_pages=4, store="redis")
    agent.attach_sim("vm1", 1024 * PS, pol, workload="zipf:1.1", vcpus=0, seed=5)
    sim, guest = sim_of(agent, "vm1")
    fill(guest, times=2)
    rep = agent.run_cycle("vm1", CycleMode.EVICT, 20)
    assert rep.error == "" and rep.pages_evicted == 1024
    served = ServeLog(agent.store("redis"))
    pages = np.arange(1024)

    # 1. partition: requests vanish; faults wait on the retry loop, then succeed when it heals
    redis_proxy.blackhole(True)
    reader = start_readers(sim, pages[0:200:10].tolist())
    reader.join(2.0)
    assert reader.is_alive()
    redis_proxy.blackhole(False)
    redis_proxy.reset()  # the client's half-read connections are now garbage: drop them
    reader.join(30)
    assert not reader.is_alive()

    # 2. truncated replies: a half payload is never taken for data
    redis_proxy.truncate(3000)  # less than one page
    reader = start_readers(sim, pages[200:400:10].tolist())
    reader.join(2.0)
    assert reader.is_alive()
    assert not sim.populated()[210]
    redis_proxy.truncate(None)
    reader.join(30)
    assert not reader.is_alive()

    # 3. slow replies while the guest runs: served, just later
    redis_proxy.latency(0.01)
    for _ in range(20):
        guest.step(1)
    redis_proxy.clear()

    assert log.of(EventKind.STORE_ERROR, "vm1")
    assert served.served_differently() == []
    checked, lost = guest.verify()
    assert lost == 0
    assert served.served_differently() == []
    record(
        "redis partitioned / truncated / slow during faults",
        pages_verified=checked,
        pages_lost=lost,
        store_errors=agent.sessions["vm1"].counters.store_errors,
        store_gets=served.calls,
        resets=redis_proxy.stats.refused_or_reset,
        truncated=redis_proxy.stats.truncated,
    )


def _used_memory(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def test_store_full_from_the_start_punches_nothing(make_agent: AgentFactory, redis_own: RedisServer) -> None:
    r = redis.Redis(host="127.0.0.1", port=redis_own.port)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", str(_used_memory(r) + 64 * 1024))
    agent = make_agent({"redis": redis_url(redis_own.port)})
    log = EventLog(agent)
    agent.attach_sim(
        "vm1",
        512 * PS,
        EvictionPolicy(interval_ms=20, cold_after=1, store="redis"),
        workload="uniform",
        vcpus=0,
    )
    _, guest = sim_of(agent, "vm1")
    fill(guest)
    rep = agent.run_cycle("vm1", CycleMode.EVICT, 20)
    assert rep.pages_evicted == 0 and "out of memory" in rep.error, rep
    stopped = log.of(EventKind.EVICTION_STOPPED, "vm1")
    assert stopped and "out of memory" in stopped[0].message
    assert holes_of(agent, "vm1") == set()  # nothing punched
    assert agent.index.count("vm1") == 0
    m = agent.metrics.store_errors.labels("redis", "put", "StoreFull")._value.get()
    assert m >= 1
    checked, lost = guest.verify()
    assert lost == 0
    r.config_set("maxmemory", "0")
    r.close()
    record(
        "store full (redis maxmemory noeviction) from the start",
        pages_verified=checked,
        pages_lost=lost,
        pages_punched=0,
    )


def test_store_fills_mid_eviction_stops_and_resumes(make_agent: AgentFactory, redis_own: RedisServer) -> None:
    r = redis.Redis(host="127.0.0.1", port=redis_own.port)
    r.config_set("maxmemory-policy", "noeviction")
    batch = EVICT_BATCH_PAGES * PS  # a put's request sits in Redis's query buffer too: room for ~2 batches
    r.config_set("maxmemory", str(_used_memory(r) + int(2.5 * batch)))
    agent = make_agent({"redis": redis_url(redis_own.port)})
    log = EventLog(agent)
    n = 4 * EVICT_BATCH_PAGES
    agent.attach_sim(
        "vm1",
        n * PS,
        EvictionPolicy(interval_ms=20, cold_after=1, store="redis"),
        workload="hotset:0.1",
        vcpus=0,
        seed=9,
    )
    _sim, guest = sim_of(agent, "vm1")
    fill(guest)
    rep = agent.run_cycle("vm1", CycleMode.EVICT, 20)
    assert "out of memory" in rep.error, rep
    assert 0 < rep.pages_evicted < n
    assert log.of(EventKind.EVICTION_STOPPED, "vm1")
    holes = holes_of(agent, "vm1")
    assert holes == set(agent.index.evicted_pages("vm1"))  # exactly the acknowledged batches
    st = agent.store("redis")
    assert (
        check_payloads(
            st,
            agent.sessions["vm1"].space,
            [e.stored for e in entries_for(agent.index, "vm1", sorted(holes))],
        )
        == 0
    )
    full_at = rep.pages_evicted
    # the guest still runs (its faults are reads, which a full Redis serves)
    for _ in range(10):
        guest.step(1)
    r.config_set("maxmemory", "0")
    rep2 = agent.run_cycle("vm1", CycleMode.EVICT, 20)
    assert rep2.error == "" and rep2.pages_evicted > 0
    checked, lost = guest.verify()
    assert lost == 0
    r.close()
    record(
        "store fills mid-eviction (redis maxmemory)",
        pages_verified=checked,
        pages_lost=lost,
        evicted_before_full=full_at,
    )
