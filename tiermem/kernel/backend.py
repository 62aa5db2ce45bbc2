"""The kernel backend interface: what the agent needs from a userfaultfd, named after the uapi.

One ``KernelBackend`` instance is one VM's guest memory plus its userfaultfd
context. The agent drives every backend with the same calls, following the RWP
v10 workflow (architecture brief §4):

* ``sim``  - :mod:`tiermem.sim.kernel`, the patch's semantics simulated with numpy.
* ``uffd`` - :mod:`tiermem.kernel.uffd`, stock kernels; RWP is *emulated*: ``rwprotect``
  asks the VMM to zap PTEs, the first touch is a MINOR fault that the backend
  records (``PAGE_IS_ACCESSED``) and resolves with UFFDIO_CONTINUE while in
  "async" mode, or delivers as an ``UFFD_PAGEFAULT_FLAG_RWP`` fault in sync mode.
* ``rwp``  - :mod:`tiermem.kernel.rwp`, kernels with UFFD_FEATURE_RWP.

Addresses are host virtual addresses in the VMM's address space (``base`` ..
``base + size``); ``offset`` arguments are byte offsets in the backing memfd.
Errors are raised as ``OSError`` with the kernel's errno, on every backend, so
the agent handles the sim and real kernels the same way.
"""

from __future__ import annotations

import abc
import errno
from dataclasses import dataclass

import numpy as np

from tiermem.kernel import uapi
from tiermem.kernel.uapi import PAGE_REGION_DTYPE, UffdMsg

__all__ = ["TRACKED_REGISTER_MODE", "ApiInfo", "KernelBackend", "Region", "ScanResult"]

TRACKED_REGISTER_MODE = (
    uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_MINOR | uapi.UFFDIO_REGISTER_MODE_RWP
)
"""How the agent registers a tracked guest mapping. MINOR beside RWP because a page that is in
the memfd's page cache but not mapped in the guest mapping (pte_none: written through another
mapping, MADV_DONTNEED'd, reclaimed, THP-split) cannot be RWP-protected and never raises an RWP
fault; with MINOR registered its next guest access still faults (resolved by UFFDIO_CONTINUE)."""


@dataclass(frozen=True)
class Region:
    """One guest memory region (a superset of Firecracker's GuestRegionUffdMapping)."""

    base_host_virt_addr: int
    """Start of the guest mapping in the VMM's address space."""
    size: int
    """Bytes."""
    offset: int = 0
    """Offset of the region in the backing memfd (or snapshot file)."""
    page_size: int = 4096
    """Bytes."""


@dataclass(frozen=True)
class ApiInfo:
    """Result of UFFDIO_API."""

    features: int
    ioctls: int


