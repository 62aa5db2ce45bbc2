"""The simulated kernel: guest memory, page tables and a userfaultfd context with RWP semantics.

``SimKernel`` implements :class:`tiermem.kernel.backend.KernelBackend` as mainline Linux 7.3
behaves (mm/userfaultfd.c, fs/proc/task_mmu.c; ``../shared/reference/rwp-uapi.md``) for one VM whose RAM is a
shmem memfd mapped twice: the tracked guest mapping (vCPU accesses, registered with
the uffd) and the I/O mapping (``io_read``/``io_write``, never tracked). Errors are
``OSError(errno, message)`` with the kernel's errno.

State: one byte per page (:mod:`tiermem.sim.mem`: not in the memfd, cached but
unmapped in the guest, protected, accessed) and a short VMA list, so a full-range UFFDIO_RWPROTECT is one numpy pass
and a hot-set PAGEMAP_SCAN (:mod:`tiermem.sim.scan`) a few. Contents follow
:mod:`tiermem.sim.content`: real bytes, or (``synthetic=True``) a u32 counter per
page, materialised on ``io_read`` and decoded on ``copy`` (invalid bytes decode to
``CORRUPT``, so verification still catches them).

Guest side (vCPU threads): ``access``, ``access_batch``, ``read_page``; VMM side:
``madvise`` (DONTNEED keeps the shmem page cache, REMOVE drops it; both raise
UFFD_EVENT_REMOVE). A page in the page cache but unmapped in the guest (an I/O-mapping
write, a DONTNEED) cannot be RWP-protected: an access maps it without any fault, even in
sync mode, unless the VMA is MINOR-registered (then a MINOR fault, resolved by CONTINUE).
A sync fault blocks the thread on its own Condition until woken (RWPROTECT clear, COPY/
ZEROPAGE/CONTINUE without DONTWAKE, WAKE, UNREGISTER of a MISSING-registered range,
every SET_MODE(enable=RWP_ASYNC), which wakes every waiter, MISSING ones included; the
last fd's release); it then retries, re-faulting with a new message if the cause remains
(so MISSING faults repeat after SET_MODE), as ``handle_userfault`` does. Closing the
agent's fd while the VMM holds its own (:meth:`SimKernel.share_with_vmm`) releases nothing. ``set_fault_handler(fn)`` instead calls ``fn(msg)`` in the
faulting thread and retries (deterministic replay).

Fault injection: ``fault_delay_s`` delays every fault once (lock released) before it
is delivered; ``inject_error(op, errno, count)`` fails the next calls of an ioctl.
"""

from __future__ import annotations

import errno
import threading
import time

import numpy as np

from tiermem.errors import InvalidArgument
from tiermem.kernel import uapi
from tiermem.sim.ctx import CORRUPT, SIM_FEATURES, SimContext, SimStats, _Waiter
from tiermem.sim.scan import ST_ACC, ST_CACHED, ST_NONE, ST_PROT
from tiermem.sim.scan import kerr as _err

__all__ = ["CORRUPT", "SIM_FEATURES", "SimKernel", "SimStats"]

_MISSING = uapi.UFFDIO_REGISTER_MODE_MISSING
_MINOR = uapi.UFFDIO_REGISTER_MODE_MINOR
_RWP = uapi.UFFDIO_REGISTER_MODE_RWP
_FIRST_WINDOW = 256


