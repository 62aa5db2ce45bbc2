"""The ``uffd`` backend: stock kernels, RWP emulated with MINOR faults on a memfd.

The VMM registers its guest mapping MISSING|MINOR and hands over ``[uffd, memfd]``
(:mod:`tiermem.handoff.listener`). The agent drives this backend with the same calls as
the sim and the ``rwp`` backend; underneath:

* ``rwprotect(protect=True)`` marks the range protected, then asks the VMM over
  the control channel to zap the guest PTEs (``MADV_DONTNEED`` inside the VMM:
  ``process_madvise`` from outside does not zap shmem PTEs) and waits for the ack.
  The page cache keeps the data, so the next guest touch is a MINOR fault.
* "Async" mode: a MINOR fault on a protected page is an access; the backend
  records it and maps the page back with UFFDIO_CONTINUE itself, without a message.
* Sync mode (``set_mode(disable=RWP_ASYNC)``): the same fault is surfaced as a
  pagefault message with ``UFFD_PAGEFAULT_FLAG_RWP`` (|WRITE) and the vCPU waits
  until ``rwprotect(protect=False)`` (CONTINUE + wake) or ``set_mode(enable=...)``.
* ``pagemap_scan`` reports ``PAGE_IS_PRESENT|FILE`` for pages in the memfd (protected
  ones are zapped but trap through MINOR, so they count as present and protected) and
  ``PAGE_IS_ACCESSED`` for those not protected (touched or installed since the last
  protect, or never protected); pages not in the memfd have no category, so an
  inverted scan reports them with categories 0, as mainline does.
* REMOVE events caused by our own zaps (EVENT_REMOVE is negotiated for balloons)
  are recognised and swallowed; other REMOVE/UNMAP events are surfaced so the
  agent can drop index entries of ranges the guest gave up.

:class:`MissingOnlyBackend` serves Firecracker's handshake: one uffd over private
anonymous memory, MISSING faults only (lazy restore), no tracking, no eviction.
"""

from __future__ import annotations

import bisect
import errno
import time
from collections.abc import Sequence

import numpy as np
import structlog

from tiermem.errors import InvalidArgument, KernelError, Unavailable
from tiermem.kernel import uapi
from tiermem.kernel.backend import ApiInfo, Region, ScanResult
from tiermem.kernel.uapi import UffdMsg
from tiermem.kernel.uffd_base import ControlChannel, RealBackend, emulate_scan
from tiermem.kernel.uffd_ioctl import IoctlFn

__all__ = ["EMULATED_FEATURES", "FD_IOCTLS", "MissingOnlyBackend", "UffdBackend"]

log = structlog.get_logger(__name__)

EMULATED_FEATURES = uapi.UFFD_FEATURE_RWP | uapi.UFFD_FEATURE_RWP_ASYNC
"""What the uffd backend adds to the kernel's features by emulation."""
FD_IOCTLS = (
    (1 << uapi._UFFDIO_REGISTER)
    | (1 << uapi._UFFDIO_UNREGISTER)
    | (1 << uapi._UFFDIO_SET_MODE)
    | (1 << uapi._UFFDIO_API)
)
_UFFD_MODE_NEEDS = uapi.UFFD_FEATURE_MISSING_SHMEM | uapi.UFFD_FEATURE_MINOR_SHMEM
_SCAN_CATS = uapi.PAGE_IS_PRESENT | uapi.PAGE_IS_FILE


def _einval(why: str) -> OSError:
    return OSError(errno.EINVAL, why)


