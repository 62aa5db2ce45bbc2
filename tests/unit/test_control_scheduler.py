"""Scheduler: intervals without drift, one cycle per VM at a time, jitter, priority, limits, backoff, skips.

Deterministic: a manual clock, one scheduling pass at a time (``tick``), and an
in-process fake agent object in place of gRPC.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from tiermem.api import NodeInfo, PolicyScope, VmSpec
from tiermem.control.clock import ManualClock
from tiermem.control.events import EventLog
from tiermem.control.policies import PolicyBook
from tiermem.control.registry import Registry
from tiermem.control.scheduler import Scheduler, SchedulerConfig
from tiermem.control.state_sqlite import SqliteState
from tiermem.errors import NotFound, Unavailable
from tiermem.model import CycleMode, CycleReport, DrainProgress, EvictionPolicy, VmState, VmStatus

T0 = 1_700_000_000.0  # a multiple of 10 s: grid slots are easy to read


@dataclass
class Order:
    address: str
    vm_id: str
    order_id: str
    policy: EvictionPolicy | None
    at_ms: int


@dataclass
class FakeAgents:
    """An in-process agent: records orders, answers with a report, can block, fail or take time."""

    clock: ManualClock
    orders: list[Order] = field(default_factory=list)
    running: dict[str, int] = field(default_factory=dict)
    max_running: dict[str, int] = field(default_factory=dict)
    gate: asyncio.Event | None = None
    fail: Callable[[str, str], Exception | None] = lambda address, vm_id: None
    bytes_written: int = 0
    cycle_s: float = 0.0
    cold: dict[str, int] = field(default_factory=dict)

    async def run_cycle(
        self,
        address: str,
        vm_id: str,
        mode: CycleMode,
        interval_ms: int,
        policy: EvictionPolicy | None,
        order_id: str,
        timeout: float,
    ) -> CycleReport:
        self.orders.append(Order(address, vm_id, order_id, policy, int(self.clock.now() * 1000)))
        self.running[vm_id] = self.running.get(vm_id, 0) + 1
        self.max_running[vm_id] = max(self.max_running.get(vm_id, 0), self.running[vm_id])
        try:
            err = self.fail(address, vm_id)
            if err is not None:
                raise err
            if self.gate is not None:
                await self.gate.wait()
            self.clock.advance(self.cycle_s)
            return CycleReport(
                vm_id=vm_id,
                cycle=len(self.orders),
                pages_cold=self.cold.get(vm_id, 0),
                bytes_written=self.bytes_written,
                policy_version=policy.version if policy else 0,
            )
        finally:
            self.running[vm_id] -= 1

    async def attach_vm(self, *a: object) -> VmStatus:
        raise NotImplementedError

    async def detach_vm(self, *a: object) -> int:
        raise NotImplementedError

    async def drain(self, *a: object) -> AsyncIterator[DrainProgress]:
        raise NotImplementedError
        yield  # pragma: no cover

    async def close(self) -> None:
        pass

    def ids(self) -> list[str]:
        return [o.order_id for o in self.orders]


@dataclass
class Env:
    clock: ManualClock
    reg: Registry
    book: PolicyBook
    agents: FakeAgents
    sched: Scheduler
    reports: list[tuple[CycleReport, str]]

    async def step(self) -> float:
        """Reload, run one pass, let the dispatched cycles finish."""
        await self.sched.sync()
        sleep = self.sched.tick()
        await self.sched.wait_idle()
        return sleep

    async def at(self, t: float) -> float:
        self.clock.set(t)
        return await self.step()


async def make_env(config: SchedulerConfig | None = None, shared_state: SqliteState | None = None) -> Env:
    clock = ManualClock(T0)
    state = shared_state or SqliteState("sqlite:///:memory:", clock=clock)
    if shared_state is None:
        await state.open()
    events = EventLog(state, clock)
    reg = Registry(state, events, clock, lease_ttl_ms=1_000_000)
    book = PolicyBook(state, events, clock, known_stores=None)
    agents = FakeAgents(clock)
    reports: list[tuple[CycleReport, str]] = []

    async def sink(r: CycleReport, err: str) -> None:
        reports.append((r, err))

    cfg = config or SchedulerConfig(jitter=0.0)
    sched = Scheduler(state=state, policies=book, agents=agents, clock=clock, on_report=sink, config=cfg)
    return Env(clock, reg, book, agents, sched, reports)


async def add(env: Env, node: str, *vms: str, interval_ms: int = 10_000, **node_kw: object) -> None:
    if await env.reg.state.get_node(node) is None:
        await env.reg.register_node(NodeInfo(node, f"{node}.local:7070", **node_kw))  # type: ignore[arg-type]
    for vm in vms:
        await env.reg.add_vm(VmSpec(vm, node, 1 << 20))
        await env.book.set(PolicyScope.for_vm(vm), EvictionPolicy(interval_ms=interval_ms))
    await env.sched.sync()  # the scheduler learns of them now: their first slot is the next one


async def test_cycles_follow_the_planned_grid_without_drift() -> None:
    env = await make_env()
    await add(env, "n1", "vm-1")
    await env.step()
    assert env.agents.orders == [] and env.sched.planned("vm-1") == int(T0 * 1000) + 10_000
    env.agents.cycle_s = 10.3  # each RunCycle lasts the interval plus 300 ms of scan and eviction
    await env.at(T0 + 10)
    await env.step()  # overdue by 300 ms when the first cycle ends: starts at once
    await env.step()
    planned = [int(o.order_id.split("@")[1]) for o in env.agents.orders]
    assert planned == [int(T0 * 1000) + k * 10_000 for k in (1, 2, 3)]  # planned starts never drift
    assert [o.at_ms - p for o, p in zip(env.agents.orders, planned, strict=True)] == [0, 300, 600]
    assert list(env.sched.stats.lags_ms) == [0, 300, 600]
    assert all(o.order_id.startswith("vm-1@") for o in env.agents.orders)
    assert [err for _, err in env.reports] == ["", "", ""]


async def test_never_two_cycles_of_one_vm_at_once() -> None:
    env = await make_env()
    await add(env, "n1", "vm-1", interval_ms=1000)
    env.agents.gate = asyncio.Event()
    await env.sched.sync()
    for k in range(1, 6):  # five intervals pass while the first cycle hangs
        env.clock.set(T0 + k)
        await env.sched.sync()
        env.sched.tick()
        await asyncio.sleep(0)
    assert len(env.agents.orders) == 1
    env.agents.gate.set()
    await env.sched.wait_idle()
    env.clock.set(T0 + 5.5)
    await env.step()
    assert env.agents.max_running == {"vm-1": 1}
    # the overdue slots were counted as skipped, the latest one ran
    assert env.agents.ids() == [f"vm-1@{int(T0 * 1000) + 1000}", f"vm-1@{int(T0 * 1000) + 5000}"]
    assert env.sched.stats.skipped_slots == 3


async def test_jitter_spreads_same_interval_vms_deterministically() -> None:
    envs = [await make_env(SchedulerConfig(jitter=0.5)) for _ in range(2)]
    vms = [f"vm-{i}" for i in range(1000)]
    for env in envs:
        await env.reg.register_node(NodeInfo("n1", "n1:7070"))
        for vm in vms:
            await env.reg.state.create_vm(VmSpec(vm, "n1", 1 << 20))
        await env.book.set(PolicyScope.fleet(), EvictionPolicy(interval_ms=10_000))
        await env.sched.sync()
    offsets = [
        env_planned - int(T0 * 1000) - 10_000 for env_planned in (envs[0].sched.planned(v) or 0 for v in vms)
    ]
    assert [envs[1].sched.planned(v) for v in vms] == [
        envs[0].sched.planned(v) for v in vms
    ]  # same on replicas
    assert min(offsets) >= -10_000 and max(offsets) < 5_000 - 10_000 + 10_000
    phases = sorted(o % 10_000 for o in offsets)
    assert phases[0] >= 0 and phases[-1] < 5_000 and phases[-1] - phases[0] > 4_500
    per_100ms = [sum(1 for p in phases if b * 100 <= p < (b + 1) * 100) for b in range(50)]
    assert max(per_100ms) < 60  # 1000 VMs over 50 buckets: ~20 each, never all at once


async def test_priority_goes_to_the_most_reclaimable_memory() -> None:
    env = await make_env()
    await add(env, "n1", "small", "big", "mid", max_concurrent_cycles=1)
    await env.reg.heartbeat(
        "n1",
        [
            VmStatus("small", resident_pages=100, working_set_pages=90),
            VmStatus("big", resident_pages=1000, working_set_pages=10),
            VmStatus("mid", resident_pages=500, working_set_pages=100),
        ],
    )
    env.clock.set(T0 + 10)
    for _ in range(3):
        await env.step()
    assert [o.vm_id for o in env.agents.orders] == ["big", "mid", "small"]


async def test_per_node_concurrency_limit() -> None:
    env = await make_env()
    await add(env, "n1", *[f"a{i}" for i in range(5)], max_concurrent_cycles=2)
    await add(env, "n2", *[f"b{i}" for i in range(3)])  # default limit (64)
    env.agents.gate = asyncio.Event()
    env.clock.set(T0 + 10)
    await env.sched.sync()
    env.sched.tick()
    await asyncio.sleep(0)
    by_node = [o.address for o in env.agents.orders]
    assert by_node.count("n1.local:7070") == 2 and by_node.count("n2.local:7070") == 3
    env.agents.gate.set()
    for _ in range(3):
        await env.sched.wait_idle()
        env.sched.tick()
        await asyncio.sleep(0)
    assert len(env.agents.orders) == 8  # the rest ran as slots freed up


async def test_node_eviction_bandwidth_is_a_token_bucket_fed_by_reports() -> None:
    env = await make_env()
    await add(env, "n1", "vm-1", "vm-2", max_concurrent_cycles=1, evict_mbps=1.0)
    env.agents.bytes_written = 5_000_000  # 5 MB per cycle at 1 MB/s: the next cycle waits ~4 s
    env.clock.set(T0 + 10)
    await env.step()
    assert len(env.agents.orders) == 1
    await env.step()
    assert len(env.agents.orders) == 1
    await env.at(T0 + 13.9)
    assert len(env.agents.orders) == 1
    await env.at(T0 + 14.01)
    assert len(env.agents.orders) == 2


async def test_store_write_bandwidth_limit() -> None:
    env = await make_env(SchedulerConfig(jitter=0.0, store_write_mbps={"default": 2.0}))
    await add(env, "n1", "vm-1", interval_ms=1000)
    await add(env, "n2", "vm-2", interval_ms=1000)
    env.agents.bytes_written = 4_000_000  # 4 MB per cycle; unlimited, the two VMs would write 8 MB/s
    for k in range(1, 81):
        await env.at(T0 + k * 0.25)
    written = 4 * len(env.agents.orders)
    # 20 s at 2 MB/s, plus the 2 MB burst and one admitted cycle of overdraft per VM
    assert 36 <= written <= 40 + 2 + 8, written
    assert {o.vm_id for o in env.agents.orders} == {"vm-1", "vm-2"}


async def test_unreachable_agent_backs_its_node_off_exponentially() -> None:
    env = await make_env(SchedulerConfig(jitter=0.0, backoff_base_s=1.0))
    await add(env, "bad", "b1", interval_ms=1000)
    await add(env, "good", "g1", interval_ms=1000)
    down = True
    env.agents.fail = lambda address, vm: (
        Unavailable("connection refused") if down and "bad" in address else None
    )
    times: list[float] = []
    for k in range(1, 40):
        await env.at(T0 + k * 0.25)
        times += [o.at_ms for o in env.agents.orders[len(times) :] if o.vm_id == "b1"]
    bad = [(o.at_ms - int(T0 * 1000)) for o in env.agents.orders if o.vm_id == "b1"]
    gaps = [b - a for a, b in itertools.pairwise(bad)]
    assert gaps[:3] == [1000, 2000, 4000]  # 1 s, 2 s, 4 s: exponential
    assert sum(1 for o in env.agents.orders if o.vm_id == "g1") >= 9  # the healthy node is not held back
    failed = [(r.vm_id, err) for r, err in env.reports if err]
    assert failed and all(vm == "b1" and "connection refused" in err for vm, err in failed)
    down = False
    n = len(bad)
    await env.at(T0 + 30)
    await env.at(T0 + 31)
    await env.at(T0 + 32)
    assert sum(1 for o in env.agents.orders if o.vm_id == "b1") >= n + 2  # back to every interval


async def test_paused_policies_down_nodes_and_draining_vms_get_no_orders() -> None:
    env = await make_env()
    await add(env, "n1", "paused", "ok", "draining")
    await env.book.set(PolicyScope.for_vm("paused"), EvictionPolicy(interval_ms=10_000, paused=True))
    await env.reg.heartbeat("n1", [VmStatus("draining", state=VmState.DRAINING)])
    await env.at(T0 + 10)
    assert [o.vm_id for o in env.agents.orders] == ["ok"]
    await env.reg.register_node(NodeInfo("n2", "n2.local:7070"))
    env.reg.lease_ttl_ms = 5_000
    await env.reg.heartbeat("n2")
    await env.reg.add_vm(VmSpec("on-n2", "n2", 1 << 20))
    await env.book.set(PolicyScope.for_vm("on-n2"), EvictionPolicy(interval_ms=10_000))
    await env.at(T0 + 30)  # n2's lease expired at T0+15
    assert "on-n2" not in [o.vm_id for o in env.agents.orders]
    env.reg.lease_ttl_ms = 1_000_000
    await env.reg.heartbeat("n2")  # back
    await env.at(T0 + 40)
    assert "on-n2" in [o.vm_id for o in env.agents.orders]


async def test_policy_change_reaches_the_next_order() -> None:
    env = await make_env()
    await add(env, "n1", "vm-1")
    await env.at(T0 + 10)
    first = env.agents.orders[-1].policy
    assert first is not None and first.cold_after == 3
    await env.book.set(PolicyScope.for_vm("vm-1"), EvictionPolicy(cold_after=7), fields=["cold_after"])
    env.sched.notify()
    await env.at(T0 + 20)
    second = env.agents.orders[-1].policy
    assert second is not None and second.cold_after == 7 and second.version > first.version
    assert env.reports[-1][0].policy_version == second.version
    # a new interval takes effect from the next planned start
    await env.book.set(PolicyScope.for_vm("vm-1"), EvictionPolicy(interval_ms=60_000), fields=["interval_ms"])
    await env.at(T0 + 30)
    planned = env.sched.planned("vm-1")
    assert len(env.agents.orders) == 2 and planned is not None
    assert planned % 60_000 == 0 and int(T0 * 1000) + 30_000 < planned <= int(T0 * 1000) + 90_000


async def test_two_claiming_schedulers_never_order_the_same_slot_twice(tmp_path: object) -> None:
    state = SqliteState("sqlite:///:memory:", clock=ManualClock(T0))
    await state.open()
    a = await make_env(SchedulerConfig(jitter=0.2, claim_orders=True), shared_state=state)
    b = await make_env(SchedulerConfig(jitter=0.2, claim_orders=True), shared_state=state)
    state.clock = a.clock  # both replicas read the same (manual) time
    b.clock = a.clock
    b.sched.clock = a.clock
    b.agents.clock = a.clock
    await add(a, "n1", *[f"vm-{i}" for i in range(20)], interval_ms=1000, max_concurrent_cycles=100)
    for k in range(1, 12):
        a.clock.set(T0 + k * 0.5)
        for env in (a, b) if k % 4 < 2 else (b, a):  # the replicas take turns being first
            await env.sched.sync()
            env.sched.tick()
        await a.sched.wait_idle()
        await b.sched.wait_idle()
    ids = a.agents.ids() + b.agents.ids()
    assert len(ids) == len(set(ids)) and len(ids) >= 20 * 4
    assert a.agents.orders and b.agents.orders  # both replicas ordered, never the same slot
    assert a.sched.stats.claimed_elsewhere > 0 and b.sched.stats.claimed_elsewhere > 0
    assert a.sched.stats.claimed_elsewhere + b.sched.stats.claimed_elsewhere >= 20 * 4
    await state.close()


async def test_manual_cycle_waits_for_the_running_one() -> None:
    env = await make_env()
    await add(env, "n1", "vm-1")
    env.agents.gate = asyncio.Event()
    env.clock.set(T0 + 10)
    await env.sched.sync()
    env.sched.tick()
    await asyncio.sleep(0)
    p = EvictionPolicy(interval_ms=500)
    manual = asyncio.create_task(
        env.sched.run_now("vm-1", CycleMode.DETECT, 500, p, "n1", "n1.local:7070", 5)
    )
    await asyncio.sleep(0.01)
    assert len(env.agents.orders) == 1  # still waiting for the scheduled cycle
    env.agents.gate.set()
    report = await manual
    assert report.vm_id == "vm-1" and env.agents.max_running == {"vm-1": 1}
    assert "@manual-" in env.agents.orders[1].order_id
    with pytest.raises(NotFound):
        env.sched.require("ghost")
