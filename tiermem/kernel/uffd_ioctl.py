"""Thin ctypes/ioctl wrappers for userfaultfd, PAGEMAP_SCAN, memfds and mappings.

Each :class:`Uffd` method packs one uapi struct (formats from :mod:`tiermem.kernel.uapi`),
issues exactly one ioctl and unpacks the answer; nothing here retries or keeps
state. The ``ioctl`` callable is injectable so tests can check the exact bytes
and request numbers a backend issues on a kernel it cannot run (the ``rwp``
backend on this machine). No compiled extension: ``fcntl.ioctl`` and libc via
ctypes only. ctypes foreign calls release the GIL, so a thread blocked in a
page fault inside ``memmove`` or ``madvise`` never stalls the other threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Callable
from typing import Any

import numpy as np

from tiermem.kernel import uapi
from tiermem.kernel.backend import ApiInfo
from tiermem.kernel.probe import open_userfaultfd
from tiermem.kernel.uapi import UffdMsg

__all__ = [
    "IoctlFn",
    "Mapping",
    "Uffd",
    "UffdOpError",
    "buffer_address",
    "data_extents",
    "default_ioctl",
    "fd_target",
    "is_memfd",
    "is_userfaultfd",
    "madvise",
    "memfd_create",
    "mmap_shared",
    "munmap",
    "new_uffd",
    "pagemap_scan",
    "punch_hole",
]

IoctlFn = Callable[[int, int, bytearray], int]
"""``ioctl(fd, request, buf)``: issue one ioctl on a mutable buffer the kernel may write back."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_MAP_FAILED = ctypes.c_void_p(-1).value


def default_ioctl(fd: int, request: int, buf: bytearray) -> int:
    """The real ioctl: the kernel reads and writes ``buf`` in place."""
    return int(fcntl.ioctl(fd, request, buf, True))


class UffdOpError(OSError):
    """A range ioctl (COPY, ZEROPAGE, CONTINUE) failed after ``done`` bytes succeeded."""

    def __init__(self, err: int, what: str, done: int = 0) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.done = done


def _errno_of(e: OSError) -> int:
    return e.errno if e.errno is not None else errno.EIO


