"""PAGEMAP_SCAN for the simulated kernel: categories, matching and merged regions, vectorised.

The sim keeps one state byte per page (see :mod:`tiermem.sim.kernel`) that takes
four values: ``ST_NONE`` (not in the memfd), ``ST_CACHED`` (in the memfd's page
cache, pte_none in the guest mapping), ``ST_PROT`` (mapped, uffd bit set) and
``ST_ACC`` (mapped, uffd bit clear). Bit 0 is "mapped in the guest". Inside one VMA
the PAGEMAP_SCAN categories of a page depend only on that byte and on the VMA's
registration mode (pagemap sees PTEs: a cached page reads like a hole), so a scan
is: per VMA, map the states to "region key" (``categories & return_mask``
when the page matches, else no match), find where the key changes with a couple
of whole-array numpy passes, and merge runs across VMA boundaries as the kernel's
``pagemap_scan_push_range`` does. No per-page Python loop.

Categories follow ``fs/proc/task_mmu.c`` of mainline 7.3:

* present shmem page: ``PAGE_IS_PRESENT | PAGE_IS_FILE`` (an RWP-protected PTE is
  PAGE_NONE, which is present);
* ``PAGE_IS_ACCESSED`` only inside ``VM_UFFD_RWP`` VMAs, for present pages whose
  uffd bit is clear. pte_none pages (holes and cached-but-unmapped pages) have no
  category: a non-inverted ``PAGE_IS_ACCESSED`` scan skips them, but an inverted
  one, or ``category_mask=0``, reports them with categories 0 (the v10 patch hid
  them; mainline does not). So "not accessed" alone does not mean "protected":
  ask for ``PAGE_IS_PRESENT`` too;
* ``PM_SCAN_WP_MATCHING`` skips RWP VMAs silently (no EINVAL, unlike v2);
* ``PAGE_IS_WRITTEN`` only inside ``VM_UFFD_WP`` VMAs (unpopulated pages included);
* soft-dirty is compiled out of the modelled kernel, nothing is swapped or huge.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

import numpy as np

from tiermem import native
from tiermem.kernel import uapi

__all__ = [
    "ST_ACC",
    "ST_CACHED",
    "ST_NONE",
    "ST_PROT",
    "categories_by_state",
    "check_scan_args",
    "check_scan_flags",
    "kerr",
    "limit_regions",
    "scan_regions",
    "scan_runs",
    "to_regions",
]

ST_NONE = 0
"""Not in the memfd: never touched (``populated=False``) or punched."""
ST_CACHED = 2
"""In the memfd's page cache, pte_none in the guest mapping (written through the I/O mapping,
or MADV_DONTNEED'd): cannot be RWP-protected; an access maps it (or faults MINOR)."""
ST_PROT = 1
"""Present with the uffd bit set: RWP-protected (PAGE_NONE + marker)."""
ST_ACC = 3
"""Present with the uffd bit clear: accessed (or never protected) since the last protect."""

_NO_MATCH = -1
_CACHED_AS_NONE = np.array([ST_NONE, ST_PROT, ST_NONE, ST_ACC], dtype=np.uint8)


def categories_by_state(mode: int) -> tuple[int, int, int]:
    """PAGEMAP_SCAN categories of (pte_none, ST_PROT, ST_ACC) pages in a VMA registered with ``mode``."""
    wp = bool(mode & uapi.UFFDIO_REGISTER_MODE_WP)
    rwp = bool(mode & uapi.UFFDIO_REGISTER_MODE_RWP)
    present = uapi.PAGE_IS_PRESENT | uapi.PAGE_IS_FILE
    c_none = uapi.PAGE_IS_WRITTEN if wp else 0
    c_acc = present | (uapi.PAGE_IS_WRITTEN if wp else 0) | (uapi.PAGE_IS_ACCESSED if rwp else 0)
    return c_none, present, c_acc


def _key(categories: int, mask: int, inverted: int, anyof: int, ret: int) -> int:
    c = categories ^ inverted
    if (c & mask) != mask:
        return _NO_MATCH
    if anyof and not (c & anyof):
        return _NO_MATCH
    return categories & ret


Classes = tuple[int, int, tuple[int, int] | None]
"""(mask, val, keys): a state's class is ``state & mask``, or ``(state & mask) == val`` when
``val >= 0``; keys are the two classes' keys when there are exactly two (class 0 first)."""


def _classes(k_none: int, k_prot: int, k_acc: int) -> Classes:
    """How to tell states with different keys apart in one pass (ST_CACHED reads as pte_none)."""
    if k_prot == k_acc:
        return 1, -1, (k_none, k_acc)  # bit 0: mapped in the guest
    if k_none == k_prot:
        return 0xFF, ST_ACC, (k_none, k_acc)
    if k_none == k_acc:
        return 0xFF, ST_PROT, (k_none, k_prot)
    return 0xFF, -1, None


