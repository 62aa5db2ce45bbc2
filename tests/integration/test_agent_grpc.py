"""The NodeAgent gRPC service over a real in-process server: happy paths, status codes, deadlines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tiermem.agent.server import RunningAgent, serve_agent
from tiermem.config import AgentSettings
from tiermem.sim.kernel import SimKernel
from tiermem.v1 import agent_pb2 as apb
from tiermem.v1 import agent_pb2_grpc as agrpc
from tiermem.v1 import types_pb2 as tpb

OUT_OF_RANGE: Any = 7
"""A cycle mode no proto defines (typed Any: the generated stubs only accept defined ones)."""
PS = 4096


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[RunningAgent, agrpc.NodeAgentAsyncStub]]:
    running = await serve_agent(
        AgentSettings(
            node_id="g1",
            listen="127.0.0.1:0",
            data_dir=str(tmp_path),
            autonomous=False,
            stores={"default": "memory://"},
        )
    )
    channel = grpc.aio.insecure_channel(running.address)
    yield running, agrpc.NodeAgentStub(channel)
    await channel.close()
    await running.stop()


def policy(**kw: object) -> tpb.EvictionPolicy:
    base: dict[str, object] = {"interval_ms": 50, "cold_after": 1}
    return tpb.EvictionPolicy(**{**base, **kw})  # type: ignore[arg-type]


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call  # type: ignore[misc]
    return ei.value.code()


async def test_attach_cycle_drain_detach(agent: tuple[RunningAgent, agrpc.NodeAgentAsyncStub]) -> None:
    running, stub = agent
    r = await stub.AttachVm(
        apb.AttachVmRequest(vm_id="v1", backend=tpb.KERNEL_BACKEND_SIM, memory_bytes=64 * PS, policy=policy())
    )
    assert r.status.total_pages == 64 and r.status.state == tpb.VM_STATE_ARMED
    sim = running.agent.sessions["v1"].backend
    assert isinstance(sim, SimKernel)
    for p in range(64):
        sim.access(p, write=True)
    dry = await stub.RunCycle(apb.RunCycleRequest(vm_id="v1", mode=tpb.CYCLE_MODE_DETECT), timeout=10)
    assert dry.pages_cold == 64 and dry.pages_evicted == 0
    rep = await stub.RunCycle(apb.RunCycleRequest(vm_id="v1", mode=tpb.CYCLE_MODE_EVICT), timeout=10)
    assert rep.pages_evicted == 64 and rep.phases.total_us > 0
    stats = await stub.GetStats(apb.GetStatsRequest(vm_id="v1"))
    assert stats.vms[0].evicted_pages == 64 and stats.node.node_id == "g1"
    assert (
        await code_of(stub.DetachVm(apb.DetachVmRequest(vm_id="v1"))) == grpc.StatusCode.FAILED_PRECONDITION
    )
    progress = [p async for p in stub.Drain(apb.DrainRequest(vm_id="v1"))]
    assert progress[-1].done and progress[-1].pages_restored == 64
    ver = await stub.VerifyVm(apb.VerifyVmRequest(vm_id="v1"))
    assert ver.supported is False  # no in-process guest workload: nothing to compare against
    events = [e async for e in stub.StreamEvents(tpb.StreamEventsRequest(vm_id="v1", follow=False))]
    kinds = {e.kind for e in events}
    assert {
        tpb.EVENT_KIND_VM_ATTACHED,
        tpb.EVENT_KIND_CYCLE_COMPLETED,
        tpb.EVENT_KIND_DRAIN_PROGRESS,
    } <= kinds
    await stub.DetachVm(apb.DetachVmRequest(vm_id="v1"))
    assert (await stub.ListVms(apb.ListVmsRequest())).vms == []


async def test_order_id_makes_a_repeated_order_idempotent(
    agent: tuple[RunningAgent, agrpc.NodeAgentAsyncStub],
) -> None:
    running, stub = agent
    await stub.AttachVm(apb.AttachVmRequest(vm_id="v2", memory_bytes=16 * PS, policy=policy()))
    a = await stub.RunCycle(apb.RunCycleRequest(vm_id="v2", order_id="o-1"), timeout=10)
    b = await stub.RunCycle(apb.RunCycleRequest(vm_id="v2", order_id="o-1"), timeout=10)
    assert a.cycle == b.cycle == 1
    assert running.agent.sessions["v2"].counters.cycles == 1


async def test_bad_requests_get_the_right_code_and_change_nothing(
    agent: tuple[RunningAgent, agrpc.NodeAgentAsyncStub],
) -> None:
    running, stub = agent
    await stub.AttachVm(apb.AttachVmRequest(vm_id="ok", memory_bytes=16 * PS, policy=policy()))
    bad = [
        (stub.AttachVm(apb.AttachVmRequest(vm_id="no spaces", memory_bytes=16 * PS)), "INVALID_ARGUMENT"),
        (stub.AttachVm(apb.AttachVmRequest(vm_id="x", memory_bytes=1000)), "INVALID_ARGUMENT"),
        (
            stub.AttachVm(
                apb.AttachVmRequest(vm_id="x", memory_bytes=16 * PS, policy=policy(cold_after=251))
            ),
            "INVALID_ARGUMENT",
        ),
        (
            stub.AttachVm(apb.AttachVmRequest(vm_id="x", memory_bytes=16 * PS, policy=policy(store="nope"))),
            "INVALID_ARGUMENT",
        ),
        (
            stub.AttachVm(
                apb.AttachVmRequest(vm_id="x", backend=tpb.KERNEL_BACKEND_UFFD, memory_bytes=16 * PS)
            ),
            "INVALID_ARGUMENT",
        ),
        (
            stub.AttachVm(apb.AttachVmRequest(vm_id="x", memory_bytes=16 * PS, workload="warp:9")),
            "INVALID_ARGUMENT",
        ),
        (stub.AttachVm(apb.AttachVmRequest(vm_id="ok", memory_bytes=16 * PS)), "ALREADY_EXISTS"),
        (stub.RunCycle(apb.RunCycleRequest(vm_id="ghost")), "NOT_FOUND"),
        (stub.RunCycle(apb.RunCycleRequest(vm_id="ok", mode=OUT_OF_RANGE)), "INVALID_ARGUMENT"),
        (
            stub.SetPolicy(apb.SetVmPolicyRequest(vm_id="ok", policy=policy(interval_ms=10**15))),
            "INVALID_ARGUMENT",
        ),
        (stub.SetPolicy(apb.SetVmPolicyRequest(vm_id="ok")), "INVALID_ARGUMENT"),
        (
            stub.SetPolicy(
                apb.SetVmPolicyRequest(vm_id="ok", policy=policy(max_evict=tpb.EvictionCap(fraction=1.5)))
            ),
            "INVALID_ARGUMENT",
        ),
        (stub.DetachVm(apb.DetachVmRequest(vm_id="ghost")), "NOT_FOUND"),
        (stub.VerifyVm(apb.VerifyVmRequest(vm_id="")), "INVALID_ARGUMENT"),
    ]
    for call, want in bad:
        assert (await code_of(call)).name == want
    assert list(running.agent.sessions) == ["ok"]
    assert (
        running.agent.sessions["ok"].policy.cold_after == 1
        and running.agent.sessions["ok"].policy.interval_ms == 50
    )


async def test_a_cycle_honours_the_callers_deadline(
    agent: tuple[RunningAgent, agrpc.NodeAgentAsyncStub],
) -> None:
    _running, stub = agent
    await stub.AttachVm(
        apb.AttachVmRequest(vm_id="slow", memory_bytes=16 * PS, policy=policy(interval_ms=60_000))
    )
    t = time.monotonic()
    rep = await stub.RunCycle(apb.RunCycleRequest(vm_id="slow"), timeout=2.0)
    assert time.monotonic() - t < 2.0  # the 60 s detection wait was cut to fit the deadline
    assert rep.cycle == 1


async def test_health_and_follow_stream(agent: tuple[RunningAgent, agrpc.NodeAgentAsyncStub]) -> None:
    running, stub = agent
    health = health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(running.address))
    resp = await health.Check(health_pb2.HealthCheckRequest(service="tiermem.v1.NodeAgent"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    stream = stub.StreamEvents(tpb.StreamEventsRequest(follow=True))
    await stub.AttachVm(apb.AttachVmRequest(vm_id="late", memory_bytes=16 * PS))
    first = await asyncio.wait_for(stream.read(), 5)
    assert isinstance(first, tpb.Event)
    assert first.kind == tpb.EVENT_KIND_VM_ATTACHED and first.vm_id == "late"
    stream.cancel()


async def test_many_concurrent_cycles_neither_queue_nor_block_other_calls(
    agent: tuple[RunningAgent, agrpc.NodeAgentAsyncStub],
) -> None:
    # More cycles than the event loop's default executor has threads (cpu_count + 4): they must all run at
    # once, each holding a thread for its detection window, while attach and detach still answer.
    _running, stub = agent
    n = 12
    for i in range(n):
        await stub.AttachVm(
            apb.AttachVmRequest(vm_id=f"c{i}", memory_bytes=64 * 4096, policy=policy()), timeout=10
        )
    cycles = [
        asyncio.ensure_future(
            stub.RunCycle(
                apb.RunCycleRequest(vm_id=f"c{i}", interval_ms=3000, mode=tpb.CYCLE_MODE_DETECT), timeout=30
            )
        )
        for i in range(n)
    ]
    await asyncio.sleep(0.5)
    await stub.AttachVm(
        apb.AttachVmRequest(vm_id="late", memory_bytes=64 * 4096, policy=policy()), timeout=10
    )
    await stub.DetachVm(apb.DetachVmRequest(vm_id="late", purge=True), timeout=10)
    assert not any(c.done() for c in cycles), "attach/detach waited for a cycle's detection window"
    reports = await asyncio.gather(*cycles)
    starts = sorted(r.started_unix_ms for r in reports)
    assert starts[-1] - starts[0] < 2000, (
        f"cycles were queued, not concurrent: started over {starts[-1] - starts[0]} ms"
    )