class Uffd:
    """One userfaultfd file descriptor (not owned: the caller closes it)."""

    def __init__(self, fd: int, *, ioctl: IoctlFn | None = None) -> None:
        self.fd = fd
        self._ioctl: IoctlFn = ioctl or default_ioctl

    def _call(self, request: int, fmt: str, *fields: int) -> tuple[Any, ...]:
        buf = bytearray(struct.pack(fmt, *fields))
        self._ioctl(self.fd, request, buf)
        return struct.unpack(fmt, buf)

    # --- fd-level ---------------------------------------------------------------------------
    def api(self, features: int) -> ApiInfo:
        """UFFDIO_API(features): once per uffd; EINVAL if a feature is not offered."""
        _, feats, ioctls = self._call(uapi.UFFDIO_API, uapi.UFFDIO_API_FMT, uapi.UFFD_API, features, 0)
        return ApiInfo(features=int(feats), ioctls=int(ioctls))

    def register(self, start: int, length: int, mode: int) -> int:
        """UFFDIO_REGISTER; returns the range ioctls bitmask."""
        out = self._call(uapi.UFFDIO_REGISTER, uapi.UFFDIO_REGISTER_FMT, start, length, mode, 0)
        return int(out[3])

    def unregister(self, start: int, length: int) -> None:
        """UFFDIO_UNREGISTER."""
        self._call(uapi.UFFDIO_UNREGISTER, uapi.UFFDIO_RANGE_FMT, start, length)

    def set_mode(self, enable: int, disable: int) -> None:
        """UFFDIO_SET_MODE (RWP series)."""
        self._call(uapi.UFFDIO_SET_MODE, uapi.UFFDIO_SET_MODE_FMT, enable, disable)

    # --- range ioctls -------------------------------------------------------------------------
    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE."""
        self._call(uapi.UFFDIO_WAKE, uapi.UFFDIO_RANGE_FMT, start, length)

    def rwprotect(self, start: int, length: int, mode: int) -> None:
        """UFFDIO_RWPROTECT (RWP series): MODE_RWP protects, 0 resolves and wakes."""
        self._call(uapi.UFFDIO_RWPROTECT, uapi.UFFDIO_RWPROTECT_FMT, start, length, mode)

    def _fill(self, request: int, fmt: str, what: str, fields: tuple[int, ...]) -> int:
        buf = bytearray(struct.pack(fmt, *fields))
        try:
            self._ioctl(self.fd, request, buf)
        except OSError as e:
            res = struct.unpack(fmt, buf)[-1]
            raise UffdOpError(_errno_of(e), what, done=max(int(res), 0)) from None
        return int(struct.unpack(fmt, buf)[-1])

    def copy(self, dst: int, src: int, length: int, mode: int = 0) -> int:
        """UFFDIO_COPY from our address ``src``; returns bytes copied, UffdOpError on failure."""
        return self._fill(uapi.UFFDIO_COPY, uapi.UFFDIO_COPY_FMT, "UFFDIO_COPY", (dst, src, length, mode, 0))

    def zeropage(self, start: int, length: int, mode: int = 0) -> int:
        """UFFDIO_ZEROPAGE; returns bytes mapped."""
        return self._fill(
            uapi.UFFDIO_ZEROPAGE, uapi.UFFDIO_ZEROPAGE_FMT, "UFFDIO_ZEROPAGE", (start, length, mode, 0)
        )

    def continue_(self, start: int, length: int, mode: int = 0) -> int:
        """UFFDIO_CONTINUE; returns bytes mapped."""
        return self._fill(
            uapi.UFFDIO_CONTINUE, uapi.UFFDIO_CONTINUE_FMT, "UFFDIO_CONTINUE", (start, length, mode, 0)
        )

    def poison(self, start: int, length: int, mode: int = 0) -> int:
        """UFFDIO_POISON (Linux 6.6+): later accesses get SIGBUS; returns bytes marked."""
        return self._fill(
            uapi.UFFDIO_POISON, uapi.UFFDIO_POISON_FMT, "UFFDIO_POISON", (start, length, mode, 0)
        )

    # --- messages -------------------------------------------------------------------------------
    def read_msgs(self, max_msgs: int = 64) -> list[UffdMsg]:
        """Read what is queued (the fd is non-blocking); [] if nothing is."""
        try:
            raw = os.read(self.fd, uapi.UFFD_MSG_SIZE * max_msgs)
        except BlockingIOError:
            return []
        n = len(raw) // uapi.UFFD_MSG_SIZE
        mv = memoryview(raw)
        return [UffdMsg.unpack(mv[i * uapi.UFFD_MSG_SIZE : (i + 1) * uapi.UFFD_MSG_SIZE]) for i in range(n)]


def new_uffd(features: int, *, nonblock: bool = True) -> tuple[int, ApiInfo]:
    """A fresh userfaultfd with UFFDIO_API(features) done; closes it again on failure."""
    flags = uapi.O_CLOEXEC | (uapi.O_NONBLOCK if nonblock else 0)
    fd = open_userfaultfd(flags)
    try:
        return fd, Uffd(fd).api(features)
    except BaseException:
        os.close(fd)
        raise


# --- PAGEMAP_SCAN ------------------------------------------------------------------------------
def pagemap_scan(
    pagemap_fd: int,
    start: int,
    end: int,
    vec: np.ndarray,
    *,
    flags: int = 0,
    max_pages: int = 0,
    category_inverted: int = 0,
    category_mask: int = 0,
    category_anyof_mask: int = 0,
    return_mask: int = 0,
    ioctl: IoctlFn | None = None,
) -> tuple[int, int]:
    """PAGEMAP_SCAN into ``vec`` (a ``PAGE_REGION_DTYPE`` array); returns (regions written, walk_end)."""
    if vec.dtype != uapi.PAGE_REGION_DTYPE or not vec.flags["C_CONTIGUOUS"]:
        raise ValueError("vec must be a C-contiguous PAGE_REGION_DTYPE array")
    vec_addr = vec.ctypes.data if len(vec) else 0
    buf = bytearray(
        struct.pack(
            uapi.PM_SCAN_ARG_FMT,
            struct.calcsize(uapi.PM_SCAN_ARG_FMT),
            flags,
            start,
            end,
            0,
            vec_addr,
            len(vec),
            max_pages,
            category_inverted,
            category_mask,
            category_anyof_mask,
            return_mask,
        )
    )
    n = (ioctl or default_ioctl)(pagemap_fd, uapi.PAGEMAP_SCAN, buf)
    walk_end = struct.unpack_from("=Q", buf, 32)[0]
    return int(n), int(walk_end)


# --- memfds, mappings, madvise ---------------------------------------------------------------
def memfd_create(name: str, size: int) -> int:
    """A close-on-exec memfd of ``size`` bytes (all holes)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Mapping:
    """A MAP_SHARED mapping of a file descriptor, with its address (unmapped by :meth:`close`)."""

    def __init__(self, fd: int, length: int, *, offset: int = 0, writable: bool = True) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        addr = _libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap: {os.strerror(err)}")
        self.addr: int = int(addr)
        self.length = length

    def view(self) -> memoryview:
        """A memoryview over the mapping; never use it after :meth:`close`."""
        return memoryview((ctypes.c_char * self.length).from_address(self.addr)).cast("B")

    def close(self) -> None:
        """munmap (idempotent)."""
        if self.addr:
            munmap(self.addr, self.length)
            self.addr = 0


