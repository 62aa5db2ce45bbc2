"""The control plane's state store: one interface, two implementations.

* ``sqlite:///path/control.db``: embedded, one file in WAL mode, no service.
  Leadership and order claims still work between processes sharing the file.
* ``redis://host:port/db[?prefix=...]``: shared by several replicas; a leader
  lease (SET NX PX, renewed by a compare-and-set script) elects the one that
  schedules, and order claims (SET NX PX) keep two replicas from ordering the
  same VM's cycle in the same interval.

Both keep nodes, VMs, the latest status per VM, policies (with versions), SLO
adjustments, a bounded history of cycle reports per VM and an event log with
sequence numbers. Backend errors become :class:`tiermem.errors.Unavailable`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from tiermem.api import Adjustment, LeaderInfo, NodeInfo, PolicyEntry, VmSpec
from tiermem.control.clock import Clock, SystemClock
from tiermem.model import CycleReport, Event, VmStatus

__all__ = ["DEFAULT_EVENTS_KEEP", "DEFAULT_REPORTS_KEEP", "StateStore"]

DEFAULT_REPORTS_KEEP = 100
"""Cycle reports kept per VM."""
DEFAULT_EVENTS_KEEP = 100_000
"""Events kept in the log (older ones cannot be replayed)."""


class StateStore(abc.ABC):
    """Durable control-plane state. Every method is a single atomic operation."""

    shared: bool = False
    """True when several replicas may run against this store."""

    def __init__(
        self,
        clock: Clock | None = None,
        reports_keep: int = DEFAULT_REPORTS_KEEP,
        events_keep: int = DEFAULT_EVENTS_KEEP,
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.reports_keep = max(1, reports_keep)
        self.events_keep = max(1, events_keep)

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """Where the state lives, with any secret redacted."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create the schema; raises Unavailable or ConfigurationError."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    # -- nodes
    @abc.abstractmethod
    async def put_node(self, node: NodeInfo) -> None:
        """Create or replace a node."""

    @abc.abstractmethod
    async def get_node(self, node_id: str) -> NodeInfo | None:
        """A node, or None."""

    @abc.abstractmethod
    async def delete_node(self, node_id: str) -> bool:
        """Remove a node; False if it did not exist."""

    @abc.abstractmethod
    async def list_nodes(self) -> list[NodeInfo]:
        """Every node, sorted by id."""

    # -- VMs
    @abc.abstractmethod
    async def create_vm(self, spec: VmSpec) -> bool:
        """Register a VM; False (and nothing changed) if the id is taken."""

    @abc.abstractmethod
    async def get_vm(self, vm_id: str) -> VmSpec | None:
        """A VM, or None."""

    @abc.abstractmethod
    async def get_vms(self, vm_ids: Sequence[str]) -> dict[str, VmSpec]:
        """The known VMs among ``vm_ids``, by id."""

    @abc.abstractmethod
    async def vm_nodes(self, vm_ids: Sequence[str]) -> dict[str, str]:
        """The node of each known VM among ``vm_ids`` (cheaper than :meth:`get_vms`: heartbeats use it)."""

    @abc.abstractmethod
    async def delete_vm(self, vm_id: str) -> bool:
        """Remove a VM with its status, SLO adjustment, VM policy and reports; False if unknown."""

    @abc.abstractmethod
    async def list_vms(self) -> list[VmSpec]:
        """Every VM, sorted by id."""

    # -- statuses (the latest heartbeat per VM)
    @abc.abstractmethod
    async def put_statuses(self, statuses: Sequence[VmStatus]) -> None:
        """Replace the latest status of each VM.

        The status's ``policy`` is not kept (it reads back as the defaults): the
        control plane's effective policy is the one it reports.
        """

    @abc.abstractmethod
    async def get_status(self, vm_id: str) -> VmStatus | None:
        """The latest status of a VM, or None."""

    @abc.abstractmethod
    async def list_statuses(self) -> dict[str, VmStatus]:
        """The latest status of every VM that has one."""

    # -- agent-local VMs (attached through a handoff socket, never registered here)
    @abc.abstractmethod
    async def put_local_vms(self, node_id: str, vm_ids: Sequence[str], now_ms: int) -> None:
        """Replace the agent-local VM ids ``node_id`` reported in its latest heartbeat, seen at ``now_ms``."""

    @abc.abstractmethod
    async def local_vm_owner(self, vm_id: str) -> tuple[str, int] | None:
        """``(node id, last seen ms)`` of the node whose heartbeats list ``vm_id`` as agent-local, or None."""

    # -- policies
    @abc.abstractmethod
    async def next_version(self) -> int:
        """A new policy version, greater than every version handed out before."""

    @abc.abstractmethod
    async def put_policy(self, entry: PolicyEntry) -> None:
        """Create or replace the entry of ``entry.scope``."""

    @abc.abstractmethod
    async def get_policy(self, scope_key: str) -> PolicyEntry | None:
        """The entry stored under a scope key, or None."""

    @abc.abstractmethod
    async def delete_policy(self, scope_key: str) -> bool:
        """Remove an entry; False if there was none."""

    @abc.abstractmethod
    async def list_policies(self) -> list[PolicyEntry]:
        """Every entry."""

    @abc.abstractmethod
    async def get_mark(self, name: str) -> int:
        """A named integer (0 if unset), e.g. the version of the last policy deletion."""

    @abc.abstractmethod
    async def set_mark(self, name: str, value: int) -> None:
        """Set a named integer."""

    # -- SLO adjustments
    @abc.abstractmethod
    async def put_adjustment(self, adj: Adjustment) -> None:
        """Create or replace a VM's adjustment."""

    @abc.abstractmethod
    async def list_adjustments(self) -> dict[str, Adjustment]:
        """Every adjustment by VM id."""

    @abc.abstractmethod
    async def get_adjustment(self, vm_id: str) -> Adjustment | None:
        """A VM's adjustment, or None."""

    # -- cycle reports
    @abc.abstractmethod
    async def add_reports(self, reports: Sequence[CycleReport]) -> None:
        """Append reports, keeping the newest ``reports_keep`` per VM."""

    @abc.abstractmethod
    async def list_reports(self, vm_id: str = "", limit: int = 50) -> list[CycleReport]:
        """The newest reports first, of one VM or (empty id) of all."""

    # -- events
    @abc.abstractmethod
    async def append_event(self, event: Event) -> Event:
        """Append an event; returns it with its sequence number set."""

    @abc.abstractmethod
    async def append_events(self, events: Sequence[Event]) -> list[Event]:
        """Append several events at once (one transaction or pipeline); returns them with seqs set."""

    @abc.abstractmethod
    async def events_after(self, after_seq: int, vm_id: str = "", limit: int = 1000) -> list[Event]:
        """Events with seq > after_seq (of one VM, or all), oldest first."""

    @abc.abstractmethod
    async def last_event_seq(self) -> int:
        """The sequence number of the newest event (0 if none)."""

    # -- coordination between replicas
    @abc.abstractmethod
    async def claim_order(self, order_id: str, owner: str, ttl_ms: int) -> bool:
        """Atomically claim a cycle order; False if anyone (this owner too) claimed it before."""

    @abc.abstractmethod
    async def acquire_leadership(self, replica_id: str, address: str, ttl_ms: int) -> bool:
        """Take the leader lease if free or expired, or renew it if held; True if held now."""

    @abc.abstractmethod
    async def release_leadership(self, replica_id: str) -> None:
        """Give the lease up if this replica holds it."""

    @abc.abstractmethod
    async def get_leader(self) -> LeaderInfo | None:
        """The current lease holder, or None."""
