"""Eviction policies per VM, per label selector and for the fleet; precedence, validation, versions.

Precedence (whole entries, not field-by-field): the VM's own entry, else the
most specific matching selector (most terms; ties go to the most recently set),
else the fleet default, else the built-in ``EvictionPolicy()`` defaults.

A partial update (``fields``) takes the named fields from the request and the
rest from the entry being updated, or, when the entry is new, from the policy
that applied to that scope until now, so "set cold_after for vm-1" never resets
vm-1's interval.

Every change takes a new version from one monotonic counter. A VM's effective
version is the largest of its source entry's version, its SLO adjustment's
version and the version of the last deletion, so it only ever grows, even when
a deletion makes an older entry apply again. The agent receives the effective
policy with every cycle order; page ages live in the agent and are untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping
from types import MappingProxyType

from tiermem.api import Adjustment, EffectivePolicy, PolicyEntry, PolicyScope, ScopeKind, VmSpec
from tiermem.control.clock import Clock, clock_ms
from tiermem.control.events import EventLog
from tiermem.control.state import StateStore
from tiermem.errors import InvalidArgument, NotFound
from tiermem.model import EventKind, EvictionCap, EvictionPolicy
from tiermem.selector import matches, parse_selector

__all__ = ["POLICY_FIELDS", "PolicyBook", "apply_adjustment", "resolve"]

POLICY_FIELDS = frozenset(
    {
        "interval_ms",
        "cold_after",
        "max_evict",
        "min_resident_bytes",
        "store",
        "compression",
        "prefetch_pages",
        "paused",
        "slo_promotion_rate",
        "poison_missing",
        "algorithm",
        "algorithm_options",
    }
)
"""Fields a SetPolicy may name (``version`` is assigned, never set)."""
DELETE_MARK = "policy_deleted_version"


def _scale_cap(cap: EvictionCap, level: int) -> EvictionCap:
    div = 2**level
    if cap.pages is not None:
        return EvictionCap(pages=cap.pages // div)
    if cap.bytes is not None:
        return EvictionCap(bytes=cap.bytes // div)
    if cap.fraction is not None:
        return EvictionCap(fraction=cap.fraction / div)
    return cap


def apply_adjustment(policy: EvictionPolicy, level: int) -> EvictionPolicy:
    """The operator's ``policy`` backed off ``level`` times: cold_after ×2 and any cap ÷2 per level.

    Level 0 is the policy itself; a level never makes a policy more aggressive.
    """
    if level <= 0:
        return policy
    return policy.with_changes(
        cold_after=min(EvictionPolicy.MAX_COLD_AFTER, policy.cold_after * 2**level),
        max_evict=_scale_cap(policy.max_evict, level),
    )


@functools.lru_cache(maxsize=4096)
def _terms(selector: str) -> Mapping[str, str]:
    return MappingProxyType(parse_selector(selector))


def _pick(vm: VmSpec, entries: Iterable[PolicyEntry]) -> PolicyEntry | None:
    own: PolicyEntry | None = None
    best: tuple[int, int] | None = None
    best_sel: PolicyEntry | None = None
    fleet: PolicyEntry | None = None
    for e in entries:
        kind = e.scope.kind
        if kind is ScopeKind.VM:
            if e.scope.value == vm.vm_id:
                own = e
        elif kind is ScopeKind.SELECTOR:
            terms = _terms(e.scope.value)
            if matches(terms, vm.labels):
                rank = (len(terms), e.policy.version)
                if best is None or rank > best:
                    best, best_sel = rank, e
        else:
            fleet = e
    return own or best_sel or fleet


def resolve(
    vm: VmSpec, entries: Iterable[PolicyEntry], adjustment: Adjustment | None = None, delete_mark: int = 0
) -> EffectivePolicy:
    """The policy ``vm`` runs with, given every entry, its SLO adjustment and the last deletion's version."""
    entry = _pick(vm, entries)
    base = entry.policy if entry is not None else EvictionPolicy()
    level = adjustment.level if adjustment is not None else 0
    version = max(base.version, adjustment.version if adjustment else 0, delete_mark)
    policy = apply_adjustment(base, level).with_changes(version=version)
    return EffectivePolicy(policy, entry.scope if entry else None, adjusted=level > 0, level=max(0, level))


