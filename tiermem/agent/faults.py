"""The fault server: serves a VM's faults from its page store.

Each VM has its own reader thread (blocking in ``backend.read_messages``, which
for real backends is an epoll loop on the uffd — never the gRPC event loop) and
its own small worker pool for MISSING faults, so one VM's fault storm cannot
stall another VM, and a fault never waits behind an eviction batch.

MISSING fault on an evicted page: index lookup -> store.get (the page and up to
``prefetch_pages`` evicted neighbours in one round trip) -> verify (the store
verifies checksum and length; a bad payload is never installed) ->
UFFDIO_COPY with DONTWAKE for each page -> UFFDIO_WAKE -> index entry removed.
While the store is down the faulting vCPU waits and the agent retries with
backoff, loudly (invariant 4): zeros are never installed for an evicted page.
"""

from __future__ import annotations

import errno
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from tiermem.agent.index import IndexEntry
from tiermem.agent.metrics import FaultKind, FaultStage
from tiermem.agent.native_faults import NativeFaults
from tiermem.agent.session import VmSession
from tiermem.errors import FailedPrecondition, IntegrityError, NotFound, StoreUnavailable, TiermemError
from tiermem.kernel import uapi
from tiermem.kernel.uapi import UffdMsg
from tiermem.model import EventKind
from tiermem.store.base import Codec

__all__ = ["FaultServer", "Installed"]

log = structlog.get_logger(__name__)

_VMM_GONE = (errno.ENOENT, errno.ESRCH, errno.ENOSPC, errno.EBADF)


