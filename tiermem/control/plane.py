"""The control plane as one domain object: what the gRPC servicer calls.

Replicas: every replica serves reads and the agents' calls (RegisterNode,
Heartbeat, DeregisterNode, ReportCycles: per-node writes an agent may send to
any replica behind a load balancer). Orchestrator writes (VMs, policies,
TriggerCycle, DrainVm) need the leader, the one replica that schedules; the
others reject them with FailedPrecondition naming the leader's address, and
clients retry there. With SQLite there is one replica, always the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass, field, replace

import structlog

from tiermem.api import (
    EffectivePolicy,
    HeartbeatResult,
    NodeInfo,
    PolicyEntry,
    PolicyScope,
    ScopeKind,
    VmSpec,
)
from tiermem.control.agentapi import AgentApi
from tiermem.control.clock import Clock, SystemClock, clock_ms
from tiermem.control.events import EventLog
from tiermem.control.leader import LeaderElector
from tiermem.control.metrics import ControlPlaneMetrics
from tiermem.control.policies import PolicyBook
from tiermem.control.recorder import Recorder
from tiermem.control.registry import Registry
from tiermem.control.scheduler import Scheduler, SchedulerConfig
from tiermem.control.slo import SloConfig, SloController
from tiermem.control.state import StateStore
from tiermem.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    NotLeader,
    PermissionDenied,
    ResourceExhausted,
    TiermemError,
)
from tiermem.model import (
    Backend,
    CycleMode,
    CycleReport,
    DrainProgress,
    Event,
    EventKind,
    EvictionPolicy,
    VmState,
    VmStatus,
    validate_id,
)

__all__ = ["ControlPlane", "PlaneConfig"]

log = structlog.get_logger(__name__)

MAX_REPORTS_LIMIT = 1000


@dataclass(frozen=True)
class PlaneConfig:
    """Control-plane behaviour (built from ControlPlaneSettings by the server)."""

    lease_ttl_ms: int = 10_000
    leader_lease_ms: int = 5000
    known_stores: frozenset[str] | None = frozenset({"default"})
    """Store names a policy may name; None accepts any name."""
    run_scheduler: bool = True
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    slo: SloConfig = field(default_factory=SloConfig)
    agent_timeout_s: float = 30.0
    """Deadline of agent calls when the caller set none (attach, detach)."""
    drain_timeout_s: float = 3600.0
    """Deadline of a drain when the caller set none."""
    lease_check_s: float = 0.5
    """How often the leader looks for expired node leases."""


class ControlPlane:
    """Registry, policies, scheduler, SLO controller, events and leadership of one replica."""

    def __init__(
        self,
        state: StateStore,
        agents: AgentApi,
        *,
        clock: Clock | None = None,
        config: PlaneConfig | None = None,
        replica_id: str = "replica",
        address: str = "",
    ) -> None:
        self.state = state
        self.agents = agents
        self.clock: Clock = clock or SystemClock()
        self.config = config or PlaneConfig()
        self.replica_id = replica_id
        self.events = EventLog(state, self.clock)
        self.recorder = Recorder(state, self.events)
        self.registry = Registry(state, self.events, self.clock, self.config.lease_ttl_ms)
        self.policies = PolicyBook(state, self.events, self.clock, self.config.known_stores)
        self.slo = SloController(self.config.slo)
        self.metrics = ControlPlaneMetrics()
        """This plane's Prometheus series (served by its server when metrics_listen is set)."""
        self.scheduler = Scheduler(
            state=state,
            policies=self.policies,
            agents=agents,
            clock=self.clock,
            on_report=self._record,
            config=self.config.scheduler,
            slo=self.slo,
            owner=replica_id,
            metrics=self.metrics,
        )
        self.registry.on_statuses = self._statuses_arrived
        self.registry.on_node_change = self.scheduler.notify_nodes
        self.elector = LeaderElector(
            state, replica_id, address, self.config.leader_lease_ms, self._on_leadership, self.events
        )
        self._elector_task: asyncio.Task[None] | None = None
        self._term_tasks: list[asyncio.Task[None]] = []
        self._term = 0

    # ------------------------------------------------------------ lifecycle and leadership
    @property
    def address(self) -> str:
        """The address other replicas send clients to when this one leads."""
        return self.elector.address

    @address.setter
    def address(self, value: str) -> None:
        self.elector.address = value

    @property
    def is_leader(self) -> bool:
        """True while this replica holds the scheduling lease."""
        return self.elector.is_leader

    async def start(self) -> None:
        """Campaign for leadership (at once, then in the background)."""
        self.recorder.start()
        await self.elector.step()
        self._elector_task = asyncio.get_running_loop().create_task(self._campaign())

    async def _campaign(self) -> None:
        await asyncio.sleep(self.elector.lease_ms / 3000)
        await self.elector.run()

    async def stop(self, resign: bool = True) -> None:
        """Stop scheduling, give up the lease, cancel in-flight orders.

        ``resign=False`` keeps the lease until it expires, as a crashed replica would.
        """
        if self._elector_task is not None:
            self.elector.halt()
            self._elector_task.cancel()
            await asyncio.wait([self._elector_task], timeout=5)
            self._elector_task = None
        if resign:
            await self.elector.resign()
        else:
            self.elector.is_leader = False
            await self._on_leadership(False)
        await self.scheduler.stop()
        await self.recorder.stop()

    async def _on_leadership(self, leading: bool) -> None:
        self._term += 1
        self.scheduler.halt()
        tasks, self._term_tasks = self._term_tasks, []
        for t in tasks:
            t.cancel()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=10)
            for t in pending:
                log.error("a scheduling task outlived its leadership term", task=t.get_name())
        if not leading:
            return  # in-flight cycles finish; their order claims keep the next leader from repeating them
        loop = asyncio.get_running_loop()
        self.scheduler.reset()
        self._term_tasks.append(loop.create_task(self._reap_leases()))
        if self.config.run_scheduler:
            self._term_tasks.append(loop.create_task(self.scheduler.run()))

    async def _reap_leases(self) -> None:
        term = self._term
        while term == self._term:
            try:
                await self.registry.expire_leases()
            except TiermemError as e:
                log.warning("lease check failed", error=str(e))
            await asyncio.sleep(self.config.lease_check_s)

    def _statuses_arrived(self, statuses: Sequence[VmStatus]) -> None:
        if self.elector.is_leader:
            self.scheduler.observe_statuses(statuses)

    async def require_leader(self) -> None:
        """NotLeader (a FailedPrecondition) naming the leader unless this replica leads."""
        if self.elector.is_leader:
            return
        leader = await self.elector.leader()
        where = f"replica {leader.replica_id} at {leader.address}" if leader else "no replica right now"
        raise NotLeader(
            f"this control-plane replica is not the leader; the leader is {where}",
            leader.address if leader else "",
        )

    # ------------------------------------------------------------ reports and events
    async def _record(self, report: CycleReport, error: str = "") -> None:
        """Keep a report in the history and emit CYCLE_COMPLETED or CYCLE_FAILED (group-committed)."""
        try:
            await self.recorder.record(report, error)
        except TiermemError as e:
            # the cycle itself happened; only its history entry is lost
            log.warning("cycle report not stored", vm_id=report.vm_id, error=str(e))

    def stream_events(
        self, vm_id: str = "", after_seq: int = 0, follow: bool = False
    ) -> AsyncIterator[Event]:
        """Replay events after ``after_seq`` (of one VM or all), then follow."""
        if vm_id:
            validate_id(vm_id, "VM id")
        # Sequence numbers are signed 64-bit in the state stores; nothing is ever numbered higher.
        return self.events.follow(min(after_seq, 2**63 - 1), vm_id, follow)

    # ------------------------------------------------------------ nodes (called by agents; any replica)
    async def register_node(self, node: NodeInfo) -> int:
        """Register a node; returns the lease TTL, ms."""
        return await self.registry.register_node(node)

    async def heartbeat(self, node_id: str, statuses: Sequence[VmStatus] = ()) -> HeartbeatResult:
        """Renew a node's lease and keep its VMs' statuses."""
        return await self.registry.heartbeat(node_id, statuses)

    async def deregister_node(self, node_id: str) -> None:
        """Forget a node without VMs."""
        await self.registry.deregister_node(node_id)

    async def list_nodes(self) -> list[NodeInfo]:
        """Every node."""
        return await self.registry.list_nodes()

    async def report_cycles(self, node_id: str, reports: Sequence[CycleReport]) -> int:
        """Keep cycles an agent ran on its own; returns how many were accepted."""
        accepted = await self.registry.accept_reports(node_id, reports)
        if self.is_leader:
            for r in accepted:
                self.scheduler.observe_report(r)
        await asyncio.gather(*(self._record(r) for r in accepted))
        return len(accepted)

    # ------------------------------------------------------------ VMs
    def _timeout(self, timeout: float | None, default: float | None = None) -> float:
        t = default if timeout is None else timeout
        t = self.config.agent_timeout_s if t is None else t
        if t <= 0:
            raise FailedPrecondition("the call's deadline has already passed")
        return t

    async def _node_up(self, node_id: str) -> NodeInfo:
        node = await self.registry.get_node(node_id)
        if not node.up:
            raise FailedPrecondition(
                f"node {node_id!r} is down (its lease expired); try again when it is back"
            )
        return node

    async def register_vm(
        self, spec: VmSpec, attach: bool = False, timeout: float | None = None, tenant: str | None = None
    ) -> VmStatus:
        """Register a VM; with ``attach``, also attach it on its node now (rolled back if that fails).

        ``tenant``: the caller is scoped to this tenant. Sim VMs and workloads
        (which may name trace files on the agent's host) are then refused, and the
        node must declare a capacity that the VM fits in.
        """
        await self.require_leader()
        if tenant is not None and (spec.backend is Backend.SIM or spec.workload):
            raise PermissionDenied(
                "sim VMs and workloads are a demo and test facility for operators (admin token); "
                "a tenant registers uffd or rwp VMs, which its VMM hands off to the agent"
            )
        spec = await self.registry.add_vm(spec, require_capacity=tenant is not None)
        try:
            if attach:
                node = await self._node_up(spec.node_id)
                eff = await self.policies.effective(spec.vm_id)
                try:
                    status = await self.agents.attach_vm(
                        node.address, spec, eff.policy, self._timeout(timeout)
                    )
                except AlreadyExists:
                    log.info("VM already attached on its agent; adopting it", vm_id=spec.vm_id)
                else:
                    status.vm_id, status.node_id = spec.vm_id, spec.node_id
                    await self.registry.put_status(status)
                await self.events.publish(
                    EventKind.VM_ATTACHED,
                    f"VM {spec.vm_id} attached on {spec.node_id}",
                    vm_id=spec.vm_id,
                    node_id=spec.node_id,
                    backend=spec.backend.value,
                )
        except BaseException:
            with contextlib.suppress(TiermemError):
                await self.registry.remove_vm(spec.vm_id)
            raise
        self.scheduler.notify([spec.vm_id])
        return await self.vm_status(spec.vm_id)

    async def deregister_vm(self, vm_id: str, purge: bool = False, timeout: float | None = None) -> int:
        """Drain (or, with ``purge``, drop) the VM's evicted pages, detach it, forget it; returns pages purged."""
        await self.require_leader()
        spec = await self.registry.get_vm(vm_id)
        node = await self.registry.get_node(spec.node_id)
        pages = 0
        if node.up:
            t = self._timeout(timeout, None if purge else self.config.drain_timeout_s)
            async with self.scheduler.hold(vm_id, t):
                deadline = time.monotonic() + t
                try:
                    if not purge:
                        async for _ in self.agents.drain(node.address, vm_id, t):
                            pass
                    pages = await self.agents.detach_vm(
                        node.address, vm_id, purge, max(0.1, deadline - time.monotonic())
                    )
                except NotFound:
                    log.info("VM not on its agent; forgetting it", vm_id=vm_id)
                await self.registry.remove_vm(vm_id)
        elif not purge:
            raise FailedPrecondition(
                f"node {node.node_id!r} is down, so VM {vm_id!r}'s evicted pages cannot be drained; "
                "wait for the node, or deregister with purge once the VM has shut down"
            )
        else:
            await self.registry.remove_vm(vm_id)
        self.slo.forget(vm_id)
        await self.events.publish(
            EventKind.VM_DETACHED,
            f"VM {vm_id} deregistered" + (" (purged)" if purge else ""),
            vm_id=vm_id,
            node_id=spec.node_id,
            purge=str(purge).lower(),
            pages_purged=pages,
        )
        self.scheduler.notify([vm_id])
        return pages

    def _assemble(self, spec: VmSpec, st: VmStatus | None, eff: EffectivePolicy, node_up: bool) -> VmStatus:
        s = replace(st) if st is not None else VmStatus(spec.vm_id, state=VmState.DETACHED)
        s.node_id, s.backend, s.labels = spec.node_id, spec.backend, dict(spec.labels)
        s.policy, s.node_up = eff.policy, node_up
        s.total_pages = s.total_pages or spec.pages
        rate = self.slo.rate(spec.vm_id)
        if rate is not None:
            s.promotion_rate = rate
        return s

    async def vm_status(self, vm_id: str) -> VmStatus:
        """A VM's latest status, enriched with its policy and node state."""
        spec = await self.registry.get_vm(vm_id)
        node = await self.state.get_node(spec.node_id)
        up = node is not None and node.up and node.lease_expires_ms > clock_ms(self.clock)
        return self._assemble(
            spec, await self.registry.get_status(vm_id), await self.policies.effective(vm_id), up
        )

    async def list_vm_status(self, node_id: str = "", selector: str = "") -> list[VmStatus]:
        """Statuses of the VMs of one node and/or matching a selector."""
        specs = await self.registry.list_vms(node_id, selector)
        statuses = await self.state.list_statuses()
        eff = await self.policies.effective_all(specs)
        now = clock_ms(self.clock)
        up = {n.node_id for n in await self.state.list_nodes() if n.up and n.lease_expires_ms > now}
        return [self._assemble(s, statuses.get(s.vm_id), eff[s.vm_id], s.node_id in up) for s in specs]

    async def drain_vm(self, vm_id: str, timeout: float | None = None) -> AsyncIterator[DrainProgress]:
        """Bring every evicted page of a VM back; streams progress (no cycle runs meanwhile)."""
        await self.require_leader()
        spec = await self.registry.get_vm(vm_id)
        node = await self._node_up(spec.node_id)
        t = self._timeout(timeout, self.config.drain_timeout_s)
        last = 0.0
        async with self.scheduler.hold(vm_id, t):
            async for p in self.agents.drain(node.address, vm_id, t):
                yield p
                if p.done or time.monotonic() - last >= 1.0:
                    last = time.monotonic()
                    await self.events.publish(
                        EventKind.DRAIN_PROGRESS,
                        f"drain of {vm_id}: {p.pages_restored}/{p.pages_total} pages back"
                        + (" (done)" if p.done else ""),
                        vm_id=vm_id,
                        node_id=spec.node_id,
                        pages_restored=p.pages_restored,
                        pages_total=p.pages_total,
                        done=str(p.done).lower(),
                    )

    # ------------------------------------------------------------ policies
    async def set_policy(
        self, scope: PolicyScope, policy: EvictionPolicy, fields: Collection[str] = ()
    ) -> PolicyEntry:
        """Create or update a policy entry (partially with ``fields``)."""
        await self.require_leader()
        entry = await self.policies.set(scope, policy, fields)
        self.scheduler.notify([scope.value] if scope.kind is ScopeKind.VM else None)
        return entry

    async def get_policy(self, vm_id: str) -> EffectivePolicy:
        """The policy a VM runs with."""
        validate_id(vm_id, "VM id")
        return await self.policies.effective(vm_id)

    async def list_policies(self, selector: str = "") -> list[PolicyEntry]:
        """Policy entries, optionally filtered by a selector."""
        return await self.policies.list(selector)

    async def delete_policy(self, scope: PolicyScope) -> None:
        """Remove a policy entry."""
        await self.require_leader()
        await self.policies.delete(scope)
        self.scheduler.notify()  # a deletion bumps every VM's effective version

    # ------------------------------------------------------------ cycles
    async def trigger_cycle(
        self,
        vm_id: str,
        mode: CycleMode = CycleMode.EVICT,
        interval_ms: int = 0,
        timeout: float | None = None,
        tenant: str | None = None,
    ) -> CycleReport:
        """Run one cycle of a VM now on its agent and record the report.

        ``tenant``: the caller is scoped to this tenant; the scheduler's per-tenant
        manual-cycle limits apply.
        """
        await self.require_leader()
        if interval_ms < 0 or interval_ms > EvictionPolicy.MAX_INTERVAL_MS:
            raise InvalidArgument(f"interval_ms must be between 0 and {EvictionPolicy.MAX_INTERVAL_MS}")
        spec = await self.registry.get_vm(vm_id)
        node = await self._node_up(spec.node_id)
        eff = await self.policies.effective(vm_id)
        if eff.policy.paused and mode is CycleMode.EVICT:
            raise FailedPrecondition(f"VM {vm_id!r}'s policy is paused; unpause it or run a detect cycle")
        iv = interval_ms or eff.policy.interval_ms
        cap = self.config.scheduler.tenant_manual_max_interval_ms
        if tenant is not None and iv > cap:
            raise InvalidArgument(
                f"a tenant's manual cycle may wait at most {cap} ms, not {iv} ms; give a shorter interval_ms"
            )
        t = self._timeout(timeout, iv / 1000 + self.config.scheduler.cycle_slack_s)
        try:
            report = await self.scheduler.run_now(
                vm_id, mode, iv, eff.policy, node.node_id, node.address, t, tenant=tenant
            )
        except TimeoutError:
            raise FailedPrecondition(f"VM {vm_id!r} stayed busy with another cycle or a drain") from None
        except ResourceExhausted:
            raise  # refused before any cycle ran (a tenant's limits): nothing to record
        except TiermemError as e:
            failed = CycleReport(
                vm_id=vm_id,
                mode=mode,
                started_unix_ms=clock_ms(self.clock),
                policy_version=eff.policy.version,
                node_id=node.node_id,
            )
            await self._record(failed, f"{type(e).__name__}: {e}")
            raise
        await self._record(report)
        return report

    async def list_reports(self, vm_id: str = "", limit: int = 0) -> list[CycleReport]:
        """Newest cycle reports first (of one VM or all); limit 0 means 50."""
        if vm_id:
            validate_id(vm_id, "VM id")
        if limit < 0:
            raise InvalidArgument("limit must be >= 0")
        return await self.state.list_reports(vm_id, min(limit or 50, MAX_REPORTS_LIMIT))