@dataclass(frozen=True)
class ScanResult:
    """Result of PAGEMAP_SCAN: merged regions and where the walk stopped."""

    regions: np.ndarray
    """Array of ``PAGE_REGION_DTYPE`` (start, end exclusive, categories & return_mask)."""
    walk_end: int

    @classmethod
    def empty(cls, walk_end: int) -> ScanResult:
        """No regions."""
        return cls(np.zeros(0, dtype=PAGE_REGION_DTYPE), walk_end)

    def page_mask(self, start: int, end: int, page_size: int) -> np.ndarray:
        """A bool array, one entry per page of [start, end), True inside any region."""
        n = (end - start) // page_size
        delta = np.zeros(n + 1, dtype=np.int32)
        if len(self.regions):
            s = ((self.regions["start"] - start) // page_size).astype(np.int64)
            e = ((self.regions["end"] - start) // page_size).astype(np.int64)
            np.add.at(delta, s, 1)
            np.add.at(delta, e, -1)
        return np.cumsum(delta[:-1]) > 0

    def pages_with(self, start: int, end: int, page_size: int, categories: int) -> np.ndarray:
        """Like :meth:`page_mask`, for the regions whose returned categories include all of ``categories``."""
        sel = (self.regions["categories"] & np.uint64(categories)) == np.uint64(categories)
        return ScanResult(self.regions[sel], self.walk_end).page_mask(start, end, page_size)


class KernelBackend(abc.ABC):
    """One VM's guest memory and userfaultfd context."""

    name: str = "abstract"
    """Backend name: ``sim``, ``uffd`` or ``rwp``."""
    tracking: bool = True
    """False for MISSING-only backends (Firecracker lazy restore): no access tracking, no cycles."""
    anonymous: bool = False
    """True when guest memory is private anonymous (Firecracker): a REMOVE event (MADV_DONTNEED or
    MADV_REMOVE) then means "reads as zero". On a shmem memfd MADV_DONTNEED keeps the page cache, so
    the same event does not say whether the data went."""

    def __init__(self, base: int, size: int, page_size: int = 4096) -> None:
        self.base = base
        self.size = size
        self.page_size = page_size

    @property
    def n_pages(self) -> int:
        """Pages of guest memory."""
        return self.size // self.page_size

    def addr(self, page: int) -> int:
        """Host virtual address of guest page index ``page``."""
        return self.base + page * self.page_size

    def page_of(self, addr: int) -> int:
        """Guest page index of host virtual address ``addr``."""
        return (addr - self.base) // self.page_size

    def page_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """Guest pages ``[first, last)`` that the address range ``[start, end)`` touches, clipped to
        guest memory (one range here; several where guest memory has holes)."""
        first = max((start - self.base) // self.page_size, 0)
        last = min((end - self.base + self.page_size - 1) // self.page_size, self.n_pages)
        return [(first, last)] if last > first else []

    # --- negotiation and registration -------------------------------------------------
    @abc.abstractmethod
    def api(self, features: int) -> ApiInfo:
        """UFFDIO_API; EINVAL if a feature is unsupported or API was already called."""

    @abc.abstractmethod
    def register(self, start: int, length: int, mode: int) -> int:
        """UFFDIO_REGISTER; returns the range ioctls bitmask."""

    @abc.abstractmethod
    def unregister(self, start: int, length: int) -> None:
        """UFFDIO_UNREGISTER."""

    # --- tracking -------------------------------------------------------------------------
    @abc.abstractmethod
    def rwprotect(self, start: int, length: int, *, protect: bool, dontwake: bool = False) -> None:
        """UFFDIO_RWPROTECT: protect (MODE_RWP) or resolve (mode 0, wakes unless dontwake)."""

    @abc.abstractmethod
    def set_mode(self, *, enable: int = 0, disable: int = 0) -> None:
        """UFFDIO_SET_MODE: toggle UFFD_FEATURE_RWP_ASYNC; waits for in-flight faults."""

    @abc.abstractmethod
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
        """PAGEMAP_SCAN over [start, end). ``vec_len`` 0 means "enough for the whole range"."""

    # --- resolving faults -------------------------------------------------------------------
    @abc.abstractmethod
    def copy(self, dst: int, data: bytes | memoryview, *, dontwake: bool = False) -> int:
        """UFFDIO_COPY of ``data`` (page multiple) to ``dst``; returns bytes copied. EEXIST if present."""

    @abc.abstractmethod
    def zeropage(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """UFFDIO_ZEROPAGE; returns bytes mapped."""

    @abc.abstractmethod
    def continue_(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """UFFDIO_CONTINUE: map the page-cache pages of [start, start+length)."""

    @property
    def can_poison(self) -> bool:
        """True if :meth:`poison` works on this VM (UFFD_FEATURE_POISON was negotiated)."""
        return False

    def poison(self, start: int, length: int) -> int:
        """UFFDIO_POISON: the guest gets SIGBUS on [start, start+length) (a page that is lost for good).

        OSError(EOPNOTSUPP) where the backend cannot poison (the fault then keeps waiting)."""
        raise OSError(errno.EOPNOTSUPP, f"the {self.name} backend cannot poison pages")

    @abc.abstractmethod
    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE: wake threads blocked on faults in the range."""

    # --- backing memory ---------------------------------------------------------------------
    @abc.abstractmethod
    def punch_hole(self, offset: int, length: int) -> None:
        """fallocate(PUNCH_HOLE|KEEP_SIZE) on the backing memfd."""

    @abc.abstractmethod
    def io_read(self, offset: int, length: int) -> bytes:
        """Read through the second (I/O) mapping; bypasses tracking."""

    @abc.abstractmethod
    def io_write(self, offset: int, data: bytes | memoryview) -> None:
        """Write through the second (I/O) mapping; bypasses tracking."""

    def populated(self) -> np.ndarray:
        """Bool per page: backed by memory now (not punched, not never-touched).

        Backends override this with something cheaper than a pagemap walk.
        """
        raise NotImplementedError

    # --- messages -----------------------------------------------------------------------------
    @abc.abstractmethod
    def read_messages(self, timeout: float | None) -> list[UffdMsg]:
        """Block up to ``timeout`` seconds for fault/event messages; [] on timeout or close."""

    def message_done(self) -> None:  # a hook: only backends with a native reader need it
        """The agent finished dispatching one message from :meth:`read_messages`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the uffd and mappings; protection never outlives it (rwp-close)."""

    @property
    def closed(self) -> bool:
        """True once closed, or once the VMM went away."""
        return False
