"""Guest memory of the simulated kernel: the shmem memfd's pages and the guest PTE state.

One state byte per page (``sim_scan.ST_*``) stands for the page cache + guest PTE:
not in the memfd, in the page cache but unmapped in the guest (pte_none), mapped with
the uffd bit (RWP-protected), mapped without it.
Contents follow :mod:`tiermem.sim.content`, either as real bytes (a numpy image
of the memfd) or, in synthetic mode, as one u32 write counter per page from which
the bytes are materialised and into which installed bytes are decoded.

No locking here: :class:`tiermem.sim.kernel.SimKernel` holds its lock around every call.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import numpy as np

from tiermem.sim import content
from tiermem.sim.scan import ST_ACC, ST_CACHED, ST_NONE

__all__ = ["CORRUPT", "SimMemory", "VmaList"]

CORRUPT = 0xFFFF_FFFF
"""Synthetic-mode counter of a page installed with bytes that are not a valid ``page_bytes``."""


class SimMemory:
    """Pages of one simulated memfd and their guest PTE state."""

    def __init__(self, n_pages: int, page_size: int, *, synthetic: bool, populated: bool) -> None:
        self.n_pages = n_pages
        self.page_size = page_size
        self.synthetic = synthetic
        self.state = np.full(n_pages, ST_ACC if populated else ST_NONE, dtype=np.uint8)
        self.image: np.ndarray | None = None
        self.ctr: np.ndarray
        if synthetic:
            self.ctr = np.zeros(n_pages, dtype=np.uint32)
        else:
            self.image = np.zeros(n_pages * page_size, dtype=np.uint8)  # calloc: untouched = no RSS
            self.ctr = self.image.reshape(n_pages, page_size).view("<u4")[:, content.COUNTER_OFFSET // 4]

    def bytes_per_page(self) -> tuple[int, int]:
        """(PTE state bytes per page, content bytes per page)."""
        return self.state.itemsize, (self.ctr.itemsize if self.synthetic else self.page_size)

    # --- PTE state --------------------------------------------------------------------------------
    def protect(self, p0: int, p1: int) -> None:
        """UFFDIO_RWPROTECT(MODE_RWP): mapped pages get PAGE_NONE + the uffd bit; pte_none pages
        (holes and cached-but-unmapped pages) have no PTE to protect and stay as they are."""
        sl = self.state[p0:p1]
        # mapped (bit 0 set): & 1 -> ST_PROT; unmapped: & 3 keeps ST_NONE / ST_CACHED
        np.bitwise_and(sl, 3 - ((sl & 1) << 1), out=sl)

    def zap(self, p0: int, p1: int) -> None:
        """MADV_DONTNEED on the guest mapping: PTEs (and markers) go, the shmem page cache stays."""
        sl = self.state[p0:p1]
        sl[sl != ST_NONE] = ST_CACHED

    def map_cached(self, p0: int, p1: int) -> None:
        """UFFDIO_CONTINUE: cached pages get a PTE without the uffd bit."""
        self.state[p0:p1] = ST_ACC

    def resolve(self, p0: int, p1: int) -> None:
        """Restore the VMA permissions of protected pages (RWPROTECT clear, unregister, close)."""
        sl = self.state[p0:p1]
        np.bitwise_or(sl, (sl & 1) << 1, out=sl)

    def touch(self, pages: np.ndarray, writes: np.ndarray | None) -> None:
        """Non-faulting guest accesses: each page ends mapped without the uffd bit; writes count."""
        self.state[pages] = ST_ACC
        if writes is not None and writes.any():
            w = pages[writes]
            np.add.at(self.ctr, w, np.uint32(1))
            if self.image is not None:
                stamps = self.image.reshape(self.n_pages, self.page_size).view("<u8")
                stamps[w, content.PAGE_INDEX_OFFSET // 8] = w.astype(np.uint64)

    def touch_one(self, page: int, write: bool) -> None:
        """``touch`` for one access, without array temporaries."""
        self.state[page] = ST_ACC
        if write:
            self.ctr[page] += np.uint32(1)
            if self.image is not None:
                at = page * self.page_size + content.PAGE_INDEX_OFFSET
                self.image[at : at + 8] = np.frombuffer(page.to_bytes(8, "little"), dtype=np.uint8)

    # --- contents ---------------------------------------------------------------------------------
    def install(self, p0: int, data: memoryview) -> None:
        """Place whole pages of ``data`` at page ``p0`` (UFFDIO_COPY); they become present."""
        n = len(data) // self.page_size
        if not n:
            return
        if self.image is not None:
            a = p0 * self.page_size
            self.image[a : a + n * self.page_size] = np.frombuffer(
                data, dtype=np.uint8, count=n * self.page_size
            )
        elif n == 1:  # the common case, without array temporaries
            c = content.counter_of(data)
            ok = bytes(data[: self.page_size]) == content.page_bytes(p0, c, self.page_size)
            self.ctr[p0] = c if ok else CORRUPT
        else:
            ctr, valid = content.decode_pages(data[: n * self.page_size], p0, self.page_size)
            self.ctr[p0 : p0 + n] = np.where(valid, ctr, np.uint32(CORRUPT))
        self.state[p0 : p0 + n] = ST_ACC

    def install_zero(self, p0: int, p1: int) -> None:
        """UFFDIO_ZEROPAGE: zero-filled pages become present."""
        self._zero(p0, p1)
        self.state[p0:p1] = ST_ACC

    def punch(self, p0: int, p1: int) -> None:
        """fallocate(PUNCH_HOLE): the pages and their PTEs (and so the RWP marker) are gone."""
        self._zero(p0, p1)
        self.state[p0:p1] = ST_NONE

    def _zero(self, p0: int, p1: int) -> None:
        if self.image is not None:
            self.image[p0 * self.page_size : p1 * self.page_size] = 0
        else:
            self.ctr[p0:p1] = 0

    def read(self, a: int, b: int) -> bytes:
        """Bytes [a, b) of the memfd (holes read as zeros)."""
        if self.image is not None:
            return self.image[a:b].tobytes()
        p0, p1 = a // self.page_size, -(-b // self.page_size)
        raw = content.pages_bytes(np.arange(p0, p1), self.ctr[p0:p1], self.page_size)
        off = a - p0 * self.page_size
        return raw[off : off + (b - a)]

    def write(self, a: int, data: memoryview) -> None:
        """Write through the I/O mapping (whole pages in synthetic mode).

        A hole written to is allocated in the page cache but not mapped in the guest mapping
        (ST_CACHED), as a ``pwrite`` is: the guest PTEs are untouched."""
        b = a + len(data)
        if self.image is not None:
            self.image[a:b] = np.frombuffer(data, dtype=np.uint8)
            sl = self.state[a // self.page_size : -(-b // self.page_size)]
            sl[sl == ST_NONE] = ST_CACHED
        else:
            p0, p1 = a // self.page_size, b // self.page_size
            before = self.state[p0:p1].copy()
            self.install(p0, data)
            self.state[p0:p1] = np.where(before == ST_NONE, np.uint8(ST_CACHED), before)

    def page(self, page: int) -> bytes:
        """The bytes of one page."""
        if self.image is not None:
            return self.image[page * self.page_size : (page + 1) * self.page_size].tobytes()
        return content.page_bytes(page, int(self.ctr[page]), self.page_size)

    def compare(self, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(present pages whose bytes differ from ``page_bytes(page, expected)``, unpopulated pages)."""
        present = self.state != ST_NONE
        if self.image is not None:
            ctr, valid = content.decode_pages(self.image, 0, self.page_size)
        else:
            ctr, valid = self.ctr, self.ctr != CORRUPT
        bad = present & (~valid | (ctr != expected))
        return np.flatnonzero(bad), np.flatnonzero(~present)