class UffdBackend(RealBackend):
    """Guest memory in a memfd, MISSING|MINOR registered by the VMM; RWP emulated."""

    name = "uffd"

    def __init__(
        self,
        uffd_fd: int,
        memfd: int,
        regions: Sequence[Region],
        control: ControlChannel,
        *,
        vmm_pid: int | None = None,
        features: int = 0,
        ioctl: IoctlFn | None = None,
        zap_timeout: float = 10.0,
    ) -> None:
        features = features or _UFFD_MODE_NEEDS
        if features & _UFFD_MODE_NEEDS != _UFFD_MODE_NEEDS:
            raise InvalidArgument(
                "uffd mode needs the VMM to negotiate MISSING_SHMEM and MINOR_SHMEM; it reported "
                + ", ".join(uapi.feature_names(features))
            )
        super().__init__(
            uffd_fd, memfd, regions, control=control, vmm_pid=vmm_pid, features=features, ioctl=ioctl
        )
        self._control = control
        self.zap_timeout = zap_timeout
        self.available = features | EMULATED_FEATURES
        self._api_features: int | None = None
        self._async = False
        self._rwp = np.zeros(self.n_pages, dtype=bool)  # emulated MODE_RWP registration
        self._protected = np.zeros(self.n_pages, dtype=bool)  # zapped, not accessed since
        self._pending: dict[int, int] = {}  # page -> surfaced, unresolved RWP faults
        self._zapping: list[tuple[int, int]] = []  # [start, end) of zaps awaiting their ack
        self.stats.update({"zaps": 0, "zap_echoes": 0})
        self.wake_all()

    # --- negotiation and registration ---------------------------------------------------------
    def api(self, features: int) -> ApiInfo:
        """Emulated UFFDIO_API: the VMM already negotiated; RWP and RWP_ASYNC are emulated."""
        with self._state_lock:
            if self._api_features is not None:
                raise _einval("UFFDIO_API already called on this uffd")
            if features & uapi.UFFD_FEATURE_RWP_ASYNC and not features & uapi.UFFD_FEATURE_RWP:
                raise _einval("RWP_ASYNC requires RWP")
            if features & ~self.available:
                missing = uapi.feature_names(features & ~self.available)
                raise _einval(f"features not available on this uffd: {', '.join(missing)}")
            self._api_features = features
            self._async = bool(features & uapi.UFFD_FEATURE_RWP_ASYNC)
            return ApiInfo(features=self.available, ioctls=FD_IOCTLS)

    def register(self, start: int, length: int, mode: int) -> int:
        """Re-registers MISSING|MINOR for real (idempotent) and MODE_RWP by emulation."""
        self._check_range(start, length)
        allowed = uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_MINOR
        allowed |= uapi.UFFDIO_REGISTER_MODE_RWP
        if mode & uapi.UFFDIO_REGISTER_MODE_WP and mode & uapi.UFFDIO_REGISTER_MODE_RWP:
            raise _einval("MODE_WP and MODE_RWP are exclusive")
        if not mode or mode & ~allowed:
            raise _einval(f"register mode {mode:#x} unsupported by the uffd backend")
        rwp = bool(mode & uapi.UFFDIO_REGISTER_MODE_RWP)
        with self._state_lock:
            if rwp and not (self._api_features or 0) & uapi.UFFD_FEATURE_RWP:
                raise _einval("MODE_RWP needs UFFD_FEATURE_RWP from UFFDIO_API")
            sl = self._pages(start, length)
            if not rwp and self._rwp[sl].any():
                raise OSError(errno.EBUSY, "re-registering would drop MODE_RWP: unregister first")
            ioctls = self._uffd.register(
                start, length, uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_MINOR
            )
            if rwp:
                self._rwp[sl] = True
                ioctls |= 1 << uapi._UFFDIO_RWPROTECT
            return ioctls

    def unregister(self, start: int, length: int) -> None:
        """Resolves pending faults, drops the emulation, and unregisters the range for real.

        Only after a drain: unregistered, a punched page reads as zeroes.
        """
        self._check_range(start, length)
        with self._state_lock:
            sl = self._pages(start, length)
            self._resolve_pending(sl.start, sl.stop)
            self._rwp[sl] = False
            self._protected[sl] = False
            self._uffd.unregister(start, length)

    # --- tracking -------------------------------------------------------------------------------
    def rwprotect(self, start: int, length: int, *, protect: bool, dontwake: bool = False) -> None:
        """Protect: mark, then have the VMM zap the PTEs. Resolve: CONTINUE pending faults and wake."""
        self._check_range(start, length)
        if protect and dontwake:
            raise _einval("MODE_RWP and MODE_DONTWAKE are exclusive")
        sl = self._pages(start, length)
        with self._state_lock:
            if not self._rwp[sl].all():
                raise OSError(errno.ENOENT, "range is not registered with MODE_RWP")
            if not protect:
                self._protected[sl] = False
                self._resolve_pending(sl.start, sl.stop, dontwake=True)
                if not dontwake:
                    self._uffd.wake(start, length)
                return
            # Mark before zapping: a touch after the zap must find the page protected.
            self._protected[sl] = True
            zap = (start, start + length)
            self._zapping.append(zap)
        try:
            self._zap(start, length)
        except BaseException:
            with self._state_lock:  # the PTEs may still be mapped: never report them cold
                self._protected[sl] = False
            raise
        finally:
            with self._state_lock:  # after the ack: its REMOVE echoes were read under this lock
                if self._native is not None:
                    # The native thread may have read an echo that no one handled yet: handle
                    # everything it read while the zap is still known.
                    self._service_events()
                self._zapping.remove(zap)

    def _zap(self, start: int, length: int) -> None:
        pending = self._control.zap_start([(start, length)])
        deadline = time.monotonic() + self.zap_timeout
        # With EVENT_REMOVE, the VMM's madvise blocks until its REMOVE event is read; read it
        # here too in case the agent's fault thread is not in read_messages right now.
        while not pending.wait(0.002):
            self._service_events()
            if self._gone:
                raise OSError(errno.ESRCH, "the VMM went away during a zap")
            if time.monotonic() > deadline:
                raise OSError(errno.ETIMEDOUT, f"the VMM did not ack a zap within {self.zap_timeout}s")
        try:
            pending.result()
        except Unavailable as e:
            self._mark_gone(f"zap: {e}")
            raise OSError(errno.ESRCH, f"the VMM went away: {e}") from None
        except KernelError as e:
            raise OSError(e.errno or errno.EIO, f"VMM zap failed: {e}") from None
        self.stats["zaps"] += 1

    def set_mode(self, *, enable: int = 0, disable: int = 0) -> None:
        """Toggle emulated RWP_ASYNC; disabling first takes the faults already queued as async."""
        if self._closed or self._gone:
            raise OSError(errno.ESRCH, "the VMM is gone or the backend is closed")
        if enable & disable:
            raise _einval("a bit in both enable and disable")
        if (enable | disable) & ~uapi.UFFD_FEATURE_RWP_ASYNC:
            raise _einval("only UFFD_FEATURE_RWP_ASYNC can be toggled")
        with self._state_lock:
            if not (self._api_features or 0) & uapi.UFFD_FEATURE_RWP:
                raise _einval("RWP was not negotiated")
            if disable and self._async:
                self._read_and_process()  # faults that happened before the freeze count as async
                self._async = False
            if enable and not self._async:
                self._async = True
                self._resolve_pending(0, self.n_pages)
        if self._out:
            self._kick_reader()

    def pagemap_scan(
        self,
        start: int,
        end: int,
        *,
        category_mask: int = 0,
        category_inverted: int = 0,
        category_anyof_mask: int = 0,
        return_mask: int = 0,
        max_pages: int = 0,
        vec_len: int = 0,
    ) -> ScanResult:
        """Emulated PAGEMAP_SCAN: PRESENT|FILE for pages in the memfd, ACCESSED if not protected."""
        if self._closed or self._gone:
            raise OSError(errno.ESRCH, "the VMM is gone or the backend is closed")
        with self._state_lock:
            pop = self.populated()
            cats = np.where(pop, np.uint64(_SCAN_CATS), np.uint64(0))
            accessed = pop & self._rwp & ~self._protected
            cats[accessed] |= np.uint64(uapi.PAGE_IS_ACCESSED)
        # As mainline 7.3: a page not in the memfd has no category, so an inverted or empty-mask scan
        # reports it (categories 0); "not accessed" alone never means "protected".
        eligible = np.ones_like(pop)
        return emulate_scan(
            self.base,
            self.page_size,
            cats,
            eligible,
            start,
            end,
            category_mask=category_mask,
            category_inverted=category_inverted,
            category_anyof_mask=category_anyof_mask,
            return_mask=return_mask,
            max_pages=max_pages,
            vec_len=vec_len,
        )

    # --- internals (state lock held) -------------------------------------------------------------
    def _resolve_pending(self, p0: int, p1: int, *, dontwake: bool = False) -> None:
        for p in [p for p in self._pending if p0 <= p < p1]:
            del self._pending[p]
            self._protected[p] = False
            self._resolve_page(p, dontwake=dontwake)

    def _resolve_page(self, p: int, *, dontwake: bool) -> None:
        """CONTINUE one page; if it is mapped already (EEXIST) or was punched (EFAULT), just wake:
        the thread retries and, for a punched page, faults MISSING."""
        addr = self.addr(p)
        mode = uapi.UFFDIO_CONTINUE_MODE_DONTWAKE if dontwake else 0
        try:
            self._fill("continue", addr, self.page_size, mode, dontwake)
        except OSError as e:
            if e.errno == errno.EFAULT:
                if not dontwake:
                    self._uffd.wake(addr, self.page_size)
            elif e.errno in (errno.ESRCH, errno.ENOSPC, errno.EBADF):
                self._mark_gone(f"CONTINUE: {e.strerror}")
            else:
                raise

    def _installed(self, start: int, length: int) -> None:
        sl = self._pages(start, length)
        self._protected[sl] = False
        if self._pending:
            for p in range(sl.start, sl.stop):
                self._pending.pop(p, None)

    def _removed(self, start: int, end: int) -> None:
        s = max(start, self.base)
        e = min(end, self.base + self.size)
        if e > s:
            self._protected[(s - self.base) // self.page_size : (e - self.base) // self.page_size] = False

    def _is_echo(self, start: int, end: int) -> bool:
        return any(zs <= start and end <= ze for zs, ze in self._zapping)

    def _handle(self, msg: UffdMsg) -> UffdMsg | None:
        if msg.event == uapi.UFFD_EVENT_PAGEFAULT and msg.flags & uapi.UFFD_PAGEFAULT_FLAG_MINOR:
            p = (msg.address - self.base) // self.page_size
            if 0 <= p < self.n_pages:
                if self._rwp[p] and self._protected[p] and not self._async:
                    self._pending[p] = self._pending.get(p, 0) + 1
                    self.stats["rwp"] += 1
                    flags = uapi.UFFD_PAGEFAULT_FLAG_RWP | (msg.flags & uapi.UFFD_PAGEFAULT_FLAG_WRITE)
                    return UffdMsg(msg.event, flags=flags, address=self.addr(p), ptid=msg.ptid)
                self._protected[p] = False  # an access: recorded for PAGE_IS_ACCESSED
                self.stats["minor"] += 1
                try:
                    self._resolve_page(p, dontwake=False)
                except OSError as e:
                    log.error("uffd backend: CONTINUE failed", address=hex(self.addr(p)), error=str(e))
                return None
        if msg.event == uapi.UFFD_EVENT_REMOVE and self._is_echo(msg.start, msg.end):
            self.stats["zap_echoes"] += 1
            return None
        return super()._handle(msg)

    def _before_close(self) -> None:
        with self._state_lock:
            self._resolve_pending(0, self.n_pages)


class MissingOnlyBackend(RealBackend):
    """Firecracker's handshake: one uffd over private anonymous memory; MISSING faults only.

    No memfd, so nothing can be tracked, read or punched: ``tracking`` is False and
    ``rwprotect``/``set_mode``/``pagemap_scan``/``punch_hole``/``io_*`` raise
    EOPNOTSUPP. Faults are served with COPY/ZEROPAGE (lazy restore from a store).

    Pages are numbered by their offset in the **snapshot memory file** (the regions'
    ``offset`` fields), not by their distance from the first region: page ``p`` is
    file bytes ``[p * page_size, (p + 1) * page_size)``, so a snapshot imported page by
    page is served page by page whatever holes (collapsed MMIO gaps) separate the regions
    in Firecracker's address space. Addresses in a hole have no page (``page_of`` is -1).

    ``populated`` is the set of pages installed since the handshake, minus REMOVEd ranges
    (balloon): after a REMOVE the guest reads zeroes there, so the agent must drop its
    index entries for the range and answer the next fault with ZEROPAGE.
    """

    name = "uffd-missing"
    tracking = False
    anonymous = True

    def __init__(
        self,
        uffd_fd: int,
        regions: Sequence[Region],
        control: ControlChannel | None = None,
        *,
        vmm_pid: int | None = None,
        features: int = 0,
        ioctl: IoctlFn | None = None,
    ) -> None:
        super().__init__(
            uffd_fd, None, regions, control=control, vmm_pid=vmm_pid, features=features, ioctl=ioctl
        )
        self._by_addr = sorted(self.regions, key=lambda r: r.base_host_virt_addr)
        self._starts = [r.base_host_virt_addr for r in self._by_addr]
        self._by_offset = sorted(self.regions, key=lambda r: r.offset)
        self._offsets = [r.offset for r in self._by_offset]
        for a, b in zip(self._by_offset, self._by_offset[1:], strict=False):
            if a.offset + a.size > b.offset:
                self._release(close_fds=False)
                raise InvalidArgument(f"regions overlap in the snapshot file at offset {b.offset:#x}")
        self._file_pages = max(r.offset + r.size for r in self.regions) // self.page_size
        self._present = np.zeros(self._file_pages, dtype=bool)
        self._api_done = False
        self.wake_all()

    @property
    def n_pages(self) -> int:
        """Pages of the snapshot memory file the regions cover (its size, holes in the file included)."""
        return self._file_pages

    def addr(self, page: int) -> int:
        """Address in the VMM of snapshot-file page ``page`` (InvalidArgument if no region holds it)."""
        off = page * self.page_size
        i = bisect.bisect_right(self._offsets, off) - 1
        if i < 0 or off >= self._by_offset[i].offset + self._by_offset[i].size:
            raise InvalidArgument(f"page {page} of the snapshot file is in no guest region")
        r = self._by_offset[i]
        return r.base_host_virt_addr + off - r.offset

    def _region_at(self, addr: int) -> Region | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or addr >= self._by_addr[i].base_host_virt_addr + self._by_addr[i].size:
            return None
        return self._by_addr[i]

    def page_of(self, addr: int) -> int:
        """Snapshot-file page of address ``addr``; -1 in a hole or outside guest memory."""
        r = self._region_at(addr)
        return -1 if r is None else (r.offset + addr - r.base_host_virt_addr) // self.page_size

    def page_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """Snapshot-file pages ``[first, last)`` of each region part of the address range."""
        out = []
        for r in self._by_addr:
            s = max(start, r.base_host_virt_addr)
            e = min(end, r.base_host_virt_addr + r.size)
            if e > s:
                first = (r.offset + s - r.base_host_virt_addr) // self.page_size
                out.append(
                    (first, (r.offset + e - r.base_host_virt_addr + self.page_size - 1) // self.page_size)
                )
        return out

    def snapshot_offset(self, addr: int) -> int:
        """Offset of guest address ``addr`` in the snapshot memory file (the region ``offset`` field)."""
        r = self._region_at(addr)
        if r is None:
            raise InvalidArgument(f"address {addr:#x} is in no guest region")
        return r.offset + addr - r.base_host_virt_addr

    def _pages(self, start: int, length: int) -> slice:
        p = self.page_of(start)  # ranges are inside one region (_check_range)
        return slice(p, p + length // self.page_size)

    def _check_range(self, start: int, length: int) -> None:
        super()._check_range(start, length)
        # The span covers holes between regions (MMIO gaps): an ioctl there would be ENOENT.
        if not any(
            r.base_host_virt_addr <= start and start + length <= r.base_host_virt_addr + r.size
            for r in self.regions
        ):
            raise OSError(errno.EINVAL, f"range {start:#x}+{length:#x} is not inside one guest region")

    def _nope(self, what: str) -> OSError:
        return OSError(
            errno.EOPNOTSUPP,
            f"{what}: Firecracker-mode guests (private anonymous memory) only serve MISSING faults",
        )

    def api(self, features: int) -> ApiInfo:
        """The VMM negotiated already; only features it reported (none in Firecracker's handshake)."""
        with self._state_lock:
            if self._api_done:
                raise _einval("UFFDIO_API already called on this uffd")
            if features & ~self.features:
                raise _einval(
                    f"features not available: {', '.join(uapi.feature_names(features & ~self.features))}"
                )
            self._api_done = True
            return ApiInfo(features=self.features, ioctls=FD_IOCTLS & ~(1 << uapi._UFFDIO_SET_MODE))

    def register(self, start: int, length: int, mode: int) -> int:
        """MODE_MISSING only (re-registers for real; the VMM registered it already)."""
        self._check_range(start, length)
        if mode != uapi.UFFDIO_REGISTER_MODE_MISSING:
            raise self._nope(f"register mode {mode:#x}")
        with self._state_lock:
            return self._uffd.register(start, length, mode)

    def unregister(self, start: int, length: int) -> None:
        """UFFDIO_UNREGISTER."""
        self._check_range(start, length)
        with self._state_lock:
            self._uffd.unregister(start, length)

    def rwprotect(self, start: int, length: int, *, protect: bool, dontwake: bool = False) -> None:
        """Unsupported: EOPNOTSUPP."""
        raise self._nope("rwprotect")

    def set_mode(self, *, enable: int = 0, disable: int = 0) -> None:
        """Unsupported: EOPNOTSUPP."""
        raise self._nope("set_mode")

    def pagemap_scan(
        self,
        start: int,
        end: int,
        *,
        category_mask: int = 0,
        category_inverted: int = 0,
        category_anyof_mask: int = 0,
        return_mask: int = 0,
        max_pages: int = 0,
        vec_len: int = 0,
    ) -> ScanResult:
        """Unsupported: EOPNOTSUPP."""
        raise self._nope("pagemap_scan")

    def populated(self) -> np.ndarray:
        """Pages installed by COPY/ZEROPAGE since the handshake, minus REMOVEd ranges."""
        with self._state_lock:
            return self._present.copy()

    def _installed(self, start: int, length: int) -> None:
        self._present[self._pages(start, length)] = True

    def _removed(self, start: int, end: int) -> None:
        for first, last in self.page_ranges(start, end):
            self._present[first:last] = False
