"""The ``rwp`` backend against rwp-uapi.md: the exact bytes and request number of every ioctl it
issues, captured through an injected ``ioctl`` (this kernel has no RWP). Also the PAGEMAP_SCAN
emulation both real backends rely on, and backend selection by probing."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from tiermem.errors import FailedPrecondition, InvalidArgument
from tiermem.handoff.client import arm_uffd
from tiermem.kernel import rwp, uapi
from tiermem.kernel.backend import TRACKED_REGISTER_MODE, Region
from tiermem.kernel.probe import HostReport
from tiermem.kernel.rwp import RwpBackend
from tiermem.kernel.select import choose_backend
from tiermem.kernel.uffd_base import emulate_scan
from tiermem.kernel.uffd_ioctl import Uffd

PS = 4096
BASE = 0x7F12_3400_0000
N = 64
SIZE = N * PS

# Request numbers as listed in rwp-uapi.md ("Full layout after the patch, x86_64").
REQ = {
    "REGISTER": 0xC020AA00,
    "UNREGISTER": 0x8010AA01,
    "WAKE": 0x8010AA02,
    "COPY": 0xC028AA03,
    "ZEROPAGE": 0xC020AA04,
    "CONTINUE": 0xC020AA07,
    "RWPROTECT": 0xC018AA09,
    "SET_MODE": 0x4010AA0A,
    "API": 0xC018AA3F,
    "PAGEMAP_SCAN": 0xC0606610,
}
RWP, ASYNC = 0x20000, 0x40000  # UFFD_FEATURE_RWP (1<<17), UFFD_FEATURE_RWP_ASYNC (1<<18)
NEGOTIATED = (
    RWP
    | ASYNC
    | uapi.UFFD_FEATURE_MISSING_SHMEM
    | uapi.UFFD_FEATURE_MINOR_SHMEM
    | uapi.UFFD_FEATURE_THREAD_ID
)


class FakeKernel:
    """Records (fd, request, bytes in); answers PAGEMAP_SCAN from per-page categories like the kernel."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, bytes]] = []
        self.categories = np.zeros(N, dtype=np.uint64)
        self.fail: dict[int, list[int]] = {}  # request -> errnos to raise, in order

    def __call__(self, fd: int, request: int, buf: bytearray) -> int:
        self.calls.append((fd, request, bytes(buf)))
        if self.fail.get(request):
            e = self.fail[request].pop(0)
            raise OSError(e, os.strerror(e))
        if request == REQ["PAGEMAP_SCAN"]:
            f = struct.unpack("<12Q", buf)
            _, _, start, end, _, vec, vec_len, max_pages, inv, mask, anyof, ret = f
            res = emulate_scan(
                BASE,
                PS,
                self.categories,
                np.ones(N, dtype=bool),
                start,
                end,
                category_mask=mask,
                category_inverted=inv,
                category_anyof_mask=anyof,
                return_mask=ret,
                max_pages=max_pages,
                vec_len=vec_len,
            )
            raw = res.regions.tobytes()
            ctypes.memmove(vec, raw, len(raw))
            struct.pack_into("<Q", buf, 32, res.walk_end)
            return len(res.regions)
        return 0

    def of(self, request: str) -> list[bytes]:
        return [b for _, r, b in self.calls if r == REQ[request]]


@pytest.fixture
def kern() -> FakeKernel:
    return FakeKernel()


@pytest.fixture
def backend(kern: FakeKernel) -> Iterator[RwpBackend]:
    fake_uffd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # epoll-able stand-in: no kernel uffd needed
    memfd = os.memfd_create("rwp-test", os.MFD_CLOEXEC)
    os.ftruncate(memfd, SIZE)
    be = RwpBackend(
        fake_uffd,
        memfd,
        [Region(BASE, SIZE, 0, PS)],
        None,
        vmm_pid=os.getpid(),
        features=NEGOTIATED,
        ioctl=kern,
        pagemap_path="/proc/self/pagemap",
    )
    yield be
    be.close()