class PolicyBook:
    """Policy entries in the state store, with validation, versions and events."""

    def __init__(
        self, state: StateStore, events: EventLog, clock: Clock, known_stores: Collection[str] | None
    ) -> None:
        self.state = state
        self.events = events
        self.clock = clock
        self.known_stores = set(known_stores) if known_stores else None

    async def _base_for(self, scope: PolicyScope) -> EvictionPolicy:
        """What applies to ``scope`` right now (the base of a partial update of a new entry)."""
        current = await self.state.get_policy(scope.key)
        if current is not None:
            return current.policy
        if scope.kind is ScopeKind.VM:
            vm = await self.state.get_vm(scope.value)
            if vm is None:
                raise NotFound(f"unknown VM {scope.value!r}")
            eff = resolve(vm, await self.state.list_policies())
            return eff.policy
        if scope.kind is ScopeKind.SELECTOR:
            fleet = await self.state.get_policy(PolicyScope.fleet().key)
            return fleet.policy if fleet else EvictionPolicy()
        return EvictionPolicy()

    async def set(
        self, scope: PolicyScope, policy: EvictionPolicy, fields: Collection[str] = ()
    ) -> PolicyEntry:
        """Create or update the entry of ``scope``; only ``fields`` when given, else the whole policy."""
        unknown = set(fields) - POLICY_FIELDS
        if unknown:
            raise InvalidArgument(
                f"unknown or read-only policy field(s): {', '.join(sorted(unknown))}; "
                f"settable: {', '.join(sorted(POLICY_FIELDS))}"
            )
        if scope.kind is ScopeKind.VM and await self.state.get_vm(scope.value) is None:
            raise NotFound(f"unknown VM {scope.value!r}")
        if fields:
            base = await self._base_for(scope)
            new = base.with_changes(**{f: getattr(policy, f) for f in fields})
        else:
            new = policy
        new.validate(self.known_stores)  # before any version is taken: a bad request changes nothing
        new = new.with_changes(version=await self.state.next_version())
        entry = PolicyEntry(scope, new, updated_ms=clock_ms(self.clock))
        await self.state.put_policy(entry)
        await self.events.publish(
            EventKind.POLICY_CHANGED,
            f"policy {scope} set to version {new.version}",
            vm_id=scope.value if scope.kind is ScopeKind.VM else "",
            scope=scope.key,
            version=new.version,
            fields=",".join(sorted(fields)) or "*",
        )
        return entry

    async def delete(self, scope: PolicyScope) -> None:
        """Remove the entry of ``scope``; NotFound if there is none."""
        if not await self.state.delete_policy(scope.key):
            raise NotFound(f"no policy for {scope}")
        version = await self.state.next_version()
        await self.state.set_mark(DELETE_MARK, version)
        await self.events.publish(
            EventKind.POLICY_CHANGED,
            f"policy {scope} deleted",
            vm_id=scope.value if scope.kind is ScopeKind.VM else "",
            scope=scope.key,
            version=version,
            deleted="true",
        )

    async def list(self, selector: str = "") -> list[PolicyEntry]:
        """Entries; with ``selector``, those whose selector includes its terms or whose VM's labels match."""
        entries = await self.state.list_policies()
        if not selector:
            return entries
        terms = parse_selector(selector)
        vm_ids = [e.scope.value for e in entries if e.scope.kind is ScopeKind.VM]
        vms = await self.state.get_vms(vm_ids)
        out = []
        for e in entries:
            if (e.scope.kind is ScopeKind.SELECTOR and matches(terms, parse_selector(e.scope.value))) or (
                e.scope.kind is ScopeKind.VM
                and e.scope.value in vms
                and matches(terms, vms[e.scope.value].labels)
            ):
                out.append(e)
        return out

    async def effective(self, vm_id: str) -> EffectivePolicy:
        """The policy a VM runs with; NotFound for an unknown VM."""
        vm = await self.state.get_vm(vm_id)
        if vm is None:
            raise NotFound(f"unknown VM {vm_id!r}")
        return resolve(
            vm,
            await self.state.list_policies(),
            await self.state.get_adjustment(vm_id),
            await self.state.get_mark(DELETE_MARK),
        )

    async def effective_all(self, vms: Iterable[VmSpec]) -> dict[str, EffectivePolicy]:
        """Effective policies of many VMs, from one read of the entries."""
        entries = await self.state.list_policies()
        adjustments = await self.state.list_adjustments()
        mark = await self.state.get_mark(DELETE_MARK)
        return {vm.vm_id: resolve(vm, entries, adjustments.get(vm.vm_id), mark) for vm in vms}

    async def adjustments(self) -> Mapping[str, Adjustment]:
        """Every SLO adjustment by VM id."""
        return await self.state.list_adjustments()

    async def adjust(self, vm_id: str, level: int, reason: str, **attributes: object) -> Adjustment:
        """Record an SLO back-off level for a VM (new version, event POLICY_ADJUSTED)."""
        version = await self.state.next_version()
        adj = Adjustment(
            vm_id, level=max(0, level), version=version, reason=reason, updated_ms=clock_ms(self.clock)
        )
        await self.state.put_adjustment(adj)
        await self.events.publish(
            EventKind.POLICY_ADJUSTED,
            reason,
            vm_id=vm_id,
            level=adj.level,
            version=version,
            **{k: str(v) for k, v in attributes.items()},
        )
        return adj
