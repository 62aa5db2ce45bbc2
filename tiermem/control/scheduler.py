"""The scheduler: orders an eviction cycle for every VM at its interval, across nodes, within limits.

* **Planning.** Each VM's cycles start on a grid: ``k * interval + phase``,
  where the phase is a deterministic per-VM offset in ``[0, jitter * interval)``
  so thousands of VMs with the same interval spread out. The next start is
  planned from the previous *planned* start (no drift); the agent's RunCycle
  lasts about one interval (protect, wait, scan, evict), so back-to-back cycles
  cover the VM continuously. A VM never has two cycles at once. Every replica
  computes the same grid, which makes ``order_id = "<vm>@<planned ms>"`` the
  same on all of them: with a shared state store the order is claimed (SET NX)
  before it is sent, so two replicas never order one VM's cycle for the same
  slot.
* **Limits.** Per node: concurrent cycles and an eviction-bandwidth token
  bucket; per store: a write-bandwidth bucket. Buckets are debited with the
  bytes each report says were written.
* **Fairness.** A tenant's manual cycles (TriggerCycle with a tenant token) are
  limited per tenant and per node, their detection window is bounded, and they
  are counted apart from the scheduled slots: no tenant can fill a node's slots
  and starve another tenant's scheduled cycles.
* **Priority.** Among due VMs, those with the most reclaimable cold memory go
  first (from the last report: cold minus evicted pages; before any report:
  resident minus working set).
* **Backoff.** An unreachable or slow agent (UNAVAILABLE, DEADLINE_EXCEEDED)
  backs its whole node off exponentially; other failures back off the VM.
* **Skips.** Paused policies, nodes that are down, and VMs whose agent says
  they are draining, detached or disconnected get no orders.
* **SLO.** Statuses feed the promotion-rate controller; its decisions become
  policy adjustments (new versions) that the next order carries.

Time comes from an injectable clock; :meth:`Scheduler.tick` does one
deterministic scheduling pass, and :meth:`Scheduler.run` loops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import structlog

from tiermem.api import EffectivePolicy, VmSpec
from tiermem.control.agentapi import AgentApi
from tiermem.control.clock import Clock, clock_ms
from tiermem.control.limits import Backoff, TokenBucket, phase_fraction
from tiermem.control.metrics import ControlPlaneMetrics, FailureReason, OrderResult, SloDirection
from tiermem.control.policies import PolicyBook
from tiermem.control.schedmodel import Gate, NodeSlot, SchedulerConfig, SchedulerStats, VmSlot
from tiermem.control.slo import SloController
from tiermem.control.state import StateStore
from tiermem.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TiermemError,
    Unavailable,
)
from tiermem.model import CycleMode, CycleReport, EvictionPolicy, VmState, VmStatus

__all__ = ["ReportSink", "Scheduler", "SchedulerConfig", "SchedulerStats"]

log = structlog.get_logger(__name__)

ReportSink = Callable[[CycleReport, str], Awaitable[None]]
"""Called with (report, error) after every cycle: records it and emits the event."""

_NOT_SCHEDULABLE = (VmState.DRAINING, VmState.DETACHED, VmState.DISCONNECTED)


class Scheduler:
    """Orders cycles; run it on the leader only."""

    def __init__(
        self,
        *,
        state: StateStore,
        policies: PolicyBook,
        agents: AgentApi,
        clock: Clock,
        on_report: ReportSink,
        config: SchedulerConfig | None = None,
        slo: SloController | None = None,
        owner: str = "",
        metrics: ControlPlaneMetrics | None = None,
    ) -> None:
        self.state = state
        self.policies = policies
        self.agents = agents
        self.clock = clock
        self.on_report = on_report
        self.config = config or SchedulerConfig()
        self.slo = slo or SloController()
        self.owner = owner or uuid.uuid4().hex
        self.metrics = metrics if metrics is not None else ControlPlaneMetrics()
        self.claim = state.shared if self.config.claim_orders is None else self.config.claim_orders
        self.stats = SchedulerStats()
        self._vms: dict[str, VmSlot] = {}
        self._nodes: dict[str, NodeSlot] = {}
        self._gates: dict[str, Gate] = {}
        self._stores: dict[str, TokenBucket] = {}
        self._heap: list[tuple[int, int, str]] = []  # (planned ms, gen, vm id)
        self._ready: dict[str, VmSlot] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._poke = asyncio.Event()
        self._dirty = True
        self._nodes_dirty = True
        self._pending: set[str] = set()
        self._term = 0
        self._tenant_manual: dict[str, int] = {}

    # ------------------------------------------------------------ time and grid
    def _now_ms(self) -> int:
        return clock_ms(self.clock)

    def _regrid(self, v: VmSlot) -> None:
        iv = v.policy.interval_ms
        v.grid_interval_ms = iv
        v.phase_ms = int(phase_fraction(v.vm_id) * max(0.0, min(1.0, self.config.jitter)) * iv)

    def _slot_at_or_after(self, v: VmSlot, t_ms: int) -> int:
        iv = v.grid_interval_ms
        k = -((v.phase_ms - t_ms) // iv)  # ceil((t - phase) / iv)
        return k * iv + v.phase_ms

    def _queue(self, v: VmSlot, planned_ms: int) -> None:
        v.planned_ms = planned_ms
        v.gen += 1
        v.queued = True
        heapq.heappush(self._heap, (planned_ms, v.gen, v.vm_id))

    def gate(self, vm_id: str) -> Gate:
        """The VM's exclusivity gate."""
        g = self._gates.get(vm_id)
        if g is None:
            g = self._gates[vm_id] = Gate()
        return g

    def notify(self, vm_ids: Iterable[str] | None = None) -> None:
        """State changed: ``vm_ids`` (registered, removed, their own policy changed), or with
        no ids anything (a selector or fleet policy): reload before the next pass."""
        if vm_ids is None:
            self._dirty = True
        else:
            self._pending.update(vm_ids)
        self._poke.set()

    def notify_nodes(self) -> None:
        """A node registered, left, went down or came back: reload the nodes before the next pass."""
        self._nodes_dirty = True
        self._poke.set()

    def planned(self, vm_id: str) -> int | None:
        """The next planned start of a VM, ms (tests, status)."""
        v = self._vms.get(vm_id)
        return v.planned_ms if v is not None and v.queued else None

    # ------------------------------------------------------------ reload
    async def sync(self) -> None:
        """Full reload: nodes, VMs, effective policies and statuses; then the SLO controller."""
        self._dirty = False
        self._pending.clear()
        now = self._now_ms()
        await self.sync_nodes()
        specs = await self.state.list_vms()
        eff = await self.policies.effective_all(specs)
        seen = set()
        for i, spec in enumerate(specs):
            seen.add(spec.vm_id)
            self._upsert(spec, eff[spec.vm_id], now)
            if i % 256 == 255:
                await asyncio.sleep(0)  # thousands of VMs: let in-flight orders progress
        for gone in set(self._vms) - seen:
            self._remove(gone)
        await self.load_statuses()
        self.metrics.vms.set(len(self._vms))
        await self._run_slo(now)

    async def sync_nodes(self) -> None:
        """Reload the nodes (cheap: one row per host)."""
        self._nodes_dirty = False
        now = self._now_ms()
        now_s = now / 1000
        cfg = self.config
        seen = set()
        for n in await self.state.list_nodes():
            seen.add(n.node_id)
            up = n.up and n.lease_expires_ms > now
            rate = n.evict_mbps or cfg.node_evict_mbps
            node = self._nodes.get(n.node_id)
            if node is None:
                node = self._nodes[n.node_id] = NodeSlot(
                    n.node_id, n.address, up, 0, TokenBucket.mbps(rate, now_s, cfg.bucket_burst_s)
                )
                node.backoff = Backoff(cfg.backoff_base_s, cfg.backoff_max_s)
            elif node.bucket.rate != rate * 1e6:
                node.bucket.set_rate(rate, cfg.bucket_burst_s)
            node.address, node.up = n.address, up
            node.max_concurrent = n.max_concurrent_cycles or cfg.max_concurrent_per_node
        for gone in set(self._nodes) - seen:
            del self._nodes[gone]
        self.metrics.nodes_up.set(sum(1 for n in self._nodes.values() if n.up))

    async def refresh(self, vm_ids: Iterable[str]) -> None:
        """Reload some VMs (and their effective policies) only."""
        ids = list(dict.fromkeys(vm_ids))
        now = self._now_ms()
        specs = await self.state.get_vms(ids)
        for vm_id in ids:
            spec = specs.get(vm_id)
            if spec is None:
                self._remove(vm_id)
                continue
            try:
                eff = await self.policies.effective(vm_id)
            except NotFound:  # removed meanwhile
                self._remove(vm_id)
                continue
            self._upsert(spec, eff, now)
        self.metrics.vms.set(len(self._vms))

    async def load_statuses(self) -> None:
        """Read every VM's latest status from the store (heartbeats another replica received)."""
        self.observe_statuses((await self.state.list_statuses()).values())

    def observe_statuses(self, statuses: Iterable[VmStatus]) -> None:
        """Take VM statuses (pushed by the registry on each heartbeat, or loaded): state, priority, SLO samples."""
        now = self._now_ms()
        for st in statuses:
            v = self._vms.get(st.vm_id)
            if v is None:
                continue
            v.schedulable = st.state not in _NOT_SCHEDULABLE
            if not v.reclaim_from_report:
                v.reclaimable = max(0, st.resident_pages - st.working_set_pages)
            if v.policy.slo_promotion_rate > 0:
                self.slo.observe(st, now)

    def _upsert(self, spec: VmSpec, e: EffectivePolicy, now: int) -> None:
        v = self._vms.get(spec.vm_id)
        if v is None:
            v = self._vms[spec.vm_id] = VmSlot(spec.vm_id, spec.node_id, e.policy)
            v.backoff = Backoff(self.config.backoff_base_s, self.config.backoff_max_s)
            self._regrid(v)
            self._queue(v, self._slot_at_or_after(v, now + 1))
        v.node_id, v.policy, v.level = spec.node_id, e.policy, e.level
        if v.grid_interval_ms != e.policy.interval_ms and not self.gate(v.vm_id).busy:
            # a new interval takes a new grid from now; a running cycle re-plans when it ends
            self._regrid(v)
            self._ready.pop(v.vm_id, None)
            self._queue(v, self._slot_at_or_after(v, now + 1))

    def _remove(self, vm_id: str) -> None:
        if self._vms.pop(vm_id, None) is None:
            return
        self._ready.pop(vm_id, None)
        self.slo.forget(vm_id)
        g = self._gates.get(vm_id)
        if g is not None and not g.busy:
            del self._gates[vm_id]

    async def _run_slo(self, now: int) -> None:
        changed = []
        for v in list(self._vms.values()):
            slo = v.policy.slo_promotion_rate
            if slo <= 0:
                continue
            d = self.slo.evaluate(v.vm_id, slo, v.level, now)
            if d is None:
                continue
            await self.policies.adjust(
                d.vm_id,
                d.level,
                d.reason,
                previous=d.previous,
                rate=f"{d.rate:.6f}",
                slo=f"{d.slo:.6f}",
                direction="backoff" if d.level > d.previous else "tighten",
            )
            self.metrics.slo_adjustment(
                SloDirection.BACKOFF if d.level > d.previous else SloDirection.TIGHTEN
            )
            changed.append(v.vm_id)
        if changed:
            await self.refresh(changed)  # the next order carries the adjusted policy

    # ------------------------------------------------------------ scheduling pass
    def _store_bucket(self, store: str, now_s: float) -> TokenBucket | None:
        rate = self.config.store_write_mbps.get(store, 0.0)
        if rate <= 0:
            return None
        b = self._stores.get(store)
        if b is None:
            b = self._stores[store] = TokenBucket.mbps(rate, now_s, self.config.bucket_burst_s)
        return b

    def tick(self) -> float:
        """One scheduling pass: dispatch every due VM the limits allow; returns seconds until the next pass."""
        now = self._now_ms()
        now_s = now / 1000
        while self._heap and self._heap[0][0] <= now:
            _, gen, vm_id = heapq.heappop(self._heap)
            v = self._vms.get(vm_id)
            if v is not None and v.gen == gen and v.queued:
                v.queued = False
                self._ready[vm_id] = v
        wake = now + int(self.config.max_sleep_s * 1000)
        if self._heap:
            wake = min(wake, self._heap[0][0])
        for v in sorted(self._ready.values(), key=lambda x: (-x.reclaimable, x.planned_ms, x.vm_id)):
            gate = self.gate(v.vm_id)
            if gate.busy:
                continue  # a manual cycle or a drain; poked when it ends
            node = self._nodes.get(v.node_id)
            if node is None or not node.up or v.policy.paused or not v.schedulable:
                del self._ready[v.vm_id]
                self._queue(v, self._slot_at_or_after(v, now + 1))
                wake = min(wake, v.planned_ms)
                continue
            if node.backoff.blocked(now_s):
                wake = min(wake, int(node.backoff.until * 1000) + 1)
                continue
            if node.running >= node.max_concurrent:
                continue
            waits = [node.bucket.wait_s(now_s)]
            sb = self._store_bucket(v.policy.store, now_s)
            if sb is not None:
                waits.append(sb.wait_s(now_s))
            if max(waits) > 0:
                wake = min(wake, now + int(max(waits) * 1000) + 1)
                continue
            del self._ready[v.vm_id]
            self._dispatch(v, node, gate, now)
        return max(0.0, (wake - now) / 1000)

    def _dispatch(self, v: VmSlot, node: NodeSlot, gate: Gate, now: int) -> None:
        iv = v.grid_interval_ms
        if now - v.planned_ms >= iv:
            missed = (now - v.planned_ms) // iv
            v.planned_ms += missed * iv  # overdue by whole intervals: run the latest slot, count the rest
            self.stats.skipped_slots += missed
            self.metrics.order(OrderResult.SKIPPED, missed)
        gate.take()
        node.running += 1
        task = asyncio.get_running_loop().create_task(self._run(v, node, gate, v.planned_ms, v.policy))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, v: VmSlot, node: NodeSlot, gate: Gate, planned: int, policy: EvictionPolicy) -> None:
        order_id = f"{v.vm_id}@{planned}"
        try:
            if self.claim:
                ttl = max(2 * policy.interval_ms, 10_000)
                if not await self.state.claim_order(order_id, self.owner, ttl):
                    self.stats.claimed_elsewhere += 1
                    self.metrics.order(OrderResult.CLAIMED_ELSEWHERE)
                    return
            start = self._now_ms()
            lag = max(0, start - planned)
            self.stats.orders += 1
            self.stats.lags_ms.append(lag)
            self.metrics.scheduler_lag.observe(lag / 1000)
            await self._order(v, node, policy, order_id)
        except Exception:
            log.exception("scheduling a cycle failed", vm_id=v.vm_id, order_id=order_id)
        finally:
            gate.release()
            node.running -= 1
            if self._vms.get(v.vm_id) is v and not v.queued:
                self._queue(v, self._next_after(v, planned))
            self._poke.set()

    def _next_after(self, v: VmSlot, planned: int) -> int:
        now = self._now_ms()
        if v.grid_interval_ms != v.policy.interval_ms:
            self._regrid(v)
            nxt = self._slot_at_or_after(v, now)
        else:
            nxt = planned + v.grid_interval_ms
        if v.backoff.blocked(now / 1000):
            nxt = max(nxt, self._slot_at_or_after(v, int(v.backoff.until * 1000)))
        return nxt

    async def _order(self, v: VmSlot, node: NodeSlot, policy: EvictionPolicy, order_id: str) -> None:
        timeout = policy.interval_ms / 1000 + self.config.cycle_slack_s
        try:
            report = await self.agents.run_cycle(
                node.address, v.vm_id, CycleMode.EVICT, policy.interval_ms, policy, order_id, timeout
            )
        except Unavailable as e:
            delay = node.backoff.fail(self.clock.now())
            self._failed(
                FailureReason.UNAVAILABLE,
                v,
                f"agent of node {node.node_id} unavailable: {e}; node backs off {delay:.1f}s",
            )
            await self.on_report(self._failure_report(v, node, policy), str(e))
            return
        except TiermemError as e:
            delay = v.backoff.fail(self.clock.now())
            self._failed(FailureReason.AGENT_ERROR, v, f"{type(e).__name__}: {e}; VM backs off {delay:.1f}s")
            await self.on_report(self._failure_report(v, node, policy), f"{type(e).__name__}: {e}")
            return
        node.backoff.succeed()
        if report.error:
            v.backoff.fail(self.clock.now())
            self._failed(FailureReason.CYCLE_ERROR, v, report.error)
        else:
            v.backoff.succeed()
            self.stats.ok += 1
            self.metrics.order(OrderResult.OK)
        report.node_id = report.node_id or node.node_id
        self.observe_report(report, policy.store)
        await self.on_report(report, report.error)

    def _failed(self, reason: FailureReason, v: VmSlot, message: str) -> None:
        self.stats.failed += 1
        self.metrics.failure(reason)
        log.warning(
            "cycle order failed", vm_id=v.vm_id, node_id=v.node_id, reason=reason.value, error=message
        )

    def _failure_report(self, v: VmSlot, node: NodeSlot, policy: EvictionPolicy) -> CycleReport:
        return CycleReport(
            vm_id=v.vm_id,
            mode=CycleMode.EVICT,
            started_unix_ms=self._now_ms(),
            policy_version=policy.version,
            node_id=node.node_id,
        )

    def observe_report(self, report: CycleReport, store: str = "") -> None:
        """Account a report (scheduled, manual or sent by an agent): buckets and reclaimable memory."""
        now_s = self.clock.now()
        v = self._vms.get(report.vm_id)
        if v is not None:
            v.reclaimable = max(0, report.pages_cold - report.pages_evicted)
            v.reclaim_from_report = True
            store = store or v.policy.store
        node = self._nodes.get(report.node_id or (v.node_id if v else ""))
        if node is not None:
            node.bucket.debit(report.bytes_written, now_s)
        sb = self._store_bucket(store or "default", now_s)
        if sb is not None:
            sb.debit(report.bytes_written, now_s)

    # ------------------------------------------------------------ manual cycles and drains
    async def run_now(
        self,
        vm_id: str,
        mode: CycleMode,
        interval_ms: int,
        policy: EvictionPolicy,
        node_id: str,
        address: str,
        timeout: float,
        tenant: str | None = None,
    ) -> CycleReport:
        """Run one cycle now (TriggerCycle), after any cycle or drain of the VM in progress.

        ``tenant``: the caller is scoped to this tenant, and the tenant limits of
        :class:`SchedulerConfig` apply (ResourceExhausted / InvalidArgument beyond them).
        """
        if tenant is not None:
            async with self._tenant_slot(tenant, node_id, interval_ms):
                return await self._manual(vm_id, mode, interval_ms, policy, node_id, address, timeout, False)
        return await self._manual(vm_id, mode, interval_ms, policy, node_id, address, timeout, True)

    @contextlib.asynccontextmanager
    async def _tenant_slot(self, tenant: str, node_id: str, interval_ms: int) -> AsyncIterator[None]:
        """Hold one of ``tenant``'s manual-cycle slots (taken before waiting for the VM: no pile-up)."""
        cfg = self.config
        if interval_ms > cfg.tenant_manual_max_interval_ms:
            raise InvalidArgument(
                f"a tenant's manual cycle may wait at most {cfg.tenant_manual_max_interval_ms} ms, "
                f"not {interval_ms}; give a shorter interval_ms"
            )
        if self._tenant_manual.get(tenant, 0) >= cfg.tenant_manual_cycles:
            raise ResourceExhausted(
                f"tenant {tenant!r} already runs {cfg.tenant_manual_cycles} manual cycle(s); "
                "wait for them to end (scheduled cycles keep running)"
            )
        node = self._nodes.get(node_id)
        if node is not None and node.tenant_manual >= cfg.tenant_manual_cycles_per_node:
            raise ResourceExhausted(
                f"node {node_id!r} already runs {cfg.tenant_manual_cycles_per_node} manual cycles of tenants; "
                "try again later"
            )
        self._tenant_manual[tenant] = self._tenant_manual.get(tenant, 0) + 1
        if node is not None:
            node.tenant_manual += 1
        try:
            yield
        finally:
            left = self._tenant_manual.get(tenant, 1) - 1
            if left > 0:
                self._tenant_manual[tenant] = left
            else:
                self._tenant_manual.pop(tenant, None)
            if node is not None:
                node.tenant_manual -= 1

    async def _manual(
        self,
        vm_id: str,
        mode: CycleMode,
        interval_ms: int,
        policy: EvictionPolicy,
        node_id: str,
        address: str,
        timeout: float,
        scheduled_slot: bool,
    ) -> CycleReport:
        gate = self.gate(vm_id)
        async with asyncio.timeout(timeout):
            await gate.acquire()
        # an admin's manual cycle takes a scheduled slot (admins own the fleet); a tenant's never does
        node = self._nodes.get(node_id) if scheduled_slot else None
        if node is not None:
            node.running += 1
        try:
            order_id = f"{vm_id}@manual-{uuid.uuid4().hex[:12]}"
            report = await self.agents.run_cycle(address, vm_id, mode, interval_ms, policy, order_id, timeout)
            report.node_id = report.node_id or node_id
            self.observe_report(report, policy.store)
            return report
        finally:
            if node is not None:
                node.running -= 1
            gate.release()
            self._poke.set()

    @contextlib.asynccontextmanager
    async def hold(self, vm_id: str, timeout: float) -> AsyncIterator[None]:
        """Keep the scheduler away from a VM (drain, detach), after its cycle in progress ends."""
        gate = self.gate(vm_id)
        try:
            async with asyncio.timeout(timeout):
                await gate.acquire()
        except TimeoutError:
            raise FailedPrecondition(f"VM {vm_id!r} is busy with a cycle; try again") from None
        try:
            yield
        finally:
            gate.release()
            self._poke.set()

    # ------------------------------------------------------------ loop
    async def run(self) -> None:
        """Schedule until cancelled.

        A full reload at the start of the term and every ``full_resync_s``; the
        nodes every ``resync_s`` (and the SLO controller with them); single VMs
        when notified; statuses as heartbeats push them (and, with a shared
        store, reloaded every ``status_resync_s`` for heartbeats other replicas took).
        """
        loop = asyncio.get_running_loop()
        cfg = self.config
        next_full = next_nodes = next_status = 0.0
        term = self._term
        # The term check backs up cancellation: a library that swallows a CancelledError must
        # not keep a deposed leader scheduling.
        while term == self._term:
            t = loop.time()
            try:
                if self._dirty or t >= next_full:
                    await self.sync()
                    next_full, next_nodes, next_status = (
                        t + cfg.full_resync_s,
                        t + cfg.resync_s,
                        t + cfg.status_resync_s,
                    )
                else:
                    if self._pending:
                        ids, self._pending = self._pending, set()
                        await self.refresh(ids)
                    if self._nodes_dirty or t >= next_nodes:
                        await self.sync_nodes()
                        await self._run_slo(self._now_ms())
                        next_nodes = t + cfg.resync_s
                    if self.state.shared and t >= next_status:
                        await self.load_statuses()
                        next_status = t + cfg.status_resync_s
            except TiermemError as e:
                log.warning("scheduler reload failed; keeping the last view", error=str(e))
                next_full = min(next_full, t + cfg.resync_s)
            self._poke.clear()
            sleep = min(self.tick(), max(0.0, next_nodes - loop.time()))
            if sleep > 0 and not self._poke.is_set():
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that arrives as the poke does, and this loop would outlive its leadership term.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(sleep):
                        await self._poke.wait()

    def halt(self) -> None:
        """End the current :meth:`run` loop at its next pass (leadership lost)."""
        self._term += 1
        self._poke.set()

    def reset(self) -> None:
        """Forget the plan (a new leadership term); gates and in-flight cycles are kept."""
        self._vms.clear()
        self._ready.clear()
        self._heap.clear()
        self._pending.clear()
        self._dirty = True

    async def wait_idle(self) -> None:
        """Wait until no ordered cycle is in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        """Cancel in-flight orders."""
        for t in list(self._tasks):
            t.cancel()
        await self.wait_idle()

    def known(self, vm_id: str) -> bool:
        """True once the VM is in the scheduler's view."""
        return vm_id in self._vms

    def require(self, vm_id: str) -> None:
        """NotFound unless the VM is in the scheduler's view."""
        if vm_id not in self._vms:
            raise NotFound(f"VM {vm_id!r} is not scheduled")
