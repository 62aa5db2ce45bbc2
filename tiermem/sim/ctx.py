"""The simulated kernel's userfaultfd context: the ioctls, messages and fd release.

:class:`SimContext` is everything of :class:`tiermem.sim.kernel.SimKernel` but the guest
and VMM sides (accesses, faults, madvise), which :mod:`tiermem.sim.kernel` adds. The
behaviour follows mainline Linux 7.3; see that module for the model.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tiermem.errors import InvalidArgument
from tiermem.kernel import uapi
from tiermem.kernel.backend import ApiInfo, KernelBackend, ScanResult
from tiermem.sim.mem import CORRUPT, SimMemory, VmaList
from tiermem.sim.scan import (
    ST_CACHED,
    ST_NONE,
    check_scan_args,
    check_scan_flags,
    limit_regions,
    scan_regions,
    scan_runs,
    to_regions,
)
from tiermem.sim.scan import kerr as _err

__all__ = ["CORRUPT", "SIM_FEATURES", "SimContext", "SimStats"]

SIM_FEATURES = (
    uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    | uapi.UFFD_FEATURE_EVENT_REMOVE
    | uapi.UFFD_FEATURE_MISSING_SHMEM
    | uapi.UFFD_FEATURE_THREAD_ID
    | uapi.UFFD_FEATURE_MINOR_SHMEM
    | uapi.UFFD_FEATURE_EXACT_ADDRESS
    | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    | uapi.UFFD_FEATURE_RWP
    | uapi.UFFD_FEATURE_RWP_ASYNC
)
"""What the modelled kernel offers for a shmem memfd. WP async tracking and fork/remap
events are not modelled, so they are not offered."""

_MISSING = uapi.UFFDIO_REGISTER_MODE_MISSING
_RWP = uapi.UFFDIO_REGISTER_MODE_RWP
_WP = uapi.UFFDIO_REGISTER_MODE_WP
_MINOR = uapi.UFFDIO_REGISTER_MODE_MINOR
_MODES = _MISSING | _WP | _MINOR | _RWP
_OPS = frozenset(
    {
        "api",
        "register",
        "unregister",
        "rwprotect",
        "set_mode",
        "pagemap_scan",
        "copy",
        "zeropage",
        "continue",
        "wake",
        "punch_hole",
        "io_read",
        "io_write",
    }
)


@dataclass
class SimStats:
    """What happened on the guest side (for tests and benchmarks)."""

    rwp_faults: int = 0
    """Sync RWP faults raised (each retry counts)."""
    missing_faults: int = 0
    """MISSING faults raised (each retry counts)."""
    minor_faults: int = 0
    """MINOR faults raised on cached-but-unmapped pages of MINOR-registered VMAs."""
    cache_maps: int = 0
    """Cached-but-unmapped pages mapped by an access without any fault (not MINOR-registered)."""
    async_resolved: int = 0
    """Accesses to protected pages auto-resolved in RWP_ASYNC mode."""
    zero_fills: int = 0
    """Unpopulated pages filled with zeros by an access (no MISSING registration)."""
    handler_calls: int = 0


class _Waiter:
    __slots__ = ("cond", "msg", "page", "queued", "reason", "woken")

    def __init__(self, page: int, msg: uapi.UffdMsg, reason: int, cond: threading.Condition) -> None:
        self.page = page
        self.msg = msg
        self.reason = reason
        self.cond = cond
        self.woken = False
        self.queued = True


class SimContext(KernelBackend):
    """Guest RAM (a shmem memfd mapped twice) and its userfaultfd: the ioctl side of :class:`SimKernel`."""

    name = "sim"

    def __init__(
        self,
        n_pages: int,
        *,
        page_size: int = 4096,
        base: int = 0x7F00_0000_0000,
        synthetic: bool = False,
        populated: bool = True,
        features: int = SIM_FEATURES,
    ) -> None:
        if n_pages <= 0:
            raise InvalidArgument(f"n_pages must be > 0, got {n_pages}")
        if page_size < 64 or page_size & (page_size - 1):
            raise InvalidArgument(f"page_size must be a power of two >= 64, got {page_size}")
        if base % page_size or base <= 0:
            raise InvalidArgument(f"base {base:#x} must be a positive multiple of the page size")
        super().__init__(base, n_pages * page_size, page_size)
        self.synthetic = synthetic
        self.kernel_features = features
        self.mem = SimMemory(n_pages, page_size, synthetic=synthetic, populated=populated)
        """The memfd's pages and the guest PTE state (read it only with the lock held, or quiescent)."""
        self._state = self.mem.state
        self._lock = threading.Lock()
        self._msg_cond = threading.Condition(self._lock)
        self._vmas = VmaList(n_pages)
        self._ctx: int | None = None  # negotiated features; None until UFFDIO_API succeeds
        self._closed = False
        self._vmm_fd = False  # the VMM holds its own fd of this context
        self._waiters: list[_Waiter] = []
        self._pending: deque[_Waiter] = deque()
        self._handler: Callable[[uapi.UffdMsg], object] | None = None
        self._fail: dict[str, list[int]] = {}
        self.fault_delay_s = 0.0
        """Delay (seconds) applied once to every fault before it is delivered, lock released."""
        self.stats = SimStats()

    # --- plumbing -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def async_mode(self) -> bool:
        """True while RWP faults auto-resolve (UFFD_FEATURE_RWP_ASYNC is set on the ctx)."""
        return bool(self._ctx and self._ctx & uapi.UFFD_FEATURE_RWP_ASYNC)

    def state_bytes_per_page(self) -> tuple[int, int]:
        """(tracking state bytes per page, content bytes per page)."""
        return self.mem.bytes_per_page()

    def inject_error(self, op: str, err: int, count: int = 1) -> None:
        """Make the next ``count`` calls of ``op`` (an ioctl/backend method name) raise OSError(err)."""
        if op not in _OPS:
            raise InvalidArgument(f"unknown operation {op!r}; use one of {', '.join(sorted(_OPS))}")
        with self._lock:
            self._fail.setdefault(op, []).extend([err] * count)

    def set_fault_handler(self, fn: Callable[[uapi.UffdMsg], object] | None) -> None:
        """Inline mode: faults that would block call ``fn(msg)`` in the faulting thread, then retry."""
        self._handler = fn

    def _injected(self, op: str) -> None:
        if self._fail.get(op):
            with self._lock:
                queue = self._fail.get(op)
                if queue:
                    raise _err(queue.pop(0), f"{op} (injected)")

    def _enter(self, op: str, *, init: bool = True) -> None:
        """Checks of every uffd ioctl: fd open, UFFDIO_API done (else EINVAL), injected errors."""
        if self._closed:
            raise _err(errno.EBADF, op)
        if init and self._ctx is None:
            raise _err(errno.EINVAL, f"{op} before UFFDIO_API")
        self._injected(op)

    def _pages(self, op: str, start: int, length: int) -> tuple[int, int]:
        """validate_range: aligned, non-empty; returns the page span (may lie outside the mapping)."""
        if start < 0 or length <= 0 or start % self.page_size or length % self.page_size:
            raise _err(errno.EINVAL, f"{op} [{start:#x}, +{length:#x})")
        p0 = (start - self.base) // self.page_size
        return p0, p0 + length // self.page_size

    def _inside(self, p0: int, p1: int) -> bool:
        return p0 >= 0 and p1 <= self.n_pages

    def _wake(self, p0: int, p1: int, reason: int | None = None) -> None:
        for w in self._waiters:
            if p0 <= w.page < p1 and (reason is None or w.reason == reason) and not w.woken:
                w.woken = True
                w.cond.notify()

    # --- negotiation and registration ---------------------------------------------------------
    def api(self, features: int) -> ApiInfo:
        self._enter("api", init=False)
        with self._lock:
            if self._ctx is not None:
                raise _err(errno.EINVAL, "UFFDIO_API called twice")
            if features & ~self.kernel_features:
                raise _err(
                    errno.EINVAL, f"UFFDIO_API: unsupported features {features & ~self.kernel_features:#x}"
                )
            if features & uapi.UFFD_FEATURE_RWP_ASYNC and not features & uapi.UFFD_FEATURE_RWP:
                raise _err(errno.EINVAL, "UFFDIO_API: RWP_ASYNC requires RWP")
            self._ctx = features
        return ApiInfo(self.kernel_features, uapi.UFFD_API_IOCTLS)

    def register(self, start: int, length: int, mode: int) -> int:
        self._enter("register")
        if mode == 0 or mode & ~_MODES:
            raise _err(errno.EINVAL, f"UFFDIO_REGISTER: bad mode {mode:#x}")
        if mode & _WP and mode & _RWP:
            raise _err(errno.EINVAL, "UFFDIO_REGISTER: MODE_WP and MODE_RWP are exclusive")
        assert self._ctx is not None
        if mode & _RWP and not self._ctx & uapi.UFFD_FEATURE_RWP:
            raise _err(errno.EINVAL, "UFFDIO_REGISTER: MODE_RWP without UFFD_FEATURE_RWP")
        if (
            mode & uapi.UFFDIO_REGISTER_MODE_MINOR
            and not self.kernel_features & uapi.UFFD_FEATURE_MINOR_SHMEM
        ):
            raise _err(errno.EINVAL, "UFFDIO_REGISTER: MODE_MINOR unsupported")
        p0, p1 = self._pages("UFFDIO_REGISTER", start, length)
        if not self._inside(p0, p1):
            raise _err(errno.EINVAL, "UFFDIO_REGISTER: range outside the guest mapping")
        with self._lock:
            for old in self._vmas.modes_in(p0, p1):
                dropped = old & (_WP | _RWP) & ~mode
                if dropped:
                    raise _err(errno.EBUSY, "UFFDIO_REGISTER: re-registration would drop WP/RWP")
            self._vmas.set(p0, p1, mode)
        ioctls = uapi.UFFD_API_RANGE_IOCTLS
        if not mode & uapi.UFFDIO_REGISTER_MODE_MINOR:
            ioctls &= ~(1 << uapi._UFFDIO_CONTINUE)
        if not mode & _WP:
            ioctls &= ~(1 << uapi._UFFDIO_WRITEPROTECT)
        if not mode & _RWP:
            ioctls &= ~(1 << uapi._UFFDIO_RWPROTECT)
        return ioctls

    def unregister(self, start: int, length: int) -> None:
        self._enter("unregister")
        p0, p1 = self._pages("UFFDIO_UNREGISTER", start, length)
        if not self._inside(p0, p1):
            raise _err(errno.EINVAL, "UFFDIO_UNREGISTER: range outside the guest mapping")
        with self._lock:
            missing = [(max(s, p0), min(e, p1)) for s, e, m in self._vmas.overlapping(p0, p1) if m & _MISSING]
            self.mem.resolve(p0, p1)  # protection never outlives the registration
            self._vmas.set(p0, p1, 0)
            for a, b in missing:  # userfaultfd_unregister wakes only MISSING-registered VMAs
                self._wake(a, b)

    # --- tracking -----------------------------------------------------------------------------
    def rwprotect(self, start: int, length: int, *, protect: bool, dontwake: bool = False) -> None:
        self._enter("rwprotect")
        if protect and dontwake:
            raise _err(errno.EINVAL, "UFFDIO_RWPROTECT: MODE_RWP with MODE_DONTWAKE")
        p0, p1 = self._pages("UFFDIO_RWPROTECT", start, length)
        with self._lock:
            if not self._inside(p0, p1) or any(not m & _RWP for m in self._vmas.modes_in(p0, p1)):
                raise _err(errno.ENOENT, "UFFDIO_RWPROTECT: range not entirely RWP-registered")
            if protect:
                self.mem.protect(p0, p1)
            else:
                self.mem.resolve(p0, p1)
                if not dontwake:
                    self._wake(p0, p1)

    def set_mode(self, *, enable: int = 0, disable: int = 0) -> None:
        self._enter("set_mode")
        if enable & disable:
            raise _err(errno.EINVAL, "UFFDIO_SET_MODE: a bit is both enabled and disabled")
        if (enable | disable) & ~uapi.UFFD_FEATURE_RWP_ASYNC:
            raise _err(errno.EINVAL, "UFFDIO_SET_MODE: only UFFD_FEATURE_RWP_ASYNC can be toggled")
        if not self.kernel_features & uapi.UFFD_FEATURE_RWP:
            raise _err(errno.EINVAL, "UFFDIO_SET_MODE: RWP unsupported")
        assert self._ctx is not None
        if enable and not self._ctx & uapi.UFFD_FEATURE_RWP:
            raise _err(errno.EINVAL, "UFFDIO_SET_MODE: RWP_ASYNC on a ctx without UFFD_FEATURE_RWP")
        # Taking the lock drains in-flight accesses (the kernel's mmap_write_lock + vma_start_write).
        with self._lock:
            self._ctx = (self._ctx | enable) & ~disable
            if enable:
                # Every call, async already or not, wakes every waiter of the context: RWP ones
                # auto-resolve, MISSING/MINOR ones fault again (a duplicate message).
                self._wake(0, self.n_pages)

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
        flags: int = 0,
        size: int = 96,
    ) -> ScanResult:
        """PAGEMAP_SCAN; ``flags`` and ``size`` are the pm_scan_arg fields (checked like the kernel)."""
        self._injected("pagemap_scan")
        masks = (category_mask, category_inverted, category_anyof_mask, return_mask)
        end = check_scan_args(
            start,
            end,
            self.page_size,
            flags=flags,
            size=size,
            masks=masks,
            max_pages=max_pages,
            vec_len=vec_len,
        )
        p0 = max(0, (start - self.base) // self.page_size)
        p1 = min(self.n_pages, (end - self.base) // self.page_size)
        with self._lock:
            vmas = self._vmas.overlapping(p0, p1)
            if check_scan_flags(flags, [m for _, _, m in vmas]) or p0 >= p1:
                return ScanResult.empty(end)
            if not max_pages and not vec_len:
                fast = scan_regions(
                    self._state,
                    vmas,
                    p0,
                    p1,
                    mask=category_mask,
                    inverted=category_inverted,
                    anyof=category_anyof_mask,
                    ret=return_mask,
                    base=self.base,
                    page_size=self.page_size,
                )
                if fast is not None:
                    return ScanResult(fast, end)
            s, e, k = scan_runs(
                self._state,
                vmas,
                p0,
                p1,
                mask=category_mask,
                inverted=category_inverted,
                anyof=category_anyof_mask,
                ret=return_mask,
            )
        s, e, k, stop = limit_regions(s, e, k, max_pages=max_pages, vec_len=vec_len)
        return ScanResult(
            to_regions(s, e, k, self.base, self.page_size), end if stop is None else self.addr(stop)
        )

    # --- resolving faults -----------------------------------------------------------------------
    def _install_span(self, op: str, dst: int, length: int) -> tuple[int, int, int]:
        """Checks shared by COPY/ZEROPAGE: returns (p0, pages to install, pages asked); lock held."""
        p0, p1 = self._pages(op, dst, length)
        if not self._inside(p0, p1) or any(m == 0 for m in self._vmas.modes_in(p0, p1)):
            raise _err(errno.ENOENT, f"{op}: destination not registered with this userfaultfd")
        if p1 - p0 == 1:  # the common case, without array temporaries
            if self._state[p0] != ST_NONE:
                raise _err(errno.EEXIST, f"{op}: page {p0} is present")
            return p0, 1, 1
        present = self._state[p0:p1] != ST_NONE
        if present[0]:
            raise _err(errno.EEXIST, f"{op}: page {p0} is present")
        k = int(present.argmax()) if present.any() else p1 - p0
        return p0, k, p1 - p0

    def copy(self, dst: int, data: bytes | memoryview, *, dontwake: bool = False) -> int:
        """UFFDIO_COPY; a copy stopped by a present page returns the bytes copied (the kernel's ``copy``)."""
        self._enter("copy")
        with self._lock:
            p0, k, _ = self._install_span("UFFDIO_COPY", dst, len(data))
            self.mem.install(p0, memoryview(data)[: k * self.page_size])  # no uffd bit: reads as accessed
            if not dontwake:
                self._wake(p0, p0 + k)
        return k * self.page_size

    def zeropage(self, start: int, length: int, *, dontwake: bool = False) -> int:
        self._enter("zeropage")
        with self._lock:
            p0, k, _ = self._install_span("UFFDIO_ZEROPAGE", start, length)
            self.mem.install_zero(p0, p0 + k)
            if not dontwake:
                self._wake(p0, p0 + k)
        return k * self.page_size

    def continue_(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """UFFDIO_CONTINUE: map cached pages; stops at a hole (EFAULT) or a mapped page (EEXIST)."""
        self._enter("continue")
        p0, p1 = self._pages("UFFDIO_CONTINUE", start, length)
        with self._lock:
            modes = self._vmas.modes_in(p0, p1) if self._inside(p0, p1) else [0]
            if any(m == 0 for m in modes):
                raise _err(errno.ENOENT, "UFFDIO_CONTINUE: range not registered with this userfaultfd")
            if any(not m & _MINOR for m in modes):
                raise _err(errno.EINVAL, "UFFDIO_CONTINUE: range not MINOR-registered")
            st = self._state[p0:p1]
            bad = np.flatnonzero(st != ST_CACHED)
            k = int(bad[0]) if bad.size else p1 - p0
            self.mem.map_cached(p0, p0 + k)
            if bad.size:
                if st[k] == ST_NONE:
                    raise _err(errno.EFAULT, f"UFFDIO_CONTINUE: page {p0 + k} is not in the page cache")
                raise _err(errno.EEXIST, f"UFFDIO_CONTINUE: page {p0 + k} is mapped")
            if not dontwake:
                self._wake(p0, p1)
        return length

    def wake(self, start: int, length: int) -> None:
        self._enter("wake")
        p0, p1 = self._pages("UFFDIO_WAKE", start, length)
        with self._lock:
            self._wake(p0, p1)

    # --- backing memory -------------------------------------------------------------------------
    def _io_span(self, op: str, offset: int, length: int, *, whole: bool) -> tuple[int, int]:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise _err(errno.EINVAL, f"{op} [{offset:#x}, +{length:#x}) outside the memfd")
        if whole and (offset % self.page_size or length % self.page_size):
            raise _err(errno.EINVAL, f"{op} [{offset:#x}, +{length:#x}) not page aligned")
        return offset, offset + length

    def punch_hole(self, offset: int, length: int) -> None:
        """fallocate(PUNCH_HOLE|KEEP_SIZE); the sim insists on whole pages inside the memfd."""
        self._injected("punch_hole")
        if length == 0:
            raise _err(errno.EINVAL, "fallocate: zero length")
        a, b = self._io_span("fallocate(PUNCH_HOLE)", offset, length, whole=True)
        p0, p1 = a // self.page_size, b // self.page_size
        with self._lock:
            self.mem.punch(p0, p1)  # the marker goes with the PTE; nobody is woken

    def io_read(self, offset: int, length: int) -> bytes:
        self._injected("io_read")
        a, b = self._io_span("io_read", offset, length, whole=False)
        with self._lock:
            return self.mem.read(a, b)

    def io_write(self, offset: int, data: bytes | memoryview) -> None:
        """Write through the I/O mapping; a hole written to becomes present (no uffd bit)."""
        self._injected("io_write")
        a, b = self._io_span("io_write", offset, len(data), whole=self.synthetic)
        if a == b:
            return
        with self._lock:
            self.mem.write(a, memoryview(data))

    def populated(self) -> np.ndarray:
        """In the memfd (mapped in the guest or only cached)."""
        with self._lock:
            out: np.ndarray = self._state != ST_NONE
            return out

    def counters(self) -> np.ndarray:
        """The write counter of every page (0 for unpopulated pages); a copy."""
        with self._lock:
            return np.array(self.mem.ctr, dtype=np.uint32)

    def compare(self, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(present pages whose bytes differ from ``page_bytes(page, expected)``, unpopulated pages)."""
        with self._lock:
            return self.mem.compare(expected)

    # --- messages ---------------------------------------------------------------------------------
    def read_messages(self, timeout: float | None) -> list[uapi.UffdMsg]:
        if self._closed:
            return []
        if self._ctx is None:
            raise _err(errno.EINVAL, "read before UFFDIO_API")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._pending and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return []
                self._msg_cond.wait(left)
            if self._closed:
                return []
            out = [w.msg for w in self._pending]
            for w in self._pending:
                w.queued = False
            self._pending.clear()
            return out

    def share_with_vmm(self) -> None:
        """The VMM holds its own fd of this context (it always does in deployment)."""
        with self._lock:
            self._vmm_fd = True

    def vmm_close(self) -> None:
        """The VMM closes its fd: the last release if the agent's fd is closed too."""
        with self._lock:
            self._vmm_fd = False
            if self._closed:
                self._release_ctx()

    def close(self) -> None:
        """Close the agent's fd. The last fd's release resolves protection, drops registrations and
        wakes every waiter; while the VMM holds its fd nothing is released (vCPUs stay blocked)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self._pending:
                w.queued = False  # this reader's view of the queue is gone
            self._pending.clear()
            self._msg_cond.notify_all()
            if not self._vmm_fd:
                self._release_ctx()

    def _release_ctx(self) -> None:
        """userfaultfd_release (lock held): protection resolved, registrations dropped, all woken."""
        self.mem.resolve(0, self.n_pages)
        self._vmas.set(0, self.n_pages, 0)
        self._wake(0, self.n_pages)
