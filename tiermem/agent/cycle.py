"""The cycle engine: the RWP v10 workflow, applied the same way on every backend.

::

    begin:   UFFDIO_RWPROTECT(range, RWP)                  -- async: accesses auto-resolve
    wait:    the policy's interval (or the caller's clock: trace replay)
    freeze:  UFFDIO_SET_MODE(disable=RWP_ASYNC)           -- sync: accesses now block
    scan:    PAGEMAP_SCAN(category_mask=PAGE_IS_PRESENT, return_mask=PRESENT|ACCESSED)
             -> hot = present and accessed; proven cold = present and not accessed (still protected)
    decide:  the policy's eviction algorithm (:mod:`tiermem.evict`) picks the cold set among the
             proven-cold pages, within the caps (``age``: ages[hot] = 0; ages[proven] += 1;
             cold = proven and ages >= cold_after)
    evict:   per batch: read via the I/O mapping -> store.put (acknowledged) -> index (durable)
             -> fallocate(PUNCH_HOLE) -> UFFDIO_WAKE
    resume:  UFFDIO_SET_MODE(enable=RWP_ASYNC)            -- wakes every parked sync fault

Only pages the frozen scan proves protected and untouched are ever evicted: present in the
guest mapping (a PTE carrying the RWP marker, whose accesses block while frozen) and not
``PAGE_IS_ACCESSED``. A page that is in the memfd but not mapped in the guest mapping
(pte_none: written through another mapping, MADV_DONTNEED'd, reclaimed, split from a THP)
cannot be protected by UFFDIO_RWPROTECT; evicting it would lose a guest write landing between
the read-out and the punch. Such pages are counted in ``CycleReport.pages_unproven`` and kept.

The decide step is pure: scan result + caps + the algorithm's state -> cold set
(:func:`decide`); ``tiermem simulate`` runs the same algorithms. A dry run
(``CycleMode.DETECT``) reports what would be evicted and changes nothing: no
eviction and no algorithm state. Capped runs evict oldest first, then lowest page
number first, so they are reproducible.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import structlog

from tiermem import evict
from tiermem.agent.faults import FaultServer
from tiermem.agent.metrics import CycleResult
from tiermem.agent.session import VmSession
from tiermem.errors import ConfigurationError, FailedPrecondition, NotFound, StoreFull, StoreUnavailable
from tiermem.kernel import uapi
from tiermem.model import CycleMode, CycleReport, EventKind, EvictionPolicy, PhaseTimes, VmState, now_ms
from tiermem.store.base import Codec, PageBlob

__all__ = ["CycleEngine", "decide", "runs"]

log = structlog.get_logger(__name__)

EVICT_BATCH_PAGES = 1024
"""Pages per store round trip and index commit: big enough to amortise both, small enough to bound
how long a sync fault on a cold page waits for its batch."""


def runs(pages: np.ndarray) -> Iterator[tuple[int, int]]:
    """Contiguous runs ``(first, count)`` of a sorted page array."""
    if pages.size == 0:
        return
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [pages.size]))
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        yield int(pages[s]), e - s


def decide(
    algorithm: evict.Algorithm,
    hot: np.ndarray,
    candidates: np.ndarray,
    promoted: np.ndarray,
    n_resident: int,
    policy: EvictionPolicy,
    page_size: int,
    *,
    commit: bool,
) -> tuple[np.ndarray, int]:
    """The cold set (sorted pages) and the number of cold pages before the caps.

    ``candidates`` are the pages the frozen scan proves cold: the algorithm chooses only
    among them. The caps: ``max_evict`` and ``min_resident_bytes``.
    """
    limit = policy.max_evict.limit_pages(algorithm.n_pages, page_size)
    room = max(n_resident - math.ceil(policy.min_resident_bytes / page_size), 0)
    limit = room if limit is None else min(limit, room)
    view = evict.CloseView(hot=hot, candidates=candidates, promoted=promoted, limit=limit)
    return algorithm.close(view, commit=commit)


class CycleEngine:
    """Runs cycles for one session; ``begin`` and ``finish`` can be driven separately (trace replay)."""

    def __init__(self, session: VmSession, faults: FaultServer) -> None:
        self.session = session
        self.faults = faults
        self._t_begin = 0.0
        self._phases = PhaseTimes()
        self._started_ms = 0

    # --- whole cycle --------------------------------------------------------------------------
    def run(
        self, mode: CycleMode, interval_s: float, wait: Callable[[float], bool] | None = None
    ) -> CycleReport:
        """Protect, wait ``interval_s`` (``wait`` returns False to abort), then finish."""
        s = self.session
        if not s.tracking:
            raise FailedPrecondition(
                f"VM {s.vm_id} is served MISSING-only (no tracking); cycles are not possible"
            )
        with s.cycle_lock:
            self.begin()
            t = time.perf_counter()
            waiter = wait or (lambda d: not s.closing.wait(d))
            completed = waiter(interval_s)
            self._phases.wait_us = _us(time.perf_counter() - t)
            if not completed:
                self._abort()
                return CycleReport(
                    vm_id=s.vm_id, mode=mode, error="cycle aborted: VM detaching", node_id=s.node_id
                )
            return self.finish(mode)

    # --- phases -------------------------------------------------------------------------------
    def begin(self) -> None:
        """Detection: write-protect every resident page (async mode: no faults are delivered)."""
        s = self.session
        s.require(VmState.ARMED, VmState.DETECTING)
        self._started_ms = now_ms()
        self._phases = PhaseTimes()
        self._t_begin = time.perf_counter()
        s.state = VmState.DETECTING
        s.backend.rwprotect(s.backend.base, s.backend.size, protect=True)
        self._phases.protect_us = _us(time.perf_counter() - self._t_begin)

    def _abort(self) -> None:
        self.session.state = VmState.ARMED

    def finish(self, mode: CycleMode) -> CycleReport:
        """Freeze, scan, decide and (unless a dry run) evict; then resume async."""
        s = self.session
        b = s.backend
        ph = self._phases
        rep = CycleReport(
            vm_id=s.vm_id,
            cycle=s.counters.cycles + 1,
            mode=mode,
            started_unix_ms=self._started_ms,
            policy_version=s.policy.version,
            node_id=s.node_id,
        )
        faults_before = s.counters.faults_served
        policy = s.policy
        try:
            t = time.perf_counter()
            with s.evict_lock:
                s.frozen = True
            b.set_mode(disable=uapi.UFFD_FEATURE_RWP_ASYNC)
            ph.freeze_us = _us(time.perf_counter() - t)

            t = time.perf_counter()
            # Residency first, then the scan: a page the fault server installs in between is then
            # "hot but not resident" and skipped. The scan is the proof: only a page that is present
            # in the guest mapping and not accessed still carries the RWP marker, so its accesses
            # block until its batch is punched and woken. A resident page the scan does not show
            # present is pte_none (cached but unmapped): unprotectable, so never evicted.
            resident = b.populated().copy()
            scan = b.pagemap_scan(
                b.base,
                b.base + b.size,
                category_mask=uapi.PAGE_IS_PRESENT,
                return_mask=uapi.PAGE_IS_PRESENT | uapi.PAGE_IS_ACCESSED,
            )
            present = scan.page_mask(b.base, b.base + b.size, b.page_size)
            hot = scan.pages_with(b.base, b.base + b.size, b.page_size, uapi.PAGE_IS_ACCESSED)
            ph.scan_us = _us(time.perf_counter() - t)

            t = time.perf_counter()
            hot &= resident
            candidates = resident & present & ~hot
            rep.pages_unproven = int(np.count_nonzero(resident & ~present))
            commit = mode is CycleMode.EVICT
            with s.promoted_lock:
                promoted = np.array(s.promoted, dtype=np.int64)
                if commit:
                    s.promoted.clear()
            n_resident = int(np.count_nonzero(resident))
            cold, n_cold = decide(
                s.algorithm(policy), hot, candidates, promoted, n_resident, policy, s.page_size, commit=commit
            )
            rep.pages_scanned = n_resident
            rep.pages_hot = int(np.count_nonzero(hot))
            rep.pages_cold = n_cold
            rep.capped = cold.size < n_cold
            s.working_set = rep.pages_hot
            if mode is CycleMode.EVICT and cold.size:
                with s.evict_lock:
                    s.pending_evict[cold] = True
            self.faults.release_deferred()
            ph.decide_us = _us(time.perf_counter() - t)

            if mode is CycleMode.EVICT:
                t = time.perf_counter()
                s.state = VmState.EVICTING
                self._evict(cold, rep)
                ph.evict_us = _us(time.perf_counter() - t)
            else:
                rep.pages_evicted = 0
        finally:
            t = time.perf_counter()
            with s.evict_lock:
                s.pending_evict[:] = False
                s.frozen = False
            try:
                # Wakes every parked sync fault; they retry and auto-resolve (or take the MISSING path).
                b.set_mode(enable=uapi.UFFD_FEATURE_RWP_ASYNC)
            finally:
                ph.resume_us = _us(time.perf_counter() - t)
                ph.total_us = _us(time.perf_counter() - self._t_begin)
                if s.state in (VmState.DETECTING, VmState.EVICTING):
                    s.state = VmState.ARMED
        rep.phases = ph
        rep.faults_served = s.counters.faults_served - faults_before
        s.counters.cycles += 1
        s.last_report = rep
        self._observe(rep)
        return rep

    def _evict(self, cold: np.ndarray, rep: CycleReport) -> None:
        """Evict ``cold`` in batches; stop at the first store error (nothing unacknowledged is punched)."""
        s = self.session
        b = s.backend
        ps = s.page_size
        try:
            store = s.store()
        except NotFound as e:
            rep.error = str(e)
            return
        compression = s.policy.compression.value
        for i in range(0, cold.size, EVICT_BATCH_PAGES):
            batch = cold[i : i + EVICT_BATCH_PAGES]
            blobs: list[PageBlob] = []
            gen = s.index.next_generations(s.vm_id, int(batch.size))
            for first, count in runs(batch):
                data = b.io_read(first * ps, count * ps)
                for k in range(count):
                    blobs.append(PageBlob(first + k, gen, data[k * ps : (k + 1) * ps]))
                    gen += 1
            try:
                entries = store.put_pages(s.space, blobs, compression)
            except (StoreUnavailable, StoreFull, ConfigurationError) as e:
                s.counters.store_errors += 1
                s.metrics.store_errors.labels(store.name, "put", type(e).__name__).inc()
                rep.error = f"eviction stopped after {rep.pages_evicted} pages: {e}"
                s.events.publish(EventKind.EVICTION_STOPPED, rep.error, s.vm_id, store=store.name)
                log.error("eviction stopped; nothing unacknowledged was punched", vm=s.vm_id, error=str(e))
                return
            s.index.put_many(s.vm_id, store.name, entries)  # durable before any punch (invariant 1)
            for first, count in runs(batch):
                b.punch_hole(first * ps, count * ps)
            with s.evict_lock:
                s.pending_evict[batch] = False
            for first, count in runs(batch):
                b.wake(b.addr(first), count * ps)
            written = sum(e.length for e in entries)
            rep.pages_evicted += int(batch.size)
            rep.zero_pages += sum(1 for e in entries if e.codec is Codec.ZERO)
            rep.bytes_written += written
            s.metrics.bytes_written.labels(store.name).inc(written)
            s.metrics.pages_evicted.labels(s.vm_id).inc(int(batch.size))
        s.counters.pages_evicted_total += rep.pages_evicted
        s.counters.bytes_written_total += rep.bytes_written

    def _observe(self, rep: CycleReport) -> None:
        s = self.session
        m = s.metrics
        ph = rep.phases
        for phase in ("protect", "wait", "freeze", "scan", "decide", "evict", "resume"):
            m.cycle_seconds.labels(phase).observe(getattr(ph, f"{phase}_us") / 1e6)
        m.cycles.labels(
            s.vm_id, rep.mode.value, (CycleResult.ERROR if rep.error else CycleResult.OK).value
        ).inc()
        if rep.pages_unproven:
            m.pages_unproven.labels(s.vm_id).inc(rep.pages_unproven)
        kind = EventKind.CYCLE_FAILED if rep.error else EventKind.CYCLE_COMPLETED
        s.events.publish(
            kind,
            f"cycle {rep.cycle} ({rep.mode.value}): {rep.pages_hot} hot, {rep.pages_cold} cold, "
            f"{rep.pages_evicted} evicted{'; ' + rep.error if rep.error else ''}",
            s.vm_id,
            cycle=rep.cycle,
            evicted=rep.pages_evicted,
            hot=rep.pages_hot,
        )


def _us(seconds: float) -> int:
    return int(seconds * 1e6)
