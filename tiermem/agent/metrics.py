"""Prometheus metrics of the node agent (one registry per agent, so several agents can share a process)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tiermem.metrics import service_registry
from tiermem.model import CycleMode

__all__ = ["RESTORE_HOW", "AgentMetrics", "CycleResult", "FaultKind", "FaultStage"]


class FaultKind(enum.Enum):
    """``kind`` of tiermem_agent_faults_total."""

    MISSING = "missing"
    ZERO = "zero"
    RWP = "rwp"


class FaultStage(enum.Enum):
    """``stage`` of tiermem_agent_fault_stage_seconds."""

    LOOKUP = "lookup"
    FETCH = "fetch"
    INSTALL = "install"


class CycleResult(enum.Enum):
    """``result`` of tiermem_agent_cycles_total."""

    OK = "ok"
    ERROR = "error"


_FAULT_BUCKETS = (
    10e-6,
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    50e-3,
    0.25,
    1.0,
    5.0,
)
_CYCLE_BUCKETS = (1e-3, 5e-3, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class _VmGauges(Collector):
    """Per-VM gauges read from the live sessions at scrape time (no stale series after detach)."""

    def __init__(self, snapshot: Callable[[], list[tuple[str, int, int, int]]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        resident = GaugeMetricFamily("tiermem_agent_vm_resident_pages", "Resident guest pages", labels=["vm"])
        evicted = GaugeMetricFamily("tiermem_agent_vm_evicted_pages", "Evicted guest pages", labels=["vm"])
        wss = GaugeMetricFamily(
            "tiermem_agent_vm_working_set_pages", "Hot pages in the last cycle", labels=["vm"]
        )
        for vm, r, e, w in self._snapshot():
            resident.add_metric([vm], r)
            evicted.add_metric([vm], e)
            wss.add_metric([vm], w)
        yield resident
        yield evicted
        yield wss

    def describe(self) -> list[GaugeMetricFamily]:
        return []


RESTORE_HOW = ("on_demand", "prefaulted", "zero")
"""Label values of ``tiermem_agent_restore_pages_total``."""


class AgentMetrics:
    """Counters and histograms named in docs/metrics.md."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else service_registry()
        r = self.registry
        self.faults = Counter("tiermem_agent_faults_total", "Faults handled", ["vm", "kind"], registry=r)
        self.fault_seconds = Histogram(
            "tiermem_agent_fault_seconds",
            "Fault service latency, MISSING fault to install",
            buckets=_FAULT_BUCKETS,
            registry=r,
        )
        self.fault_stage_seconds = Histogram(
            "tiermem_agent_fault_stage_seconds",
            "Fault service latency by stage",
            ["stage"],
            buckets=_FAULT_BUCKETS,
            registry=r,
        )
        self.cycle_seconds = Histogram(
            "tiermem_agent_cycle_phase_seconds",
            "Cycle time by phase",
            ["phase"],
            buckets=_CYCLE_BUCKETS,
            registry=r,
        )
        self.cycles = Counter(
            "tiermem_agent_cycles_total", "Cycles run", ["vm", "mode", "result"], registry=r
        )
        self.pages_evicted = Counter("tiermem_agent_pages_evicted_total", "Pages evicted", ["vm"], registry=r)
        self.pages_unproven = Counter(
            "tiermem_agent_pages_unproven_total",
            "Resident pages a cycle kept because its scan could not prove them protected (unmapped in the guest)",
            ["vm"],
            registry=r,
        )
        self.pages_restored = Counter(
            "tiermem_agent_pages_restored_total", "Pages brought back", ["vm"], registry=r
        )
        self.bytes_written = Counter(
            "tiermem_agent_store_bytes_written_total",
            "Payload bytes acknowledged by stores",
            ["store"],
            registry=r,
        )
        self.store_errors = Counter(
            "tiermem_agent_store_errors_total",
            "Store operations that failed",
            ["store", "op", "error"],
            registry=r,
        )
        self.housekeeper_errors = Counter(
            "tiermem_agent_housekeeper_errors_total",
            "Housekeeper passes that failed (retried with backoff; nothing queued is dropped)",
            ["stage", "error"],
            registry=r,
        )
        self.pages_missing = Counter(
            "tiermem_agent_pages_missing_total",
            "Faults on evicted pages whose payload is gone from the store",
            ["vm", "store"],
            registry=r,
        )

        self.restore_first_fault_seconds = Histogram(
            "tiermem_agent_restore_first_fault_seconds",
            "Snapshot restore: handshake to first page served",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
            registry=r,
        )
        self.restore_pages = Counter(
            "tiermem_agent_restore_pages_total",
            "Snapshot restore: pages installed",
            ["vm", "how"],
            registry=r,
        )
        self.restore_bytes_read = Counter(
            "tiermem_agent_restore_store_bytes_read_total",
            "Snapshot restore: payload bytes read from the store",
            ["vm"],
            registry=r,
        )

    def watch_vms(self, snapshot: Callable[[], list[tuple[str, int, int, int]]]) -> None:
        """Expose per-VM gauges computed by ``snapshot`` -> [(vm, resident, evicted, working_set)]."""
        self.registry.register(_VmGauges(snapshot))

    def forget_vm(self, vm: str) -> None:
        """Drop the per-VM series of a detached VM."""
        series: list[tuple[Counter, tuple[str, ...]]] = [
            (self.pages_evicted, (vm,)),
            (self.pages_restored, (vm,)),
            (self.pages_unproven, (vm,)),
            (self.restore_bytes_read, (vm,)),
        ]
        series += [(self.restore_pages, (vm, how)) for how in RESTORE_HOW]
        series += [(self.faults, (vm, kind.value)) for kind in FaultKind]
        series += [(self.cycles, (vm, mode.value, res.value)) for mode in CycleMode for res in CycleResult]
        for metric, labels in series:
            try:
                metric.remove(*labels)
            except KeyError:
                pass
