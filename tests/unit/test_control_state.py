"""The state-store suite: SQLite and Redis (a real redis-server) must behave the same."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tiermem.api import Adjustment, NodeInfo, PolicyEntry, PolicyScope, VmSpec
from tiermem.control.clock import ManualClock
from tiermem.control.state import StateStore
from tiermem.control.state_open import open_state
from tiermem.control.state_redis import RedisState
from tiermem.control.state_sqlite import SqliteState
from tiermem.errors import ConfigurationError, Unavailable
from tiermem.model import Backend, CycleReport, Event, EventKind, EvictionCap, EvictionPolicy, VmStatus

Expire = Callable[[int], Awaitable[None]]


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[StateStore, Expire]]:
    clock = ManualClock()
    st: StateStore
    if request.param == "sqlite":
        st = SqliteState(f"sqlite:///{tmp_path}/cp.db", clock=clock, reports_keep=3, events_keep=50)
    else:
        srv = request.getfixturevalue("redis_srv")
        st = RedisState(
            f"{srv.url}?prefix=t{uuid.uuid4().hex[:8]}", clock=clock, reports_keep=3, events_keep=50
        )
    await st.open()

    async def expire(ms: int) -> None:
        # SQLite expiry follows the injected clock, Redis expiry its own: move both.
        clock.advance(ms / 1000)
        await asyncio.sleep(ms / 1000)

    yield st, expire
    await st.close()


async def test_nodes_roundtrip_and_delete(env: tuple[StateStore, Expire]) -> None:
    st, _ = env
    n = NodeInfo(
        "n2", "127.0.0.1:7070", capacity_bytes=1 << 30, backends=(Backend.SIM, Backend.UFFD), evict_mbps=5.5
    )
    await st.put_node(n)
    await st.put_node(NodeInfo("n1", "127.0.0.1:7071"))
    assert await st.get_node("n2") == n
    assert [x.node_id for x in await st.list_nodes()] == ["n1", "n2"]
    assert await st.delete_node("n2") is True
    assert await st.delete_node("n2") is False
    assert await st.get_node("n2") is None


async def test_vm_create_is_exclusive_and_delete_cascades(env: tuple[StateStore, Expire]) -> None:
    st, _ = env
    spec = VmSpec("vm-1", "n1", 1 << 20, labels={"tier": "gold"})
    assert await st.create_vm(spec) is True
    assert await st.create_vm(VmSpec("vm-1", "n2", 4096)) is False
    assert (await st.get_vm("vm-1")) == spec  # the loser changed nothing
    assert await st.get_vms(["vm-1", "nope", "vm-1"]) == {"vm-1": spec}
    assert await st.get_vms([]) == {}
    assert await st.vm_nodes(["vm-1", "nope"]) == {"vm-1": "n1"}
    await st.create_vm(VmSpec("vm-2", "n1", 4096))
    await st.put_statuses([VmStatus("vm-1", evicted_pages=7), VmStatus("vm-2", evicted_pages=1)])
    await st.put_adjustment(Adjustment("vm-1", level=2, version=9))
    await st.put_policy(PolicyEntry(PolicyScope.for_vm("vm-1"), EvictionPolicy(cold_after=9, version=3)))
    await st.add_reports([CycleReport("vm-1", cycle=1), CycleReport("vm-2", cycle=1)])

    assert await st.delete_vm("vm-1") is True
    assert await st.delete_vm("vm-1") is False
    assert await st.get_vm("vm-1") is None
    assert await st.get_status("vm-1") is None
    assert await st.get_adjustment("vm-1") is None
    assert await st.get_policy("vm:vm-1") is None
    assert await st.list_reports("vm-1") == []
    assert [r.vm_id for r in await st.list_reports()] == ["vm-2"]
    assert (await st.get_status("vm-2")).evicted_pages == 1  # type: ignore[union-attr]
    assert [v.vm_id for v in await st.list_vms()] == ["vm-2"]
    assert await st.vm_nodes(["vm-1", "vm-2"]) == {"vm-2": "n1"}


async def test_statuses_replace(env: tuple[StateStore, Expire]) -> None:
    st, _ = env
    await st.put_statuses([VmStatus("a", faults_served=1, labels={"x": "y"})])
    await st.put_statuses(
        [VmStatus("a", faults_served=5), VmStatus("b", policy=EvictionPolicy(cold_after=9))]
    )
    all_ = await st.list_statuses()
    assert set(all_) == {"a", "b"}
    assert all_["a"].faults_served == 5 and all_["a"].labels == {}
    assert all_["b"].policy == EvictionPolicy()  # not kept: the control plane reports its effective policy


async def test_local_vms_are_replaced_per_node(env: tuple[StateStore, Expire]) -> None:
    st, _ = env
    assert await st.local_vm_owner("vm-h") is None
    await st.put_local_vms("n1", ["vm-h", "vm-i"], 1000)
    await st.put_local_vms("n2", ["vm-j"], 1500)
    assert await st.local_vm_owner("vm-h") == ("n1", 1000) and await st.local_vm_owner("vm-j") == ("n2", 1500)
    await st.put_local_vms("n1", ["vm-i"], 2000)  # vm-h detached on n1: its id is free again
    assert await st.local_vm_owner("vm-h") is None and await st.local_vm_owner("vm-i") == ("n1", 2000)
    await st.put_local_vms("n1", [], 3000)
    assert await st.local_vm_owner("vm-i") is None and await st.local_vm_owner("vm-j") == ("n2", 1500)


async def test_policy_versions_are_monotonic_and_entries_roundtrip(env: tuple[StateStore, Expire]) -> None:
    st, _ = env
    versions = [await st.next_version() for _ in range(5)]
    assert versions == sorted(versions) and len(set(versions)) == 5
    e = PolicyEntry(
        PolicyScope.for_selector("tier=gold,zone=a"),
        EvictionPolicy(interval_ms=5000, max_evict=EvictionCap(fraction=0.25), version=versions[-1]),
        updated_ms=123,
    )
    await st.put_policy(e)
    await st.put_policy(PolicyEntry(PolicyScope.fleet(), EvictionPolicy(version=1)))
    assert await st.get_policy("selector:tier=gold,zone=a") == e
    assert {x.scope.key for x in await st.list_policies()} == {"fleet", "selector:tier=gold,zone=a"}
    assert await st.delete_policy("fleet") is True
    assert await st.delete_policy("fleet") is False
    assert await st.get_mark("deleted") == 0
    await st.set_mark("deleted", 42)
    assert await st.get_mark("deleted") == 42


async def test_adjustments(env: tuple[StateStore, Expire]) -> None:
    st, _ = env
    await st.put_adjustment(Adjustment("vm-1", level=1, version=4, reason="rate 0.01 > slo 0.002"))
    await st.put_adjustment(Adjustment("vm-1", level=2, version=5))
    assert (await st.get_adjustment("vm-1")).level == 2  # type: ignore[union-attr]
    assert set(await st.list_adjustments()) == {"vm-1"}


async def test_reports_are_bounded_per_vm_newest_first(env: tuple[StateStore, Expire]) -> None:
    st, _ = env
    await st.add_reports([CycleReport("a", cycle=i) for i in range(1, 6)])
    await st.add_reports([CycleReport("b", cycle=1)])
    assert [r.cycle for r in await st.list_reports("a")] == [5, 4, 3]  # reports_keep=3
    assert [r.cycle for r in await st.list_reports("a", limit=2)] == [5, 4]
    assert [(r.vm_id, r.cycle) for r in await st.list_reports(limit=2)] == [("b", 1), ("a", 5)]


async def test_events_have_increasing_seq_and_replay(env: tuple[StateStore, Expire]) -> None:
    st, _ = env
    assert await st.last_event_seq() == 0
    evs = [
        await st.append_event(
            Event(EventKind.NODE_UP, f"e{i}", vm_id="a" if i % 2 else "b", attributes={"i": str(i)})
        )
        for i in range(6)
    ]
    seqs = [e.seq for e in evs]
    assert seqs == sorted(seqs) and seqs[0] >= 1
    assert await st.last_event_seq() == seqs[-1]
    after = await st.events_after(seqs[2])
    assert [e.message for e in after] == ["e3", "e4", "e5"]
    assert [e.seq for e in after] == seqs[3:]
    assert after[0].attributes == {"i": "3"} and after[0].kind is EventKind.NODE_UP
    assert [e.message for e in await st.events_after(0, vm_id="a")] == ["e1", "e3", "e5"]
    assert [e.message for e in await st.events_after(0, limit=2)] == ["e0", "e1"]
    batch = await st.append_events([Event(EventKind.CYCLE_COMPLETED, f"b{i}", vm_id="b") for i in range(3)])
    assert [e.seq for e in batch] == [seqs[-1] + 1, seqs[-1] + 2, seqs[-1] + 3]
    assert [e.message for e in await st.events_after(seqs[-1])] == ["b0", "b1", "b2"]
    assert await st.append_events([]) == []
    assert await st.events_after(2**64 - 1) == []  # any uint64 from the wire: an empty replay


async def test_order_claims_are_exclusive_until_expiry(env: tuple[StateStore, Expire]) -> None:
    st, expire = env
    assert await st.claim_order("vm-1@1000", "r1", ttl_ms=150) is True
    assert await st.claim_order("vm-1@1000", "r2", ttl_ms=150) is False
    assert await st.claim_order("vm-1@1000", "r1", ttl_ms=150) is False  # the same owner cannot order twice
    assert await st.claim_order("vm-1@2000", "r2", ttl_ms=150) is True
    await expire(250)
    assert await st.claim_order("vm-1@1000", "r2", ttl_ms=150) is True


async def test_leader_lease_acquire_renew_expire_release(env: tuple[StateStore, Expire]) -> None:
    st, expire = env
    assert await st.get_leader() is None
    assert await st.acquire_leadership("r1", "10.0.0.1:7000", ttl_ms=200) is True
    assert await st.acquire_leadership("r2", "10.0.0.2:7000", ttl_ms=200) is False
    assert await st.acquire_leadership("r1", "10.0.0.1:7000", ttl_ms=200) is True  # renewal
    leader = await st.get_leader()
    assert leader is not None and (leader.replica_id, leader.address) == ("r1", "10.0.0.1:7000")
    await expire(300)
    assert await st.get_leader() is None
    assert await st.acquire_leadership("r2", "10.0.0.2:7000", ttl_ms=5000) is True
    await st.release_leadership("r1")  # not the holder: no effect
    assert (await st.get_leader()).replica_id == "r2"  # type: ignore[union-attr]
    await st.release_leadership("r2")
    assert await st.get_leader() is None
    assert await st.acquire_leadership("r1", "10.0.0.1:7000", ttl_ms=5000) is True


def test_open_state_rejects_unknown_scheme() -> None:
    with pytest.raises(ConfigurationError):
        open_state("postgres://x/y")
    with pytest.raises(ConfigurationError):
        open_state("sqlite://")


async def test_redis_down_is_unavailable() -> None:
    from tests.helpers.servers import free_port

    st = RedisState(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(Unavailable):
        await st.open()
    await st.close()
