"""The ControlPlane over real gRPC, with minimal in-test NodeAgent servers implementing agent.proto."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers.wait import wait_until_async
from tiermem.api import NodeInfo, PolicyScope, VmSpec
from tiermem.config import ControlPlaneSettings
from tiermem.control.server import RunningControlPlane, plane_config, serve_control_plane
from tiermem.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TiermemError,
    Unavailable,
)
from tiermem.model import Backend, CycleMode, EventKind, EvictionPolicy, VmState, VmStatus
from tiermem.rpc import convert as c
from tiermem.rpc.clients import AsyncControlPlaneClient, ControlPlaneClient
from tiermem.rpc.server import ServerOptions, StartedServer, start_server
from tiermem.v1 import agent_pb2 as apb
from tiermem.v1 import agent_pb2_grpc as agrpc
from tiermem.v1 import types_pb2 as tpb

Ctx = grpc.aio.ServicerContext[Any, Any]


@dataclasses.dataclass
class Order:
    vm_id: str
    order_id: str
    policy: EvictionPolicy | None
    interval_ms: int
    deadline_s: float | None


OUT_OF_RANGE: Any = 99
"""An enum value no proto defines (typed Any: the generated stubs only accept defined ones)."""


class FakeAgent(agrpc.NodeAgentServicer):
    """The agent.proto contract, minimally: VMs in a dict, cycles that evict 10 pages each."""

    def __init__(self, node_id: str, cycle_s: float = 0.0) -> None:
        self.node_id = node_id
        self.cycle_s = cycle_s
        self.vms: dict[str, apb.AttachVmRequest] = {}
        self.evicted: dict[str, int] = {}
        self.orders: list[Order] = []
        self.detached: list[tuple[str, bool]] = []
        self.server: StartedServer | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    async def start(self) -> FakeAgent:
        self.server = await start_server(
            lambda s: agrpc.add_NodeAgentServicer_to_server(self, s),
            ["tiermem.v1.NodeAgent"],
            ServerOptions(),
        )
        return self

    def _status(self, vm_id: str) -> tpb.VmStatus:
        req = self.vms[vm_id]
        return tpb.VmStatus(
            vm_id=vm_id,
            node_id=self.node_id,
            state=tpb.VM_STATE_ARMED,
            backend=req.backend,
            total_pages=req.memory_bytes // 4096,
            evicted_pages=self.evicted.get(vm_id, 0),
            policy=req.policy,
        )

    async def AttachVm(self, request: apb.AttachVmRequest, context: Ctx) -> apb.AttachVmResponse:
        if request.vm_id in self.vms:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "attached")
        self.vms[request.vm_id] = request
        return apb.AttachVmResponse(status=self._status(request.vm_id))

    async def DetachVm(self, request: apb.DetachVmRequest, context: Ctx) -> apb.DetachVmResponse:
        if request.vm_id not in self.vms:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown VM")
        n = self.evicted.get(request.vm_id, 0)
        if n and not request.purge:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{n} pages still evicted")
        del self.vms[request.vm_id]
        self.evicted.pop(request.vm_id, None)
        self.detached.append((request.vm_id, request.purge))
        return apb.DetachVmResponse(pages_purged=n if request.purge else 0)

    async def RunCycle(self, request: apb.RunCycleRequest, context: Ctx) -> tpb.CycleReport:
        if request.vm_id not in self.vms:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown VM")
        policy = c.policy_from_pb(request.policy, validate=False) if request.HasField("policy") else None
        self.orders.append(
            Order(request.vm_id, request.order_id, policy, request.interval_ms, context.time_remaining())
        )
        await asyncio.sleep(self.cycle_s)
        self.evicted[request.vm_id] = self.evicted.get(request.vm_id, 0) + 10
        n = sum(1 for o in self.orders if o.vm_id == request.vm_id)
        return tpb.CycleReport(
            vm_id=request.vm_id,
            cycle=n,
            mode=request.mode,
            pages_scanned=256,
            pages_hot=20,
            pages_cold=10,
            pages_evicted=10,
            bytes_written=40960,
            node_id=self.node_id,
            policy_version=policy.version if policy else 0,
        )

    async def Drain(self, request: apb.DrainRequest, context: Ctx) -> AsyncIterator[tpb.DrainProgress]:
        if request.vm_id not in self.vms:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown VM")
        total = self.evicted.get(request.vm_id, 0)
        for i in range(0, total + 1, max(1, total // 3)):
            yield tpb.DrainProgress(vm_id=request.vm_id, pages_total=total, pages_restored=min(i, total))
        self.evicted[request.vm_id] = 0
        yield tpb.DrainProgress(vm_id=request.vm_id, pages_total=total, pages_restored=total, done=True)


def _fake_agent(node_id: str) -> FakeAgent:
    """A FakeAgent; the RPCs it leaves out answer UNIMPLEMENTED, from the generated base class."""
    return FakeAgent(node_id)  # type: ignore[abstract]


def cp_settings(tmp_path: Path, **kw: Any) -> ControlPlaneSettings:
    base: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "state": f"sqlite:///{tmp_path}/cp.db",
        "jitter": 0.0,
        "replica_id": "r1",
        "lease_ttl_ms": 60_000,
    }
    base.update(kw)
    return ControlPlaneSettings(**base)


async def start_cp(settings: ControlPlaneSettings, **cfg: Any) -> RunningControlPlane:
    config = dataclasses.replace(plane_config(settings), lease_check_s=0.05, **cfg)
    return await serve_control_plane(settings, config=config)


@pytest.fixture
async def fleet(
    tmp_path: Path,
) -> AsyncIterator[tuple[RunningControlPlane, AsyncControlPlaneClient, list[FakeAgent]]]:
    cp = await start_cp(cp_settings(tmp_path))
    agents = [await _fake_agent("n1").start(), await _fake_agent("n2").start()]
    client = AsyncControlPlaneClient(cp.address, timeout_s=10)
    for a in agents:
        await client.register_node(NodeInfo(a.node_id, a.address, backends=(Backend.SIM,)))
    yield cp, client, agents
    await client.close()
    await cp.stop()
    for a in agents:
        assert a.server is not None
        await a.server.stop(0)


async def test_register_attach_schedule_report_policy_change_drain_deregister(fleet: Any) -> None:
    _cp, client, (a1, a2) = fleet
    await client.set_policy(PolicyScope.fleet(), EvictionPolicy(interval_ms=200, cold_after=2))
    st = await client.register_vm(VmSpec("vm-1", "n1", 1 << 20, labels={"tier": "gold"}), attach=True)
    assert st.vm_id == "vm-1" and st.node_up and st.state is VmState.ARMED and st.labels == {"tier": "gold"}
    assert a1.vms["vm-1"].policy.interval_ms == 200  # attached with the effective policy
    await client.register_vm(VmSpec("vm-2", "n2", 1 << 20), attach=True)

    async def cycles(n: int) -> bool:
        return (
            len(await client.list_cycle_reports("vm-1")) >= n
            and len(await client.list_cycle_reports("vm-2")) >= n
        )

    await wait_until_async(lambda: cycles(3))
    assert all(o.policy is not None and o.policy.cold_after == 2 for o in a1.orders)
    assert all(o.order_id.startswith("vm-1@") for o in a1.orders)
    assert len({o.order_id for o in a1.orders}) == len(a1.orders)
    events = [e async for e in client.stream_events(vm_id="vm-1")]
    assert EventKind.CYCLE_COMPLETED in {e.kind for e in events} and EventKind.VM_ATTACHED in {
        e.kind for e in events
    }

    # a policy change over gRPC reaches the next cycle
    entry = await client.set_policy(PolicyScope.for_vm("vm-1"), EvictionPolicy(cold_after=5), ["cold_after"])
    assert entry.policy.interval_ms == 200 and entry.policy.cold_after == 5
    seen = len(a1.orders)
    await wait_until_async(lambda: asyncio.sleep(0, len(a1.orders) >= seen + 2))
    newer = [o.policy for o in a1.orders[seen + 1 :]]
    assert newer and all(
        p is not None and p.cold_after == 5 and p.version == entry.policy.version for p in newer
    )
    assert [o.policy.cold_after for o in a2.orders if o.policy] == [2] * len(a2.orders)  # vm-2 untouched
    eff = await client.get_policy("vm-1")
    assert eff.source == PolicyScope.for_vm("vm-1") and not eff.adjusted

    # heartbeats carry statuses; GetVmStatus shows them with the policy in force
    await client.heartbeat("n1", [VmStatus("vm-1", evicted_pages=77, working_set_pages=5, faults_served=3)])
    st = await client.get_vm_status("vm-1")
    assert (st.evicted_pages, st.working_set_pages, st.node_up, st.policy.cold_after) == (77, 5, True, 5)
    assert [s.vm_id for s in await client.list_vm_status(selector="tier=gold")] == ["vm-1"]
    assert [s.vm_id for s in await client.list_vm_status(node_id="n2")] == ["vm-2"]

    # drain streams the agent's progress; deregister drains, then detaches
    await client.set_policy(PolicyScope.for_vm("vm-1"), EvictionPolicy(paused=True), ["paused"])
    progress = [p async for p in client.drain_vm("vm-1")]
    assert progress[-1].done and progress[-1].pages_restored == progress[-1].pages_total > 0
    assert a1.evicted["vm-1"] == 0
    await wait_until_async(lambda: asyncio.sleep(0, a2.evicted.get("vm-2", 0) > 0))
    assert await client.deregister_vm("vm-2", purge=True) > 0
    assert a2.detached == [("vm-2", True)]
    assert await client.deregister_vm("vm-1") == 0
    assert a1.detached == [("vm-1", False)]
    assert await client.list_vm_status() == []
    kinds = [e.kind for e in [e async for e in client.stream_events()]]
    assert EventKind.DRAIN_PROGRESS in kinds and kinds.count(EventKind.VM_DETACHED) == 2


async def test_bad_requests_get_the_right_codes_and_change_nothing(fleet: Any) -> None:
    cp, client, (a1, _) = fleet
    await client.register_vm(VmSpec("vm-1", "n1", 1 << 20))
    before = (await client.list_vm_status(), await client.list_policies(), await client.list_nodes())

    async def code(coro: Any) -> grpc.StatusCode:
        with pytest.raises(TiermemError) as ei:
            await coro
        return ei.value.code  # type: ignore[attr-defined,no-any-return]

    INV, N, A, F = (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert await code(client.register_vm(VmSpec("bad id", "n1", 1 << 20))) == INV
    assert await code(client.register_vm(VmSpec("vm-2", "n1", 1000))) == INV  # not page aligned
    assert await code(client.register_vm(VmSpec("vm-2", "n1", 0))) == INV
    assert await code(client.register_vm(VmSpec("vm-2", "nowhere", 1 << 20))) == N
    assert await code(client.register_vm(VmSpec("vm-1", "n1", 1 << 20))) == A
    assert await code(client.register_vm(VmSpec("vm-2", "n1", 1 << 20, backend=Backend.UFFD))) == F
    assert await code(client.get_vm_status("vm-404")) == N
    assert await code(client.get_vm_status("../x")) == INV
    assert (
        await code(client.set_policy(PolicyScope.fleet(), EvictionPolicy(cold_after=0), ["cold_after"]))
        == INV
    )
    assert await code(client.set_policy(PolicyScope.fleet(), EvictionPolicy(store="nfs"))) == INV
    assert await code(client.set_policy(PolicyScope.fleet(), EvictionPolicy(), ["version"])) == INV
    assert await code(client.set_policy(PolicyScope.for_vm("vm-404"), EvictionPolicy())) == N
    assert await code(client.get_policy("vm-404")) == N
    assert await code(client.delete_policy(PolicyScope.fleet())) == N
    assert await code(client.list_vm_status(selector="tier")) == INV
    assert await code(client.list_cycle_reports("no/such")) == INV
    assert await code(client.deregister_vm("vm-404")) == N
    assert await code(client.deregister_node("n1")) == F  # has a VM
    assert await code(client.register_node(NodeInfo("n1", "10.9.9.9:1"))) == A  # another host, valid lease
    assert await code(client.trigger_cycle("vm-1", interval_ms=2**60)) == INV
    assert await code(client.heartbeat("bad id")) == INV
    with pytest.raises(InvalidArgument):
        [e async for e in client.stream_events(vm_id="bad id")]
    # raw requests the typed client cannot produce
    from tiermem.v1 import control_pb2 as cpb
    from tiermem.v1 import control_pb2_grpc as cgrpc

    async with grpc.aio.insecure_channel(cp.address) as ch:
        stub = cgrpc.ControlPlaneStub(ch)
        bad: list[tuple[Any, Any]] = [
            (stub.SetPolicy, cpb.SetPolicyRequest(policy=tpb.EvictionPolicy(interval_ms=1))),  # no scope
            (stub.SetPolicy, cpb.SetPolicyRequest(scope=cpb.PolicyScope(fleet=False))),
            (stub.SetPolicy, cpb.SetPolicyRequest(scope=cpb.PolicyScope(selector="a=1,a=2"))),
            (stub.RegisterVm, cpb.RegisterVmRequest()),
            (
                stub.RegisterNode,
                cpb.RegisterNodeRequest(
                    node=cpb.NodeInfo(node_id="n9", address="x:1", backends=[OUT_OF_RANGE])
                ),
            ),
            (stub.TriggerCycle, cpb.TriggerCycleRequest(vm_id="vm-1", mode=OUT_OF_RANGE)),
        ]
        for call, req in bad:
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await call(req, timeout=5)
            assert ei.value.code() == INV, req
    assert (await client.list_vm_status(), await client.list_policies(), await client.list_nodes()) == before
    assert a1.vms == {}  # nothing reached the agent


async def test_unreachable_agent_is_unavailable_and_attach_is_rolled_back(fleet: Any) -> None:
    _cp, client, _ = fleet
    from tests.helpers.servers import free_port

    await client.register_node(NodeInfo("dead", f"127.0.0.1:{free_port()}"))
    with pytest.raises(Unavailable):
        await client.register_vm(VmSpec("vm-d", "dead", 1 << 20), attach=True, timeout=5)
    with pytest.raises(NotFound):
        await client.get_vm_status("vm-d")  # rolled back
    await client.register_vm(VmSpec("vm-d", "dead", 1 << 20))
    with pytest.raises(Unavailable):
        await client.trigger_cycle("vm-d", interval_ms=100, timeout=5)
    reports = await client.list_cycle_reports("vm-d")
    assert len(reports) == 1 and reports[0].error  # the failure is recorded
    failed = [e for e in [e async for e in client.stream_events("vm-d")] if e.kind is EventKind.CYCLE_FAILED]
    assert failed


async def test_trigger_cycle_and_deadlines_are_passed_to_the_agent(fleet: Any) -> None:
    _cp, client, (a1, _) = fleet
    await client.set_policy(PolicyScope.fleet(), EvictionPolicy(interval_ms=3_600_000))  # no scheduled cycle
    await client.register_vm(VmSpec("vm-1", "n1", 1 << 20), attach=True)
    r = await client.trigger_cycle("vm-1", CycleMode.DETECT, interval_ms=50, timeout=4)
    assert (r.vm_id, r.mode, r.node_id) == ("vm-1", CycleMode.DETECT, "n1")
    assert a1.orders[-1].interval_ms == 50 and "@manual-" in a1.orders[-1].order_id
    assert (
        a1.orders[-1].deadline_s is not None and a1.orders[-1].deadline_s < 4
    )  # the caller's deadline, less a margin
    assert (await client.list_cycle_reports("vm-1"))[0].cycle == r.cycle
    a1.cycle_s = 3.0
    with pytest.raises(Unavailable):  # DEADLINE_EXCEEDED
        await client.trigger_cycle("vm-1", interval_ms=50, timeout=0.5)
    a1.cycle_s = 0.0
    await client.set_policy(PolicyScope.for_vm("vm-1"), EvictionPolicy(paused=True), ["paused"])
    with pytest.raises(FailedPrecondition):
        await client.trigger_cycle("vm-1", timeout=4)


async def test_lease_expiry_marks_the_node_down_and_heartbeat_brings_it_back(tmp_path: Path) -> None:
    cp = await start_cp(cp_settings(tmp_path, lease_ttl_ms=300))
    agent = await _fake_agent("n1").start()
    client = AsyncControlPlaneClient(cp.address, timeout_s=5)
    try:
        assert await client.register_node(NodeInfo("n1", agent.address)) == 300
        await client.register_vm(VmSpec("vm-1", "n1", 1 << 20))

        async def down() -> bool:
            return not (await client.list_nodes())[0].up

        await wait_until_async(down)
        assert (await client.get_vm_status("vm-1")).node_up is False
        with pytest.raises(FailedPrecondition):
            await client.trigger_cycle("vm-1", interval_ms=10)
        hb = await client.heartbeat("n1")
        assert hb.lease_ttl_ms == 300 and not hb.reregister
        assert (await client.get_vm_status("vm-1")).node_up is True
        kinds = [e.kind for e in [e async for e in client.stream_events()] if e.node_id == "n1"]
        assert kinds[:3] == [EventKind.NODE_UP, EventKind.NODE_DOWN, EventKind.NODE_UP]
        assert (await client.heartbeat("ghost")).reregister is True
    finally:
        await client.close()
        await cp.stop()
        assert agent.server is not None
        await agent.server.stop(0)


async def test_event_stream_replays_then_follows(fleet: Any) -> None:
    _cp, client, _ = fleet
    await client.set_policy(PolicyScope.fleet(), EvictionPolicy(interval_ms=60_000))
    last = [e async for e in client.stream_events()][-1].seq
    got: list[Any] = []

    async def follow() -> None:
        async for e in client.stream_events(after_seq=last, follow=True):
            got.append(e)
            if len(got) == 2:
                return

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    await client.set_policy(PolicyScope.for_selector("a=b"), EvictionPolicy())
    await client.delete_policy(PolicyScope.for_selector("a=b"))
    await asyncio.wait_for(task, 5)
    assert [e.kind for e in got] == [EventKind.POLICY_CHANGED, EventKind.POLICY_CHANGED]
    assert got[0].seq == last + 1 and got[1].seq == last + 2
    assert [e async for e in client.stream_events(after_seq=2**64 - 1)] == []


async def test_sync_client_and_token_auth(tmp_path: Path) -> None:
    cp = await start_cp(cp_settings(tmp_path, token="s3cret"))
    try:

        def use() -> tuple[int, str]:
            with ControlPlaneClient(cp.address, token="s3cret", timeout_s=5) as cli:
                ttl = cli.register_node(NodeInfo("n1", "127.0.0.1:7070"))
                cli.register_vm(VmSpec("vm-1", "n1", 1 << 20))
                try:
                    cli.get_vm_status("vm-2")
                except NotFound as e:
                    missing = str(e)
                return ttl, missing

        ttl, missing = await asyncio.to_thread(use)
        assert ttl == 60_000 and "vm-2" in missing

        def unauthenticated() -> grpc.StatusCode:
            with ControlPlaneClient(cp.address, token="wrong", timeout_s=5) as cli:
                try:
                    cli.list_nodes()
                except TiermemError as e:
                    return e.code  # type: ignore[attr-defined,no-any-return]
            raise AssertionError("no error")

        assert await asyncio.to_thread(unauthenticated) == grpc.StatusCode.UNAUTHENTICATED
        async with grpc.aio.insecure_channel(cp.address) as ch:  # health needs no token
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="tiermem.v1.ControlPlane"), timeout=5
            )
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await cp.stop()


async def test_metrics_endpoint_serves_the_scheduler_series(tmp_path: Path) -> None:
    import urllib.request

    cp = await start_cp(cp_settings(tmp_path, metrics_listen="127.0.0.1:0"))
    agent = await _fake_agent("n1").start()
    try:
        async with AsyncControlPlaneClient(cp.address, timeout_s=5) as client:
            await client.register_node(NodeInfo("n1", agent.address))
            await client.set_policy(PolicyScope.fleet(), EvictionPolicy(interval_ms=100))
            await client.register_vm(VmSpec("vm-1", "n1", 1 << 20), attach=True)
            await wait_until_async(lambda: asyncio.sleep(0, len(agent.orders) >= 2))
        assert cp.metrics_port
        url = f"http://127.0.0.1:{cp.metrics_port}/metrics"
        text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
        for series in (
            "tiermem_cp_scheduler_lag_seconds_count",
            'tiermem_cp_cycle_orders_total{result="ok"}',
            "tiermem_cp_nodes_up 1.0",
            "tiermem_cp_vms 1.0",
        ):
            assert series in text, series
    finally:
        await cp.stop()
        assert agent.server is not None
        await agent.server.stop(0)


async def test_known_stores_and_advertise_settings(tmp_path: Path) -> None:
    cp = await start_cp(cp_settings(tmp_path, known_stores=["default", "fast"], advertise="10.9.9.9:7000"))
    client = AsyncControlPlaneClient(cp.address, timeout_s=10)
    try:
        assert cp.plane.address == "10.9.9.9:7000"  # what followers name in NOT_LEADER, not the bind address
        await client.set_policy(PolicyScope.fleet(), EvictionPolicy(store="fast"))
        with pytest.raises(InvalidArgument, match="unknown store 'fsat'"):
            await client.set_policy(PolicyScope.fleet(), EvictionPolicy(store="fsat"))
        (entry,) = await client.list_policies()
        assert entry.policy.store == "fast"  # the refused write changed nothing
    finally:
        await client.close()
        await cp.stop()


async def test_a_vm_id_active_on_another_node_is_not_placed(fleet: Any) -> None:
    # issue 17 item 2: n2's agent runs "vm-h" attached through its handoff socket (never registered here);
    # placing the same id on n1 would give the fleet two VMs it cannot tell apart
    cp, client, (a1, _a2) = fleet
    await client.heartbeat("n2", [VmStatus("vm-h", state=VmState.ARMED, evicted_pages=5)])
    with pytest.raises(FailedPrecondition, match="active on node 'n2'"):
        await client.register_vm(VmSpec("vm-h", "n1", 1 << 20), attach=True)
    assert "vm-h" not in a1.vms and [v.vm_id for v in await client.list_vm_status()] == []
    # on its own node the id may be registered (adopting the VM there)
    await client.register_vm(VmSpec("vm-h", "n2", 1 << 20))
    assert [v.node_id for v in await client.list_vm_status()] == ["n2"]
    await client.deregister_vm("vm-h")
    # n2 detached it: its next heartbeat no longer lists it, and the id is free
    await client.heartbeat("n2", [VmStatus("vm-other", state=VmState.ARMED)])
    await client.register_vm(VmSpec("vm-h", "n1", 1 << 20))
    # a node that stops heartbeating frees its ids a lease later
    with pytest.raises(FailedPrecondition, match="active on node 'n2'"):
        await client.register_vm(VmSpec("vm-other", "n1", 1 << 20))
    cp.plane.registry.lease_ttl_ms = 1
    await asyncio.sleep(0.01)
    await client.register_vm(VmSpec("vm-other", "n1", 1 << 20))
