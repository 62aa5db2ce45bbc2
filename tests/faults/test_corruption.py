"""Corrupted payloads in real stores (local files, Redis, S3) are refused, reported and never installed.

A byte of an evicted page's payload is flipped inside the backend itself (the
segment file, the Redis string, the S3 object). A vCPU touching that page must
wait (invariant 3: a bad payload is never installed, and invariant 4: zeros are
never installed either); the agent must publish an ``integrity_error`` event and
count it in ``tiermem_agent_store_errors_total{error="IntegrityError"}``. Once
the byte is repaired, the same fault is served with the right contents.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.faults.common import EventLog, fill, record, sim_of
from tests.faults.conftest import AgentFactory, redis_url
from tests.helpers.servers import RedisServer, S3Server
from tests.helpers.wait import wait_until
from tiermem.agent.node import Agent
from tiermem.model import CycleMode, EventKind, EvictionPolicy
from tiermem.store.base import StoredPage
from tiermem.store.local import LocalPageStore
from tiermem.store.redis_store import RedisPageStore
from tiermem.store.s3_store import S3PageStore
from tiermem.store.segfile import parse_location

pytestmark = pytest.mark.timeout(90)

PS = 4096
Flip = Callable[[StoredPage], Callable[[], None]]
"""Flip one payload byte of a stored page in the backend; returns the function that repairs it."""


def _flip_local(store: LocalPageStore, vm_id: str) -> Flip:
    def flip(st: StoredPage) -> Callable[[], None]:
        loc = parse_location(st.location)
        assert loc is not None
        seg, off, length = loc
        path = Path(store.root) / vm_id / "seg" / seg
        at = off + length // 2
        fd = os.open(path, os.O_RDWR)
        try:
            old = os.pread(fd, 1, at)
            os.pwrite(fd, bytes([old[0] ^ 0x40]), at)
        finally:
            os.close(fd)

        def repair() -> None:
            fd2 = os.open(path, os.O_RDWR)
            try:
                os.pwrite(fd2, old, at)
            finally:
                os.close(fd2)

        return repair

    return flip


def _flip_redis(store: RedisPageStore, port: int, vm_id: str) -> Flip:
    r = redis.Redis(host="127.0.0.1", port=port)

    def flip(st: StoredPage) -> Callable[[], None]:
        key = store.key(vm_id, st.page, st.generation)
        value = r.get(key)
        assert isinstance(value, bytes)
        at = len(value) // 2
        r.setrange(key, at, bytes([value[at] ^ 0x40]))

        def repair() -> None:
            r.setrange(key, at, value[at : at + 1])

        return repair

    return flip


def _flip_s3(store: S3PageStore, srv: S3Server, vm_id: str) -> Flip:
    c = srv.client()

    def flip(st: StoredPage) -> Callable[[], None]:
        loc = parse_location(st.location)
        assert loc is not None
        seg, off, length = loc
        key = f"{store.prefix}/{vm_id}/seg/{seg}"
        original = c.get_object(Bucket=srv.bucket, Key=key)["Body"].read()
        bad = bytearray(original)
        bad[off + length // 2] ^= 0x40
        c.put_object(Bucket=srv.bucket, Key=key, Body=bytes(bad))

        def restore() -> None:
            c.put_object(Bucket=srv.bucket, Key=key, Body=original)

        return restore

    return flip


def _setup(
    kind: str, make_agent: AgentFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[Agent, Flip]:
    if kind == "file":
        agent = make_agent({"store": f"file://{tmp_path}/pages"})
        st = agent.store("store")
        assert isinstance(st, LocalPageStore)
        return agent, lambda e: _flip_local(st, agent.sessions["vm1"].space)(e)
    if kind == "redis":
        srv: RedisServer = request.getfixturevalue("redis_own")
        agent = make_agent({"store": redis_url(srv.port)})
        st = agent.store("store")
        assert isinstance(st, RedisPageStore)
        return agent, lambda e: _flip_redis(st, srv.port, agent.sessions["vm1"].space)(e)
    s3: S3Server = request.getfixturevalue("s3_srv")
    prefix = f"corrupt-{random.randrange(1 << 30):x}"
    agent = make_agent({"store": f"{s3.url(prefix)}&segment_mib=1"})
    st = agent.store("store")
    assert isinstance(st, S3PageStore)
    return agent, lambda e: _flip_s3(st, s3, agent.sessions["vm1"].space)(e)


@pytest.mark.parametrize(
    "kind",
    [
        "file",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("s3", marks=pytest.mark.s3),
    ],
)
def test_corrupt_payload_is_refused_reported_and_never_installed(
    kind: str, make_agent: AgentFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    agent, flip = _setup(kind, make_agent, tmp_path, request)
    log = EventLog(agent)
    agent.attach_sim(
        "vm1",
        256 * PS,
        EvictionPolicy(interval_ms=20, cold_after=1, prefetch_pages=0, store="store"),
        workload="uniform",
        vcpus=0,
        seed=2,
    )
    sim, guest = sim_of(agent, "vm1")
    fill(guest, times=3)
    assert agent.run_cycle("vm1", CycleMode.EVICT, 20).pages_evicted == 256
    victim = 77
    entry = agent.index.get("vm1", victim)
    assert entry is not None
    repair = flip(entry.stored)

    t = threading.Thread(target=sim.access, args=(victim,), daemon=True)
    t.start()
    t.join(1.5)
    assert t.is_alive(), "the vCPU must wait: a corrupt payload is never installed"
    assert not sim.populated()[victim]
    assert agent.index.get("vm1", victim) == entry  # still evicted, still indexed
    events = log.of(EventKind.INTEGRITY_ERROR, "vm1")
    assert events and events[0].attributes.get("page") == str(victim), events
    assert agent.metrics.store_errors.labels("store", "get", "IntegrityError")._value.get() >= 1
    assert agent.sessions["vm1"].counters.integrity_errors >= 1

    repair()
    t.join(20)
    assert not t.is_alive(), "the fault did not resume after the payload was repaired"
    wait_until(lambda: agent.index.get("vm1", victim) is None, 5, "the restored page's entry to go")
    checked, lost = guest.verify()
    assert lost == 0
    record(
        f"corrupt payload refused ({kind} store)",
        pages_verified=checked,
        pages_lost=lost,
        integrity_errors=agent.sessions["vm1"].counters.integrity_errors,
        installed_corrupt=0,
    )


def test_a_corrupt_neighbour_does_not_block_a_healthy_fault(make_agent: AgentFactory, tmp_path: Path) -> None:
    agent = make_agent({"store": f"file://{tmp_path}/pages"})
    st = agent.store("store")
    assert isinstance(st, LocalPageStore)
    agent.attach_sim(
        "vm1",
        64 * PS,
        EvictionPolicy(interval_ms=20, cold_after=1, prefetch_pages=8, store="store"),
        workload="uniform",
        vcpus=0,
    )
    sim, guest = sim_of(agent, "vm1")
    fill(guest)
    agent.run_cycle("vm1", CycleMode.EVICT, 20)
    bad = agent.index.get("vm1", 20)
    assert bad is not None
    _flip_local(st, agent.sessions["vm1"].space)(bad.stored)
    t = threading.Thread(target=sim.access, args=(17,), daemon=True)  # 18..25 are prefetched with it
    t.start()
    t.join(3)
    assert not t.is_alive(), "a healthy page waits on its corrupt neighbour"
    assert not sim.populated()[20]  # and the corrupt one is still not installed
