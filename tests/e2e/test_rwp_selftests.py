"""One table of RWP selftest-style cases, run against the sim and against the real kernel.

The cases mirror tools/testing/selftests/mm/uffd-unit-tests.c's RWP tests that apply to shared
shmem (rwp-async, rwp-sync, rwp-pagemap, rwp-async-toggle, rwp-close, rwp-mprotect, rwp-gup,
rwp-fork without EVENT_FORK, rwp-wp-exclusive), plus the mainline 7.3 behaviours the agent depends on (issue 16): a page
cached in the memfd but unmapped in the guest cannot be protected and never faults RWP; with
MINOR co-registered it faults MINOR and CONTINUE maps it; an inverted scan reports holes;
PM_SCAN_WP_MATCHING skips an RWP VMA; SET_MODE(enable) wakes MISSING waiters too.

Every case is written once against :class:`Target`. ``sim`` runs everywhere; ``kernel`` needs a
kernel with UFFD_FEATURE_RWP (Linux >= 7.3) and skips with the reason elsewhere; it is marked
``rwp`` so the kernel-VM tier runs it inside a 7.3 VM.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.helpers.rwp_targets import KernelTarget, SimTarget, Target, kernel_skip_reason
from tiermem.kernel import uapi
from tiermem.kernel.uapi import UffdMsg

PS = 4096
N = 16
RWP, ASYNC = uapi.UFFD_FEATURE_RWP, uapi.UFFD_FEATURE_RWP_ASYNC
MISSING, MINOR, M_RWP = (
    uapi.UFFDIO_REGISTER_MODE_MISSING,
    uapi.UFFDIO_REGISTER_MODE_MINOR,
    uapi.UFFDIO_REGISTER_MODE_RWP,
)
SHMEM = uapi.UFFD_FEATURE_MISSING_SHMEM | uapi.UFFD_FEATURE_MINOR_SHMEM
BLOCKED_S = 1.0
"""How long an access must stay blocked to count as blocked (the kernel side runs under TCG)."""


@pytest.fixture(params=["sim", pytest.param("kernel", marks=[pytest.mark.uffd, pytest.mark.rwp])])
def make(request: pytest.FixtureRequest) -> Iterator[Callable[[int], Target]]:
    if request.param == "kernel" and (why := kernel_skip_reason()):
        pytest.skip(why)
    made: list[Target] = []

    def factory(features: int) -> Target:
        t: Target = SimTarget(features, N) if request.param == "sim" else KernelTarget(features, N)
        made.append(t)
        return t

    yield factory
    for t in made:
        if isinstance(t, KernelTarget):
            t.teardown()


def fill(t: Target) -> None:
    """Page p holds p % 255 + 1 (the selftest's pattern), written through the guest mapping."""
    for p in range(N):
        t.write(p, p % 255 + 1)


def in_thread(fn: Callable[[], object]) -> threading.Thread:
    th = threading.Thread(target=fn, daemon=True)
    th.start()
    return th


def intact(t: Target) -> bool:
    if isinstance(t, SimTarget):
        return bool((t.k.counters() == t.writes).all())
    return all(t.read(p) == p % 255 + 1 for p in range(N))


def resolve_rwp_faults(t: Target, stop: threading.Event, seen: list[UffdMsg]) -> None:
    """The selftest's poll thread: check FLAG_RWP, then RWPROTECT(mode=0) the page."""
    while not stop.is_set():
        for m in t.messages(0.05):
            seen.append(m)
            t.rwprotect((m.address - t.base) // PS, 1, protect=False)


# --- the kernel selftests (shared shmem) ------------------------------------------------------------
def test_rwp_async(make: Callable[[int], Target]) -> None:
    t = make(RWP | ASYNC | SHMEM)
    t.register(0, N, M_RWP)
    fill(t)
    t.rwprotect(0, N, True)
    for p in range(N):
        t.read(p)
    assert intact(t)
    assert t.messages(0) == []


def test_rwp_sync(make: Callable[[int], Target]) -> None:
    t = make(RWP | SHMEM)
    t.register(0, N, M_RWP)
    fill(t)
    t.rwprotect(0, N, True)
    stop, seen = threading.Event(), []  # type: ignore[var-annotated]
    h = in_thread(lambda: resolve_rwp_faults(t, stop, seen))
    reader = in_thread(lambda: [t.read(p) for p in range(N)])
    reader.join(60)
    stop.set()
    h.join(10)  # joined before the counter is read
    assert not reader.is_alive()
    assert len(seen) == N and all(m.flags & uapi.UFFD_PAGEFAULT_FLAG_RWP for m in seen)
    assert intact(t)


def test_rwp_pagemap_hot_scan(make: Callable[[int], Target]) -> None:
    t = make(RWP | ASYNC | SHMEM)
    t.register(0, N, M_RWP)
    fill(t)
    t.rwprotect(0, N, True)
    for p in range(N // 2):
        t.read(p)
    acc = uapi.PAGE_IS_ACCESSED
    assert t.scan(category_mask=acc, return_mask=acc) == [(0, N // 2, acc)]


def test_rwp_async_toggle(make: Callable[[int], Target]) -> None:
    t = make(RWP | ASYNC | SHMEM)
    t.register(0, N, M_RWP)
    fill(t)
    t.rwprotect(0, N, True)
    for p in range(N // 2):
        t.read(p)  # async: auto-resolved
    assert t.messages(0) == []
    t.set_mode(disable=ASYNC)
    stop, seen = threading.Event(), []  # type: ignore[var-annotated]
    h = in_thread(lambda: resolve_rwp_faults(t, stop, seen))
    for p in range(N // 2, N):
        t.read(p)  # sync: delivered and resolved by the handler
    stop.set()
    h.join(10)
    assert len(seen) == N - N // 2
    t.set_mode(enable=ASYNC)
    t.rwprotect(0, N, True)
    for p in range(N):
        t.read(p)  # auto-resolved again, no handler
    assert t.messages(0) == [] and intact(t)


def test_rwp_close_restores_access(make: Callable[[int], Target]) -> None:
    t = make(RWP | SHMEM)
    t.register(0, N, M_RWP)
    fill(t)
    t.rwprotect(0, N, True)
    t.close()  # the only fd: its release resolves the protection
    reader = in_thread(lambda: [t.read(p) for p in range(N)])
    reader.join(30)
    assert not reader.is_alive() and intact(t)


def test_rwp_mprotect_keeps_the_marker(make: Callable[[int], Target]) -> None:
    t = make(RWP | ASYNC | SHMEM)
    if not t.models_mprotect_and_gup:
        pytest.skip("the sim does not model mprotect")
    t.register(0, N, M_RWP)
    fill(t)
    t.rwprotect(0, N, True)
    t.mprotect(0)
    t.mprotect(3)  # PROT_READ|PROT_WRITE
    acc = uapi.PAGE_IS_ACCESSED
    assert t.scan(category_mask=acc, return_mask=acc) == []  # still protected after mprotect
    for p in range(N):
        t.read(p)
    assert t.scan(category_mask=acc, return_mask=acc) == [(0, N, acc)]


def test_rwp_gup_reads_through_a_protected_page(make: Callable[[int], Target]) -> None:
    t = make(RWP | ASYNC | SHMEM)
    if not t.models_mprotect_and_gup:
        pytest.skip("the sim does not model GUP")
    t.register(0, N, M_RWP)
    t.write(0, 0xCD)
    t.rwprotect(0, N, True)
    assert t.gup_read(0) == 0xCD
    assert t.read(0) == 0xCD


def test_rwp_fork_child_reads_and_the_parent_keeps_the_marker(make: Callable[[int], Target]) -> None:
    # rwp-fork for a shared mapping without EVENT_FORK: the child inherits no registration, so its
    # read neither faults nor blocks (sync mode in the parent), and the parent's marker stays.
    t = make(RWP | SHMEM)
    if not t.models_fork:
        pytest.skip("the sim does not model fork")
    t.register(0, N, M_RWP)
    t.write(1, 0x5A)
    t.rwprotect(0, N, True)
    assert t.marker(1)
    assert t.read_in_child(1) == 0x5A
    assert t.marker(1)  # still protected in the parent
    assert t.messages(0.1) == []


def test_rwp_wp_exclusive(make: Callable[[int], Target]) -> None:
    t = make(RWP | SHMEM | uapi.UFFD_FEATURE_PAGEFAULT_FLAG_WP | uapi.UFFD_FEATURE_WP_HUGETLBFS_SHMEM)
    with pytest.raises(OSError) as e:
        t.register(0, N, uapi.UFFDIO_REGISTER_MODE_WP | M_RWP)
    assert e.value.errno == errno.EINVAL


# --- mainline behaviours the agent depends on -----------------------------------------------------------
def test_cached_but_unmapped_page_is_not_protected_and_never_faults(make: Callable[[int], Target]) -> None:
    t = make(RWP | ASYNC | SHMEM)
    fill(t)  # before MISSING is registered: nobody would serve the first touches
    t.register(0, N, MISSING | M_RWP)
    t.punch(3)
    t.pwrite(3, bytes([7]) * PS)  # in the page cache, not in the guest mapping
    t.rwprotect(0, N, True)
    t.set_mode(disable=ASYNC)  # sync: protected pages block
    present = uapi.PAGE_IS_PRESENT
    assert t.scan(category_mask=present, return_mask=present) == [(0, 3, present), (4, N, present)]
    w = in_thread(lambda: t.write(3, 9))
    w.join(BLOCKED_S * 5)
    assert not w.is_alive()  # no RWP fault, not even in sync mode: this is the lost-write hazard
    assert t.messages(0.1) == []
    t.set_mode(enable=ASYNC)


def test_minor_co_registration_traps_cached_pages(make: Callable[[int], Target]) -> None:
    t = make(RWP | ASYNC | SHMEM)
    fill(t)  # before MISSING is registered: nobody would serve the first touches
    t.register(0, N, MISSING | MINOR | M_RWP)
    t.punch(3)
    t.pwrite(3, bytes([7]) * PS)
    t.rwprotect(0, N, True)
    w = in_thread(lambda: t.write(3, 9))
    msgs: list[UffdMsg] = []
    deadline = time.monotonic() + 30
    while not msgs and time.monotonic() < deadline:
        msgs = t.messages(0.1)
    assert [(m.address, m.flags & ~uapi.UFFD_PAGEFAULT_FLAG_WRITE) for m in msgs] == [
        (t.addr(3), uapi.UFFD_PAGEFAULT_FLAG_MINOR)
    ]
    assert w.is_alive()  # blocked until CONTINUE maps the cached page
    t.continue_(3)
    w.join(30)
    assert not w.is_alive()
    if isinstance(t, KernelTarget):
        assert t.value(3) == 9


def test_inverted_scan_reports_holes_with_no_category(make: Callable[[int], Target]) -> None:
    t = make(RWP | ASYNC | SHMEM)
    fill(t)  # before MISSING is registered: nobody would serve the first touches
    t.register(0, N, MISSING | M_RWP)
    t.punch(5)
    t.rwprotect(0, N, True)
    t.read(0)
    acc = uapi.PAGE_IS_ACCESSED
    cold = t.scan(category_mask=acc, category_inverted=acc, return_mask=acc)
    assert cold == [(1, N, 0)]  # the hole at page 5 is reported too
    assert t.scan(category_mask=0, return_mask=acc)[:2] == [(0, 1, acc), (1, N, 0)]


def test_wp_matching_skips_an_rwp_vma(make: Callable[[int], Target]) -> None:
    t = make(RWP | ASYNC | SHMEM)
    fill(t)  # before MISSING is registered: nobody would serve the first touches
    t.register(0, N, MISSING | M_RWP)
    assert t.scan(flags=uapi.PM_SCAN_WP_MATCHING, category_mask=uapi.PAGE_IS_PRESENT) == []


def test_set_mode_enable_wakes_missing_waiters_every_time(make: Callable[[int], Target]) -> None:
    t = make(RWP | ASYNC | SHMEM)
    t.register(0, N, MISSING | M_RWP)
    t.punch(2)
    r = in_thread(lambda: t.read(2))
    first = t.messages(30)
    assert [m.address for m in first] == [t.addr(2)]
    t.set_mode(enable=ASYNC)  # already async: still wakes; the reader faults MISSING again
    again: list[UffdMsg] = []
    deadline = time.monotonic() + 30
    while not again and time.monotonic() < deadline:
        again = t.messages(0.1)
    assert [m.address for m in again] == [t.addr(2)]
    t.copy(2, bytes([4]) * PS)
    r.join(30)
    assert not r.is_alive()


def first_message(t: Target) -> list[UffdMsg]:
    deadline = time.monotonic() + 30
    msgs: list[UffdMsg] = []
    while not msgs and time.monotonic() < deadline:
        msgs = t.messages(0.1)
    return msgs


@pytest.mark.parametrize("missing", [False, True], ids=["rwp-only", "missing-rwp"])
def test_unregister_wakes_only_missing_registered_ranges(
    make: Callable[[int], Target], missing: bool
) -> None:
    t = make(RWP | SHMEM)
    fill(t)
    t.register(0, N, M_RWP | (MISSING if missing else 0))
    t.rwprotect(0, N, True)  # sync mode: an access blocks
    r = in_thread(lambda: t.read(4))
    assert [m.address for m in first_message(t)] == [t.addr(4)]
    t.unregister(0, N)
    r.join(BLOCKED_S if not missing else 30)
    assert r.is_alive() is not missing  # woken only where MISSING was registered
    if not missing:
        t.wake(4, 1)  # UFFDIO_WAKE still reaches it; unregistered, it reads on
        r.join(30)
        assert not r.is_alive()


def test_closing_one_fd_releases_nothing_while_another_is_open(make: Callable[[int], Target]) -> None:
    t = make(RWP | SHMEM)
    t.register(0, N, M_RWP)
    fill(t)
    t.share_fd()  # the VMM's fd
    t.rwprotect(0, N, True)
    r = in_thread(lambda: t.read(6))
    assert [m.address for m in first_message(t)] == [t.addr(6)]
    t.close()  # the agent's fd: nothing is released, the vCPU stays blocked
    r.join(BLOCKED_S)
    assert r.is_alive()
    t.close_shared()  # the last fd: protection resolved, waiters woken
    r.join(30)
    assert not r.is_alive() and intact(t)


def test_dontneed_keeps_shmem_data_and_remove_drops_it(make: Callable[[int], Target]) -> None:
    # Why a REMOVE event on a memfd is not "reads as zero": DONTNEED only zaps the guest PTEs.
    t = make(RWP | ASYNC | SHMEM)
    fill(t)
    t.register(0, N, MISSING | MINOR | M_RWP)
    t.rwprotect(0, N, True)
    t.madvise(2, 2, uapi.MADV_DONTNEED)
    present = uapi.PAGE_IS_PRESENT
    assert t.scan(category_mask=present, return_mask=present) == [(0, 2, present), (4, N, present)]
    w = in_thread(lambda: t.read(2))
    assert [(m.address, m.flags) for m in first_message(t)] == [(t.addr(2), uapi.UFFD_PAGEFAULT_FLAG_MINOR)]
    t.continue_(2)  # the page cache kept the data: CONTINUE maps it back
    w.join(30)
    assert not w.is_alive()
    t.madvise(3, 1, uapi.MADV_REMOVE)
    r = in_thread(lambda: t.read(3))
    assert [(m.address, m.flags) for m in first_message(t)] == [(t.addr(3), 0)]  # MISSING: the data is gone
    t.copy(3, bytes([4]) * PS)
    r.join(30)
    assert not r.is_alive()
    if isinstance(t, KernelTarget):
        assert t.read(2) == 3 and t.read(3) == 4
