"""The scheduler's records: configuration, statistics, and its per-VM and per-node bookkeeping."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from tiermem.control.limits import Backoff, TokenBucket
from tiermem.model import EvictionPolicy

__all__ = ["Gate", "NodeSlot", "SchedulerConfig", "SchedulerStats", "VmSlot"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Scheduling parameters (from ControlPlaneSettings)."""

    max_concurrent_per_node: int = 64
    node_evict_mbps: float = 0.0
    store_write_mbps: Mapping[str, float] = field(default_factory=dict)
    jitter: float = 0.1
    resync_s: float = 1.0
    """Reload of the nodes (and SLO evaluation)."""
    full_resync_s: float = 60.0
    """Full reload of VMs and policies (a safety net: changes made here are applied at once)."""
    status_resync_s: float = 10.0
    """Reload of every VM status, with a shared store (heartbeats taken by other replicas)."""
    max_sleep_s: float = 0.5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    cycle_slack_s: float = 60.0
    """Deadline of an agent cycle call: the interval plus this."""
    bucket_burst_s: float = 1.0
    claim_orders: bool | None = None
    """Claim each order in the state store first (default: when the store is shared)."""
    tenant_manual_cycles: int = 2
    """Manual cycles (TriggerCycle) one tenant may have running or waiting at once."""
    tenant_manual_cycles_per_node: int = 8
    """Manual cycles of all tenants together on one node (they never use the scheduled slots)."""
    tenant_manual_max_interval_ms: int = 300_000
    """Longest detection window of a tenant's manual cycle."""


@dataclass
class SchedulerStats:
    """Counters and recent lags (for the benchmark and tests)."""

    orders: int = 0
    ok: int = 0
    failed: int = 0
    claimed_elsewhere: int = 0
    skipped_slots: int = 0
    lags_ms: deque[int] = field(default_factory=lambda: deque(maxlen=200_000))


class Gate:
    """One VM's exclusivity: a scheduled cycle, a manual cycle or a drain, never two at once."""

    def __init__(self) -> None:
        self.busy = False
        self.idle = asyncio.Event()
        self.idle.set()

    def take(self) -> None:
        """Mark busy (the caller checked it was not)."""
        self.busy = True
        self.idle.clear()

    def release(self) -> None:
        """Mark idle and wake waiters."""
        self.busy = False
        self.idle.set()

    async def acquire(self) -> None:
        """Wait until idle, then take."""
        while self.busy:
            await self.idle.wait()
        self.take()


@dataclass
class VmSlot:
    """What the scheduler knows of one VM: its policy, grid, next planned start, priority and backoff."""

    vm_id: str
    node_id: str
    policy: EvictionPolicy
    grid_interval_ms: int = 0
    phase_ms: int = 0
    planned_ms: int = 0
    gen: int = 0
    queued: bool = False
    schedulable: bool = True
    reclaimable: int = 0
    reclaim_from_report: bool = False
    level: int = 0
    backoff: Backoff = field(default_factory=Backoff)


@dataclass
class NodeSlot:
    """What the scheduler knows of one node: address, lease state, limits, cycles running, backoff."""

    node_id: str
    address: str
    up: bool
    max_concurrent: int
    bucket: TokenBucket
    running: int = 0
    """Scheduled cycles and admins' manual cycles in flight (bounded by ``max_concurrent``)."""
    tenant_manual: int = 0
    """Tenants' manual cycles in flight: counted apart, so they never take the scheduled slots."""
    backoff: Backoff = field(default_factory=Backoff)
