"""The RWP selftests of the patch (uffd-unit-tests.c, rwp-uapi.md §5), rewritten against the sim.

rwp-mprotect, rwp-gup, rwp-fork* and rwp-swap-cow exercise mprotect, GUP, fork
and swap, which the sim does not model; everything else is here.
"""

from __future__ import annotations

import errno
import threading

import numpy as np
import pytest

from tiermem.kernel import uapi
from tiermem.sim.content import page_bytes
from tiermem.sim.kernel import SIM_FEATURES, SimKernel

RWP, RWP_ASYNC = uapi.UFFD_FEATURE_RWP, uapi.UFFD_FEATURE_RWP_ASYNC
MODE_RWP = uapi.UFFDIO_REGISTER_MODE_RWP
N = 16


def filled(n: int = N) -> SimKernel:
    """A guest whose page p was written p % 255 + 1 times (the selftest's fill pattern)."""
    k = SimKernel(n)
    pages = np.repeat(np.arange(n), np.arange(n) % 255 + 1)
    k.access_batch(pages, np.ones(len(pages), dtype=bool))
    return k


def content_ok(k: SimKernel) -> bool:
    return all(k.read_page(p) == page_bytes(p, p % 255 + 1) for p in range(k.n_pages))


def no_sync_faults(msg: uapi.UffdMsg) -> None:
    raise AssertionError(f"unexpected fault delivered: {msg}")


class Handler(threading.Thread):
    """The selftest's poll thread: checks FLAG_RWP and resolves one page with RWPROTECT(mode=0)."""

    def __init__(self, k: SimKernel) -> None:
        super().__init__(daemon=True)
        self.k, self.faults, self.bad_flags = k, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for m in self.k.read_messages(0.05):
                if not m.flags & uapi.UFFD_PAGEFAULT_FLAG_RWP:
                    self.bad_flags += 1
                self.faults += 1
                self.k.rwprotect(m.address, self.k.page_size, protect=False)


def test_rwp_async() -> None:
    k = filled()
    k.api(RWP | RWP_ASYNC)
    k.register(k.base, k.size, MODE_RWP)
    k.rwprotect(k.base, k.size, protect=True)
    k.set_fault_handler(no_sync_faults)
    assert content_ok(k)
    assert k.read_messages(0) == []
    assert k.stats.async_resolved == N and k.stats.rwp_faults == 0


def test_rwp_sync() -> None:
    k = filled()
    k.api(RWP)
    k.register(k.base, k.size, MODE_RWP)
    k.rwprotect(k.base, k.size, protect=True)
    h = Handler(k)
    h.start()
    assert content_ok(k)
    h.stop.set()
    h.join()  # joined before the counter is read
    assert h.faults == N and h.bad_flags == 0
    assert k.stats.rwp_faults == N


@pytest.mark.parametrize("n", [4, 16, 1024])
def test_rwp_pagemap_v10_hot_scan(n: int) -> None:
    k = filled(n)
    k.api(RWP | RWP_ASYNC)
    k.register(k.base, k.size, MODE_RWP)
    k.rwprotect(k.base, k.size, protect=True)
    k.access_batch(np.arange(n // 2))
    r = k.pagemap_scan(
        k.base, k.base + k.size, category_mask=uapi.PAGE_IS_ACCESSED, return_mask=uapi.PAGE_IS_ACCESSED
    )
    assert len(r.regions) == 1
    assert (int(r.regions[0]["start"]), int(r.regions[0]["end"])) == (k.base, k.base + n // 2 * k.page_size)
    assert int(r.regions[0]["categories"]) == uapi.PAGE_IS_ACCESSED
    assert r.walk_end == k.base + k.size
    # The v2 form (inverted, vec_len=16): the first cold region starts at the second half.
    inv = k.pagemap_scan(
        k.base,
        k.base + k.size,
        category_mask=uapi.PAGE_IS_ACCESSED,
        category_inverted=uapi.PAGE_IS_ACCESSED,
        return_mask=uapi.PAGE_IS_ACCESSED,
        vec_len=16,
    )
    assert len(inv.regions) >= 1
    assert int(inv.regions[0]["start"]) == k.base + n // 2 * k.page_size
    assert int(inv.regions[0]["categories"]) == 0


def test_rwp_async_toggle() -> None:
    k = filled()
    half = N // 2
    k.api(RWP | RWP_ASYNC)
    k.register(k.base, k.size, MODE_RWP)
    k.rwprotect(k.base, k.size, protect=True)
    k.access_batch(np.arange(half))  # phase 1, async: auto-resolved
    assert k.read_messages(0) == []
    k.set_mode(disable=RWP_ASYNC)
    h = Handler(k)
    h.start()
    k.access_batch(np.arange(half, N))  # phase 2, sync: delivered and resolved by the handler
    h.stop.set()
    h.join()
    assert h.faults == N - half
    k.set_mode(enable=RWP_ASYNC)  # phase 3: re-protect, touch all, no handler running
    k.rwprotect(k.base, k.size, protect=True)
    k.set_fault_handler(no_sync_faults)
    assert content_ok(k)
    assert k.read_messages(0) == []


def test_rwp_close_restores_access_and_wakes_a_blocked_reader() -> None:
    k = filled()
    k.api(RWP)
    k.register(k.base, k.size, MODE_RWP)
    k.rwprotect(k.base, k.size, protect=True)
    blocked = threading.Thread(target=k.access, args=(3,), daemon=True)
    blocked.start()
    assert len(k.read_messages(5)) == 1
    k.close()
    blocked.join(10)
    assert not blocked.is_alive()
    k.set_fault_handler(no_sync_faults)
    assert content_ok(k)
    assert k.read_messages(0) == []
    r = k.pagemap_scan(k.base, k.base + k.size, category_mask=uapi.PAGE_IS_ACCESSED)
    assert len(r.regions) == 0  # no RWP VMA is left, so nothing is reported as accessed


def test_rwp_wp_exclusive() -> None:
    k = SimKernel(N)
    k.api(RWP | uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
    with pytest.raises(OSError) as e:
        k.register(k.base, k.size, uapi.UFFDIO_REGISTER_MODE_WP | MODE_RWP)
    assert e.value.errno == errno.EINVAL


def test_api_probe() -> None:
    probe = SimKernel(1)
    info = probe.api(0)
    assert info.features & RWP and info.features & RWP_ASYNC
    assert info.features == SIM_FEATURES
    base = (1 << uapi._UFFDIO_REGISTER) | (1 << uapi._UFFDIO_UNREGISTER) | (1 << uapi._UFFDIO_API)
    assert info.ioctls & base == base  # what the v10 selftest checks
    assert info.ioctls == uapi.UFFD_API_IOCTLS  # the header also reports SET_MODE
    with pytest.raises(OSError) as e:
        probe.api(0)
    assert e.value.errno == errno.EINVAL


def test_api_probe_on_a_kernel_without_rwp() -> None:
    k = SimKernel(4, features=SIM_FEATURES & ~(RWP | RWP_ASYNC))
    with pytest.raises(OSError) as e:
        k.api(RWP)
    assert e.value.errno == errno.EINVAL
    info = k.api(uapi.UFFD_FEATURE_MISSING_SHMEM)  # a failed UFFDIO_API leaves the ctx uninitialised
    assert not info.features & RWP
    with pytest.raises(OSError) as e:
        k.register(k.base, k.size, MODE_RWP)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        k.set_mode(disable=RWP_ASYNC)
    assert e.value.errno == errno.EINVAL