def mmap_shared(fd: int, length: int, offset: int = 0) -> Mapping:
    """MAP_SHARED read-write mapping of ``fd``."""
    return Mapping(fd, length, offset=offset)


def munmap(addr: int, length: int) -> None:
    """munmap(2)."""
    if _libc.munmap(addr, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"munmap: {os.strerror(err)}")


def madvise(addr: int, length: int, advice: int) -> None:
    """madvise(2) in this process."""
    if _libc.madvise(addr, length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({advice}): {os.strerror(err)}")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE): frees the pages; the next guest access is a MISSING fault."""
    mode = uapi.FALLOC_FL_PUNCH_HOLE | uapi.FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(PUNCH_HOLE): {os.strerror(err)}")


def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """[(start, end)) byte ranges of ``fd`` in [start, end) that hold data (SEEK_DATA/SEEK_HOLE)."""
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        try:
            d = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if d >= end:
            break
        h = min(os.lseek(fd, d, os.SEEK_HOLE), end)
        out.append((d, h))
        pos = h
    return out


def buffer_address(data: bytes | bytearray | memoryview) -> tuple[int, object]:
    """Address of ``data``'s bytes in this process, plus an object that keeps them alive.

    On the fault path: ``bytes`` (what stores return) take the cheap ctypes route
    (about 1 µs); other buffers go through numpy, which accepts read-only views.
    """
    if isinstance(data, bytes):
        ptr = ctypes.c_char_p(data)
        return int(ctypes.cast(ptr, ctypes.c_void_p).value or 0), (ptr, data)
    arr = np.frombuffer(data, dtype=np.uint8)
    return int(arr.__array_interface__["data"][0]), arr


def fd_target(fd: int) -> str:
    """What ``fd`` refers to (``anon_inode:[userfaultfd]``, ``/memfd:name (deleted)``, ...)."""
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/self/fd/{fd}")
    return ""


def is_userfaultfd(fd: int) -> bool:
    """True if ``fd`` is a userfaultfd."""
    return fd_target(fd) == "anon_inode:[userfaultfd]"


def is_memfd(fd: int) -> bool:
    """True if ``fd`` is a memfd (shmem file created by memfd_create)."""
    return fd_target(fd).startswith("/memfd:")
