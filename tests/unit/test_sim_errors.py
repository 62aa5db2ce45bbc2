"""Every error case of the sim, with the errno the patched kernel returns."""

from __future__ import annotations

import errno
from collections.abc import Callable

import numpy as np
import pytest

from tiermem.errors import InvalidArgument
from tiermem.kernel import uapi
from tiermem.sim.kernel import SimKernel

RWP, RWP_ASYNC = uapi.UFFD_FEATURE_RWP, uapi.UFFD_FEATURE_RWP_ASYNC
MISSING, WP, MINOR, MODE_RWP = (
    uapi.UFFDIO_REGISTER_MODE_MISSING,
    uapi.UFFDIO_REGISTER_MODE_WP,
    uapi.UFFDIO_REGISTER_MODE_MINOR,
    uapi.UFFDIO_REGISTER_MODE_RWP,
)
PS = 4096


def armed(n: int = 8, features: int = RWP | RWP_ASYNC, mode: int = MODE_RWP | MISSING) -> SimKernel:
    k = SimKernel(n)
    k.api(features)
    if mode:
        k.register(k.base, k.size, mode)
    return k


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(OSError) as e:
        fn()
    assert e.value.errno is not None
    return e.value.errno


# --- UFFDIO_API -----------------------------------------------------------------------------------
def test_api_errors() -> None:
    k = SimKernel(4)
    assert errno_of(lambda: k.api(RWP_ASYNC)) == errno.EINVAL  # RWP_ASYNC requires RWP
    assert errno_of(lambda: k.api(uapi.UFFD_FEATURE_EVENT_FORK)) == errno.EINVAL  # not offered
    assert errno_of(lambda: k.api(1 << 40)) == errno.EINVAL
    k.api(RWP)
    assert errno_of(lambda: k.api(RWP)) == errno.EINVAL  # second UFFDIO_API


@pytest.mark.parametrize(
    "op",
    [
        lambda k: k.register(k.base, k.size, MODE_RWP),
        lambda k: k.unregister(k.base, k.size),
        lambda k: k.rwprotect(k.base, k.size, protect=True),
        lambda k: k.set_mode(enable=RWP_ASYNC),
        lambda k: k.copy(k.base, bytes(PS)),
        lambda k: k.zeropage(k.base, PS),
        lambda k: k.wake(k.base, PS),
        lambda k: k.read_messages(0),
    ],
)
def test_uffd_ops_before_api_are_einval(op: Callable[[SimKernel], object]) -> None:
    assert errno_of(lambda: op(SimKernel(4))) == errno.EINVAL


def test_uffd_ops_after_close_are_ebadf_but_memory_stays_usable() -> None:
    k = armed()
    k.close()
    assert errno_of(lambda: k.rwprotect(k.base, k.size, protect=True)) == errno.EBADF
    assert errno_of(lambda: k.register(k.base, k.size, MODE_RWP)) == errno.EBADF
    assert errno_of(lambda: k.api(0)) == errno.EBADF
    assert k.read_messages(0) == [] and k.closed
    k.punch_hole(0, PS)  # the memfd and the mappings outlive the uffd
    assert k.io_read(0, PS) == bytes(PS)
    k.access(0, write=True)
    assert k.counters()[0] == 1


# --- UFFDIO_REGISTER ------------------------------------------------------------------------------
def test_register_errors() -> None:
    k = armed(mode=0)
    assert errno_of(lambda: k.register(k.base, k.size, WP | MODE_RWP)) == errno.EINVAL
    assert errno_of(lambda: k.register(k.base, k.size, 0)) == errno.EINVAL
    assert errno_of(lambda: k.register(k.base, k.size, 1 << 4)) == errno.EINVAL
    assert errno_of(lambda: k.register(k.base + 1, PS, MODE_RWP)) == errno.EINVAL
    assert errno_of(lambda: k.register(k.base, PS + 1, MODE_RWP)) == errno.EINVAL
    assert errno_of(lambda: k.register(k.base, 0, MODE_RWP)) == errno.EINVAL
    assert errno_of(lambda: k.register(k.base, k.size + PS, MODE_RWP)) == errno.EINVAL
    assert errno_of(lambda: k.register(k.base - PS, PS, MODE_RWP)) == errno.EINVAL
    no_rwp = armed(features=uapi.UFFD_FEATURE_MISSING_SHMEM, mode=0)
    assert errno_of(lambda: no_rwp.register(no_rwp.base, no_rwp.size, MODE_RWP)) == errno.EINVAL
    no_rwp.register(no_rwp.base, no_rwp.size, MISSING)  # MISSING needs no feature