class VmaList:
    """The VMAs of the guest mapping: (start page, end page, uffd registration mode) tiles.

    Registering a sub-range splits VMAs and equal neighbours merge again, as in the
    kernel; modes are looked up per page (bisect) or per batch (searchsorted).
    """

    def __init__(self, n_pages: int) -> None:
        self.n_pages = n_pages
        self._vmas: list[tuple[int, int, int]] = []
        self.set(0, n_pages, 0)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return iter(self._vmas)

    @property
    def single(self) -> int | None:
        """The mode when one VMA covers the guest (the common case), else None."""
        return self._vmas[0][2] if len(self._vmas) == 1 else None

    def set(self, p0: int, p1: int, mode: int) -> None:
        """Give pages [p0, p1) the registration ``mode``."""
        pieces: list[tuple[int, int, int]] = []
        for s, e, m in self._vmas:
            if s < p0:
                pieces.append((s, min(e, p0), m))
            if e > p1:
                pieces.append((max(s, p1), e, m))
        pieces.append((p0, p1, mode))
        pieces.sort()
        merged: list[tuple[int, int, int]] = []
        for s, e, m in pieces:
            if merged and merged[-1][2] == m and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e, m)
            else:
                merged.append((s, e, m))
        self._vmas = merged
        self._starts = [s for s, _, _ in merged]
        self._start_arr = np.array(self._starts, dtype=np.int64)
        self._mode_arr = np.array([m for _, _, m in merged], dtype=np.int64)

    def overlapping(self, p0: int, p1: int) -> list[tuple[int, int, int]]:
        """The VMAs that intersect pages [p0, p1)."""
        return [v for v in self._vmas if v[0] < p1 and v[1] > p0]

    def modes_in(self, p0: int, p1: int) -> list[int]:
        """Modes of the VMAs that intersect pages [p0, p1)."""
        if len(self._vmas) == 1:
            return [self._vmas[0][2]]
        return [m for _, _, m in self.overlapping(p0, p1)]

    def mode_of(self, page: int) -> int:
        """Mode of one page."""
        if len(self._vmas) == 1:
            return self._vmas[0][2]
        return self._vmas[bisect.bisect_right(self._starts, page) - 1][2]

    def modes_of(self, pages: np.ndarray) -> np.ndarray:
        """Modes of many pages (vectorised)."""
        out: np.ndarray = self._mode_arr[np.searchsorted(self._start_arr, pages, side="right") - 1]
        return out
