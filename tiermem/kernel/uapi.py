"""userfaultfd and PAGEMAP_SCAN uapi: constants, struct layouts, ioctl numbers.

One module shared by the simulated and the real backends. Values are those of
``include/uapi/linux/userfaultfd.h`` and ``include/uapi/linux/fs.h`` (x86_64),
plus the RWP series (v1..v10 share the same uapi; see
``../shared/reference/rwp-uapi.md``). Struct layouts are expressed as Python
``struct`` formats; every size is asserted at import.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

# --- ioctl encoding (asm-generic/ioctl.h) -------------------------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


def _iowr(typ: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, typ, nr, size)


def _ior(typ: int, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, typ, nr, size)


def _iow(typ: int, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, typ, nr, size)


# --- syscalls and open flags (x86_64) ------------------------------------------------------
NR_USERFAULTFD = 323
NR_MEMFD_CREATE = 319
NR_PROCESS_MADVISE = 440
UFFD_USER_MODE_ONLY = 1
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_NOHUGEPAGE = 15

# --- userfaultfd.h ---------------------------------------------------------------------------
UFFD_API = 0xAA
UFFDIO = 0xAA

_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_MOVE = 0x05
_UFFDIO_WRITEPROTECT = 0x06
_UFFDIO_CONTINUE = 0x07
_UFFDIO_POISON = 0x08
_UFFDIO_RWPROTECT = 0x09  # RWP series
_UFFDIO_SET_MODE = 0x0A  # RWP series
_UFFDIO_API = 0x3F

# Struct formats ('=' : native order, no padding; the kernel structs are naturally aligned u64s).
UFFDIO_API_FMT = "=QQQ"  # api, features, ioctls
UFFDIO_RANGE_FMT = "=QQ"  # start, len
UFFDIO_REGISTER_FMT = "=QQQQ"  # range.start, range.len, mode, ioctls
UFFDIO_COPY_FMT = "=QQQQq"  # dst, src, len, mode, copy
UFFDIO_ZEROPAGE_FMT = "=QQQq"  # range.start, range.len, mode, zeropage
UFFDIO_MOVE_FMT = "=QQQQq"  # dst, src, len, mode, move
UFFDIO_WRITEPROTECT_FMT = "=QQQ"  # range.start, range.len, mode
UFFDIO_CONTINUE_FMT = "=QQQq"  # range.start, range.len, mode, mapped
UFFDIO_POISON_FMT = "=QQQq"  # range.start, range.len, mode, updated
UFFDIO_RWPROTECT_FMT = "=QQQ"  # range.start, range.len, mode
UFFDIO_SET_MODE_FMT = "=QQ"  # enable, disable
UFFD_MSG_SIZE = 32
UFFD_MSG_PAGEFAULT_FMT = "=BBHIQQI4x"  # event, reserved1, reserved2, reserved3, flags, address, ptid
UFFD_MSG_REMOVE_FMT = "=BBHIQQ8x"  # event, ..., start, end
UFFD_MSG_REMAP_FMT = "=BBHIQQQ"  # event, ..., from, to, len

UFFDIO_REGISTER = _iowr(UFFDIO, _UFFDIO_REGISTER, struct.calcsize(UFFDIO_REGISTER_FMT))
UFFDIO_UNREGISTER = _ior(UFFDIO, _UFFDIO_UNREGISTER, struct.calcsize(UFFDIO_RANGE_FMT))
UFFDIO_WAKE = _ior(UFFDIO, _UFFDIO_WAKE, struct.calcsize(UFFDIO_RANGE_FMT))
UFFDIO_COPY = _iowr(UFFDIO, _UFFDIO_COPY, struct.calcsize(UFFDIO_COPY_FMT))
UFFDIO_ZEROPAGE = _iowr(UFFDIO, _UFFDIO_ZEROPAGE, struct.calcsize(UFFDIO_ZEROPAGE_FMT))
UFFDIO_MOVE = _iowr(UFFDIO, _UFFDIO_MOVE, struct.calcsize(UFFDIO_MOVE_FMT))
UFFDIO_WRITEPROTECT = _iowr(UFFDIO, _UFFDIO_WRITEPROTECT, struct.calcsize(UFFDIO_WRITEPROTECT_FMT))
UFFDIO_CONTINUE = _iowr(UFFDIO, _UFFDIO_CONTINUE, struct.calcsize(UFFDIO_CONTINUE_FMT))
UFFDIO_POISON = _iowr(UFFDIO, _UFFDIO_POISON, struct.calcsize(UFFDIO_POISON_FMT))
UFFDIO_RWPROTECT = _iowr(UFFDIO, _UFFDIO_RWPROTECT, struct.calcsize(UFFDIO_RWPROTECT_FMT))
UFFDIO_SET_MODE = _iow(UFFDIO, _UFFDIO_SET_MODE, struct.calcsize(UFFDIO_SET_MODE_FMT))
UFFDIO_API = _iowr(UFFDIO, _UFFDIO_API, struct.calcsize(UFFDIO_API_FMT))
USERFAULTFD_IOC_NEW = _ioc(_IOC_NONE, UFFDIO, 0x00, 0)

# Events
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

# Page-fault flags
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2
UFFD_PAGEFAULT_FLAG_RWP = 1 << 3  # RWP series

# Features
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16
UFFD_FEATURE_RWP = 1 << 17  # RWP series
UFFD_FEATURE_RWP_ASYNC = 1 << 18  # RWP series

FEATURE_NAMES: dict[int, str] = {
    UFFD_FEATURE_PAGEFAULT_FLAG_WP: "PAGEFAULT_FLAG_WP",
    UFFD_FEATURE_EVENT_FORK: "EVENT_FORK",
    UFFD_FEATURE_EVENT_REMAP: "EVENT_REMAP",
    UFFD_FEATURE_EVENT_REMOVE: "EVENT_REMOVE",
    UFFD_FEATURE_MISSING_HUGETLBFS: "MISSING_HUGETLBFS",
    UFFD_FEATURE_MISSING_SHMEM: "MISSING_SHMEM",
    UFFD_FEATURE_EVENT_UNMAP: "EVENT_UNMAP",
    UFFD_FEATURE_SIGBUS: "SIGBUS",
    UFFD_FEATURE_THREAD_ID: "THREAD_ID",
    UFFD_FEATURE_MINOR_HUGETLBFS: "MINOR_HUGETLBFS",
    UFFD_FEATURE_MINOR_SHMEM: "MINOR_SHMEM",
    UFFD_FEATURE_EXACT_ADDRESS: "EXACT_ADDRESS",
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM: "WP_HUGETLBFS_SHMEM",
    UFFD_FEATURE_WP_UNPOPULATED: "WP_UNPOPULATED",
    UFFD_FEATURE_POISON: "POISON",
    UFFD_FEATURE_WP_ASYNC: "WP_ASYNC",
    UFFD_FEATURE_MOVE: "MOVE",
    UFFD_FEATURE_RWP: "RWP",
    UFFD_FEATURE_RWP_ASYNC: "RWP_ASYNC",
}

# Register modes
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
UFFDIO_REGISTER_MODE_RWP = 1 << 3  # RWP series

# Ioctl mode flags
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1
UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0
UFFDIO_CONTINUE_MODE_WP = 1 << 1
UFFDIO_POISON_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1
UFFDIO_RWPROTECT_MODE_RWP = 1 << 0  # RWP series
UFFDIO_RWPROTECT_MODE_DONTWAKE = 1 << 1  # RWP series

# Ioctl bit sets reported by UFFDIO_API / UFFDIO_REGISTER (after the RWP series).
UFFD_API_IOCTLS = (
    (1 << _UFFDIO_REGISTER) | (1 << _UFFDIO_UNREGISTER) | (1 << _UFFDIO_SET_MODE) | (1 << _UFFDIO_API)
)
UFFD_API_RANGE_IOCTLS = sum(1 << n for n in (2, 3, 4, 5, 6, 7, 8, 9))
UFFD_API_RANGE_IOCTLS_BASIC = sum(1 << n for n in (2, 3, 6, 7, 8, 9))

# --- fs.h: PAGEMAP_SCAN ------------------------------------------------------------------------
PROCFS_IOCTL_MAGIC = ord("f")
PM_SCAN_ARG_FMT = (
    "=12Q"  # size, flags, start, end, walk_end, vec, vec_len, max_pages, inv, mask, anyof, return
)
PAGE_REGION_FMT = "=QQQ"  # start, end, categories
PAGEMAP_SCAN = _iowr(PROCFS_IOCTL_MAGIC, 16, struct.calcsize(PM_SCAN_ARG_FMT))

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
PAGE_IS_GUARD = 1 << 8
PAGE_IS_ACCESSED = 1 << 9  # RWP series
PM_SCAN_CATEGORIES = (1 << 10) - 1  # with the RWP series (bit 9 included)

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1

# numpy dtype with the exact layout of struct page_region; the real backend hands
# its buffer to the kernel as ``vec``, the sim fills the same array.
PAGE_REGION_DTYPE = np.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])

# /proc/pid/pagemap entry bits
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_GUARD_REGION = 1 << 58
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63


def feature_names(features: int) -> list[str]:
    """Names of the feature bits set in ``features``, lowest bit first."""
    names = [name for bit, name in sorted(FEATURE_NAMES.items()) if features & bit]
    unknown = features & ~sum(FEATURE_NAMES)
    names += [f"BIT{b}" for b in range(64) if unknown & (1 << b)]
    return names


@dataclass(frozen=True)
class UffdMsg:
    """One message read from a userfaultfd (``struct uffd_msg``, 32 bytes packed)."""

    event: int
    flags: int = 0
    address: int = 0
    ptid: int = 0
    start: int = 0  # REMOVE/UNMAP: start; REMAP: from
    end: int = 0  # REMOVE/UNMAP: end; REMAP: to
    length: int = 0  # REMAP: len

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> UffdMsg:
        """Decode one 32-byte message."""
        event = raw[0]
        if event == UFFD_EVENT_PAGEFAULT:
            _, _, _, _, flags, address, ptid = struct.unpack(UFFD_MSG_PAGEFAULT_FMT, raw)
            return cls(event, flags=flags, address=address, ptid=ptid)
        if event in (UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP):
            _, _, _, _, start, end = struct.unpack(UFFD_MSG_REMOVE_FMT, raw)
            return cls(event, start=start, end=end)
        if event == UFFD_EVENT_REMAP:
            _, _, _, _, frm, to, ln = struct.unpack(UFFD_MSG_REMAP_FMT, raw)
            return cls(event, start=frm, end=to, length=ln)
        return cls(event)

    def pack(self) -> bytes:
        """Encode as the kernel would (used by the sim and by tests)."""
        if self.event == UFFD_EVENT_PAGEFAULT:
            return struct.pack(
                UFFD_MSG_PAGEFAULT_FMT, self.event, 0, 0, 0, self.flags, self.address, self.ptid
            )
        if self.event in (UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP):
            return struct.pack(UFFD_MSG_REMOVE_FMT, self.event, 0, 0, 0, self.start, self.end)
        if self.event == UFFD_EVENT_REMAP:
            return struct.pack(UFFD_MSG_REMAP_FMT, self.event, 0, 0, 0, self.start, self.end, self.length)
        return struct.pack("=B31x", self.event)


# Layout checks against rwp-uapi.md (a wrong format would corrupt kernel memory).
assert struct.calcsize(UFFD_MSG_PAGEFAULT_FMT) == UFFD_MSG_SIZE
assert struct.calcsize(UFFD_MSG_REMOVE_FMT) == UFFD_MSG_SIZE
assert struct.calcsize(UFFD_MSG_REMAP_FMT) == UFFD_MSG_SIZE
assert struct.calcsize(PM_SCAN_ARG_FMT) == 96
assert PAGE_REGION_DTYPE.itemsize == struct.calcsize(PAGE_REGION_FMT) == 24
assert UFFDIO_RWPROTECT == 0xC018AA09
assert UFFDIO_SET_MODE == 0x4010AA0A
assert PAGEMAP_SCAN == 0xC0606610
