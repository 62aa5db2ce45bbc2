"""Protobuf <-> domain dataclass conversions for the shared tiermem.v1 types.

Every conversion lives here so servicers stay thin and domain code never sees a
protobuf message. Input conversions validate (raising InvalidArgument); output
conversions cannot fail.
"""

from __future__ import annotations

from tiermem.errors import InvalidArgument
from tiermem.model import (
    Backend,
    Compression,
    CycleMode,
    CycleReport,
    DrainProgress,
    Event,
    EventKind,
    EvictionCap,
    EvictionPolicy,
    PhaseTimes,
    StoreUsage,
    VmState,
    VmStatus,
)
from tiermem.v1 import types_pb2 as pb

_BACKEND = {
    Backend.SIM: pb.KERNEL_BACKEND_SIM,
    Backend.UFFD: pb.KERNEL_BACKEND_UFFD,
    Backend.RWP: pb.KERNEL_BACKEND_RWP,
}
_BACKEND_IN: dict[int, Backend] = {int(v): k for k, v in _BACKEND.items()}
_COMP = {
    Compression.NONE: pb.COMPRESSION_NONE,
    Compression.ZSTD: pb.COMPRESSION_ZSTD,
    Compression.LZ4: pb.COMPRESSION_LZ4,
}
_COMP_IN: dict[int, Compression] = {int(v): k for k, v in _COMP.items()}


def compression_from_pb(v: int) -> Compression:
    """A Compression enum value (UNSPECIFIED is none); InvalidArgument for an unknown value."""
    if v == pb.COMPRESSION_UNSPECIFIED:
        return Compression.NONE
    if v not in _COMP_IN:
        raise InvalidArgument(f"unknown compression {v}")
    return _COMP_IN[v]


def compression_to_pb(c: Compression) -> int:
    """The wire value of a Compression."""
    return int(_COMP[c])


_MODE = {CycleMode.DETECT: pb.CYCLE_MODE_DETECT, CycleMode.EVICT: pb.CYCLE_MODE_EVICT}
_MODE_IN: dict[int, CycleMode] = {int(v): k for k, v in _MODE.items()}
_STATE = {s: getattr(pb, f"VM_STATE_{s.name}") for s in VmState}
_STATE_IN: dict[int, VmState] = {int(v): k for k, v in _STATE.items()}
_EVENT = {k: getattr(pb, f"EVENT_KIND_{k.name}") for k in EventKind}
_EVENT_IN: dict[int, EventKind] = {int(v): k for k, v in _EVENT.items()}


def backend_to_pb(b: Backend) -> int:
    """Backend enum value."""
    return _BACKEND[b]


def backend_from_pb(v: int, default: Backend | None = None) -> Backend:
    """Backend from its enum value; UNSPECIFIED gives ``default`` or an error."""
    if v == pb.KERNEL_BACKEND_UNSPECIFIED and default is not None:
        return default
    try:
        return _BACKEND_IN[v]
    except KeyError:
        raise InvalidArgument(f"unknown kernel backend {v}") from None


def mode_to_pb(m: CycleMode) -> int:
    """CycleMode enum value."""
    return _MODE[m]


def mode_from_pb(v: int) -> CycleMode:
    """CycleMode from its enum value; UNSPECIFIED means EVICT."""
    if v == pb.CYCLE_MODE_UNSPECIFIED:
        return CycleMode.EVICT
    try:
        return _MODE_IN[v]
    except KeyError:
        raise InvalidArgument(f"unknown cycle mode {v}") from None


def cap_to_pb(c: EvictionCap) -> pb.EvictionCap:
    """EvictionCap message."""
    m = pb.EvictionCap()
    if c.pages is not None:
        m.pages = c.pages
    elif c.bytes is not None:
        m.bytes = c.bytes
    elif c.fraction is not None:
        m.fraction = c.fraction
    return m