def test_request_numbers_match_the_uapi_notes() -> None:
    assert REQ["REGISTER"] == uapi.UFFDIO_REGISTER
    assert REQ["UNREGISTER"] == uapi.UFFDIO_UNREGISTER
    assert REQ["WAKE"] == uapi.UFFDIO_WAKE
    assert REQ["COPY"] == uapi.UFFDIO_COPY
    assert REQ["ZEROPAGE"] == uapi.UFFDIO_ZEROPAGE
    assert REQ["CONTINUE"] == uapi.UFFDIO_CONTINUE
    assert REQ["RWPROTECT"] == uapi.UFFDIO_RWPROTECT
    assert REQ["SET_MODE"] == uapi.UFFDIO_SET_MODE
    assert REQ["API"] == uapi.UFFDIO_API
    assert REQ["PAGEMAP_SCAN"] == uapi.PAGEMAP_SCAN
    assert (uapi.UFFD_FEATURE_RWP, uapi.UFFD_FEATURE_RWP_ASYNC) == (RWP, ASYNC)
    assert (uapi.UFFDIO_REGISTER_MODE_RWP, uapi.UFFD_PAGEFAULT_FLAG_RWP, uapi.PAGE_IS_ACCESSED) == (
        0x8,
        0x8,
        0x200,
    )
    assert (uapi.UFFDIO_RWPROTECT_MODE_RWP, uapi.UFFDIO_RWPROTECT_MODE_DONTWAKE) == (1, 2)


def test_construction_wakes_the_whole_range(kern: FakeKernel, backend: RwpBackend) -> None:
    assert kern.of("WAKE") == [struct.pack("<QQ", BASE, SIZE)]


def test_register_and_unregister_bytes(kern: FakeKernel, backend: RwpBackend) -> None:
    backend.register(BASE, SIZE, TRACKED_REGISTER_MODE)
    assert kern.of("REGISTER") == [struct.pack("<QQQQ", BASE, SIZE, 0xD, 0)]  # MISSING|MINOR|RWP
    backend.unregister(BASE + PS, 2 * PS)
    assert kern.of("UNREGISTER") == [struct.pack("<QQ", BASE + PS, 2 * PS)]


def test_rwprotect_bytes(kern: FakeKernel, backend: RwpBackend) -> None:
    backend.rwprotect(BASE, SIZE, protect=True)
    backend.rwprotect(BASE + 3 * PS, PS, protect=False)
    backend.rwprotect(BASE + 4 * PS, 2 * PS, protect=False, dontwake=True)
    assert kern.of("RWPROTECT") == [
        struct.pack("<QQQ", BASE, SIZE, 0x1),
        struct.pack("<QQQ", BASE + 3 * PS, PS, 0x0),
        struct.pack("<QQQ", BASE + 4 * PS, 2 * PS, 0x2),
    ]
    assert all(len(b) == 24 for b in kern.of("RWPROTECT"))


def test_rwprotect_retries_eagain_and_marks_the_vmm_gone_on_esrch(
    kern: FakeKernel, backend: RwpBackend
) -> None:
    kern.fail[REQ["RWPROTECT"]] = [errno.EAGAIN, errno.EAGAIN]
    backend.rwprotect(BASE, SIZE, protect=True)
    assert len(kern.of("RWPROTECT")) == 3
    kern.fail[REQ["RWPROTECT"]] = [errno.ENOENT]
    with pytest.raises(OSError) as ei:
        backend.rwprotect(BASE, SIZE, protect=True)
    assert ei.value.errno == errno.ENOENT and not backend.closed
    kern.fail[REQ["SET_MODE"]] = [errno.ESRCH]
    with pytest.raises(OSError):
        backend.set_mode(disable=ASYNC)
    assert backend.closed
    assert backend.read_messages(0.01) == []


def test_set_mode_bytes(kern: FakeKernel, backend: RwpBackend) -> None:
    backend.set_mode(disable=ASYNC)
    backend.set_mode(enable=ASYNC)
    assert kern.of("SET_MODE") == [struct.pack("<QQ", 0, ASYNC), struct.pack("<QQ", ASYNC, 0)]


def test_resolve_ioctl_bytes(kern: FakeKernel, backend: RwpBackend) -> None:
    backend.zeropage(BASE + PS, PS, dontwake=True)
    backend.continue_(BASE + 2 * PS, PS)
    data = b"\x11" * PS
    backend.copy(BASE + 5 * PS, data)
    assert kern.of("ZEROPAGE") == [struct.pack("<QQQq", BASE + PS, PS, 1, 0)]
    assert kern.of("CONTINUE") == [struct.pack("<QQQq", BASE + 2 * PS, PS, 0, 0)]
    (raw,) = kern.of("COPY")
    dst, src, length, mode, copied = struct.unpack("<QQQQq", raw)
    assert (dst, length, mode, copied) == (BASE + 5 * PS, PS, 0, 0) and src != 0


