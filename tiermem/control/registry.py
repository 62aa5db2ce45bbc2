"""The node and VM registry: registration, node leases kept by heartbeats, the latest VM status.

A node whose lease expires is marked down (event NODE_DOWN); its VMs keep their
state and the scheduler orders nothing for them until a heartbeat or a new
registration brings it back (NODE_UP).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from tiermem.api import HeartbeatResult, NodeInfo, VmSpec
from tiermem.control.clock import Clock, clock_ms
from tiermem.control.events import EventLog
from tiermem.control.state import StateStore
from tiermem.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tiermem.model import CycleReport, EventKind, VmState, VmStatus, validate_id
from tiermem.selector import matches, parse_selector

__all__ = ["Registry"]

log = structlog.get_logger(__name__)


class Registry:
    """Nodes and VMs, backed by the state store."""

    def __init__(self, state: StateStore, events: EventLog, clock: Clock, lease_ttl_ms: int = 10_000) -> None:
        if lease_ttl_ms <= 0:
            raise InvalidArgument("lease_ttl_ms must be > 0")
        self.state = state
        self.events = events
        self.clock = clock
        self.lease_ttl_ms = lease_ttl_ms
        self.on_statuses: Callable[[Sequence[VmStatus]], None] | None = None
        """Called with the statuses kept from each heartbeat (the scheduler's priority and SLO inputs)."""
        self.on_node_change: Callable[[], None] | None = None
        """Called when a node registers, leaves, goes down or comes back."""
        self._local_written: dict[str, tuple[frozenset[str], int]] = {}
        """Per node: the agent-local VM ids last written to the state store, and when."""

    def _node_changed(self) -> None:
        if self.on_node_change is not None:
            self.on_node_change()

    def _live(self, node: NodeInfo, now: int) -> NodeInfo:
        node.up = node.up and node.lease_expires_ms > now
        return node

    # -- nodes
    async def register_node(self, node: NodeInfo) -> int:
        """Register (or re-register, after an agent restart) a node; returns the lease TTL, ms.

        A node id already held by another address with a valid lease is
        ALREADY_EXISTS: two hosts must not share an id.
        """
        node.validate()
        now = clock_ms(self.clock)
        old = await self.state.get_node(node.node_id)
        if old is not None and old.address != node.address and old.up and old.lease_expires_ms > now:
            raise AlreadyExists(
                f"node {node.node_id!r} is registered at {old.address} with a valid lease; "
                "deregister it or wait for its lease to expire"
            )
        node.up = True
        node.lease_expires_ms = now + self.lease_ttl_ms
        node.registered_ms = old.registered_ms if old is not None else now
        node.vms = 0
        await self.state.put_node(node)
        if old is None or not (old.up and old.lease_expires_ms > now):
            await self.events.publish(
                EventKind.NODE_UP,
                f"node {node.node_id} registered at {node.address}",
                node_id=node.node_id,
                address=node.address,
            )
        self._node_changed()
        return self.lease_ttl_ms

    async def heartbeat(self, node_id: str, statuses: Sequence[VmStatus] = ()) -> HeartbeatResult:
        """Renew a node's lease and keep the latest status of its VMs."""
        validate_id(node_id, "node id")
        node = await self.state.get_node(node_id)
        if node is None:
            return HeartbeatResult(self.lease_ttl_ms, reregister=True)
        now = clock_ms(self.clock)
        was_up = node.up and node.lease_expires_ms > now
        if node.up and not was_up:
            # the lease lapsed before the reaper noticed: record the gap, so NODE_DOWN/NODE_UP stay paired
            await self.events.publish(
                EventKind.NODE_DOWN, f"node {node_id} missed its heartbeats; lease expired", node_id=node_id
            )
        node.up = True
        node.lease_expires_ms = now + self.lease_ttl_ms
        await self.state.put_node(node)
        if not was_up:
            await self.events.publish(EventKind.NODE_UP, f"node {node_id} is back", node_id=node_id)
            self._node_changed()
        await self._keep_statuses(node_id, statuses, now)
        return HeartbeatResult(self.lease_ttl_ms)

    async def _keep_statuses(self, node_id: str, statuses: Sequence[VmStatus], now: int) -> None:
        nodes = await self.state.vm_nodes([s.vm_id for s in statuses]) if statuses else {}
        # A heartbeat lists every VM of its node: agent-local ones (attached through the handoff socket,
        # not registered here) take their id fleet-wide; ids it no longer lists are free again. Kept in
        # the state store, so every replica (heartbeats may reach any) sees them.
        local = frozenset(
            s.vm_id for s in statuses if nodes.get(s.vm_id) is None and s.state is not VmState.DETACHED
        )
        last = self._local_written.get(node_id)
        # written when the list changes, and often enough that a live claim never looks stale
        if last is None or last[0] != local or now - last[1] >= self.lease_ttl_ms // 3:
            await self.state.put_local_vms(node_id, sorted(local), now)
            self._local_written[node_id] = (local, now)
        if not statuses:
            return
        keep: list[VmStatus] = []
        for s in statuses:
            if nodes.get(s.vm_id) != node_id:
                continue  # not registered here: an agent-local VM, or a VM that moved
            s.node_id = node_id
            s.updated_unix_ms = s.updated_unix_ms or now
            keep.append(s)
        await self.state.put_statuses(keep)
        if keep and self.on_statuses is not None:
            self.on_statuses(keep)

    async def deregister_node(self, node_id: str) -> None:
        """Forget a node; refused while VMs are registered on it."""
        validate_id(node_id, "node id")
        if await self.state.get_node(node_id) is None:
            raise NotFound(f"unknown node {node_id!r}")
        on_node = [v.vm_id for v in await self.state.list_vms() if v.node_id == node_id]
        if on_node:
            raise FailedPrecondition(
                f"node {node_id!r} still has {len(on_node)} VM(s) ({', '.join(on_node[:5])}); deregister them first"
            )
        await self.state.delete_node(node_id)
        await self.events.publish(EventKind.NODE_DOWN, f"node {node_id} deregistered", node_id=node_id)
        self._node_changed()

    async def get_node(self, node_id: str) -> NodeInfo:
        """A node with ``up`` computed from its lease; NotFound if unknown."""
        validate_id(node_id, "node id")
        node = await self.state.get_node(node_id)
        if node is None:
            raise NotFound(f"unknown node {node_id!r}")
        return self._live(node, clock_ms(self.clock))

    async def list_nodes(self) -> list[NodeInfo]:
        """Every node, with ``up`` from its lease and ``vms`` counted."""
        now = clock_ms(self.clock)
        counts: dict[str, int] = {}
        for v in await self.state.list_vms():
            counts[v.node_id] = counts.get(v.node_id, 0) + 1
        nodes = [self._live(n, now) for n in await self.state.list_nodes()]
        for n in nodes:
            n.vms = counts.get(n.node_id, 0)
        return nodes

    async def expire_leases(self) -> list[str]:
        """Mark down every node whose lease has expired; returns their ids (events NODE_DOWN)."""
        now = clock_ms(self.clock)
        down = []
        for node in await self.state.list_nodes():
            if node.up and node.lease_expires_ms <= now:
                node.up = False
                await self.state.put_node(node)
                down.append(node.node_id)
                await self.events.publish(
                    EventKind.NODE_DOWN,
                    f"node {node.node_id} missed its heartbeats; lease expired",
                    node_id=node.node_id,
                )
        if down:
            self._node_changed()
        return down

    # -- VMs
    async def add_vm(self, spec: VmSpec, require_capacity: bool = False) -> VmSpec:
        """Register a VM on a known node (validated; ALREADY_EXISTS for a taken id).

        A node's capacity 0 means "not declared": unlimited for operators, but with
        ``require_capacity`` (a tenant's call) such a node takes no VM at all.
        """
        spec.validate()
        node = await self.state.get_node(spec.node_id)
        if node is None:
            raise NotFound(f"unknown node {spec.node_id!r}; the node's agent registers it")
        if node.backends and spec.backend not in node.backends:
            have = ", ".join(b.value for b in node.backends)
            raise FailedPrecondition(
                f"node {spec.node_id!r} cannot run the {spec.backend.value} backend (it has {have})"
            )
        if require_capacity and not node.capacity_bytes:
            raise FailedPrecondition(
                f"node {spec.node_id!r} declares no capacity, so it takes no tenant VMs; "
                "its agent declares one with capacity_bytes (default: the host's memory)"
            )
        if node.capacity_bytes:
            used = sum(v.memory_bytes for v in await self.state.list_vms() if v.node_id == spec.node_id)
            if used + spec.memory_bytes > node.capacity_bytes:
                raise FailedPrecondition(
                    f"node {spec.node_id!r} has {node.capacity_bytes - used} bytes of capacity left, "
                    f"VM {spec.vm_id!r} needs {spec.memory_bytes}"
                )
        seen = await self.state.local_vm_owner(spec.vm_id)
        now = clock_ms(self.clock)
        if seen is not None and seen[0] != spec.node_id and now - seen[1] < self.lease_ttl_ms:
            # two nodes running one VM id would be two VMs the fleet cannot tell apart (its reports,
            # statuses and orders); each keeps its pages in its own store namespace either way
            raise FailedPrecondition(
                f"VM {spec.vm_id!r} is active on node {seen[0]!r} (attached there through its handoff socket); "
                "detach it there first or pick another id"
            )
        spec.registered_ms = now
        if not await self.state.create_vm(spec):
            raise AlreadyExists(f"VM {spec.vm_id!r} is already registered")
        return spec

    async def remove_vm(self, vm_id: str) -> None:
        """Forget a VM and everything kept for it."""
        if not await self.state.delete_vm(vm_id):
            raise NotFound(f"unknown VM {vm_id!r}")

    async def get_vm(self, vm_id: str) -> VmSpec:
        """A VM; NotFound if unknown."""
        validate_id(vm_id, "VM id")
        spec = await self.state.get_vm(vm_id)
        if spec is None:
            raise NotFound(f"unknown VM {vm_id!r}")
        return spec

    async def list_vms(self, node_id: str = "", selector: str = "") -> list[VmSpec]:
        """VMs, optionally of one node and matching a label selector."""
        if node_id:
            validate_id(node_id, "node id")
        terms = parse_selector(selector) if selector else {}
        return [
            v
            for v in await self.state.list_vms()
            if (not node_id or v.node_id == node_id) and matches(terms, v.labels)
        ]

    async def get_status(self, vm_id: str) -> VmStatus | None:
        """The latest status the VM's agent reported, or None."""
        return await self.state.get_status(vm_id)

    async def put_status(self, status: VmStatus) -> None:
        """Keep a status obtained otherwise (e.g. the AttachVm answer)."""
        status.updated_unix_ms = status.updated_unix_ms or clock_ms(self.clock)
        await self.state.put_statuses([status])

    async def accept_reports(self, node_id: str, reports: Sequence[CycleReport]) -> list[CycleReport]:
        """Validate reports an agent sent for its VMs; returns those of VMs registered on the node."""
        validate_id(node_id, "node id")
        if await self.state.get_node(node_id) is None:
            raise NotFound(f"unknown node {node_id!r}; register it first")
        specs = await self.state.get_vms([r.vm_id for r in reports])
        ok = []
        for r in reports:
            spec = specs.get(r.vm_id)
            if spec is None or spec.node_id != node_id:
                log.debug("report for an unregistered VM dropped", vm_id=r.vm_id, node_id=node_id)
                continue
            r.node_id = node_id
            ok.append(r)
        return ok