def test_reregister_dropping_rwp_or_wp_is_ebusy() -> None:
    k = armed(mode=MODE_RWP | MISSING)
    assert errno_of(lambda: k.register(k.base, PS, MISSING)) == errno.EBUSY
    assert errno_of(lambda: k.register(k.base, k.size, WP)) == errno.EBUSY  # drops RWP too
    k.register(k.base, PS, MODE_RWP)  # keeping RWP is fine (MISSING is replaced)
    k.unregister(k.base, k.size)
    k.register(k.base, k.size, WP)
    assert errno_of(lambda: k.register(k.base, k.size, MODE_RWP)) == errno.EBUSY  # drops WP
    k.register(k.base, k.size, WP | MISSING)


def test_register_ioctls_bitmask() -> None:
    k = armed(mode=0)
    rwp = k.register(k.base, PS, MODE_RWP | MISSING)
    assert rwp & (1 << uapi._UFFDIO_RWPROTECT)
    assert not rwp & (1 << uapi._UFFDIO_CONTINUE) and not rwp & (1 << uapi._UFFDIO_WRITEPROTECT)
    assert rwp & (1 << uapi._UFFDIO_COPY) and rwp & (1 << uapi._UFFDIO_WAKE)
    missing = k.register(k.base + PS, PS, MISSING)
    assert not missing & (1 << uapi._UFFDIO_RWPROTECT)
    minor = k.register(k.base + 2 * PS, PS, MINOR)
    assert minor & (1 << uapi._UFFDIO_CONTINUE)
    wp = k.register(k.base + 3 * PS, PS, WP)
    assert wp & (1 << uapi._UFFDIO_WRITEPROTECT) and not wp & (1 << uapi._UFFDIO_RWPROTECT)


# --- UFFDIO_RWPROTECT -----------------------------------------------------------------------------
def test_rwprotect_errors() -> None:
    k = armed(mode=0)
    k.register(k.base, 4 * PS, MODE_RWP)
    k.register(k.base + 4 * PS, 4 * PS, MISSING)
    assert errno_of(lambda: k.rwprotect(k.base, 8 * PS, protect=True)) == errno.ENOENT  # partly RWP
    assert errno_of(lambda: k.rwprotect(k.base + 4 * PS, PS, protect=False)) == errno.ENOENT
    assert errno_of(lambda: k.rwprotect(k.base + 8 * PS, PS, protect=True)) == errno.ENOENT  # no VMA
    assert errno_of(lambda: k.rwprotect(k.base + 1, PS, protect=True)) == errno.EINVAL
    assert errno_of(lambda: k.rwprotect(k.base, 0, protect=True)) == errno.EINVAL
    assert errno_of(lambda: k.rwprotect(k.base, 100, protect=True)) == errno.EINVAL
    assert errno_of(lambda: k.rwprotect(k.base, PS, protect=True, dontwake=True)) == errno.EINVAL
    # Nothing changed by the failed calls: every page still reads as accessed.
    r = k.pagemap_scan(k.base, k.base + 4 * PS, category_mask=uapi.PAGE_IS_ACCESSED)
    assert len(r.regions) == 1 and int(r.regions[0]["end"]) == k.base + 4 * PS