def cap_from_pb(m: pb.EvictionCap) -> EvictionCap:
    """EvictionCap from its message."""
    which = m.WhichOneof("cap")
    if which == "pages":
        return EvictionCap(pages=m.pages)
    if which == "bytes":
        return EvictionCap(bytes=m.bytes)
    if which == "fraction":
        return EvictionCap(fraction=m.fraction)
    return EvictionCap()


def policy_to_pb(p: EvictionPolicy) -> pb.EvictionPolicy:
    """EvictionPolicy message."""
    return pb.EvictionPolicy(
        interval_ms=p.interval_ms,
        cold_after=p.cold_after,
        max_evict=cap_to_pb(p.max_evict),
        min_resident_bytes=p.min_resident_bytes,
        store=p.store,
        compression=_COMP[p.compression],
        prefetch_pages=p.prefetch_pages,
        paused=p.paused,
        slo_promotion_rate=p.slo_promotion_rate,
        poison_missing=p.poison_missing,
        version=p.version,
        algorithm=p.algorithm,
        algorithm_options=p.algorithm_options,
    )


def policy_from_pb(
    m: pb.EvictionPolicy,
    base: EvictionPolicy | None = None,
    fields: list[str] | None = None,
    validate: bool = True,
) -> EvictionPolicy:
    """EvictionPolicy from its message.

    With ``fields``, only the named fields are taken from ``m`` and the rest
    from ``base``; without, zero-valued scalars take ``base``'s (default) values,
    so an empty message means "the defaults".
    """
    base = base or EvictionPolicy()
    names = {
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
        "version",
        "algorithm",
        "algorithm_options",
    }
    if fields:
        unknown = set(fields) - names
        if unknown:
            raise InvalidArgument(f"unknown policy field(s): {', '.join(sorted(unknown))}")
        take = set(fields)
    else:
        take = {n for n in names if n != "max_evict" and getattr(m, n)} | {
            "paused",
            "poison_missing",
            "version",
        }
        if m.HasField("max_evict") and m.max_evict.WhichOneof("cap"):
            take.add("max_evict")
    if m.compression not in _COMP_IN and m.compression != pb.COMPRESSION_UNSPECIFIED:
        raise InvalidArgument(f"unknown compression {m.compression}")
    changes: dict[str, object] = {}
    for n in take:
        if n == "max_evict":
            changes[n] = cap_from_pb(m.max_evict)
        elif n == "compression":
            changes[n] = _COMP_IN.get(m.compression, Compression.NONE)
        else:
            changes[n] = getattr(m, n)
    p = base.with_changes(**changes)
    return p.validate() if validate else p


def phases_to_pb(p: PhaseTimes) -> pb.PhaseTimes:
    """PhaseTimes message."""
    return pb.PhaseTimes(**vars(p))


def report_to_pb(r: CycleReport) -> pb.CycleReport:
    """CycleReport message."""
    d = dict(vars(r))
    d["mode"] = _MODE[r.mode]
    d["phases"] = phases_to_pb(r.phases)
    return pb.CycleReport(**d)


def report_from_pb(m: pb.CycleReport) -> CycleReport:
    """CycleReport from its message."""
    return CycleReport(
        vm_id=m.vm_id,
        cycle=m.cycle,
        mode=mode_from_pb(m.mode),
        started_unix_ms=m.started_unix_ms,
        pages_scanned=m.pages_scanned,
        pages_hot=m.pages_hot,
        pages_cold=m.pages_cold,
        pages_evicted=m.pages_evicted,
        zero_pages=m.zero_pages,
        bytes_written=m.bytes_written,
        faults_served=m.faults_served,
        phases=PhaseTimes(**{f: getattr(m.phases, f) for f in vars(PhaseTimes())}),
        policy_version=m.policy_version,
        error=m.error,
        node_id=m.node_id,
        capped=m.capped,
        pages_unproven=m.pages_unproven,
    )