def test_pagemap_scan_arg_bytes_and_result(kern: FakeKernel, backend: RwpBackend) -> None:
    acc = uapi.PAGE_IS_ACCESSED | uapi.PAGE_IS_PRESENT | uapi.PAGE_IS_FILE
    kern.categories[[2, 3, 10]] = acc
    res = backend.pagemap_scan(
        BASE, BASE + SIZE, category_mask=uapi.PAGE_IS_ACCESSED, return_mask=uapi.PAGE_IS_ACCESSED, vec_len=8
    )
    (raw,) = kern.of("PAGEMAP_SCAN")
    f = struct.unpack("<12Q", raw)
    assert len(raw) == 96 and f[0] == 96  # size
    assert (f[1], f[2], f[3], f[4]) == (0, BASE, BASE + SIZE, 0)  # flags, start, end, walk_end
    assert f[5] != 0 and f[6] == 8 and f[7] == 0  # vec, vec_len, max_pages
    assert f[8:] == (0, 0x200, 0, 0x200)  # inverted, mask, anyof, return
    assert [tuple(map(int, r)) for r in res.regions] == [
        (BASE + 2 * PS, BASE + 4 * PS, 0x200),
        (BASE + 10 * PS, BASE + 11 * PS, 0x200),
    ]
    assert res.walk_end == BASE + SIZE