def test_rwprotect_marks_only_present_pages() -> None:
    k = armed(mode=MODE_RWP)  # no MISSING: a hole is zero-filled on touch
    k.punch_hole(2 * PS, PS)
    k.rwprotect(k.base, k.size, protect=True)
    k.set_fault_handler(lambda m: pytest.fail(f"unexpected fault {m}"))
    k.set_mode(enable=RWP_ASYNC)
    k.access(2)  # populated after the protect: not protected, not a fault
    assert k.stats.zero_fills == 1 and k.stats.async_resolved == 0


# --- UFFDIO_SET_MODE ------------------------------------------------------------------------------
def test_set_mode_errors() -> None:
    k = armed()
    assert errno_of(lambda: k.set_mode(enable=RWP_ASYNC, disable=RWP_ASYNC)) == errno.EINVAL
    assert errno_of(lambda: k.set_mode(enable=uapi.UFFD_FEATURE_WP_ASYNC)) == errno.EINVAL
    assert errno_of(lambda: k.set_mode(disable=RWP)) == errno.EINVAL
    k.set_mode(disable=RWP_ASYNC)
    assert not k.async_mode
    k.set_mode(enable=RWP_ASYNC)
    assert k.async_mode
    plain = armed(features=uapi.UFFD_FEATURE_MISSING_SHMEM, mode=MISSING)
    assert errno_of(lambda: plain.set_mode(enable=RWP_ASYNC)) == errno.EINVAL


# --- PAGEMAP_SCAN ---------------------------------------------------------------------------------
def test_pagemap_scan_errors() -> None:
    k = armed()
    lo, hi = k.base, k.base + k.size
    r = k.pagemap_scan(lo, hi, flags=uapi.PM_SCAN_WP_MATCHING)  # mainline skips RWP VMAs silently
    assert len(r.regions) == 0 and r.walk_end == hi
    assert errno_of(lambda: k.pagemap_scan(lo, hi, flags=1 << 5)) == errno.EINVAL
    assert errno_of(lambda: k.pagemap_scan(lo, hi, size=88)) == errno.EINVAL
    assert errno_of(lambda: k.pagemap_scan(lo, hi, category_mask=1 << 10)) == errno.EINVAL
    assert errno_of(lambda: k.pagemap_scan(lo, hi, return_mask=1 << 12)) == errno.EINVAL
    assert errno_of(lambda: k.pagemap_scan(lo, hi, category_anyof_mask=-1)) == errno.EINVAL
    assert errno_of(lambda: k.pagemap_scan(lo + 1, hi)) == errno.EINVAL
    assert errno_of(lambda: k.pagemap_scan(lo, hi, max_pages=-1)) == errno.EINVAL
    assert errno_of(lambda: k.pagemap_scan(hi, lo)) == errno.EFAULT
    assert errno_of(lambda: k.pagemap_scan(lo, hi, flags=uapi.PM_SCAN_CHECK_WPASYNC)) == errno.EPERM
    plain = armed(mode=MISSING)  # WP_MATCHING silently skips non-WP-async VMAs
    r = plain.pagemap_scan(plain.base, plain.base + plain.size, flags=uapi.PM_SCAN_WP_MATCHING)
    assert len(r.regions) == 0 and r.walk_end == plain.base + plain.size


