"""Two control-plane replicas on one real Redis: one leader schedules, followers serve reads and refuse
orchestrator writes; a crashed leader is replaced within a lease period; no slot is ever ordered twice."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.servers import RedisServer
from tests.helpers.wait import wait_until_async
from tests.integration.test_control_grpc import FakeAgent, _fake_agent, cp_settings, start_cp
from tiermem.api import NodeInfo, PolicyScope, VmSpec
from tiermem.control.server import RunningControlPlane
from tiermem.errors import FailedPrecondition, NotLeader
from tiermem.model import EventKind, EvictionPolicy, VmState, VmStatus
from tiermem.rpc.clients import AsyncControlPlaneClient, ControlPlaneClient

pytestmark = pytest.mark.redis

LEASE_MS = 600
INTERVAL_MS = 200


@pytest.fixture
async def replicas(
    redis_srv: RedisServer, tmp_path: Path
) -> AsyncIterator[tuple[list[RunningControlPlane], list[FakeAgent]]]:
    url = f"{redis_srv.url}?prefix=cp{uuid.uuid4().hex[:8]}"
    started: list[RunningControlPlane] = []
    for rid in ("A", "B"):
        s = cp_settings(tmp_path, state=url, replica_id=rid, leader_lease_ms=LEASE_MS, jitter=0.3)
        started.append(await start_cp(s))
    agents = [await _fake_agent("n1").start(), await _fake_agent("n2").start()]
    yield started, agents
    for cp in started:
        await cp.stop()
    for a in agents:
        assert a.server is not None
        await a.server.stop(0)


def assert_each_slot_ordered_once(agents: list[FakeAgent]) -> int:
    orders = [o for a in agents for o in a.orders]
    ids = [o.order_id for o in orders]
    assert len(ids) == len(set(ids)), "an order was sent twice"
    by_vm: dict[str, list[int]] = {}
    for o in orders:
        vm, _, planned = o.order_id.partition("@")
        by_vm.setdefault(vm, []).append(int(planned))
    for vm, starts in by_vm.items():
        starts.sort()
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(g >= INTERVAL_MS for g in gaps), (vm, gaps)  # never two orders in one interval
    return len(orders)


async def test_follower_serves_reads_refuses_writes_and_takes_over_from_a_crashed_leader(
    replicas: Any,
) -> None:
    (a, b), agents = replicas
    assert a.plane.is_leader and not b.plane.is_leader
    ca = AsyncControlPlaneClient(a.address, timeout_s=5)
    cb = AsyncControlPlaneClient(b.address, timeout_s=5)
    try:
        # agents may talk to any replica
        for ag in agents:
            await cb.register_node(NodeInfo(ag.node_id, ag.address))
        await ca.set_policy(PolicyScope.fleet(), EvictionPolicy(interval_ms=INTERVAL_MS))
        for i in range(6):
            await ca.register_vm(VmSpec(f"vm-{i}", f"n{1 + i % 2}", 1 << 20), attach=True)
        cb.follow_leader = False
        with pytest.raises(NotLeader, match=f"leader is replica A at {a.address}") as refused:
            await cb.register_vm(VmSpec("vm-x", "n1", 1 << 20))
        assert refused.value.leader_address == a.address  # carried in trailing metadata
        with pytest.raises(FailedPrecondition):
            await cb.set_policy(PolicyScope.fleet(), EvictionPolicy())
        assert "vm-x" not in {s.vm_id for s in await ca.list_vm_status()}  # the refusal changed nothing
        # a client that follows the leader (the default) gets the write done there, and stays there
        follower = AsyncControlPlaneClient(b.address, timeout_s=5)
        try:
            await follower.register_vm(VmSpec("vm-y", "n1", 1 << 20))
            assert follower.address == a.address
            await follower.deregister_vm("vm-y")
        finally:
            await follower.close()

        def sync_follow() -> str:
            with ControlPlaneClient(b.address, timeout_s=5) as cli:
                cli.register_vm(VmSpec("vm-z", "n1", 1 << 20))
                cli.deregister_vm("vm-z")
                return cli.address

        assert await asyncio.to_thread(sync_follow) == a.address
        # reads on the follower see the leader's writes
        assert len(await cb.list_vm_status()) == 6
        assert (await cb.get_policy("vm-0")).policy.interval_ms == INTERVAL_MS
        await cb.heartbeat("n1")

        async def ordered(n: int) -> bool:
            return sum(len(ag.orders) for ag in agents) >= n

        await wait_until_async(lambda: ordered(12))

        async def reported(n: int) -> bool:  # reports are group-committed just after the cycles
            return len(await cb.list_cycle_reports()) >= n

        await wait_until_async(lambda: reported(12))

        # the leader crashes: it stops without giving its lease up
        await a.stop(resign=False)
        before = sum(len(ag.orders) for ag in agents)
        assert await b.plane.elector.step() is False  # A's lease still holds
        await asyncio.sleep(LEASE_MS / 1000)  # one lease period later ...
        assert await b.plane.elector.step() is True  # ... B leads
        assert b.plane.is_leader
        await wait_until_async(lambda: ordered(before + 12))  # and B schedules
        # B now takes writes
        await cb.register_vm(VmSpec("vm-x", "n1", 1 << 20), attach=True)
        await wait_until_async(lambda: asyncio.sleep(0, any(o.vm_id == "vm-x" for o in agents[0].orders)))
        leaders = [
            e.attributes["replica"]
            for e in [e async for e in cb.stream_events()]
            if e.kind is EventKind.LEADER_CHANGED
        ]
        assert leaders == ["A", "B"]
        assert_each_slot_ordered_once(agents)
    finally:
        await ca.close()
        await cb.close()


async def test_two_schedulers_at_once_never_order_a_slot_twice(replicas: Any) -> None:
    """Split brain (both replicas believe they lead): the order claims still allow one order per slot."""
    (a, b), agents = replicas
    async with AsyncControlPlaneClient(a.address, timeout_s=5) as ca:
        for ag in agents:
            await ca.register_node(NodeInfo(ag.node_id, ag.address, max_concurrent_cycles=50))
        await ca.set_policy(PolicyScope.fleet(), EvictionPolicy(interval_ms=INTERVAL_MS))
        for i in range(10):
            await ca.register_vm(VmSpec(f"vm-{i}", f"n{1 + i % 2}", 1 << 20), attach=True)
        assert b.plane._elector_task is not None
        b.plane._elector_task.cancel()  # B stops campaigning ...
        b.plane.elector.is_leader = True  # ... and believes it leads: both replicas schedule
        await b.plane._on_leadership(True)

        async def ordered() -> bool:
            return sum(len(ag.orders) for ag in agents) >= 60

        await wait_until_async(ordered)
        sa, sb = a.plane.scheduler.stats, b.plane.scheduler.stats
        assert sa.claimed_elsewhere + sb.claimed_elsewhere > 0  # both tried the same slots; one got through
        assert sa.orders + sa.claimed_elsewhere > 0 and sb.orders + sb.claimed_elsewhere > 0  # both scheduled
        assert assert_each_slot_ordered_once(agents) >= 60


async def test_an_id_reported_to_a_follower_is_not_placed_by_the_leader(replicas: Any) -> None:
    # issue 17 item 2 with replicas: n2's heartbeat (listing its agent-local "vm-h") reaches follower B;
    # the leader A must still refuse to place "vm-h" on n1 (the claim lives in the shared state store)
    (a, b), agents = replicas
    ca = AsyncControlPlaneClient(a.address, timeout_s=5)
    cb = AsyncControlPlaneClient(b.address, timeout_s=5)
    try:
        for ag in agents:
            await cb.register_node(NodeInfo(ag.node_id, ag.address))
        cb.follow_leader = False
        await cb.heartbeat("n2", [VmStatus("vm-h", state=VmState.ARMED)])
        with pytest.raises(FailedPrecondition, match="active on node 'n2'"):
            await ca.register_vm(VmSpec("vm-h", "n1", 1 << 20))
        await cb.heartbeat("n2", [])  # n2 no longer runs it
        await ca.register_vm(VmSpec("vm-h", "n1", 1 << 20))
    finally:
        await ca.close()
        await cb.close()
