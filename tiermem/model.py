"""Domain dataclasses shared by the agent, the control plane and the CLI.

These are plain Python: nothing here knows about gRPC. ``tiermem.rpc.convert``
is the one place that turns them into protobuf messages and back.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace
from typing import Any

from tiermem import evict
from tiermem.errors import InvalidArgument
from tiermem.ids import validate_id

__all__ = [
    "PAGE_SIZE",
    "Backend",
    "Compression",
    "CycleMode",
    "CycleReport",
    "DrainProgress",
    "Event",
    "EventKind",
    "EvictionCap",
    "EvictionPolicy",
    "PhaseTimes",
    "StoreUsage",
    "VmState",
    "VmStatus",
    "now_ms",
    "policy_from_dict",
    "policy_to_dict",
    "validate_id",
]

PAGE_SIZE = 4096


def now_ms() -> int:
    """Wall-clock Unix time in milliseconds."""
    return int(time.time() * 1000)


class Backend(enum.Enum):
    """Kernel backend of a VM."""

    SIM = "sim"
    UFFD = "uffd"
    RWP = "rwp"


class Compression(enum.Enum):
    """Payload compression of evicted pages."""

    NONE = "none"
    ZSTD = "zstd"
    LZ4 = "lz4"


class CycleMode(enum.Enum):
    """DETECT is a dry run; EVICT detects, then evicts."""

    DETECT = "detect"
    EVICT = "evict"


class VmState(enum.Enum):
    """The per-VM session state machine on the agent."""

    ATTACHED = "attached"
    ARMED = "armed"
    DETECTING = "detecting"
    EVICTING = "evicting"
    DRAINING = "draining"
    DETACHED = "detached"
    DISCONNECTED = "disconnected"


class EventKind(enum.Enum):
    """Kinds of events streamed by the agent and the control plane."""

    VM_ATTACHED = "vm_attached"
    VM_DETACHED = "vm_detached"
    CYCLE_COMPLETED = "cycle_completed"
    CYCLE_FAILED = "cycle_failed"
    DRAIN_PROGRESS = "drain_progress"
    POLICY_CHANGED = "policy_changed"
    POLICY_ADJUSTED = "policy_adjusted"
    STORE_ERROR = "store_error"
    INTEGRITY_ERROR = "integrity_error"
    NODE_UP = "node_up"
    NODE_DOWN = "node_down"
    VMM_DISCONNECTED = "vmm_disconnected"
    VMM_RECONNECTED = "vmm_reconnected"
    EVICTION_STOPPED = "eviction_stopped"
    LEADER_CHANGED = "leader_changed"
    HANDOFF_REFUSED = "handoff_refused"
    SNAPSHOT_IMPORTED = "snapshot_imported"
    RESTORE_STARTED = "restore_started"
    RESTORE_FINISHED = "restore_finished"


@dataclass(frozen=True)
class EvictionCap:
    """Per-cycle eviction cap; at most one of the fields is set, none means unlimited."""

    pages: int | None = None
    bytes: int | None = None
    fraction: float | None = None

    def limit_pages(self, total_pages: int, page_size: int = PAGE_SIZE) -> int | None:
        """The cap in pages for a VM of ``total_pages``, or None for unlimited."""
        if self.pages is not None:
            return self.pages
        if self.bytes is not None:
            return self.bytes // page_size
        if self.fraction is not None:
            return int(total_pages * self.fraction)
        return None

    def validate(self) -> None:
        """Raise InvalidArgument unless the cap is well-formed."""
        set_fields = [v for v in (self.pages, self.bytes, self.fraction) if v is not None]
        if len(set_fields) > 1:
            raise InvalidArgument("max_evict: give pages, bytes or a fraction, not several")
        if self.pages is not None and self.pages < 0:
            raise InvalidArgument("max_evict: pages must be >= 0")
        if self.bytes is not None and self.bytes < 0:
            raise InvalidArgument("max_evict: bytes must be >= 0")
        if self.fraction is not None and not (0.0 <= self.fraction <= 1.0):
            raise InvalidArgument("max_evict: fraction must be between 0 and 1")


@dataclass(frozen=True)
class EvictionPolicy:
    """A VM's eviction policy, as the agent enforces it."""

    interval_ms: int = 30_000
    """Detection interval: how long pages are watched for accesses, milliseconds."""
    cold_after: int = 3
    """Cycles without an access after which a page is cold."""
    max_evict: EvictionCap = field(default_factory=EvictionCap)
    """Per-cycle eviction cap (unlimited by default)."""
    min_resident_bytes: int = 0
    """Eviction never takes the VM's resident memory below this, bytes."""
    store: str = "default"
    """Name of the page store on the agent."""
    compression: Compression = Compression.NONE
    """Payload compression."""
    prefetch_pages: int = 8
    """Neighbouring evicted pages fetched in the same round trip as a faulting page."""
    paused: bool = False
    """No cycles run while paused."""
    slo_promotion_rate: float = 0.0
    """Maximum promotions per evicted page per minute (0.002 = 0.2%/min); 0 disables the SLO."""
    poison_missing: bool = False
    """A fault on an evicted page whose payload is gone from its store: False waits (the agent keeps
    retrying, the vCPU stays blocked), True answers with UFFDIO_POISON (the guest gets SIGBUS)."""
    version: int = 0
    """Monotonic version assigned by the control plane (0 = local)."""
    algorithm: str = "age"
    """Eviction algorithm (:mod:`tiermem.evict`: ``age``, ``rrd``, ``recommended``)."""
    algorithm_options: str = ""
    """Its options, ``key=value[,key=value]``."""

    MAX_INTERVAL_MS = 7 * 24 * 3600 * 1000
    MAX_PREFETCH = 512
    MAX_COLD_AFTER = 250  # ages are uint8 and saturate at 255

    def validate(self, known_stores: set[str] | None = None) -> EvictionPolicy:
        """Return self if valid, else raise InvalidArgument naming the field."""
        if not (0 < self.interval_ms <= self.MAX_INTERVAL_MS):
            raise InvalidArgument(
                f"interval_ms must be > 0 and <= {self.MAX_INTERVAL_MS}, got {self.interval_ms}"
            )
        if not (1 <= self.cold_after <= self.MAX_COLD_AFTER):
            raise InvalidArgument(
                f"cold_after must be between 1 and {self.MAX_COLD_AFTER}, got {self.cold_after}"
            )
        self.max_evict.validate()
        if self.min_resident_bytes < 0:
            raise InvalidArgument("min_resident_bytes must be >= 0")
        if not (0 <= self.prefetch_pages <= self.MAX_PREFETCH):
            raise InvalidArgument(f"prefetch_pages must be between 0 and {self.MAX_PREFETCH}")
        if not (0.0 <= self.slo_promotion_rate <= 1.0) or self.slo_promotion_rate != self.slo_promotion_rate:
            raise InvalidArgument("slo_promotion_rate must be between 0 and 1 (per evicted page per minute)")
        if not self.store:
            raise InvalidArgument("store must be a store name")
        evict.parse_options(self.algorithm, self.algorithm_options)  # names the bad algorithm or option
        if known_stores is not None and self.store not in known_stores:
            raise InvalidArgument(f"unknown store {self.store!r}; known: {', '.join(sorted(known_stores))}")
        return self

    def with_changes(self, **changes: Any) -> EvictionPolicy:
        """A copy with ``changes`` applied (validated by the caller)."""
        return replace(self, **changes)