# --- COPY / ZEROPAGE / CONTINUE / WAKE --------------------------------------------------------------
def test_copy_and_zeropage_errors() -> None:
    k = armed(mode=0)
    k.register(k.base, 4 * PS, MODE_RWP | MISSING)
    k.punch_hole(0, 4 * PS)
    assert errno_of(lambda: k.copy(k.base + 4 * PS, bytes(PS))) == errno.ENOENT  # unregistered, present
    k.punch_hole(4 * PS, PS)
    assert errno_of(lambda: k.copy(k.base + 4 * PS, bytes(PS))) == errno.ENOENT  # unregistered hole
    assert errno_of(lambda: k.copy(k.base + 3 * PS, bytes(2 * PS))) == errno.ENOENT  # straddles
    assert errno_of(lambda: k.copy(k.base + 8 * PS, bytes(PS))) == errno.ENOENT  # outside
    assert errno_of(lambda: k.copy(k.base + 1, bytes(PS))) == errno.EINVAL
    assert errno_of(lambda: k.copy(k.base, bytes(100))) == errno.EINVAL
    assert errno_of(lambda: k.copy(k.base, b"")) == errno.EINVAL
    assert errno_of(lambda: k.zeropage(k.base, 0)) == errno.EINVAL
    assert k.copy(k.base, bytes(PS)) == PS
    assert errno_of(lambda: k.copy(k.base, bytes(PS))) == errno.EEXIST
    assert errno_of(lambda: k.zeropage(k.base, PS)) == errno.EEXIST
    # A copy over [1, 4) with page 2 already present stops there: the kernel's short ``copy``.
    assert k.zeropage(k.base + 2 * PS, PS) == PS
    assert k.copy(k.base + PS, bytes(3 * PS)) == PS
    assert k.populated()[:4].tolist() == [True, True, True, False]


def test_continue_errors() -> None:
    k = armed(mode=MODE_RWP | MINOR)
    k.punch_hole(PS, PS)
    k.madvise(k.base, PS, uapi.MADV_DONTNEED)  # cached, unmapped
    assert k.continue_(k.base, PS) == PS
    assert errno_of(lambda: k.continue_(k.base, PS)) == errno.EEXIST  # mapped now
    assert errno_of(lambda: k.continue_(k.base + PS, PS)) == errno.EFAULT  # no page in the page cache
    k.unregister(k.base, PS)
    assert errno_of(lambda: k.continue_(k.base, PS)) == errno.ENOENT
    k.register(k.base, PS, MODE_RWP)
    assert errno_of(lambda: k.continue_(k.base, PS)) == errno.EINVAL  # not MINOR-registered
    assert errno_of(lambda: k.wake(k.base + 1, PS)) == errno.EINVAL


# --- backing memory ---------------------------------------------------------------------------------
def test_memfd_range_errors() -> None:
    k = SimKernel(4)
    assert errno_of(lambda: k.punch_hole(0, 5 * PS)) == errno.EINVAL
    assert errno_of(lambda: k.punch_hole(-PS, PS)) == errno.EINVAL
    assert errno_of(lambda: k.punch_hole(1, PS)) == errno.EINVAL
    assert errno_of(lambda: k.punch_hole(0, 0)) == errno.EINVAL
    assert errno_of(lambda: k.io_read(3 * PS, 2 * PS)) == errno.EINVAL
    assert errno_of(lambda: k.io_write(4 * PS, b"x")) == errno.EINVAL
    syn = SimKernel(4, synthetic=True)
    assert errno_of(lambda: syn.io_write(0, b"partial")) == errno.EINVAL  # whole pages only
    with pytest.raises(InvalidArgument):
        k.access(4)
    with pytest.raises(InvalidArgument):
        k.access_batch(np.array([0, -1]))
    with pytest.raises(InvalidArgument):
        k.access_batch(np.array([0, 1]), np.array([True]))
    with pytest.raises(InvalidArgument):
        SimKernel(0)
    with pytest.raises(InvalidArgument):
        SimKernel(4, page_size=3000)
    with pytest.raises(InvalidArgument):
        SimKernel(4, base=0x1001)


def test_injected_errors_hit_once_then_clear() -> None:
    k = armed()
    k.inject_error("rwprotect", errno.EAGAIN, count=2)
    k.inject_error("io_read", errno.EIO)
    for _ in range(2):
        assert errno_of(lambda: k.rwprotect(k.base, k.size, protect=True)) == errno.EAGAIN
    k.rwprotect(k.base, k.size, protect=True)
    assert errno_of(lambda: k.io_read(0, PS)) == errno.EIO
    assert len(k.io_read(0, PS)) == PS
    with pytest.raises(InvalidArgument):
        k.inject_error("frobnicate", errno.EIO)
