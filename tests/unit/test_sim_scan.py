"""PAGEMAP_SCAN on the sim: categories, masks, merging, max_pages/vec_len/walk_end, against a
page-by-page reference written from mainline 7.3's fs/proc/task_mmu.c (pte_none pages, holes and
cached-but-unmapped alike, have no category and are reported by scans that match categories 0)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem import native
from tiermem.kernel import uapi
from tiermem.sim.kernel import SimKernel

PS = 4096
MISSING, WP, MINOR, RWP = (
    uapi.UFFDIO_REGISTER_MODE_MISSING,
    uapi.UFFDIO_REGISTER_MODE_WP,
    uapi.UFFDIO_REGISTER_MODE_MINOR,
    uapi.UFFDIO_REGISTER_MODE_RWP,
)
PRESENT, FILE, WRITTEN, ACCESSED = (
    uapi.PAGE_IS_PRESENT,
    uapi.PAGE_IS_FILE,
    uapi.PAGE_IS_WRITTEN,
    uapi.PAGE_IS_ACCESSED,
)
NONE, PROT, CACHED, ACC = 0, 1, 2, 3  # the sim's page states


@pytest.fixture(scope="module", params=["native", "numpy"], autouse=True)
def scan_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs on the native run detection and on the numpy reference path."""
    saved = native.mod
    if request.param == "native" and saved is None:
        pytest.skip(f"native extension unavailable: {native.reason}")
    if request.param == "numpy":
        native.mod = None
    try:
        yield request.param
    finally:
        native.mod = saved