@dataclass
class PhaseTimes:
    """Microseconds spent in each phase of a cycle."""

    protect_us: int = 0
    wait_us: int = 0
    freeze_us: int = 0
    scan_us: int = 0
    decide_us: int = 0
    evict_us: int = 0
    resume_us: int = 0
    total_us: int = 0


@dataclass
class CycleReport:
    """What one detection (and eviction) cycle did."""

    vm_id: str
    cycle: int = 0
    mode: CycleMode = CycleMode.EVICT
    started_unix_ms: int = 0
    pages_scanned: int = 0
    pages_hot: int = 0
    pages_cold: int = 0
    pages_evicted: int = 0
    zero_pages: int = 0
    bytes_written: int = 0
    faults_served: int = 0
    phases: PhaseTimes = field(default_factory=PhaseTimes)
    policy_version: int = 0
    error: str = ""
    node_id: str = ""
    capped: bool = False
    pages_unproven: int = 0
    """Resident pages the frozen scan could not prove protected (in the memfd, not mapped in the
    guest mapping): never evicted, whatever their age."""


@dataclass
class StoreUsage:
    """Pages and bytes a store holds for one VM."""

    store_name: str = ""
    store_kind: str = ""
    store_url: str = ""
    pages: int = 0
    zero_pages: int = 0
    stored_bytes: int = 0
    logical_bytes: int = 0