def test_whole_range_scan_loops_from_walk_end_and_merges(
    kern: FakeKernel, backend: RwpBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rwp, "SCAN_CHUNK", 3)
    rng = np.random.default_rng(7)
    kern.categories[:] = np.where(rng.random(N) < 0.5, uapi.PAGE_IS_ACCESSED, 0)
    kern.categories[20:40] = uapi.PAGE_IS_ACCESSED  # a long run split across calls
    full = emulate_scan(
        BASE,
        PS,
        kern.categories,
        np.ones(N, dtype=bool),
        BASE,
        BASE + SIZE,
        category_mask=0x200,
        category_inverted=0,
        category_anyof_mask=0,
        return_mask=0x200,
        max_pages=0,
        vec_len=0,
    )
    res = backend.pagemap_scan(BASE, BASE + SIZE, category_mask=0x200, return_mask=0x200)
    assert len(kern.of("PAGEMAP_SCAN")) > 2
    assert res.regions.tolist() == full.regions.tolist() and res.walk_end == BASE + SIZE
    limited = backend.pagemap_scan(BASE, BASE + SIZE, category_mask=0x200, return_mask=0x200, max_pages=25)
    pages = int(((limited.regions["end"] - limited.regions["start"]) // PS).sum())
    assert pages == 25 and limited.walk_end == int(limited.regions["end"][-1])


def test_api_checks_what_the_vmm_negotiated(backend: RwpBackend, kern: FakeKernel) -> None:
    with pytest.raises(OSError) as ei:
        backend.api(RWP | uapi.UFFD_FEATURE_EVENT_FORK)
    assert ei.value.errno == errno.EINVAL
    info = backend.api(RWP | ASYNC)
    assert info.features == NEGOTIATED and not kern.of("API")  # never a second UFFDIO_API
    with pytest.raises(OSError):
        backend.api(RWP)


def test_rwp_backend_refuses_a_uffd_without_rwp() -> None:
    with pytest.raises(OSError) as ei:
        RwpBackend(-1, -1, [Region(BASE, SIZE)], None, vmm_pid=1, features=uapi.UFFD_FEATURE_MISSING_SHMEM)
    assert ei.value.errno == errno.EINVAL


def test_vmm_client_arms_rwp_mode_with_minor_co_registered(kern: FakeKernel) -> None:
    kernel_features = NEGOTIATED | uapi.UFFD_FEATURE_EVENT_REMOVE
    _, features = arm_uffd(Uffd(99, ioctl=kern), BASE, SIZE, "rwp", kernel_features)
    want = (
        RWP
        | ASYNC
        | uapi.UFFD_FEATURE_MISSING_SHMEM
        | uapi.UFFD_FEATURE_MINOR_SHMEM
        | uapi.UFFD_FEATURE_EVENT_REMOVE
        | uapi.UFFD_FEATURE_THREAD_ID
    )
    assert features == want == 0x60528
    # MISSING|MINOR|RWP: unmapped page-cache pages cannot be RWP-protected, so they must fault MINOR
    assert kern.calls == [
        (99, REQ["API"], struct.pack("<QQQ", 0xAA, want, 0)),
        (99, REQ["REGISTER"], struct.pack("<QQQQ", BASE, SIZE, 0xD, 0)),
    ]
    with pytest.raises(FailedPrecondition, match="RWP"):
        arm_uffd(Uffd(99, ioctl=kern), BASE, SIZE, "rwp", uapi.UFFD_FEATURE_MISSING_SHMEM)
    with pytest.raises(FailedPrecondition, match="MINOR_SHMEM"):
        arm_uffd(Uffd(99, ioctl=kern), BASE, SIZE, "rwp", kernel_features & ~uapi.UFFD_FEATURE_MINOR_SHMEM)


# --- the PAGEMAP_SCAN emulation (the fake kernel above, and the uffd backend's scan) -------------------
def scan(cats: list[int], **kw: int) -> list[tuple[int, int, int]]:
    c = np.array(cats, dtype=np.uint64)
    args = {
        "category_mask": 0,
        "category_inverted": 0,
        "category_anyof_mask": 0,
        "return_mask": 0,
        "max_pages": 0,
        "vec_len": 0,
        **kw,
    }
    r = emulate_scan(0, PS, c, np.ones(len(c), dtype=bool), 0, len(c) * PS, **args)
    return [(int(s) // PS, int(e) // PS, int(k)) for s, e, k in r.regions.tolist()] + [
        (-1, r.walk_end // PS, 0)
    ]


A, P = 0x200, 0x8  # accessed, present


def test_emulated_scan_matches_merges_and_limits() -> None:
    cats = [A | P, A | P, P, A | P, 0, A | P]
    assert scan(cats, category_mask=A, return_mask=A) == [(0, 2, A), (3, 4, A), (5, 6, A), (-1, 6, 0)]
    assert scan(cats, category_mask=A, category_inverted=A, return_mask=A) == [
        (2, 3, 0),
        (4, 5, 0),
        (-1, 6, 0),
    ]
    assert scan(cats, category_anyof_mask=A | P, return_mask=P) == [(0, 4, P), (5, 6, P), (-1, 6, 0)]
    # different returned categories split regions
    assert scan(cats, category_mask=P, return_mask=A | P)[:3] == [(0, 2, A | P), (2, 3, P), (3, 4, A | P)]
    # vec full: walk_end is the first page that did not fit
    assert scan(cats, category_mask=A, return_mask=A, vec_len=2) == [(0, 2, A), (3, 4, A), (-1, 5, 0)]
    # max_pages: walk_end is after the last page taken
    assert scan(cats, category_mask=A, return_mask=A, max_pages=3) == [(0, 2, A), (3, 4, A), (-1, 4, 0)]
    assert scan([0, 0], category_mask=A) == [(-1, 2, 0)]


def test_emulated_scan_rejects_what_the_kernel_rejects() -> None:
    c = np.zeros(4, dtype=np.uint64)
    ok = np.ones(4, dtype=bool)
    kw = {"category_inverted": 0, "category_anyof_mask": 0, "return_mask": 0, "max_pages": 0, "vec_len": 0}
    with pytest.raises(OSError) as ei:
        emulate_scan(0, PS, c, ok, 0, 4 * PS, category_mask=1 << 10, **kw)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError):
        emulate_scan(0, PS, c, ok, 1, 4 * PS, category_mask=0, **kw)
    r = emulate_scan(0, PS, c, ok, 0, 3 * PS + 1, category_mask=0, **kw)  # end rounds up
    assert r.walk_end == 4 * PS


# --- backend selection -------------------------------------------------------------------------------------
def report(uffd: bool, rwp_ok: bool) -> HostReport:
    rep = HostReport(kernel="test", machine="x86_64")
    rep.backends = {"sim": True, "uffd": uffd, "rwp": rwp_ok}
    rep.reasons = {"sim": "always", "uffd": "needs MINOR_SHMEM", "rwp": "kernel lacks UFFD_FEATURE_RWP"}
    return rep


def test_choose_backend_prefers_rwp_then_uffd_then_sim() -> None:
    assert choose_backend(None, report=report(True, True)) == "rwp"
    assert choose_backend("auto", report=report(True, False)) == "uffd"
    assert choose_backend(None, report=report(False, False)) == "sim"
    assert choose_backend("uffd", report=report(True, True)) == "uffd"
    assert choose_backend("sim", report=report(False, False)) == "sim"


def test_choose_backend_explains_what_the_host_lacks() -> None:
    with pytest.raises(FailedPrecondition, match="UFFD_FEATURE_RWP"):
        choose_backend("rwp", report=report(True, False))
    with pytest.raises(FailedPrecondition, match="MINOR_SHMEM"):
        choose_backend("uffd", report=report(False, False))
    with pytest.raises(InvalidArgument):
        choose_backend("kvm", report=report(True, True))


@pytest.mark.uffd
def test_choose_backend_on_this_host_probes_the_kernel() -> None:
    from tiermem.kernel.probe import uffd_api_features

    features, _ = uffd_api_features()
    expected = "rwp" if features & RWP and features & ASYNC else "uffd"
    assert choose_backend() in (expected, "uffd")
    if not features & RWP:
        with pytest.raises(FailedPrecondition):
            choose_backend("rwp")
