"""What the real kernel backends (``uffd``, ``rwp``, and the Firecracker MISSING-only mode) share.

One instance owns the fds a VMM handed over: its userfaultfd (whose ioctls act on
the VMM's mm, with the VMM's addresses) and, for memfd-backed guests, the memfd
plus the agent's own MAP_SHARED mapping of it (the I/O mapping). It implements
the parts of :class:`~tiermem.kernel.backend.KernelBackend` that do not depend
on how access tracking works:

* COPY / ZEROPAGE / CONTINUE with the kernel's partial-progress rules: EAGAIN
  (``mmap_changing`` while a REMOVE/UNMAP event is unread) is retried after
  reading the pending events; EEXIST skips the page, wakes it and is raised at the
  end once every other page of the range is installed (the agent treats it as
  success, so it must mean "every page is present now").
* ``read_messages``: an epoll loop on the uffd, a kick eventfd (``close`` and
  messages queued by another thread) and a pidfd of the VMM (exit = gone).
  Messages are read and processed under one lock, so subclasses can classify
  them atomically with respect to their own state changes.
* ``populated``: ``mincore`` on the I/O mapping (page-cache residency of the
  memfd: one syscall, exact, never populates a hole). ``io_read`` uses ``pread``
  because a read fault on a MAP_SHARED shmem hole would allocate a page.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import structlog

from tiermem.errors import InvalidArgument
from tiermem.kernel import uapi
from tiermem.kernel.backend import KernelBackend, Region, ScanResult
from tiermem.kernel.uapi import UffdMsg
from tiermem.kernel.uffd_ioctl import IoctlFn, Mapping, Uffd, UffdOpError, buffer_address, punch_hole

__all__ = [
    "ControlChannel",
    "NativeReader",
    "PendingReply",
    "RealBackend",
    "emulate_scan",
    "validate_regions",
]

log = structlog.get_logger(__name__)


class NativeReader(Protocol):
    """What the backend needs of the native fault thread (``tiermem._native.FaultPath``)."""

    @property
    def notify_fd(self) -> int:
        """Readable when messages wait for Python."""

    @property
    def running(self) -> bool:
        """The thread is reading the uffd."""

    def start(self) -> None:
        """Start reading and serving."""

    def stop(self) -> None:
        """Stop and join."""

    def take(self, read_kernel: bool = False) -> list[bytes]:
        """Messages handed over (then those still queued in the kernel), in order."""

    def ack(self, n: int = 1) -> None:
        """``n`` handed messages are done."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.restype = ctypes.c_int
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]

EAGAIN_BUDGET_S = 5.0
"""How long a COPY/ZEROPAGE/CONTINUE keeps retrying EAGAIN before giving up."""
_GONE_ERRNOS = (errno.ESRCH, errno.ENOSPC, errno.ENOENT)
"""COPY/ZEROPAGE/CONTINUE errnos meaning the VMM's mm or guest mapping is gone."""


class PendingReply(Protocol):
    """An outstanding request on the VMM control channel."""

    def wait(self, timeout: float) -> bool:
        """Block up to ``timeout`` s; True once answered (or failed)."""
        ...

    def result(self) -> None:
        """Raise if the request failed (Unavailable: VMM gone; KernelError: VMM-side errno)."""
        ...


