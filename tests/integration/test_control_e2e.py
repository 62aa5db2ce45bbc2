"""End to end: a control plane, two real node agents on the sim backend, ten VMs with different policies.

The agents register and heartbeat on their own; the control plane's scheduler
orders every cycle. Cycles run and their reports arrive, evicted pages come
back intact when the guest reads them, and a policy changed over gRPC is the
one the next cycle runs with.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.wait import wait_until_async
from tests.integration.test_control_grpc import cp_settings, start_cp
from tiermem.agent.server import serve_agent
from tiermem.api import PolicyScope, VmSpec
from tiermem.config import AgentSettings
from tiermem.control.server import RunningControlPlane
from tiermem.model import EventKind, EvictionCap, EvictionPolicy
from tiermem.rpc.channel import aio_channel
from tiermem.rpc.clients import AsyncControlPlaneClient
from tiermem.v1 import agent_pb2 as apb
from tiermem.v1 import agent_pb2_grpc as agrpc

MiB = 1 << 20
# (vm, node, workload, policy): intervals, ages, caps and a paused VM all differ
FLEET: list[tuple[str, str, str, EvictionPolicy]] = [
    ("vm-0", "n1", "idle", EvictionPolicy(interval_ms=200, cold_after=1)),
    ("vm-1", "n1", "hotset:0.1", EvictionPolicy(interval_ms=250, cold_after=1)),
    ("vm-2", "n1", "zipf:1.1", EvictionPolicy(interval_ms=300, cold_after=2)),
    ("vm-3", "n1", "idle", EvictionPolicy(interval_ms=200, cold_after=1, max_evict=EvictionCap(pages=16))),
    ("vm-4", "n1", "hotset:0.3", EvictionPolicy(interval_ms=350, cold_after=2, prefetch_pages=0)),
    ("vm-5", "n2", "idle", EvictionPolicy(interval_ms=200, cold_after=1)),
    ("vm-6", "n2", "uniform", EvictionPolicy(interval_ms=300, cold_after=3)),
    ("vm-7", "n2", "hotset:0.2", EvictionPolicy(interval_ms=250, cold_after=1, min_resident_bytes=MiB)),
    ("vm-8", "n2", "zipf:0.9", EvictionPolicy(interval_ms=400, cold_after=2)),
    ("vm-9", "n2", "idle", EvictionPolicy(interval_ms=200, cold_after=1, paused=True)),
]


@pytest.fixture
async def stack(
    tmp_path: Path,
) -> AsyncIterator[tuple[RunningControlPlane, AsyncControlPlaneClient, dict[str, Any]]]:
    cp = await start_cp(cp_settings(tmp_path, lease_ttl_ms=5_000, max_concurrent_cycles_per_node=8))
    agents = {}
    for node in ("n1", "n2"):
        s = AgentSettings(
            node_id=node,
            listen="127.0.0.1:0",
            data_dir=str(tmp_path / node),
            control_plane=cp.address,
            heartbeat_ms=200,
            fsync=False,
        )
        agents[node] = await serve_agent(s)
    client = AsyncControlPlaneClient(cp.address, timeout_s=20)
    yield cp, client, agents
    await client.close()
    for a in agents.values():
        await a.stop()
    await cp.stop()


async def test_fleet_of_ten_vms_on_two_sim_agents(stack: Any) -> None:
    _cp, client, agents = stack

    async def registered() -> bool:
        return {n.node_id for n in await client.list_nodes() if n.up} == {"n1", "n2"}

    await wait_until_async(registered)
    for vm, node, workload, policy in FLEET:
        await client.register_vm(
            VmSpec(vm, node, 4 * MiB, labels={"wl": workload.split(":")[0]}, workload=workload), attach=True
        )
        await client.set_policy(PolicyScope.for_vm(vm), policy)

    running = [vm for vm, *_, p in FLEET if not p.paused]

    async def cycles_done(n: int) -> bool:
        for vm in running:
            if len([r for r in await client.list_cycle_reports(vm) if not r.error]) < n:
                return False
        return True

    await wait_until_async(lambda: cycles_done(3), timeout=60)
    reports = {vm: await client.list_cycle_reports(vm, limit=100) for vm, *_ in FLEET}
    assert reports["vm-9"] == []  # paused: never ordered
    assert all(not r.error for vm in running for r in reports[vm]), reports
    assert sum(r.pages_evicted for r in reports["vm-0"]) > 0  # idle, cold after one cycle
    assert all(r.pages_evicted <= 16 for r in reports["vm-3"])  # the per-cycle cap holds
    assert {r.node_id for r in reports["vm-5"]} == {"n2"}
    # every report ran with the VM's own policy version
    for vm in running:
        version = (await client.get_policy(vm)).policy.version
        assert {r.policy_version for r in reports[vm]} == {version}, vm

    # statuses arrive by heartbeat
    async def evicted_seen() -> bool:
        return bool((await client.get_vm_status("vm-0")).evicted_pages > 0)

    await wait_until_async(evicted_seen)

    # evicted pages come back intact when the guest reads them
    async with aio_channel(agents["n1"].address) as ch:
        stub = agrpc.NodeAgentStub(ch)
        for vm in ("vm-0", "vm-1", "vm-3"):
            v = await stub.VerifyVm(apb.VerifyVmRequest(vm_id=vm), timeout=30)
            assert v.supported and v.pages_checked > 0 and v.mismatches == 0, (vm, v)

    async def faults_served() -> bool:
        return bool((await client.get_vm_status("vm-0")).faults_served > 0)

    await wait_until_async(faults_served, timeout=20)

    # a policy change over gRPC is the one the next cycle runs with
    entry = await client.set_policy(PolicyScope.for_vm("vm-5"), EvictionPolicy(cold_after=4), ["cold_after"])
    assert entry.policy.interval_ms == 200

    async def next_cycle_has_new_policy() -> bool:
        return any(
            r.policy_version == entry.policy.version for r in await client.list_cycle_reports("vm-5", 5)
        )

    await wait_until_async(next_cycle_has_new_policy, timeout=20)
    newest = await client.list_cycle_reports("vm-5", 50)
    first_new = max(i for i, r in enumerate(newest) if r.policy_version == entry.policy.version)
    assert all(
        r.policy_version == entry.policy.version for r in newest[: first_new + 1]
    )  # never back to the old one

    async with aio_channel(agents["n2"].address) as ch:
        vms = {
            v.vm_id: v for v in (await agrpc.NodeAgentStub(ch).ListVms(apb.ListVmsRequest(), timeout=10)).vms
        }
    assert (
        vms["vm-5"].policy.cold_after == 4 and vms["vm-5"].policy.version == entry.policy.version
    )  # on the agent
    kinds = {e.kind for e in [e async for e in client.stream_events()]}
    assert {
        EventKind.NODE_UP,
        EventKind.VM_ATTACHED,
        EventKind.CYCLE_COMPLETED,
        EventKind.POLICY_CHANGED,
    } <= kinds
    await asyncio.sleep(0)
