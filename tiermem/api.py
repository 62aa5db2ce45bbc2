"""Control-plane domain types: nodes, VM specs, policy scopes and entries, leases.

Plain dataclasses: the state stores persist them (``tiermem.control.codec``)
and ``tiermem.rpc.convert_api`` maps them to and from protobuf.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field

from tiermem.errors import InvalidArgument
from tiermem.model import PAGE_SIZE, Backend, EvictionPolicy, validate_id
from tiermem.selector import normalize_selector, validate_labels

__all__ = [
    "Adjustment",
    "EffectivePolicy",
    "HeartbeatResult",
    "LeaderInfo",
    "NodeInfo",
    "PolicyEntry",
    "PolicyScope",
    "ScopeKind",
    "VmSpec",
]

# fullmatch; "unix:" paths exclude control characters (a newline would forge log lines)
_ADDRESS = re.compile(
    r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}|unix:[^\x00-\x1f\x7f]{1,255}", re.ASCII
)
MAX_WORKLOAD_LEN = 256


@dataclass
class NodeInfo:
    """A host running a node agent, as registered with the control plane."""

    node_id: str
    address: str
    capacity_bytes: int = 0
    """Guest memory the node may track, bytes; 0 = no limit."""
    backends: tuple[Backend, ...] = ()
    """Kernel backends the node can run; empty = any."""
    up: bool = True
    """Lease valid."""
    lease_expires_ms: int = 0
    max_concurrent_cycles: int = 0
    """0 = the control plane default."""
    evict_mbps: float = 0.0
    """Eviction bandwidth limit, MB/s; 0 = the control plane default (unlimited if that is 0)."""
    vms: int = 0
    """VMs registered on the node (computed when listed)."""
    registered_ms: int = 0

    def validate(self) -> NodeInfo:
        """Return self if well-formed, else raise InvalidArgument."""
        validate_id(self.node_id, "node id")
        if not _ADDRESS.fullmatch(self.address or ""):
            raise InvalidArgument(f"invalid agent address {self.address!r}: use host:port")
        port = self.address.rsplit(":", 1)[-1]
        if not self.address.startswith("unix:") and not 0 < int(port) < 65536:
            raise InvalidArgument(f"invalid port in agent address {self.address!r}")
        if self.capacity_bytes < 0:
            raise InvalidArgument("capacity_bytes must be >= 0")
        if self.max_concurrent_cycles < 0 or self.max_concurrent_cycles > 10_000:
            raise InvalidArgument("max_concurrent_cycles must be between 0 and 10000")
        if not math.isfinite(self.evict_mbps) or self.evict_mbps < 0:
            raise InvalidArgument("evict_mbps must be a finite number >= 0")
        return self


@dataclass
class VmSpec:
    """A VM registered with the control plane."""

    vm_id: str
    node_id: str
    memory_bytes: int
    labels: dict[str, str] = field(default_factory=dict)
    backend: Backend = Backend.SIM
    workload: str = ""
    """Sim only: the in-process guest workload spec."""
    synthetic: bool = False
    registered_ms: int = 0

    def validate(self) -> VmSpec:
        """Return self if well-formed, else raise InvalidArgument."""
        validate_id(self.vm_id, "VM id")
        validate_id(self.node_id, "node id")
        if self.memory_bytes <= 0 or self.memory_bytes % PAGE_SIZE:
            raise InvalidArgument(
                f"memory_bytes must be a positive multiple of {PAGE_SIZE}, got {self.memory_bytes}"
            )
        if self.memory_bytes > 1 << 50:
            raise InvalidArgument(f"memory_bytes {self.memory_bytes} is too large")
        validate_labels(self.labels)
        if len(self.workload) > MAX_WORKLOAD_LEN or any(c in self.workload for c in "\n\r\0"):
            raise InvalidArgument(f"workload spec must be one line of at most {MAX_WORKLOAD_LEN} characters")
        return self

    @property
    def pages(self) -> int:
        """Guest memory in pages."""
        return self.memory_bytes // PAGE_SIZE


class ScopeKind(enum.Enum):
    """What a policy entry applies to."""

    VM = "vm"
    SELECTOR = "selector"
    FLEET = "fleet"


@dataclass(frozen=True)
class PolicyScope:
    """One VM, a label selector (normalised), or the fleet default."""

    kind: ScopeKind
    value: str = ""

    @classmethod
    def for_vm(cls, vm_id: str) -> PolicyScope:
        """The scope of one VM."""
        return cls(ScopeKind.VM, validate_id(vm_id, "VM id"))

    @classmethod
    def for_selector(cls, selector: str) -> PolicyScope:
        """The scope of a label selector, normalised (raises InvalidArgument if malformed)."""
        return cls(ScopeKind.SELECTOR, normalize_selector(selector))

    @classmethod
    def fleet(cls) -> PolicyScope:
        """The fleet default."""
        return cls(ScopeKind.FLEET)

    @property
    def key(self) -> str:
        """The storage key: ``vm:<id>``, ``selector:<k=v,...>`` or ``fleet``."""
        return "fleet" if self.kind is ScopeKind.FLEET else f"{self.kind.value}:{self.value}"

    def __str__(self) -> str:
        return self.key


@dataclass
class PolicyEntry:
    """A stored policy and what it applies to; ``policy.version`` orders entries by recency."""

    scope: PolicyScope
    policy: EvictionPolicy
    updated_ms: int = 0


@dataclass
class EffectivePolicy:
    """The policy a VM runs with, where it came from, and whether the SLO controller changed it."""

    policy: EvictionPolicy
    source: PolicyScope | None
    """None: the built-in defaults."""
    adjusted: bool = False
    level: int = 0
    """The SLO back-off level applied (0: the source policy as set)."""


@dataclass
class Adjustment:
    """The SLO controller's back-off of one VM's policy (level 0 = the operator's policy)."""

    vm_id: str
    level: int = 0
    """Each level doubles cold_after and halves any cap."""
    version: int = 0
    reason: str = ""
    updated_ms: int = 0


@dataclass(frozen=True)
class HeartbeatResult:
    """What the control plane answers a heartbeat."""

    lease_ttl_ms: int
    reregister: bool = False
    """The control plane does not know the node (it lost its state): register again."""


@dataclass(frozen=True)
class LeaderInfo:
    """The replica holding the scheduling lease."""

    replica_id: str
    address: str
    expires_ms: int = 0