def _class_of(state: int, mask: int, val: int) -> int:
    return int((state & mask) == val) if val >= 0 else state & mask


def _bounds(sl: np.ndarray, mask: int, val: int) -> np.ndarray:
    """``[0, edges..., len]``: the bounds of the runs of one class."""
    if native.available():
        # Scattered hot pages make a run edge every few pages; numpy's flatnonzero takes a
        # mispredicted branch per edge, the native pass compares 64 states at a time.
        return native.run_bounds(sl, mask, val)
    cls = (sl & mask if mask != 0xFF else sl) if val < 0 else ((sl & mask) == val).view(np.uint8)
    return np.concatenate(([0], np.flatnonzero(cls[1:] != cls[:-1]) + 1, [len(sl)])).astype(np.int64)


def _segment_runs(
    sl: np.ndarray, k_none: int, k_prot: int, k_acc: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximal runs of equal key in one VMA's states: (starts, ends, keys), offsets into ``sl``."""
    m = len(sl)
    if k_none == k_prot == k_acc:
        return np.zeros(1, dtype=np.int64), np.full(1, m, dtype=np.int64), np.full(1, k_none, dtype=np.int64)
    mask, val, two = _classes(k_none, k_prot, k_acc)
    # Three keys: ST_CACHED and ST_NONE are one class (both pte_none), whatever their values.
    bounds = _bounds(sl if two is not None else _CACHED_AS_NONE[sl], mask, val)
    starts, ends = bounds[:-1], bounds[1:]
    if two is None:
        lut = np.array([k_none, k_prot, k_none, k_acc], dtype=np.int64)  # ST_CACHED reads as pte_none
        return starts, ends, lut[sl[starts]]
    # Two classes: the runs alternate, so no per-run gather is needed.
    first = two[_class_of(int(sl[0]), mask, val)]
    keys = np.empty(len(starts), dtype=np.int64)
    keys[0::2] = first
    keys[1::2] = two[1] if first == two[0] else two[0]
    return starts, ends, keys


def scan_runs(
    state: np.ndarray,
    vmas: Sequence[tuple[int, int, int]],
    p0: int,
    p1: int,
    *,
    mask: int,
    inverted: int,
    anyof: int,
    ret: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matching regions of pages [p0, p1): (start pages, end pages exclusive, categories & ret).

    ``vmas`` tiles the guest with (start page, end page, registration mode).
    Adjacent matching pages with equal returned categories form one region.
    """
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    for vs, ve, mode in vmas:
        a, b = max(vs, p0), min(ve, p1)
        if a >= b:
            continue
        c_none, c_prot, c_acc = categories_by_state(mode)
        k_none, k_prot, k_acc = (_key(c, mask, inverted, anyof, ret) for c in (c_none, c_prot, c_acc))
        s, e, k = _segment_runs(state[a:b], k_none, k_prot, k_acc)
        starts.append(s + a)
        ends.append(e + a)
        keys.append(k)
    if not starts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    if len(starts) == 1:
        st, en, ky = starts[0], ends[0], keys[0]
    else:
        st, en, ky = (np.concatenate(x) for x in (starts, ends, keys))
        # Merge runs across VMA boundaries, as pagemap_scan_push_range does.
        new = np.empty(len(ky), dtype=bool)
        new[0] = True
        new[1:] = ky[1:] != ky[:-1]
        last = np.empty_like(new)
        last[:-1] = new[1:]
        last[-1] = True
        st, en, ky = st[new], en[last], ky[new]
    if (
        len(ky) > 1
        and _NO_MATCH in (ky[0], ky[1])
        and (ky[0::2] == ky[0]).all()
        and (ky[1::2] == ky[1]).all()
    ):
        # Alternating match / no match (the hot-set scan): every other run, as views.
        p = 1 if ky[0] == _NO_MATCH else 0
        return st[p::2], en[p::2], ky[p::2]
    idx = np.flatnonzero(ky != _NO_MATCH)
    return st.take(idx), en.take(idx), ky.take(idx)


def scan_regions(
    state: np.ndarray,
    vmas: Sequence[tuple[int, int, int]],
    p0: int,
    p1: int,
    *,
    mask: int,
    inverted: int,
    anyof: int,
    ret: int,
    base: int,
    page_size: int,
) -> np.ndarray | None:
    """The hot-set scan's shape (one VMA, two classes of state, one not matching) as a
    ``PAGE_REGION_DTYPE`` array in one native pass, or None when it does not apply (no native
    extension, several VMAs, other categories: use :func:`scan_runs`). No limits: the caller uses
    this only without max_pages and vec_len."""
    if not native.available() or len(vmas) != 1:
        return None
    vs, ve, mode = vmas[0]
    a, b = max(vs, p0), min(ve, p1)
    if a >= b:
        return None
    keys = tuple(_key(c, mask, inverted, anyof, ret) for c in categories_by_state(mode))
    cmask, val, two = _classes(*keys)
    if two is None or _NO_MATCH not in two or two[0] == two[1]:
        return None
    matching = 1 if two[0] == _NO_MATCH else 0
    match = matching if val >= 0 else (cmask if matching else 0)
    return native.match_regions(
        state[a:b], cmask, val, match, two[matching], base + a * page_size, page_size, uapi.PAGE_REGION_DTYPE
    )


def limit_regions(
    starts: np.ndarray, ends: np.ndarray, keys: np.ndarray, *, max_pages: int, vec_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    """Apply ``max_pages`` (0 = unlimited) and ``vec_len`` (0 = unlimited) as the kernel walk does.

    Returns the kept regions and the page where the walk stopped early, or None
    when it ran to the end.
    """
    stop: int | None = None
    if max_pages and len(starts):
        cum = np.cumsum(ends - starts)
        if cum[-1] > max_pages:
            i = int(np.searchsorted(cum, max_pages, side="right"))
            before = int(cum[i - 1]) if i else 0
            keep = max_pages - before
            stop = int(starts[i]) + keep
            n = i + 1 if keep else i
            starts, ends, keys = starts[:n].copy(), ends[:n].copy(), keys[:n]
            if keep:
                ends[-1] = stop
    if vec_len and len(starts) > vec_len:
        stop = int(starts[vec_len])
        starts, ends, keys = starts[:vec_len], ends[:vec_len], keys[:vec_len]
    return starts, ends, keys, stop


def kerr(code: int, what: str) -> OSError:
    """The OSError a kernel call fails with (errno set, message naming the call)."""
    return OSError(code, f"{what}: {errno.errorcode.get(code, code)} (sim)")


def check_scan_args(
    start: int,
    end: int,
    page_size: int,
    *,
    flags: int,
    size: int,
    masks: Sequence[int],
    max_pages: int,
    vec_len: int,
) -> int:
    """pagemap_scan_get_args: EINVAL/EFAULT on a bad pm_scan_arg; returns ``end`` rounded up to a page."""
    if size != 96:
        raise kerr(errno.EINVAL, f"PAGEMAP_SCAN: size {size} != sizeof(struct pm_scan_arg)")
    if flags < 0 or flags & ~(uapi.PM_SCAN_WP_MATCHING | uapi.PM_SCAN_CHECK_WPASYNC):
        raise kerr(errno.EINVAL, f"PAGEMAP_SCAN: bad flags {flags:#x}")
    for m in masks:
        if m < 0 or m & ~uapi.PM_SCAN_CATEGORIES:
            raise kerr(errno.EINVAL, f"PAGEMAP_SCAN: unknown category bits in {m:#x}")
    if max_pages < 0 or vec_len < 0:
        raise kerr(errno.EINVAL, "PAGEMAP_SCAN: negative max_pages or vec_len")
    if start < 0 or start % page_size:
        raise kerr(errno.EINVAL, f"PAGEMAP_SCAN: start {start:#x} not page aligned")
    if end < start:
        raise kerr(errno.EFAULT, "PAGEMAP_SCAN: end before start")  # access_ok() fails
    return -(-end // page_size) * page_size


def check_scan_flags(flags: int, modes: Sequence[int]) -> bool:
    """pagemap_scan_test_walk for the VMAs' registration modes; True means "skip them all".

    The sim models no WP-async VMA, so PM_SCAN_CHECK_WPASYNC fails with EPERM and
    PM_SCAN_WP_MATCHING skips every VMA, RWP ones included (silently, as mainline does; the
    v2 patch's EINVAL was dropped).
    """
    for _mode in modes:
        if flags & uapi.PM_SCAN_CHECK_WPASYNC:
            raise kerr(errno.EPERM, "PAGEMAP_SCAN: range is not WP-async")
    return bool(flags & uapi.PM_SCAN_WP_MATCHING)


def to_regions(
    starts: np.ndarray, ends: np.ndarray, keys: np.ndarray, base: int, page_size: int
) -> np.ndarray:
    """Page-index runs as a ``PAGE_REGION_DTYPE`` array of addresses."""
    if native.available():
        return native.regions(starts, ends, keys, base, page_size, uapi.PAGE_REGION_DTYPE)
    out = np.empty(len(starts), dtype=uapi.PAGE_REGION_DTYPE)
    ps, b = np.uint64(page_size), np.uint64(base)
    out["start"] = starts.astype(np.uint64) * ps + b
    out["end"] = ends.astype(np.uint64) * ps + b
    out["categories"] = keys.astype(np.uint64)
    return out
