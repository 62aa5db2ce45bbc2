"""Registry: node registration, leases kept by heartbeats, expiry and return, VM registration rules."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tiermem.api import NodeInfo, VmSpec
from tiermem.control.clock import ManualClock
from tiermem.control.events import EventLog
from tiermem.control.registry import Registry
from tiermem.control.state_sqlite import SqliteState
from tiermem.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tiermem.model import Backend, EventKind, VmStatus


@pytest.fixture
async def reg() -> AsyncIterator[tuple[Registry, ManualClock]]:
    clock = ManualClock()
    state = SqliteState("sqlite:///:memory:", clock=clock)
    await state.open()
    yield Registry(state, EventLog(state, clock), clock, lease_ttl_ms=10_000), clock
    await state.close()


async def kinds(r: Registry) -> list[tuple[EventKind, str]]:
    return [(e.kind, e.node_id) for e in await r.state.events_after(0)]


async def test_register_node_then_lease_expires_and_returns(reg: tuple[Registry, ManualClock]) -> None:
    r, clock = reg
    assert await r.register_node(NodeInfo("n1", "127.0.0.1:7070", capacity_bytes=1 << 30)) == 10_000
    await r.add_vm(VmSpec("vm-1", "n1", 1 << 20, labels={"app": "db"}))
    assert (await r.get_node("n1")).up is True
    clock.advance(9.9)
    assert await r.expire_leases() == []
    assert (await r.heartbeat("n1")).reregister is False  # renews for another 10 s
    clock.advance(9.9)
    assert await r.expire_leases() == []
    clock.advance(0.2)
    assert (await r.get_node("n1")).up is False  # computed from the lease even before the reaper runs
    assert await r.expire_leases() == ["n1"]
    assert await r.expire_leases() == []  # NODE_DOWN once
    # the VM keeps its registration while the node is down
    assert (await r.get_vm("vm-1")).labels == {"app": "db"}
    hb = await r.heartbeat("n1")
    assert hb == type(hb)(10_000, False)
    assert (await r.get_node("n1")).up is True
    assert await kinds(r) == [
        (EventKind.NODE_UP, "n1"),
        (EventKind.NODE_DOWN, "n1"),
        (EventKind.NODE_UP, "n1"),
    ]


async def test_heartbeat_from_unknown_node_asks_to_reregister(reg: tuple[Registry, ManualClock]) -> None:
    r, _ = reg
    hb = await r.heartbeat("ghost", [VmStatus("vm-x")])
    assert hb.reregister is True
    assert await r.state.list_nodes() == []
    assert await r.state.list_statuses() == {}


async def test_reregistration_keeps_id_but_a_second_host_is_refused(
    reg: tuple[Registry, ManualClock],
) -> None:
    r, clock = reg
    await r.register_node(NodeInfo("n1", "10.0.0.1:7070"))
    await r.register_node(NodeInfo("n1", "10.0.0.1:7070", max_concurrent_cycles=2))  # agent restart: fine
    assert (await r.get_node("n1")).max_concurrent_cycles == 2
    with pytest.raises(AlreadyExists):
        await r.register_node(NodeInfo("n1", "10.0.0.2:7070"))
    assert (await r.get_node("n1")).address == "10.0.0.1:7070"
    clock.advance(11)  # the old host is gone: its lease expired
    await r.register_node(NodeInfo("n1", "10.0.0.2:7070"))
    assert (await r.get_node("n1")).address == "10.0.0.2:7070"


@pytest.mark.parametrize(
    "node",
    [
        NodeInfo("bad id!", "127.0.0.1:1"),
        NodeInfo("n1", "no-port"),
        NodeInfo("n1", "127.0.0.1:70000"),
        NodeInfo("n1", "127.0.0.1:1", capacity_bytes=-1),
        NodeInfo("n1", "127.0.0.1:1", evict_mbps=float("nan")),
        NodeInfo("n1", "127.0.0.1:1", evict_mbps=-1),
    ],
)
async def test_bad_nodes_are_rejected_and_change_nothing(
    reg: tuple[Registry, ManualClock], node: NodeInfo
) -> None:
    r, _ = reg
    with pytest.raises(InvalidArgument):
        await r.register_node(node)
    assert await r.state.list_nodes() == []
    assert await r.state.events_after(0) == []


async def test_vm_registration_rules(reg: tuple[Registry, ManualClock]) -> None:
    r, _ = reg
    await r.register_node(NodeInfo("n1", "127.0.0.1:7070", capacity_bytes=8 << 20, backends=(Backend.SIM,)))
    with pytest.raises(NotFound):
        await r.add_vm(VmSpec("vm-1", "nope", 1 << 20))
    with pytest.raises(InvalidArgument):
        await r.add_vm(VmSpec("vm-1", "n1", 1000))  # not page aligned
    with pytest.raises(InvalidArgument):
        await r.add_vm(VmSpec("vm-1", "n1", 1 << 20, labels={"bad key": "x"}))
    with pytest.raises(FailedPrecondition):
        await r.add_vm(VmSpec("vm-1", "n1", 1 << 20, backend=Backend.UFFD))
    await r.add_vm(VmSpec("vm-1", "n1", 6 << 20))
    with pytest.raises(AlreadyExists):
        await r.add_vm(VmSpec("vm-1", "n1", 1 << 20))
    assert (await r.get_vm("vm-1")).memory_bytes == 6 << 20
    with pytest.raises(FailedPrecondition):
        await r.add_vm(VmSpec("vm-2", "n1", 4 << 20))  # over the node's capacity
    assert [v.vm_id for v in await r.list_vms()] == ["vm-1"]
    with pytest.raises(FailedPrecondition):
        await r.deregister_node("n1")  # VMs still on it
    assert [n.vms for n in await r.list_nodes()] == [1]


async def test_heartbeat_keeps_statuses_of_the_nodes_own_vms_only(reg: tuple[Registry, ManualClock]) -> None:
    r, clock = reg
    await r.register_node(NodeInfo("n1", "127.0.0.1:7070"))
    await r.register_node(NodeInfo("n2", "127.0.0.1:7071"))
    await r.add_vm(VmSpec("a", "n1", 1 << 20))
    await r.add_vm(VmSpec("b", "n2", 1 << 20))
    await r.heartbeat("n1", [VmStatus("a", evicted_pages=5), VmStatus("b", evicted_pages=9), VmStatus("zz")])
    st = await r.state.list_statuses()
    assert set(st) == {"a"}
    assert st["a"].evicted_pages == 5 and st["a"].node_id == "n1"
    assert st["a"].updated_unix_ms == int(clock.now() * 1000)


async def test_vm_lookups_validate_ids(reg: tuple[Registry, ManualClock]) -> None:
    r, _ = reg
    with pytest.raises(InvalidArgument):
        await r.get_vm("../etc")
    with pytest.raises(NotFound):
        await r.get_vm("vm-404")
    with pytest.raises(InvalidArgument):
        await r.list_vms(selector="novalue")