class FaultServer:
    """Reads and resolves the faults of one VM."""

    def __init__(self, session: VmSession, workers: int = 4, max_backoff_s: float = 1.0) -> None:
        self.session = session
        self.max_backoff_s = max_backoff_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"faults-{session.vm_id}")
        self._inflight: set[int] = set()
        self._inflight_lock = threading.Lock()
        self._busy = 0
        """Faults queued or running on the worker pool."""
        self._reader: threading.Thread | None = None
        self._stop = threading.Event()
        self.vmm_gone = threading.Event()
        m = session.metrics
        # Metric children bound once: ``labels()`` costs microseconds a call, six calls a fault.
        self._m_missing = m.faults.labels(session.vm_id, FaultKind.MISSING.value)
        self._m_zero = m.faults.labels(session.vm_id, FaultKind.ZERO.value)
        self._m_rwp = m.faults.labels(session.vm_id, FaultKind.RWP.value)
        self._m_restored = m.pages_restored.labels(session.vm_id)
        self._m_lookup = m.fault_stage_seconds.labels(FaultStage.LOOKUP.value)
        self._m_fetch = m.fault_stage_seconds.labels(FaultStage.FETCH.value)
        self._m_install = m.fault_stage_seconds.labels(FaultStage.INSTALL.value)
        self.native: NativeFaults | None = None
        """The native fault thread serving this VM's common faults, when it applies (see native_faults)."""

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self, *, native: bool = True) -> None:
        """Start the native fault thread (where it applies, unless ``native`` is False) and the reader."""
        if native:
            self.native = NativeFaults.create(self.session)
            if self.native is not None:
                self.native.start()
        self._reader = threading.Thread(
            target=self._read_loop, name=f"uffd-{self.session.vm_id}", daemon=True
        )
        self._reader.start()

    def stop(self) -> None:
        """Stop reading; in-flight faults finish."""
        self._stop.set()
        if self.native is not None:
            self.native.stop()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=False)

    def _read_loop(self) -> None:
        while not self._stop.is_set() and not self.session.closing.is_set():
            try:
                msgs = self.session.backend.read_messages(0.2)
            except OSError as e:
                if e.errno in _VMM_GONE:
                    self._vmm_went_away(e)
                    return
                log.error("uffd read failed", vm=self.session.vm_id, error=str(e))
                time.sleep(0.05)
                continue
            if not msgs and self.session.backend.closed:
                self._vmm_went_away(None)
                return
            for m in msgs:
                # The reader must survive anything one message does: if it died, nothing would read
                # the uffd again and the guest would hang.
                try:
                    self.dispatch(m, inline=False)
                except Exception:
                    log.exception("fault message not handled", vm=self.session.vm_id, address=hex(m.address))
                finally:
                    self.session.backend.message_done()  # the native thread reads on once all are done

    def first_gone(self) -> bool:
        """Mark the VMM gone; True for the first caller only (who reports it: one event per VMM death)."""
        with self._inflight_lock:
            if self.vmm_gone.is_set():
                return False
            self.vmm_gone.set()
            return True

    def _vmm_went_away(self, err: OSError | None) -> None:
        if self.first_gone():
            self.session.events.publish(
                EventKind.VMM_DISCONNECTED,
                f"VMM of {self.session.vm_id} went away",
                self.session.vm_id,
                error=str(err or "closed"),
            )

    # --- dispatch ------------------------------------------------------------------------------
    def handle(self, msg: UffdMsg) -> None:
        """Resolve one message synchronously (the sim's inline mode: same code path, no threads)."""
        self.dispatch(msg, inline=True)

    def dispatch(self, msg: UffdMsg, *, inline: bool) -> None:
        """Route a message: tracking faults inline, MISSING faults to the pool (or inline)."""
        if msg.event == uapi.UFFD_EVENT_PAGEFAULT:
            page = self.session.backend.page_of(msg.address)
            if not 0 <= page < self.session.n_pages:
                log.warning("fault outside guest memory", vm=self.session.vm_id, address=hex(msg.address))
                return
            if msg.flags & uapi.UFFD_PAGEFAULT_FLAG_RWP:
                self.on_tracking_fault(page)
                return
            if msg.flags & uapi.UFFD_PAGEFAULT_FLAG_MINOR:
                # A page in the memfd but unmapped in the guest (the uffd backend turns its own MINOR
                # faults into RWP ones): map it with CONTINUE, parked like an RWP fault while frozen.
                self.on_tracking_fault(page, minor=True)
                return
            with self._inflight_lock:
                if page in self._inflight:
                    return  # the in-flight install wakes this vCPU too
                self._inflight.add(page)
            if inline:
                self._serve_missing(page, inline=True)
            elif self._reader_may_serve(page):
                try:
                    self._serve_missing(page, inline=False, retry=False)
                except TiermemError as e:
                    # The first attempt failed: hand the fault to a worker, which retries with backoff,
                    # so this reader keeps resolving the VM's other faults meanwhile.
                    log.warning(
                        "fast fault path failed; retrying on a worker", vm=self.session.vm_id, error=str(e)
                    )
                    with self._inflight_lock:
                        self._inflight.add(page)
                    self._submit(page)
            else:
                self._submit(page)
        elif msg.event in (uapi.UFFD_EVENT_REMOVE, uapi.UFFD_EVENT_UNMAP):
            self.on_remove(msg.start, msg.end)

    def _submit(self, page: int) -> None:
        with self._inflight_lock:
            self._busy += 1
        self._pool.submit(self._pool_task, page)

    def _pool_task(self, page: int) -> None:
        try:
            self._serve_missing(page, inline=False)
        except Exception:  # nobody reads this future: say it here
            log.exception("fault not served", vm=self.session.vm_id, page=page)
        finally:
            with self._inflight_lock:
                self._busy -= 1

    def _reader_may_serve(self, page: int) -> bool:
        """Serve on the reader thread (saving a thread hop, ~100 µs here) when that cannot delay others.

        Only for a local store (a bounded, sub-millisecond fetch), only while no worker is busy
        (so faults keep being served in parallel under load), and only one attempt: a failing
        store hands the fault to a worker, so the reader never waits out an outage.
        """
        if self._busy:
            return False
        e = self.session.index.get(self.session.vm_id, page)
        if e is None:
            return True  # a zero fill: no store involved
        try:
            kind = self.session.stores(e.store).kind
        except TiermemError:
            return False
        return kind in ("file", "memory")

    # --- tracking faults ---------------------------------------------------------------------------
    def on_tracking_fault(self, page: int, *, minor: bool = False) -> None:
        """A sync RWP fault (or the uffd emulation's surfaced one), or a MINOR fault (``minor``)."""
        s = self.session
        s.counters.rwp_faults += 1
        self._m_rwp.inc()
        with s.evict_lock:
            if s.frozen:
                s.deferred.append((page, minor))  # decided after the hot set is frozen
                return
            if s.pending_evict[page]:
                return  # the eviction batch's WAKE after the punch resolves it
        self._resolve_tracking(page, minor)

    def _resolve_tracking(self, page: int, minor: bool) -> None:
        b = self.session.backend
        try:
            if minor:
                b.continue_(b.addr(page), self.session.page_size)
            else:
                b.rwprotect(b.addr(page), self.session.page_size, protect=False)
        except OSError as e:
            if e.errno in _VMM_GONE:
                self._vmm_went_away(e)
            elif minor and e.errno in (errno.EEXIST, errno.EFAULT):
                # Mapped meanwhile (EEXIST) or punched (EFAULT: its retry faults MISSING): just wake.
                self.wake(Installed(present=[page]))
            elif e.errno != errno.EEXIST:
                log.error(
                    "tracking fault not resolved", vm=self.session.vm_id, page=page, minor=minor, error=str(e)
                )

    def release_deferred(self) -> None:
        """Called by the cycle engine once the eviction set is known: resolve parked faults not in it."""
        s = self.session
        with s.evict_lock:
            parked, s.deferred = s.deferred, []
            s.frozen = False
            resolve = [(p, minor) for p, minor in parked if not s.pending_evict[p]]
        for p, minor in resolve:
            self._resolve_tracking(p, minor)

    def on_remove(self, start: int, end: int) -> None:
        """A REMOVE/UNMAP event: the VMM zapped or discarded the range.

        On private anonymous memory (Firecracker) the range reads as zeroes now, so its evicted
        pages are forgotten and their payloads retired. On a shmem memfd the event is ambiguous:
        MADV_DONTNEED keeps the page cache (the guest still expects its data) and only MADV_REMOVE
        drops it, so evicted pages keep their entries: a later fault restores their last contents
        rather than risking the loss of data the guest still owns. A restored snapshot keeps its
        entries (it can be restored again): this restore answers the range with zeroes from now on.
        """
        s = self.session
        if not s.backend.anonymous:
            log.info(
                "range zapped by the VMM; evicted pages kept", vm=s.vm_id, start=hex(start), end=hex(end)
            )
            return
        ranges = s.backend.page_ranges(start, end)
        if s.restore is not None:
            for first, last in ranges:
                s.restore.remove(first, last)
            log.info(
                "range removed by the VMM", vm=s.vm_id, start=hex(start), end=hex(end), snapshot_kept=True
            )
            return
        gone = [
            (e.stored.page, e.stored.generation)
            for first, last in ranges
            for e in s.index.entries(s.vm_id, range(first, last))
            if e
        ]
        dropped = s.index.remove(s.vm_id, gone)
        with s.retired_lock:
            s.retired.extend(dropped)
        log.info("range removed by the VMM", vm=s.vm_id, start=hex(start), end=hex(end), dropped=len(dropped))

    # --- MISSING faults -------------------------------------------------------------------------------
    def _serve_missing(self, page: int, *, inline: bool, retry: bool = True) -> None:
        claimed = [page]  # pages this handler marked in flight; all are released at the end
        try:
            t0 = time.perf_counter()
            s = self.session
            entry = s.index.get(s.vm_id, page)
            if entry is None or (s.restore is not None and s.restore.removed[page]):
                self._zero_fill(page)  # never evicted, zero in the snapshot, or given back by the balloon
                return
            claimed = self._with_neighbours(page, entry)
            entries = [e for e in s.index.entries(s.vm_id, claimed) if e is not None]
            if not entries:
                return  # restored meanwhile (a stale message): nothing to serve
            pages = [e.stored.page for e in entries]
            gens = {e.stored.page: e.stored.generation for e in entries}
            t1 = time.perf_counter()
            try:
                if len(entries) > 1:
                    try:
                        data = self.fetch(entries, inline=inline, retry=False)
                    except (IntegrityError, NotFound):
                        # One bad neighbour must not hold the faulting page: fetch it alone from now on.
                        entries = [e for e in entries if e.stored.page == page]
                        pages = [page]
                        data = self.fetch(entries, inline=inline, retry=retry)
                    except StoreUnavailable:
                        data = self.fetch(entries, inline=inline, retry=retry)
                else:
                    data = self.fetch(entries, inline=inline, retry=retry)
            except NotFound:
                if not self._poisons(retry):
                    raise
                self._poison(page, entry)  # the policy prefers a SIGBUS in the guest to a vCPU hung for good
                return
            if data is None:
                return  # session closing
            t2 = time.perf_counter()
            result = self.install(pages, data, fault_page=page)
            # Only pages this handler installed lose their index entry. EEXIST means the page is
            # already present: installed by a racing fault or drain (which drops the entry itself),
            # or - on a stale MISSING message - still present because a cycle is evicting it right
            # now, whose new entry must survive the punch that is about to happen.
            if result.copied:
                if s.tracking:  # the eviction algorithm learns from promotions (bounded: cleared per close)
                    with s.promoted_lock:
                        s.promoted.extend(result.copied)
                if s.restore is None:
                    restored = s.index.remove(s.vm_id, [(p, gens[p]) for p in result.copied])
                    with s.retired_lock:
                        s.retired.extend(restored)
                else:  # the snapshot stays whole: only this restore's progress is recorded
                    copied = set(result.copied)
                    restored = [e for e in entries if e.stored.page in copied]
                    s.restore.installed(result.copied, sum(e.stored.length for e in restored), prefault=False)
            self.wake(result)
            t3 = time.perf_counter()
            if result.copied:
                s.counters.faults_served += 1
                s.counters.pages_restored += len(restored)
                s.counters.prefetched += max(len(restored) - 1, 0)
                s.counters.promotions.append((time.monotonic(), 1))
                self._m_missing.inc()
                self._m_restored.inc(len(restored))
                self._m_lookup.observe(t1 - t0)
                self._m_fetch.observe(t2 - t1)
                self._m_install.observe(t3 - t2)
                s.metrics.fault_seconds.observe(t3 - t0)
                s.fault_latency.add((t3 - t0) * 1e6)
        finally:
            with self._inflight_lock:
                self._inflight.difference_update(claimed)

    def _poisons(self, retry: bool) -> bool:
        # a VMM that did not negotiate UFFD_FEATURE_POISON (or the sim) keeps the waiting behaviour
        return retry and self.session.policy.poison_missing and self.session.backend.can_poison

    def _poison(self, page: int, entry: IndexEntry) -> None:
        s = self.session
        try:
            s.backend.poison(s.backend.addr(page), s.page_size)
        except OSError as e:
            if e.errno in _VMM_GONE:
                self._vmm_went_away(e)
                return
            if e.errno != errno.EEXIST:
                raise
        # the page is gone for good: its entry goes, so no drain or restart waits on it again
        s.index.remove(s.vm_id, [(page, entry.stored.generation)], flush=True)
        s.events.publish(
            EventKind.STORE_ERROR,
            f"page {page} of {s.vm_id} is lost: poisoned (the guest gets SIGBUS)",
            s.vm_id,
            page=page,
            poisoned="true",
        )
        log.critical("page poisoned", vm=s.vm_id, page=page)

    def _zero_fill(self, page: int) -> None:
        # A hole that was never evicted: the guest's first touch (or a balloon page). Zero it, as the
        # kernel would without a handler.
        s = self.session
        try:
            s.backend.zeropage(s.backend.addr(page), s.page_size)
            s.counters.zero_fills += 1
            self._m_zero.inc()
            if s.restore is not None:
                s.restore.zero_filled([page])
        except OSError as e:
            if e.errno == errno.EEXIST:
                return
            if e.errno in _VMM_GONE:
                self._vmm_went_away(e)
                return
            raise

    def _with_neighbours(self, page: int, entry: IndexEntry) -> list[int]:
        n = self.session.policy.prefetch_pages
        if n <= 0:
            return [page]
        bitmap = self.session.index.evicted_bitmap(self.session.vm_id)
        done = (
            self.session.restore.done if self.session.restore is not None else None
        )  # this restore installed them
        out = [page]
        with self._inflight_lock:
            q = page + 1
            while len(out) <= n and q < len(bitmap) and bitmap[q] and (done is None or not done[q]):
                e = self.session.index.get(self.session.vm_id, q)
                if e is None or e.store != entry.store or q in self._inflight:
                    break
                self._inflight.add(q)
                out.append(q)
                q += 1
        return out

    def prefault(self, pages: list[int]) -> int:
        """Restore only: install ``pages`` the guest has not touched yet; returns pages installed.

        Pages in flight (a vCPU's fault) or already installed are skipped. A store outage is
        waited out like a fault's (the restore must not leave a page behind with wrong bytes).
        """
        s = self.session
        r = s.restore
        if r is None:
            raise FailedPrecondition(f"VM {s.vm_id} is not a snapshot restore")
        with self._inflight_lock:
            claimed = [p for p in pages if p not in self._inflight and not r.done[p]]
            self._inflight.update(claimed)
        try:
            found = s.index.entries(s.vm_id, claimed)
            entries = [e for e in found if e is not None]
            zeros = [p for p, e in zip(claimed, found, strict=True) if e is None]
            n = 0
            for store_name in sorted({e.store for e in entries}):
                group = [e for e in entries if e.store == store_name]
                data = self.fetch(group, inline=False)
                if data is None:
                    return n  # session closing
                done = self._fill_runs([e.stored.page for e in group], data)
                if done is None:
                    return n
                got = set(done)
                r.installed(done, sum(e.stored.length for e in group if e.stored.page in got), prefault=True)
                n += len(done)
            done = self._fill_runs(zeros, None)
            if done is None:
                return n
            r.zero_filled(done)
            return n + len(done)
        finally:
            with self._inflight_lock:
                self._inflight.difference_update(claimed)

    def _fill_runs(self, pages: list[int], data: list[bytes] | None) -> list[int] | None:
        """COPY (``data``) or ZEROPAGE (None) ``pages`` with one ioctl per address-contiguous run, then
        wake each run; returns the pages now present, or None if the VMM went away.

        A prefault batch is hundreds of pages: one ioctl per run instead of per page is what makes
        the background prefault faster than the guest's own faults. EEXIST means the whole run is
        present now (the backend installed every other page first).
        """
        b = self.session.backend
        ps = self.session.page_size
        out: list[int] = []
        i = 0
        while i < len(pages):
            j = i + 1
            while j < len(pages) and b.addr(pages[j]) == b.addr(pages[j - 1]) + ps:
                j += 1
            start, length = b.addr(pages[i]), (j - i) * ps
            for attempt in range(2):
                try:
                    if data is None:
                        b.zeropage(start, length, dontwake=True)
                    else:
                        b.copy(start, b"".join(data[i:j]), dontwake=True)
                except OSError as e:
                    if e.errno == errno.EAGAIN and attempt == 0:
                        continue  # the VMM's layout was changing (mmap_changing): retry once
                    if e.errno in _VMM_GONE:
                        self._vmm_went_away(e)
                        return None
                    if e.errno != errno.EEXIST:
                        log.error(
                            "prefault install failed", vm=self.session.vm_id, page=pages[i], error=str(e)
                        )
                        break
                out.extend(pages[i:j])
                self.wake(Installed(copied=pages[i:j]))
                break
            i = j
        return out

    def fetch(self, entries: list[IndexEntry], *, inline: bool, retry: bool = True) -> list[bytes] | None:
        """Get and verify payloads, retrying with backoff while the store is unavailable (unless ``retry``
        is false: then the first error is raised, after it was counted and reported)."""
        s = self.session
        store_name = entries[0].store
        backoff = 0.005
        reported = False
        while not s.closing.is_set():
            try:
                store = s.stores(store_name)
                stored = [e.stored for e in entries]
                data = []
                nonzero = [st for st in stored if st.codec != Codec.ZERO]
                fetched = iter(store.get_pages(s.space, nonzero) if nonzero else [])
                for st in stored:
                    data.append(bytes(s.page_size) if st.codec == Codec.ZERO else next(fetched))
                if reported:
                    log.warning("store recovered; fault served", vm=s.vm_id, store=store_name)
                return data
            except (StoreUnavailable, IntegrityError, NotFound) as e:
                s.counters.store_errors += 1
                kind = type(e).__name__
                s.metrics.store_errors.labels(store_name, "get", kind).inc()
                if isinstance(e, IntegrityError):
                    s.counters.integrity_errors += 1
                missing = isinstance(e, NotFound)
                if not reported:
                    reported = True
                    ev = EventKind.INTEGRITY_ERROR if isinstance(e, IntegrityError) else EventKind.STORE_ERROR
                    what = "an evicted page is MISSING from its store" if missing else "fault waits"
                    s.events.publish(
                        ev,
                        f"{what} ({s.vm_id}): {e}",
                        s.vm_id,
                        store=store_name,
                        page=entries[0].stored.page,
                        missing=str(missing).lower(),
                    )
                    if missing:  # acknowledged pages are gone (a Redis without persistence restarted, ...)
                        s.metrics.pages_missing.labels(s.vm_id, store_name).inc()
                        log.critical(
                            "EVICTED PAGE MISSING FROM ITS STORE",
                            vm=s.vm_id,
                            store=store_name,
                            error=str(e),
                            poison=s.policy.poison_missing,
                        )
                    else:
                        log.error("fault waits on the store", vm=s.vm_id, store=store_name, error=str(e))
                if missing and len(entries) == 1 and self._poisons(retry):
                    raise  # the caller poisons the page instead of waiting
                if not retry or (inline and backoff >= self.max_backoff_s):
                    # Inline (sim replay) has no other thread to wait for: raise rather than hang.
                    raise
                s.closing.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)
            except TiermemError:
                raise
        return None

    def install(self, pages: list[int], data: list[bytes], fault_page: int | None = None) -> Installed:
        """UFFDIO_COPY each page with DONTWAKE; the caller updates the index, then calls :meth:`wake`.

        Waking last means a vCPU never runs on a restored page while the index still lists it as
        evicted. An error on ``fault_page`` is raised; on other (prefetched or drained) pages it only
        leaves that page evicted.
        """
        b = self.session.backend
        out = Installed()
        for p, d in zip(pages, data, strict=True):
            for attempt in range(2):
                try:
                    b.copy(b.addr(p), d, dontwake=True)
                    out.copied.append(p)
                except OSError as e:
                    if e.errno == errno.EEXIST:
                        out.present.append(p)
                    elif e.errno == errno.EAGAIN and attempt == 0:
                        continue  # the VMM's layout was changing (mmap_changing): retry once
                    elif e.errno in _VMM_GONE:
                        self._vmm_went_away(e)
                        return out
                    elif p == fault_page:
                        raise
                break
        return out

    def wake(self, result: Installed) -> None:
        """One UFFDIO_WAKE over the span of installed (or already present) pages."""
        done = result.copied + result.present
        if not done:
            return
        lo, hi = min(done), max(done)
        b = self.session.backend
        ps = self.session.page_size
        spans = [(b.addr(lo), (hi - lo + 1) * ps)]
        if b.addr(hi) - b.addr(lo) != (hi - lo) * ps:
            # Pages on both sides of a hole in the address space (a Firecracker guest's MMIO gap: pages
            # are numbered by snapshot-file offset): one wake per address-contiguous run.
            spans = []
            for p in sorted(done):
                a = b.addr(p)
                if spans and spans[-1][0] + spans[-1][1] == a:
                    spans[-1] = (spans[-1][0], spans[-1][1] + ps)
                elif not spans or spans[-1][0] + spans[-1][1] < a:
                    spans.append((a, ps))
        for start, length in spans:
            try:
                b.wake(start, length)
            except OSError as e:
                if e.errno in _VMM_GONE:
                    self._vmm_went_away(e)
                    return
                log.error(
                    "UFFDIO_WAKE failed", vm=self.session.vm_id, start=hex(start), length=length, error=str(e)
                )


@dataclass
class Installed:
    """What :meth:`FaultServer.install` did: pages it copied in, and pages that were already present."""

    copied: list[int] = field(default_factory=list)
    present: list[int] = field(default_factory=list)