@dataclass
class VmStatus:
    """A VM's tiering status as reported by its agent (and enriched by the control plane)."""

    vm_id: str
    node_id: str = ""
    state: VmState = VmState.ATTACHED
    backend: Backend = Backend.SIM
    total_pages: int = 0
    resident_pages: int = 0
    evicted_pages: int = 0
    working_set_pages: int = 0
    faults_served: int = 0
    minor_faults: int = 0
    promotion_rate: float = 0.0
    store_usage: StoreUsage = field(default_factory=StoreUsage)
    cycles: int = 0
    page_size: int = PAGE_SIZE
    labels: dict[str, str] = field(default_factory=dict)
    policy: EvictionPolicy = field(default_factory=EvictionPolicy)
    fault_p50_us: int = 0
    fault_p99_us: int = 0
    updated_unix_ms: int = 0
    node_up: bool = True
    incarnation: str = ""
    """The VM's incarnation on its agent (16 hex digits; empty where unknown)."""


@dataclass
class DrainProgress:
    """Progress of a drain."""

    vm_id: str
    pages_total: int = 0
    pages_restored: int = 0
    done: bool = False


@dataclass
class Event:
    """One event in the agent's or control plane's stream."""

    kind: EventKind
    message: str
    vm_id: str = ""
    node_id: str = ""
    seq: int = 0
    time_unix_ms: int = field(default_factory=now_ms)
    attributes: dict[str, str] = field(default_factory=dict)


def policy_to_dict(p: EvictionPolicy) -> dict[str, Any]:
    """A JSON-serialisable form of a policy (for durable state)."""
    return {
        "interval_ms": p.interval_ms,
        "cold_after": p.cold_after,
        "max_evict": {
            "pages": p.max_evict.pages,
            "bytes": p.max_evict.bytes,
            "fraction": p.max_evict.fraction,
        },
        "min_resident_bytes": p.min_resident_bytes,
        "store": p.store,
        "compression": p.compression.value,
        "prefetch_pages": p.prefetch_pages,
        "paused": p.paused,
        "slo_promotion_rate": p.slo_promotion_rate,
        "poison_missing": p.poison_missing,
        "version": p.version,
        "algorithm": p.algorithm,
        "algorithm_options": p.algorithm_options,
    }


def policy_from_dict(d: dict[str, Any]) -> EvictionPolicy:
    """The inverse of :func:`policy_to_dict`; unknown keys are ignored, missing ones take defaults."""
    base = EvictionPolicy()
    cap = d.get("max_evict") or {}
    try:
        return EvictionPolicy(
            interval_ms=int(d.get("interval_ms", base.interval_ms)),
            cold_after=int(d.get("cold_after", base.cold_after)),
            max_evict=EvictionCap(
                pages=cap.get("pages"), bytes=cap.get("bytes"), fraction=cap.get("fraction")
            ),
            min_resident_bytes=int(d.get("min_resident_bytes", 0)),
            store=str(d.get("store", base.store)),
            compression=Compression(d.get("compression", "none")),
            prefetch_pages=int(d.get("prefetch_pages", base.prefetch_pages)),
            paused=bool(d.get("paused", False)),
            slo_promotion_rate=float(d.get("slo_promotion_rate", 0.0)),
            poison_missing=bool(d.get("poison_missing", False)),
            version=int(d.get("version", 0)),
            algorithm=str(d.get("algorithm", base.algorithm)),
            algorithm_options=str(d.get("algorithm_options", "")),
        )
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"invalid policy: {e}") from None