class SimKernel(SimContext):
    """One simulated VM: guest RAM (a shmem memfd mapped twice), its userfaultfd, its vCPUs and VMM."""

    # --- VMM side -------------------------------------------------------------------------------------
    def madvise(self, start: int, length: int, advice: int) -> None:
        """The VMM's madvise on the guest mapping: DONTNEED zaps the PTEs (the shmem page cache and
        so the data stay), REMOVE drops the pages. Both raise UFFD_EVENT_REMOVE on registered VMAs
        when EVENT_REMOVE was negotiated (queued; the kernel's caller would wait for the read)."""
        p0, p1 = self._pages("madvise", start, length)
        if not self._inside(p0, p1):
            raise _err(errno.EINVAL, "madvise: range outside the guest mapping")
        with self._lock:
            if advice == uapi.MADV_DONTNEED:
                self.mem.zap(p0, p1)
            elif advice == uapi.MADV_REMOVE:
                self.mem.punch(p0, p1)
            else:
                raise _err(errno.EINVAL, f"madvise: advice {advice} not modelled")
            registered = any(self._vmas.modes_in(p0, p1))
            if not (self._ctx and self._ctx & uapi.UFFD_FEATURE_EVENT_REMOVE and registered) or self._closed:
                return
            msg = uapi.UffdMsg(uapi.UFFD_EVENT_REMOVE, start=self.addr(p0), end=self.addr(p1))
            handler = self._handler
            if handler is None:
                w = _Waiter(p0, msg, 0, threading.Condition(self._lock))
                w.woken = True  # nobody blocks on it
                self._pending.append(w)
                self._msg_cond.notify_all()
                return
        handler(msg)

    # --- guest side ---------------------------------------------------------------------------------
    def _check_pages(self, pages: np.ndarray) -> None:
        if len(pages) and (int(pages.min()) < 0 or int(pages.max()) >= self.n_pages):
            raise InvalidArgument(f"guest access outside RAM (pages 0..{self.n_pages - 1})")

    def _check_page(self, page: int) -> None:
        if not 0 <= page < self.n_pages:
            raise InvalidArgument(f"guest access to page {page} outside RAM (pages 0..{self.n_pages - 1})")

    def access(self, page: int, write: bool = False, tid: int = 0) -> None:
        """One guest access through the tracked mapping; blocks (or calls the handler) on a fault."""
        self._check_page(page)
        with self._lock:
            self._access_locked(int(page), write, tid)

    def read_page(self, page: int, tid: int = 0) -> bytes:
        """A guest read of a whole page through the tracked mapping (faults like ``access``)."""
        self._check_page(page)
        with self._lock:
            self._access_locked(int(page), False, tid)
            return self.mem.page(int(page))

    def access_batch(self, pages: np.ndarray, writes: np.ndarray | None = None, tid: int = 0) -> None:
        """Guest accesses in order: a numpy pass for runs that cannot fault, one by one for faults."""
        pages = np.asarray(pages, dtype=np.int64)
        if writes is not None:
            writes = np.asarray(writes, dtype=bool)
            if writes.shape != pages.shape:
                raise InvalidArgument("writes must have the same length as pages")
        self._check_pages(pages)
        n, i, win = len(pages), 0, len(pages)
        with self._lock:
            while i < n:
                j = min(n, i + win)
                seg = pages[i:j]
                st = self._state[seg]
                blk = self._blocking(seg, st)
                k = j - i
                if blk is not None and blk[first := int(blk.argmax())]:
                    k = first
                if k:
                    self._apply(seg[:k], st[:k], None if writes is None else writes[i : i + k])
                if i + k == j:
                    i, win = j, win * 4  # no fault in this window: gallop
                    continue
                self._access_locked(int(seg[k]), bool(writes is not None and writes[i + k]), tid)
                i, win = i + k + 1, _FIRST_WINDOW

    def _blocking(self, seg: np.ndarray, st: np.ndarray) -> np.ndarray | None:
        """Mask of accesses that would fault to the handler (MISSING, or RWP in sync mode)."""
        sync = not self.async_mode
        if (mode := self._vmas.single) is not None:
            blk = (st == ST_NONE) if mode & _MISSING else None
            if mode & _MINOR:
                cached = st == ST_CACHED
                blk = cached if blk is None else blk | cached
            if sync and mode & _RWP:
                prot = st == ST_PROT
                blk = prot if blk is None else blk | prot
            return blk
        modes = self._vmas.modes_of(seg)
        mixed: np.ndarray = (st == ST_NONE) & ((modes & _MISSING) != 0)
        mixed |= (st == ST_CACHED) & ((modes & _MINOR) != 0)
        if sync:
            mixed |= st == ST_PROT  # only RWP VMAs hold protected pages
        return mixed

    def _apply(self, seg: np.ndarray, st: np.ndarray, writes: np.ndarray | None) -> None:
        if self.async_mode and (prot := st == ST_PROT).any():
            self.stats.async_resolved += self._distinct(seg[prot])  # a page resolves once
        if (hole := st == ST_NONE).any():
            self.stats.zero_fills += self._distinct(seg[hole])
        if (cached := st == ST_CACHED).any():
            self.stats.cache_maps += self._distinct(seg[cached])
        self.mem.touch(seg, writes)

    def _distinct(self, pages: np.ndarray) -> int:
        if len(pages) * 32 < self.n_pages:
            return len(np.unique(pages))
        seen = np.zeros(self.n_pages, dtype=bool)  # cheaper than sorting a large batch
        seen[pages] = True
        return int(np.count_nonzero(seen))

    def _apply_one(self, page: int, write: bool) -> None:
        st = self._state[page]
        if st == ST_PROT:
            self.stats.async_resolved += 1
        elif st == ST_NONE:
            self.stats.zero_fills += 1
        elif st == ST_CACHED:
            self.stats.cache_maps += 1
        self.mem.touch_one(page, write)

    def _fault_reason(self, page: int) -> int | None:
        st = self._state[page]
        if st == ST_ACC:
            return None
        if st == ST_NONE:
            return 0 if self._vmas.mode_of(page) & _MISSING else None
        if st == ST_CACHED:  # no PTE to carry the RWP marker: only MINOR can trap it
            return uapi.UFFD_PAGEFAULT_FLAG_MINOR if self._vmas.mode_of(page) & _MINOR else None
        return None if self.async_mode else uapi.UFFD_PAGEFAULT_FLAG_RWP

    def _access_locked(self, page: int, write: bool, tid: int) -> None:
        delayed = False
        last_reason: int | None = None
        calls = 0
        while True:
            reason = self._fault_reason(page)
            if reason is None:
                self._apply_one(page, write)
                return
            if self.fault_delay_s > 0 and not delayed:
                delayed = True
                self._lock.release()
                try:
                    time.sleep(self.fault_delay_s)
                finally:
                    self._lock.acquire()
                continue
            if reason == uapi.UFFD_PAGEFAULT_FLAG_RWP:
                self.stats.rwp_faults += 1
            elif reason:
                self.stats.minor_faults += 1
            else:
                self.stats.missing_faults += 1
            assert self._ctx is not None  # a registered range implies a negotiated ctx
            msg = uapi.UffdMsg(
                uapi.UFFD_EVENT_PAGEFAULT,
                flags=reason | (uapi.UFFD_PAGEFAULT_FLAG_WRITE if write else 0),
                address=self.addr(page),
                ptid=tid if self._ctx & uapi.UFFD_FEATURE_THREAD_ID else 0,
            )
            handler = self._handler
            if handler is None:
                self._block(page, msg, reason)
                continue
            # The handler must resolve what it was given; a different fault after it (an RWP
            # fault on a page the handler evicted turns MISSING) gets another call, up to 3.
            if last_reason == reason or calls >= 3:
                raise RuntimeError(f"fault handler did not resolve {msg}")
            last_reason = reason
            calls += 1
            self.stats.handler_calls += 1
            self._lock.release()
            try:
                handler(msg)
            finally:
                self._lock.acquire()

    def _block(self, page: int, msg: uapi.UffdMsg, reason: int) -> None:
        w = _Waiter(page, msg, reason, threading.Condition(self._lock))
        self._waiters.append(w)
        self._pending.append(w)
        self._msg_cond.notify_all()
        try:
            while not w.woken:
                w.cond.wait()
        finally:
            self._waiters.remove(w)
            if w.queued:
                self._pending.remove(w)  # never read: the kernel drops it with the wait entry