class ControlChannel(Protocol):
    """What a backend needs from the handoff connection (``tiermem.handoff.listener.HandoffConnection``)."""

    @property
    def closed(self) -> bool:
        """True once the VMM side is gone."""
        ...

    def add_close_callback(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` once when the connection closes (immediately if already closed)."""
        ...

    def zap_start(self, ranges: Sequence[tuple[int, int]]) -> PendingReply:
        """Ask the VMM to zap the guest PTEs of ``[(start, length)]`` (MADV_DONTNEED in the VMM)."""
        ...


def validate_regions(regions: Sequence[Region], *, memfd_backed: bool) -> tuple[int, int, int]:
    """Check handed-over regions; returns (base, size, page_size) of the guest span.

    memfd-backed guests must be one contiguous span whose memfd offset equals the
    distance from the first base (the agent maps page ``p`` to memfd offset
    ``p * page_size``). Anonymous guests (Firecracker) may have holes between
    regions; the span covers them and they never fault.
    """
    if not regions:
        raise InvalidArgument("no guest memory regions")
    page_size = regions[0].page_size
    if page_size != mmap_page_size():
        raise InvalidArgument(f"page_size {page_size} unsupported: only {mmap_page_size()}-byte pages")
    ordered = sorted(regions, key=lambda r: r.base_host_virt_addr)
    base = ordered[0].base_host_virt_addr
    prev_end = base
    for r in ordered:
        if r.page_size != page_size:
            raise InvalidArgument("all regions must have the same page_size")
        if r.size <= 0 or r.size % page_size or r.base_host_virt_addr % page_size or r.offset % page_size:
            raise InvalidArgument(f"region {r} is not page aligned or is empty")
        if r.base_host_virt_addr < prev_end:
            raise InvalidArgument(f"region at {r.base_host_virt_addr:#x} overlaps the previous one")
        if r.base_host_virt_addr + r.size > 1 << 57:
            raise InvalidArgument(f"region {r} is outside the user address space")
        if memfd_backed and (r.base_host_virt_addr != prev_end or r.offset != r.base_host_virt_addr - base):
            raise InvalidArgument(
                "memfd-backed regions must be contiguous, starting at memfd offset 0, "
                "with offset == base_host_virt_addr - first base"
            )
        prev_end = r.base_host_virt_addr + r.size
    return base, prev_end - base, page_size


def mmap_page_size() -> int:
    """The base page size of this host."""
    return os.sysconf("SC_PAGE_SIZE")


def emulate_scan(
    base: int,
    page_size: int,
    categories: np.ndarray,
    eligible: np.ndarray,
    start: int,
    end: int,
    *,
    category_mask: int,
    category_inverted: int,
    category_anyof_mask: int,
    return_mask: int,
    max_pages: int,
    vec_len: int,
) -> ScanResult:
    """PAGEMAP_SCAN semantics over per-page ``categories`` (uint64) of the span at ``base``.

    Same matching as ``fs/proc/task_mmu.c``: ``(cats ^ inverted) & mask == mask``
    and (anyof or any of anyof); output ``cats & return_mask``; adjacent pages with
    equal output merge; stops when ``vec_len`` regions are full (``walk_end`` = the
    page that did not fit) or ``max_pages`` pages matched (``walk_end`` = after the
    last one). Pages outside the span, or not ``eligible``, never match.
    """
    for m in (category_mask, category_inverted, category_anyof_mask, return_mask):
        if m & ~uapi.PM_SCAN_CATEGORIES or m < 0:
            raise OSError(errno.EINVAL, "PAGEMAP_SCAN: unknown category bit")
    if start % page_size or end < start or max_pages < 0 or vec_len < 0:
        raise OSError(errno.EINVAL, "PAGEMAP_SCAN: bad range or limits")
    end = -(-end // page_size) * page_size  # the kernel rounds end up
    n = len(categories)
    p0 = min(max((start - base) // page_size, 0), n)
    p1 = min(max((end - base) // page_size, 0), n)
    cats = categories[p0:p1]
    inv = cats ^ np.uint64(category_inverted)
    match = eligible[p0:p1] & ((inv & np.uint64(category_mask)) == np.uint64(category_mask))
    if category_anyof_mask:
        match &= (inv & np.uint64(category_anyof_mask)) != 0
    pages = np.flatnonzero(match)
    walk_end = end
    if max_pages and len(pages) >= max_pages:
        pages = pages[:max_pages]
        walk_end = base + (p0 + int(pages[-1]) + 1) * page_size
    out_c = cats[pages] & np.uint64(return_mask)
    brk = np.ones(len(pages), dtype=bool)
    if len(pages) > 1:
        brk[1:] = (np.diff(pages) != 1) | (out_c[1:] != out_c[:-1])
    starts = np.flatnonzero(brk)
    if vec_len and len(starts) > vec_len:
        walk_end = base + (p0 + int(pages[starts[vec_len]])) * page_size
        pages_kept = int(starts[vec_len])
        pages, out_c, starts = pages[:pages_kept], out_c[:pages_kept], starts[:vec_len]
    regions = np.zeros(len(starts), dtype=uapi.PAGE_REGION_DTYPE)
    if not len(starts):
        return ScanResult(regions, int(walk_end))
    ends = np.append(starts[1:], len(pages)) - 1
    regions["start"] = base + (p0 + pages[starts]).astype(np.uint64) * page_size
    regions["end"] = base + (p0 + pages[ends] + 1).astype(np.uint64) * page_size
    regions["categories"] = out_c[starts]
    return ScanResult(regions, int(walk_end))


class RealBackend(KernelBackend):
    """Shared machinery of the real backends; subclasses add tracking."""

    name = "real"
    tracking = True
    """False when the backend cannot track accesses or evict (Firecracker's anonymous memory)."""

    def __init__(
        self,
        uffd_fd: int,
        memfd: int | None,
        regions: Sequence[Region],
        *,
        control: ControlChannel | None = None,
        vmm_pid: int | None = None,
        features: int = 0,
        ioctl: IoctlFn | None = None,
    ) -> None:
        base, size, page_size = validate_regions(regions, memfd_backed=memfd is not None)
        super().__init__(base, size, page_size)
        self.regions = tuple(regions)
        self.vmm_pid = vmm_pid
        self.features = features
        """UFFDIO_API features the VMM negotiated on this uffd (from the handoff description)."""
        self.uffd_fd = uffd_fd
        self.memfd = memfd
        self._uffd = Uffd(uffd_fd, ioctl=ioctl)
        self._io: Mapping | None = None
        self._closed = False
        self._gone = False
        self._state_lock = threading.RLock()  # uffd reads + message processing + state changes
        self._read_lock = threading.RLock()  # one thread blocked in epoll at a time
        self._out: deque[UffdMsg] = deque()
        self._native: NativeReader | None = None
        """The native fault thread when attached: it reads the uffd, Python gets what it hands over."""
        self.stats: dict[str, int] = {"missing": 0, "minor": 0, "rwp": 0, "remove": 0, "unmap": 0}
        self._kick_lock = threading.Lock()
        self._kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._pidfd = -1
        try:
            if memfd is not None:
                if os.fstat(memfd).st_size < size:
                    raise InvalidArgument(f"memfd is smaller than the guest regions ({size} bytes)")
                self._io = Mapping(memfd, size)
            # Reads must never block under the state lock (another thread may have taken the message
            # epoll announced): the VMM may have handed over a blocking uffd.
            os.set_blocking(uffd_fd, False)
            self._epoll.register(uffd_fd, select.EPOLLIN)
            self._epoll.register(self._kick, select.EPOLLIN)
            if vmm_pid:
                with contextlib.suppress(OSError):
                    self._pidfd = os.pidfd_open(vmm_pid)
                    self._epoll.register(self._pidfd, select.EPOLLIN)
        except BaseException:
            self._release(close_fds=False)  # the caller still owns the fds when construction fails
            raise
        if control is not None:
            control.add_close_callback(lambda: self._mark_gone("VMM control connection closed"))

    # --- helpers --------------------------------------------------------------------------------
    def _check_range(self, start: int, length: int) -> None:
        if self._closed or self._gone:
            raise OSError(errno.ESRCH, "the VMM is gone or the backend is closed")
        ps = self.page_size
        if length <= 0 or start % ps or length % ps:
            raise OSError(errno.EINVAL, f"range {start:#x}+{length:#x} is not page aligned or empty")
        if start < self.base or start + length > self.base + self.size:
            raise OSError(errno.EINVAL, f"range {start:#x}+{length:#x} is outside guest memory")

    def _check_offset(self, offset: int, length: int) -> None:
        if self.memfd is None:
            raise OSError(errno.EOPNOTSUPP, "no memfd: this guest's memory is private anonymous memory")
        if self._closed:
            raise OSError(errno.EBADF, "backend closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"offset {offset}+{length} is outside the memfd ({self.size} bytes)")

    def _check_open(self) -> None:
        """Raise EBADF after close: never issue an ioctl on a closed (possibly reused) fd number."""
        if self._closed:
            raise OSError(errno.EBADF, "backend closed")

    def _mark_gone(self, why: str) -> None:
        if not self._gone and not self._closed:
            log.info("uffd backend gone", backend=self.name, base=hex(self.base), reason=why)
        self._gone = True
        self._kick_reader()

    def _kick_reader(self) -> None:
        # Under its own lock: a close callback may fire after close(), when the fd number may
        # already belong to another file.
        with self._kick_lock, contextlib.suppress(OSError):
            if self._kick >= 0:
                os.eventfd_write(self._kick, 1)

    def _pages(self, start: int, length: int) -> slice:
        p = (start - self.base) // self.page_size
        return slice(p, p + length // self.page_size)

    # --- resolving faults ---------------------------------------------------------------------
    def _fill(
        self, op: str, dst: int, length: int, mode: int, dontwake: bool, src: int = 0
    ) -> tuple[int, bool]:
        """Run COPY/ZEROPAGE/CONTINUE over [dst, dst+length); returns (bytes done, any page existed)."""
        ps = self.page_size
        pos = 0
        existed = False
        deadline = 0.0
        while pos < length:
            try:
                with self._state_lock:
                    self._check_open()
                    # A successful ioctl did the whole range (partial progress is EAGAIN).
                    n = length - pos
                    if op == "copy":
                        self._uffd.copy(dst + pos, src + pos, n, mode)
                    elif op == "zeropage":
                        self._uffd.zeropage(dst + pos, n, mode)
                    elif op == "poison":
                        self._uffd.poison(dst + pos, n, mode)
                    else:
                        self._uffd.continue_(dst + pos, n, mode)
                    self._installed(dst + pos, n)
                pos += n
            except UffdOpError as e:
                if e.done:
                    with self._state_lock:
                        self._installed(dst + pos, e.done)
                    pos += e.done
                if e.errno == errno.EAGAIN:
                    if not e.done:  # mmap_changing: an unread REMOVE/UNMAP event; read it, back off
                        deadline = deadline or time.monotonic() + EAGAIN_BUDGET_S
                        if time.monotonic() > deadline:
                            raise OSError(errno.EAGAIN, f"UFFDIO_{op.upper()}: still EAGAIN") from None
                        self._service_events()
                        time.sleep(0.0001)
                    continue
                if e.errno == errno.EEXIST:
                    existed = True
                    with self._state_lock:
                        self._check_open()
                        self._installed(dst + pos, ps)
                        if not dontwake:  # the kernel does not wake on EEXIST
                            self._uffd.wake(dst + pos, ps)
                    pos += ps
                    continue
                if e.errno in _GONE_ERRNOS:
                    self._mark_gone(f"UFFDIO_{op.upper()}: {e.strerror}")
                raise
        return pos, existed

    def _installed(self, start: int, length: int) -> None:
        """Hook: ``length`` bytes at ``start`` were just mapped by COPY/ZEROPAGE/CONTINUE (state lock held)."""

    def copy(self, dst: int, data: bytes | memoryview, *, dontwake: bool = False) -> int:
        """UFFDIO_COPY; OSError(EEXIST) once all pages are present if any already was."""
        length = len(data) if isinstance(data, bytes) else data.nbytes
        self._check_range(dst, length)
        src, keep = buffer_address(data)
        mode = uapi.UFFDIO_COPY_MODE_DONTWAKE if dontwake else 0
        done, existed = self._fill("copy", dst, length, mode, dontwake, src)
        del keep
        if existed:
            raise OSError(errno.EEXIST, "UFFDIO_COPY: page already present")
        return done

    def zeropage(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """UFFDIO_ZEROPAGE; OSError(EEXIST) like :meth:`copy`."""
        self._check_range(start, length)
        mode = uapi.UFFDIO_ZEROPAGE_MODE_DONTWAKE if dontwake else 0
        done, existed = self._fill("zeropage", start, length, mode, dontwake)
        if existed:
            raise OSError(errno.EEXIST, "UFFDIO_ZEROPAGE: page already present")
        return done

    @property
    def can_poison(self) -> bool:
        """The VMM negotiated UFFD_FEATURE_POISON on this uffd."""
        return bool(self.features & uapi.UFFD_FEATURE_POISON)

    def poison(self, start: int, length: int) -> int:
        """UFFDIO_POISON, then wake: a vCPU waiting on the range gets SIGBUS instead of waiting forever."""
        self._check_range(start, length)
        done, existed = self._fill("poison", start, length, 0, False)
        if existed:
            raise OSError(errno.EEXIST, "UFFDIO_POISON: page already present")
        return done

    def continue_(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """UFFDIO_CONTINUE; EFAULT if a page is not in the memfd (punched)."""
        self._check_range(start, length)
        mode = uapi.UFFDIO_CONTINUE_MODE_DONTWAKE if dontwake else 0
        done, existed = self._fill("continue", start, length, mode, dontwake)
        if existed:
            raise OSError(errno.EEXIST, "UFFDIO_CONTINUE: page already mapped")
        return done

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE."""
        self._check_range(start, length)
        with self._state_lock:
            self._check_open()
            self._uffd.wake(start, length)

    # --- backing memory -------------------------------------------------------------------------
    def punch_hole(self, offset: int, length: int) -> None:
        """fallocate(PUNCH_HOLE|KEEP_SIZE) on the memfd; page aligned."""
        self._check_offset(offset, length)
        if offset % self.page_size or length % self.page_size or length == 0:
            raise OSError(errno.EINVAL, "punch_hole: offset and length must be page aligned, length > 0")
        assert self.memfd is not None
        with self._state_lock:
            self._check_open()
            punch_hole(self.memfd, offset, length)
            self._punched(offset, length)

    def _punched(self, offset: int, length: int) -> None:
        """Hook: [offset, offset+length) of the memfd was just punched (state lock held)."""

    def io_read(self, offset: int, length: int) -> bytes:
        """Read the memfd with pread: holes read as zeroes and stay holes."""
        self._check_offset(offset, length)
        assert self.memfd is not None
        with self._state_lock:  # the lock keeps close() from closing the fd under us
            self._check_open()
            out = os.pread(self.memfd, length, offset)
            while len(out) < length:  # shmem never returns short inside the file; be safe anyway
                more = os.pread(self.memfd, length - len(out), offset + len(out))
                if not more:
                    raise OSError(errno.EIO, "short read from the memfd")
                out += more
        return out

    def io_write(self, offset: int, data: bytes | memoryview) -> None:
        """Write through the I/O mapping (not registered with any uffd: no faults)."""
        length = len(data) if isinstance(data, bytes) else data.nbytes
        self._check_offset(offset, length)
        assert self._io is not None
        src, keep = buffer_address(data)
        with self._state_lock:  # the lock keeps close() from unmapping under us
            self._check_open()
            ctypes.memmove(self._io.addr + offset, src, length)
        del keep

    def populated(self) -> np.ndarray:
        """Bool per page: the page is in the memfd (mincore on the I/O mapping)."""
        if self._io is None:
            raise OSError(errno.EOPNOTSUPP, "no memfd")
        if self._closed:
            raise OSError(errno.EBADF, "backend closed")
        vec = np.zeros(self.n_pages, dtype=np.uint8)
        with self._state_lock:
            self._check_open()
            rc = _libc.mincore(self._io.addr, self.size, vec.ctypes.data)
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore: {os.strerror(err)}")
        return (vec & 1).astype(bool)

    # --- messages -----------------------------------------------------------------------------
    def _handle(self, msg: UffdMsg) -> UffdMsg | None:
        """Classify one message (state lock held): return what the agent should see, or None."""
        if msg.event == uapi.UFFD_EVENT_PAGEFAULT:
            key = "minor" if msg.flags & uapi.UFFD_PAGEFAULT_FLAG_MINOR else "missing"
            if msg.flags & uapi.UFFD_PAGEFAULT_FLAG_RWP:
                key = "rwp"
            self.stats[key] += 1
            return msg
        if msg.event in (uapi.UFFD_EVENT_REMOVE, uapi.UFFD_EVENT_UNMAP):
            self.stats["remove" if msg.event == uapi.UFFD_EVENT_REMOVE else "unmap"] += 1
            self._removed(msg.start, msg.end)
        return msg

    def _removed(self, start: int, end: int) -> None:
        """Hook: a REMOVE/UNMAP event for [start, end) (state lock held)."""

    def _read_and_process(self, kernel: bool = True) -> int:
        """Read what is queued and process it; returns how many messages were read.

        With the native fault thread attached, the messages are the ones it handed over (and with
        ``kernel``, what is still queued in the kernel, read under its lock so the order holds).
        """
        with self._state_lock:
            total = 0
            while True:
                if self._closed:  # the fd may already be closed (and its number reused)
                    return total
                native = self._native
                if native is not None:
                    if not native.running:
                        self._native_stopped()
                    msgs = [UffdMsg.unpack(raw) for raw in native.take(kernel or not native.running)]
                else:
                    msgs = self._uffd.read_msgs()
                if not msgs:
                    return total
                total += len(msgs)
                for i, m in enumerate(msgs):
                    try:
                        out = self._handle(m)
                    except BaseException:
                        if native is not None:  # those messages are lost: never leave the thread waiting
                            native.ack(len(msgs) - i)
                        raise
                    if out is not None:
                        self._out.append(out)  # acknowledged by message_done once dispatched
                    elif native is not None:
                        native.ack(1)
                if native is not None:
                    return total  # take() returned everything there was

    # --- the native fault thread -------------------------------------------------------------
    def attach_native(self, native: NativeReader) -> None:
        """Let the native fault thread read the uffd (call before anyone reads it); it serves what
        it can and hands the rest over, in kernel order, through :meth:`read_messages`."""
        with self._state_lock:
            self._check_open()
            self._epoll.unregister(self.uffd_fd)
            self._epoll.register(native.notify_fd, select.EPOLLIN)
            self._native = native
            native.start()

    def _native_stopped(self) -> None:
        """The native thread stopped reading (uffd error): read the uffd here again (state lock held)."""
        native = self._native
        if native is None:
            return
        log.warning("native fault thread stopped; the Python path reads the uffd again")
        self._native = None
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(native.notify_fd)
        with contextlib.suppress(OSError, ValueError):
            self._epoll.register(self.uffd_fd, select.EPOLLIN)

    def message_done(self) -> None:
        """The agent finished dispatching one message from :meth:`read_messages`: with the native
        thread attached, it may read on once every message it handed over is done (kernel order)."""
        native = self._native
        if native is not None:
            native.ack(1)

    def installed_natively(self, pages: Sequence[int]) -> None:
        """Bookkeeping for pages the native thread installed (what :meth:`copy` does for its own)."""
        with self._state_lock:
            for p in pages:
                self._installed(self.base + p * self.page_size, self.page_size)

    def _service_events(self) -> None:
        """Read and process pending messages from any thread (e.g. the REMOVE event that keeps
        ``mmap_changing`` set), then wake the reader if something is now queued for the agent."""
        self._read_and_process()
        if self._out:
            self._kick_reader()

    def read_messages(self, timeout: float | None) -> list[UffdMsg]:
        """Block up to ``timeout`` s for messages for the agent; [] on timeout, close or VMM exit."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._read_lock:
            while True:
                if self._closed or self._gone:
                    return []
                if self._out:
                    return self._take_out()
                wait = -1.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
                try:
                    events = self._epoll.poll(wait)
                except (OSError, ValueError):  # epoll closed under us
                    return []
                native = self._native
                for fd, _ in events:
                    if fd == self._kick or (native is not None and fd == native.notify_fd):
                        with contextlib.suppress(OSError):
                            os.eventfd_read(fd)
                    elif fd == self._pidfd:
                        self._mark_gone("VMM process exited")
                if self._closed or self._gone:
                    return []
                self._read_and_process(kernel=False)
                if self._out:
                    return self._take_out()
                if deadline is not None and time.monotonic() >= deadline:
                    return []

    def _take_out(self) -> list[UffdMsg]:
        with self._state_lock:
            out = list(self._out)
            self._out.clear()
            return out

    # --- lifecycle ----------------------------------------------------------------------------
    def wake_all(self) -> None:
        """UFFDIO_WAKE over the whole span: threads whose faults a previous agent read but never
        resolved retry and fault again (called once after attach)."""
        with self._state_lock, contextlib.suppress(OSError):
            self._check_open()
            self._uffd.wake(self.base, self.size)

    @property
    def closed(self) -> bool:
        """True once closed, or once the VMM went away."""
        return self._closed or self._gone

    def _before_close(self) -> None:
        """Hook: release anything blocking the guest before the fds go."""

    def close(self) -> None:
        """Close the uffd and memfd copies and the I/O mapping (the VMM keeps its own)."""
        if self._closed:
            return
        native = self._native
        if native is not None:
            native.stop()  # joined before the fd closes: its number could be reused at once
        with contextlib.suppress(OSError):
            if not self._gone:
                self._before_close()
        self._closed = True
        self._kick_reader()
        with self._read_lock, self._state_lock:
            self._release(close_fds=True)

    def _release(self, *, close_fds: bool) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._epoll.close()
        owned = (self.uffd_fd, self.memfd) if close_fds else ()
        with self._kick_lock:
            kick, self._kick = self._kick, -1
        for fd in (kick, self._pidfd, *owned):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._pidfd = -1
        if self._io is not None:
            with contextlib.suppress(OSError):
                self._io.close()
