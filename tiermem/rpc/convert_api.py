"""Protobuf <-> domain conversions specific to the ControlPlane service (shared types: tiermem.rpc.convert)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tiermem.api import (
    EffectivePolicy,
    HeartbeatResult,
    NodeInfo,
    PolicyEntry,
    PolicyScope,
    ScopeKind,
    VmSpec,
)
from tiermem.errors import InvalidArgument
from tiermem.model import Backend, EvictionPolicy
from tiermem.rpc import convert as c
from tiermem.v1 import control_pb2 as cpb
from tiermem.v1 import types_pb2 as tpb

__all__ = [
    "effective_from_pb",
    "effective_to_pb",
    "entry_from_pb",
    "entry_to_pb",
    "heartbeat_from_pb",
    "node_from_pb",
    "node_to_pb",
    "policy_request",
    "scope_from_pb",
    "scope_to_pb",
    "spec_from_pb",
    "spec_to_pb",
]


def _backends(n: NodeInfo) -> Any:
    return [c.backend_to_pb(b) for b in n.backends]


def node_to_pb(n: NodeInfo) -> cpb.NodeInfo:
    """NodeInfo message."""
    return cpb.NodeInfo(
        node_id=n.node_id,
        address=n.address,
        capacity_bytes=n.capacity_bytes,
        backends=_backends(n),
        up=n.up,
        lease_expires_unix_ms=n.lease_expires_ms,
        max_concurrent_cycles=n.max_concurrent_cycles,
        evict_mbps=n.evict_mbps,
        vms=n.vms,
    )


def node_from_pb(m: cpb.NodeInfo) -> NodeInfo:
    """NodeInfo from its message (``up``, lease and ``vms`` are the control plane's, and ignored)."""
    backends = tuple(dict.fromkeys(c.backend_from_pb(b) for b in m.backends))
    return NodeInfo(
        node_id=m.node_id,
        address=m.address,
        capacity_bytes=m.capacity_bytes,
        backends=backends,
        up=m.up,
        lease_expires_ms=m.lease_expires_unix_ms,
        max_concurrent_cycles=m.max_concurrent_cycles,
        evict_mbps=m.evict_mbps,
        vms=m.vms,
    )


def spec_to_pb(s: VmSpec) -> cpb.VmSpec:
    """VmSpec message."""
    return cpb.VmSpec(
        vm_id=s.vm_id,
        node_id=s.node_id,
        memory_bytes=s.memory_bytes,
        labels=s.labels,
        backend=c.backend_to_pb(s.backend),  # type: ignore[arg-type]
        workload=s.workload,
        synthetic=s.synthetic,
    )


def spec_from_pb(m: cpb.VmSpec) -> VmSpec:
    """VmSpec from its message; an unspecified backend means sim."""
    return VmSpec(
        vm_id=m.vm_id,
        node_id=m.node_id,
        memory_bytes=m.memory_bytes,
        labels=dict(m.labels),
        backend=c.backend_from_pb(m.backend, default=Backend.SIM),
        workload=m.workload,
        synthetic=m.synthetic,
    )


def scope_to_pb(s: PolicyScope | None) -> cpb.PolicyScope:
    """PolicyScope message (an empty one for the built-in defaults)."""
    if s is None:
        return cpb.PolicyScope()
    if s.kind is ScopeKind.VM:
        return cpb.PolicyScope(vm_id=s.value)
    if s.kind is ScopeKind.SELECTOR:
        return cpb.PolicyScope(selector=s.value)
    return cpb.PolicyScope(fleet=True)


def scope_from_pb(m: cpb.PolicyScope, allow_empty: bool = False) -> PolicyScope | None:
    """PolicyScope from its message (validated); InvalidArgument unless exactly one scope is given."""
    which = m.WhichOneof("scope")
    if which == "vm_id":
        return PolicyScope.for_vm(m.vm_id)
    if which == "selector":
        return PolicyScope.for_selector(m.selector)
    if which == "fleet" and m.fleet:
        return PolicyScope.fleet()
    if allow_empty and which is None:
        return None
    raise InvalidArgument("scope: give exactly one of vm_id, selector or fleet=true")


def entry_to_pb(e: PolicyEntry) -> cpb.PolicyEntry:
    """PolicyEntry message."""
    return cpb.PolicyEntry(
        scope=scope_to_pb(e.scope), policy=c.policy_to_pb(e.policy), updated_unix_ms=e.updated_ms
    )


def entry_from_pb(m: cpb.PolicyEntry) -> PolicyEntry:
    """PolicyEntry from its message (as returned by the server: not re-validated)."""
    scope = scope_from_pb(m.scope)
    if scope is None:  # pragma: no cover - scope_from_pb raises for an empty scope
        raise InvalidArgument("policy entry without a scope")
    return PolicyEntry(scope, c.policy_from_pb(m.policy, validate=False), m.updated_unix_ms)


def effective_to_pb(e: EffectivePolicy) -> cpb.GetPolicyResponse:
    """GetPolicyResponse message."""
    return cpb.GetPolicyResponse(
        effective=c.policy_to_pb(e.policy), source=scope_to_pb(e.source), adjusted=e.adjusted
    )


def effective_from_pb(m: cpb.GetPolicyResponse) -> EffectivePolicy:
    """EffectivePolicy from its message."""
    return EffectivePolicy(
        c.policy_from_pb(m.effective, validate=False), scope_from_pb(m.source, allow_empty=True), m.adjusted
    )


def heartbeat_from_pb(m: cpb.HeartbeatResponse) -> HeartbeatResult:
    """HeartbeatResult from its message."""
    return HeartbeatResult(lease_ttl_ms=m.lease_ttl_ms, reregister=m.reregister)


def policy_request(m: tpb.EvictionPolicy, fields: Sequence[str]) -> EvictionPolicy:
    """The policy of a SetPolicy request, not yet validated (the domain merges ``fields`` and validates).

    Without ``fields`` unset (zero) scalars take the built-in defaults, as the
    contract says; with ``fields`` only those are read by the domain.
    """
    return c.policy_from_pb(m, base=EvictionPolicy(), fields=list(fields) or None, validate=False)


def policy_fields_to_pb(p: EvictionPolicy) -> tpb.EvictionPolicy:
    """EvictionPolicy message (client side of SetPolicy)."""
    return c.policy_to_pb(p)