def regions(k: SimKernel, **kw: int) -> list[tuple[int, int, int]]:
    r = k.pagemap_scan(k.base, k.base + k.size, **kw)
    return [((int(a) - k.base) // PS, (int(b) - k.base) // PS, int(c)) for a, b, c in r.regions.tolist()]


def reference(
    states: list[int],
    modes: list[int],
    start: int,
    end: int,
    *,
    mask: int,
    inv: int,
    anyof: int,
    ret: int,
    max_pages: int,
    vec_len: int,
) -> tuple[list[tuple[int, int, int]], int]:
    """The kernel walk, one page at a time; pages and walk_end in page units (end rounded up)."""
    out: list[tuple[int, int, int]] = []
    found = 0
    for p in range(max(start, 0), min(end, len(states))):
        s, mode = states[p], modes[p]
        cats = 0
        if s in (PROT, ACC):  # mapped; a cached page is pte_none to pagemap
            cats |= PRESENT | FILE
        if mode & WP and s != PROT:
            cats |= WRITTEN
        if mode & RWP and s == ACC:
            cats |= ACCESSED
        c = cats ^ inv
        if (c & mask) != mask or (anyof and not c & anyof):
            continue
        if max_pages and found == max_pages:
            return out, p
        val = cats & ret
        if out and out[-1][1] == p and out[-1][2] == val:
            out[-1] = (out[-1][0], p + 1, val)
        else:
            if vec_len and len(out) == vec_len:
                return out, p
            out.append((p, p + 1, val))
        found += 1
    return out, end


def build(n: int, regs: list[tuple[int, int, int]], states: list[int]) -> tuple[SimKernel, list[int]]:
    """A sim with registrations applied in order and the given page states (PROT only where RWP)."""
    k = SimKernel(n)
    k.api(uapi.UFFD_FEATURE_RWP | uapi.UFFD_FEATURE_RWP_ASYNC)
    modes = [0] * n
    for a, ln, mode in regs:
        ln = min(ln, n - a)
        if ln <= 0:
            continue
        k.unregister(k.base + a * PS, ln * PS)
        if mode:
            k.register(k.base + a * PS, ln * PS, mode)
        modes[a : a + ln] = [mode] * ln
    fixed = [ACC if s == PROT and not modes[p] & RWP else s for p, s in enumerate(states)]
    k.mem.state[:] = np.array(fixed, dtype=np.uint8)
    return k, fixed


def test_categories_per_vma_kind() -> None:
    # pages 0-1 unregistered, 2-4 RWP (protected, accessed, hole), 5-6 WP (present, hole), 7 RWP cached
    k, _ = build(8, [(2, 3, RWP), (5, 2, WP), (7, 1, RWP)], [ACC, NONE, PROT, ACC, NONE, ACC, NONE, CACHED])
    got = regions(k, return_mask=uapi.PM_SCAN_CATEGORIES)
    assert got == [
        (0, 1, PRESENT | FILE),
        (1, 2, 0),
        (2, 3, PRESENT | FILE),
        (3, 4, PRESENT | FILE | ACCESSED),
        (4, 5, 0),  # mainline reports pte_none in an RWP VMA with categories 0 (v10 hid it)
        (5, 6, PRESENT | FILE | WRITTEN),
        (6, 7, WRITTEN),
        (7, 8, 0),  # cached in the memfd but unmapped: pagemap sees a hole
    ]


def test_hot_scan_merges_across_vmas_and_the_inverted_scan_reports_holes() -> None:
    k, _ = build(8, [(0, 4, RWP | MISSING), (4, 4, RWP)], [ACC, ACC, NONE, ACC, ACC, CACHED, PROT, ACC])
    assert regions(k, category_mask=ACCESSED, return_mask=ACCESSED) == [
        (0, 2, ACCESSED),
        (3, 5, ACCESSED),
        (7, 8, ACCESSED),
    ]
    cold = regions(k, category_mask=ACCESSED, category_inverted=ACCESSED, return_mask=ACCESSED)
    assert cold == [(2, 3, 0), (5, 7, 0)]  # "not accessed" includes the hole and the cached page
    proven = regions(k, category_mask=PRESENT | ACCESSED, category_inverted=ACCESSED, return_mask=PRESENT)
    assert proven == [(6, 7, PRESENT)]  # only the protected page is provably cold


def test_return_mask_splits_regions_and_anyof_selects() -> None:
    k, _ = build(6, [(0, 6, RWP)], [ACC, PROT, PROT, ACC, ACC, NONE])
    assert regions(k, category_mask=PRESENT, return_mask=PRESENT | ACCESSED) == [
        (0, 1, PRESENT | ACCESSED),
        (1, 3, PRESENT),
        (3, 5, PRESENT | ACCESSED),
    ]
    assert regions(k, category_mask=PRESENT, return_mask=PRESENT) == [(0, 5, PRESENT)]
    assert regions(k, category_anyof_mask=ACCESSED | WRITTEN) == [(0, 1, 0), (3, 5, 0)]


def test_three_keys_in_one_vma() -> None:
    k, _ = build(6, [(0, 6, RWP)], [ACC, NONE, ACC, PROT, ACC, ACC])
    assert regions(k, return_mask=PRESENT | ACCESSED) == [
        (0, 1, PRESENT | ACCESSED),
        (1, 2, 0),
        (2, 3, PRESENT | ACCESSED),
        (3, 4, PRESENT),
        (4, 6, PRESENT | ACCESSED),
    ]


def test_max_pages_and_vec_len_stop_the_walk_and_walk_end_resumes_it() -> None:
    states = [ACC, ACC, ACC, PROT, ACC, PROT, ACC, ACC, ACC, ACC]
    k, _ = build(10, [(0, 10, RWP)], states)
    hot = {"category_mask": ACCESSED, "return_mask": ACCESSED}
    r = k.pagemap_scan(k.base, k.base + k.size, max_pages=2, **hot)
    assert r.regions.tolist() == [(k.base, k.base + 2 * PS, ACCESSED)]
    assert r.walk_end == k.base + 2 * PS  # stopped inside the first run
    r = k.pagemap_scan(k.base, k.base + k.size, max_pages=3, **hot)
    assert r.walk_end == k.base + 4 * PS  # the next matching page
    r = k.pagemap_scan(k.base, k.base + k.size, vec_len=2, **hot)
    assert len(r.regions) == 2 and r.walk_end == k.base + 6 * PS
    # Paging through with start = walk_end gives the full answer.
    pages: list[tuple[int, int]] = []
    start = k.base
    while start < k.base + k.size:
        r = k.pagemap_scan(start, k.base + k.size, vec_len=1, max_pages=2, **hot)
        pages += [(int(a), int(b)) for a, b, _ in r.regions.tolist()]
        start = r.walk_end
    full = k.pagemap_scan(k.base, k.base + k.size, **hot)
    covered = np.zeros(10, dtype=bool)
    for a, b in pages:
        covered[(a - k.base) // PS : (b - k.base) // PS] = True
    assert covered.tolist() == full.page_mask(k.base, k.base + k.size, PS).tolist()


def test_unaligned_end_rounds_up_and_out_of_mapping_parts_are_empty() -> None:
    k, _ = build(4, [(0, 4, RWP)], [ACC] * 4)
    r = k.pagemap_scan(k.base, k.base + 2 * PS + 1, category_mask=ACCESSED)
    assert r.regions.tolist() == [(k.base, k.base + 3 * PS, 0)] and r.walk_end == k.base + 3 * PS
    r = k.pagemap_scan(k.base - 4 * PS, k.base + 8 * PS, category_mask=ACCESSED)
    assert r.regions.tolist() == [(k.base, k.base + 4 * PS, 0)] and r.walk_end == k.base + 8 * PS
    assert len(k.pagemap_scan(k.base + 8 * PS, k.base + 9 * PS).regions) == 0
    assert len(k.pagemap_scan(k.base, k.base).regions) == 0


def test_large_hot_scan_matches_numpy() -> None:
    n = 1 << 16
    k = SimKernel(n, synthetic=True)
    k.api(uapi.UFFD_FEATURE_RWP | uapi.UFFD_FEATURE_RWP_ASYNC)
    k.register(k.base, k.size, RWP | MISSING)
    k.rwprotect(k.base, k.size, protect=True)
    rng = np.random.default_rng(7)
    hot = rng.random(n) < 0.1
    k.access_batch(rng.permutation(np.flatnonzero(hot)))
    r = k.pagemap_scan(k.base, k.base + k.size, category_mask=ACCESSED, return_mask=ACCESSED)
    assert r.page_mask(k.base, k.base + k.size, PS).tolist() == hot.tolist()
    assert (r.regions["start"][1:] > r.regions["end"][:-1]).all()  # runs are maximal


MODES = st.sampled_from([0, MISSING, RWP, RWP | MISSING, WP, WP | MISSING, MINOR, RWP | MINOR])
CATS = st.integers(0, 0x3FF).map(lambda m: m & (PRESENT | FILE | WRITTEN | ACCESSED | uapi.PAGE_IS_SWAPPED))


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 40),
    regs=st.lists(st.tuples(st.integers(0, 39), st.integers(1, 40), MODES), max_size=4),
    states=st.lists(st.sampled_from([NONE, PROT, CACHED, ACC]), min_size=40, max_size=40),
    mask=CATS,
    inv=CATS,
    anyof=CATS,
    ret=CATS,
    max_pages=st.integers(0, 12),
    vec_len=st.integers(0, 6),
    lo=st.integers(-2, 42),
    span=st.integers(0, 44),
)
def test_scan_matches_reference(
    n: int,
    regs: list[tuple[int, int, int]],
    states: list[int],
    mask: int,
    inv: int,
    anyof: int,
    ret: int,
    max_pages: int,
    vec_len: int,
    lo: int,
    span: int,
) -> None:
    k, fixed = build(n, [r for r in regs if r[0] < n], states[:n])
    modes = [0] * n
    for a, ln, mode in regs:
        if a < n:
            modes[a : min(n, a + ln)] = [mode] * (min(n, a + ln) - a)
    start = max(lo, -(k.base // PS))
    r = k.pagemap_scan(
        k.base + start * PS,
        k.base + (start + span) * PS,
        category_mask=mask,
        category_inverted=inv,
        category_anyof_mask=anyof,
        return_mask=ret,
        max_pages=max_pages,
        vec_len=vec_len,
    )
    got = [((int(a) - k.base) // PS, (int(b) - k.base) // PS, int(c)) for a, b, c in r.regions.tolist()]
    want, walk_end = reference(
        fixed,
        modes,
        start,
        start + span,
        mask=mask,
        inv=inv,
        anyof=anyof,
        ret=ret,
        max_pages=max_pages,
        vec_len=vec_len,
    )
    assert got == want
    assert r.walk_end == k.base + walk_end * PS


@settings(max_examples=200, deadline=None)
@given(
    states=st.lists(st.sampled_from([NONE, PROT, CACHED, ACC]), min_size=1, max_size=300),
    mask=st.sampled_from([ACCESSED, PRESENT, PRESENT | ACCESSED]),
    inv=st.sampled_from([0, ACCESSED, PRESENT]),
    ret=st.sampled_from([0, ACCESSED, PRESENT | ACCESSED]),
    lo=st.integers(0, 20),
    cut=st.integers(0, 20),
)
def test_hot_scan_over_long_ranges_matches_reference(
    states: list[int], mask: int, inv: int, ret: int, lo: int, cut: int
) -> None:
    """The hot-set scan's shapes (one RWP VMA: accessed, present, their inverses) over more than the 64
    pages the native pass compares at a time, including blocks that are cut by the range."""
    n = len(states)
    k, fixed = build(n, [(0, n, RWP | MISSING)], states)
    start, end = min(lo, n), max(min(lo, n), n - cut)
    r = k.pagemap_scan(
        k.base + start * PS, k.base + end * PS, category_mask=mask, category_inverted=inv, return_mask=ret
    )
    got = [((int(a) - k.base) // PS, (int(b) - k.base) // PS, int(c)) for a, b, c in r.regions.tolist()]
    want, _ = reference(
        fixed, [RWP | MISSING] * n, start, end, mask=mask, inv=inv, anyof=0, ret=ret, max_pages=0, vec_len=0
    )
    assert got == want