def usage_to_pb(u: StoreUsage) -> pb.StoreUsage:
    """StoreUsage message."""
    return pb.StoreUsage(
        store=pb.StoreRef(name=u.store_name, kind=u.store_kind, url=u.store_url),
        pages=u.pages,
        zero_pages=u.zero_pages,
        stored_bytes=u.stored_bytes,
        logical_bytes=u.logical_bytes,
    )


def usage_from_pb(m: pb.StoreUsage) -> StoreUsage:
    """StoreUsage from its message."""
    return StoreUsage(
        store_name=m.store.name,
        store_kind=m.store.kind,
        store_url=m.store.url,
        pages=m.pages,
        zero_pages=m.zero_pages,
        stored_bytes=m.stored_bytes,
        logical_bytes=m.logical_bytes,
    )


def status_to_pb(s: VmStatus) -> pb.VmStatus:
    """VmStatus message."""
    return pb.VmStatus(
        vm_id=s.vm_id,
        node_id=s.node_id,
        state=_STATE[s.state],
        backend=_BACKEND[s.backend],
        total_pages=s.total_pages,
        resident_pages=s.resident_pages,
        evicted_pages=s.evicted_pages,
        working_set_pages=s.working_set_pages,
        faults_served=s.faults_served,
        minor_faults=s.minor_faults,
        promotion_rate=s.promotion_rate,
        store_usage=usage_to_pb(s.store_usage),
        cycles=s.cycles,
        page_size=s.page_size,
        labels=s.labels,
        policy=policy_to_pb(s.policy),
        fault_p50_us=s.fault_p50_us,
        fault_p99_us=s.fault_p99_us,
        updated_unix_ms=s.updated_unix_ms,
        node_up=s.node_up,
        incarnation=s.incarnation,
    )


def status_from_pb(m: pb.VmStatus) -> VmStatus:
    """VmStatus from its message."""
    return VmStatus(
        vm_id=m.vm_id,
        node_id=m.node_id,
        state=_STATE_IN.get(m.state, VmState.ATTACHED),
        backend=_BACKEND_IN.get(m.backend, Backend.SIM),
        total_pages=m.total_pages,
        resident_pages=m.resident_pages,
        evicted_pages=m.evicted_pages,
        working_set_pages=m.working_set_pages,
        faults_served=m.faults_served,
        minor_faults=m.minor_faults,
        promotion_rate=m.promotion_rate,
        store_usage=usage_from_pb(m.store_usage),
        cycles=m.cycles,
        page_size=m.page_size or 4096,
        labels=dict(m.labels),
        policy=policy_from_pb(m.policy, validate=False),
        fault_p50_us=m.fault_p50_us,
        fault_p99_us=m.fault_p99_us,
        updated_unix_ms=m.updated_unix_ms,
        node_up=m.node_up,
        incarnation=m.incarnation,
    )


def drain_to_pb(d: DrainProgress) -> pb.DrainProgress:
    """DrainProgress message."""
    return pb.DrainProgress(
        vm_id=d.vm_id, pages_total=d.pages_total, pages_restored=d.pages_restored, done=d.done
    )


def drain_from_pb(m: pb.DrainProgress) -> DrainProgress:
    """DrainProgress from its message."""
    return DrainProgress(
        vm_id=m.vm_id, pages_total=m.pages_total, pages_restored=m.pages_restored, done=m.done
    )


def event_to_pb(e: Event) -> pb.Event:
    """Event message."""
    return pb.Event(
        seq=e.seq,
        time_unix_ms=e.time_unix_ms,
        kind=_EVENT[e.kind],
        vm_id=e.vm_id,
        node_id=e.node_id,
        message=e.message,
        attributes=e.attributes,
    )


def event_from_pb(m: pb.Event) -> Event:
    """Event from its message."""
    return Event(
        kind=_EVENT_IN.get(m.kind, EventKind.CYCLE_COMPLETED),
        message=m.message,
        vm_id=m.vm_id,
        node_id=m.node_id,
        seq=m.seq,
        time_unix_ms=m.time_unix_ms,
        attributes=dict(m.attributes),
    )
