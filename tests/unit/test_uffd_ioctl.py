"""The userfaultfd ioctl wrappers on the real kernel: one process, a faulting thread and a resolver.

The faulting thread touches the guest mapping with ``ctypes.memmove``, which
releases the GIL, so the resolving thread can run while it is blocked in the fault.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tiermem.kernel import uapi
from tiermem.kernel.uapi import UffdMsg
from tiermem.kernel.uffd_ioctl import (
    Mapping,
    Uffd,
    UffdOpError,
    buffer_address,
    data_extents,
    is_memfd,
    is_userfaultfd,
    madvise,
    memfd_create,
    new_uffd,
    punch_hole,
)

pytestmark = pytest.mark.uffd

PS = 4096
N = 16
FEATURES = (
    uapi.UFFD_FEATURE_MISSING_SHMEM
    | uapi.UFFD_FEATURE_MINOR_SHMEM
    | uapi.UFFD_FEATURE_EVENT_REMOVE
    | uapi.UFFD_FEATURE_THREAD_ID
)


@dataclass
class Guest:
    memfd: int
    mapping: Mapping
    uffd: Uffd
    features: int
    range_ioctls: int

    def addr(self, page: int) -> int:
        return self.mapping.addr + page * PS

    def next_msg(self, timeout: float = 5.0) -> UffdMsg:
        ep = select.epoll()
        try:
            ep.register(self.uffd.fd, select.EPOLLIN)
            assert ep.poll(timeout), "no userfaultfd message"
        finally:
            ep.close()
        msgs = self.uffd.read_msgs(1)
        assert len(msgs) == 1
        return msgs[0]


@pytest.fixture
def guest() -> Iterator[Guest]:
    memfd = memfd_create("uffd-ioctl-test", N * PS)
    mapping = Mapping(memfd, N * PS)
    fd, info = new_uffd(FEATURES)
    uffd = Uffd(fd)
    ioctls = uffd.register(
        mapping.addr, N * PS, uapi.UFFDIO_REGISTER_MODE_MISSING | uapi.UFFDIO_REGISTER_MODE_MINOR
    )
    yield Guest(memfd, mapping, uffd, info.features, ioctls)
    os.close(fd)
    mapping.close()
    os.close(memfd)


class Toucher(threading.Thread):
    """Touches one page (read 8 bytes, or write 8 bytes) and records what it read."""

    def __init__(self, addr: int, write: bytes | None = None) -> None:
        super().__init__(daemon=True)
        self.addr, self.write = addr, write
        self.buf = ctypes.create_string_buffer(8)

    def run(self) -> None:
        if self.write is not None:
            ctypes.memmove(self.addr, self.write, len(self.write))
        ctypes.memmove(self.buf, self.addr, 8)

    def done(self) -> bytes:
        self.join(timeout=5)
        assert not self.is_alive(), "the faulting thread is still blocked"
        return self.buf.raw


def test_api_and_register_report_what_the_kernel_offers(guest: Guest) -> None:
    assert guest.features & FEATURES == FEATURES
    for nr in (uapi._UFFDIO_WAKE, uapi._UFFDIO_COPY, uapi._UFFDIO_ZEROPAGE, uapi._UFFDIO_CONTINUE):
        assert guest.range_ioctls & (1 << nr)
    assert is_userfaultfd(guest.uffd.fd) and is_memfd(guest.memfd)
    assert not is_userfaultfd(guest.memfd) and not is_memfd(guest.uffd.fd)
    with pytest.raises(OSError) as ei:  # UFFDIO_API works once per uffd
        guest.uffd.api(0)
    assert ei.value.errno == errno.EINVAL


def test_missing_copy_zap_minor_continue_punch_missing(guest: Guest) -> None:
    a = guest.addr(3)
    # 1. first touch of a hole: MISSING, resolved with COPY (which wakes the thread)
    t = Toucher(a)
    t.start()
    m = guest.next_msg()
    assert m.event == uapi.UFFD_EVENT_PAGEFAULT and m.address == a
    assert not m.flags & (uapi.UFFD_PAGEFAULT_FLAG_MINOR | uapi.UFFD_PAGEFAULT_FLAG_WRITE)
    assert m.ptid == t.native_id  # THREAD_ID
    src = b"A" * PS
    addr, keep = buffer_address(src)
    assert guest.uffd.copy(a, addr, PS) == PS
    assert t.done() == b"A" * 8

    # 2. COPY onto a page that is present: EEXIST, nothing copied
    with pytest.raises(UffdOpError) as ei:
        guest.uffd.copy(a, addr, PS)
    assert ei.value.errno == errno.EEXIST and ei.value.done == 0

    # 3. zap inside "the VMM" (MADV_DONTNEED): a REMOVE event; the madvise waits until it is read
    z = threading.Thread(target=madvise, args=(guest.mapping.addr, N * PS, uapi.MADV_DONTNEED), daemon=True)
    z.start()
    m = guest.next_msg()
    assert (m.event, m.start, m.end) == (
        uapi.UFFD_EVENT_REMOVE,
        guest.mapping.addr,
        guest.mapping.addr + N * PS,
    )
    z.join(timeout=5)
    assert data_extents(guest.memfd, 0, N * PS) == [(3 * PS, 4 * PS)]  # the data survived the zap

    # 4. touching the zapped, still-cached page: MINOR (|WRITE), resolved with CONTINUE
    t = Toucher(a, write=b"B")
    t.start()
    m = guest.next_msg()
    assert m.flags & uapi.UFFD_PAGEFAULT_FLAG_MINOR and m.flags & uapi.UFFD_PAGEFAULT_FLAG_WRITE
    with pytest.raises(UffdOpError) as ei:  # the page cache has it: COPY refuses
        guest.uffd.copy(a, addr, PS)
    assert ei.value.errno == errno.EEXIST
    assert guest.uffd.continue_(a, PS) == PS
    assert t.done() == b"B" + b"A" * 7
    with pytest.raises(UffdOpError) as ei:  # mapped now
        guest.uffd.continue_(a, PS)
    assert ei.value.errno == errno.EEXIST

    # 5. punch: the page is gone; the next touch is MISSING again; CONTINUE has nothing to map
    punch_hole(guest.memfd, 3 * PS, PS)
    assert data_extents(guest.memfd, 0, N * PS) == []
    t = Toucher(a)
    t.start()
    m = guest.next_msg()
    assert m.address == a and not m.flags & uapi.UFFD_PAGEFAULT_FLAG_MINOR
    with pytest.raises(UffdOpError) as ei:
        guest.uffd.continue_(a, PS)
    assert ei.value.errno == errno.EFAULT
    assert guest.uffd.zeropage(a, PS) == PS
    assert t.done() == bytes(8)
    del keep


def test_partial_copy_reports_progress_then_eexist(guest: Guest) -> None:
    src = bytes(range(256)) * (2 * PS // 256)
    addr, keep = buffer_address(src)
    assert guest.uffd.copy(guest.addr(6), addr + PS, PS) == PS  # page 6 present
    with pytest.raises(UffdOpError) as ei:  # pages 5, 6: page 5 copied, then EEXIST on 6
        guest.uffd.copy(guest.addr(5), addr, 2 * PS)
    assert ei.value.errno == errno.EAGAIN and ei.value.done == PS
    assert os.pread(guest.memfd, PS, 5 * PS) == src[:PS]
    del keep


def test_dontwake_leaves_the_thread_blocked_until_wake(guest: Guest) -> None:
    a = guest.addr(9)
    t = Toucher(a)
    t.start()
    guest.next_msg()
    assert guest.uffd.zeropage(a, PS, uapi.UFFDIO_ZEROPAGE_MODE_DONTWAKE) == PS
    t.join(timeout=0.2)
    assert t.is_alive()  # installed, but not woken
    guest.uffd.wake(a, PS)
    assert t.done() == bytes(8)


def test_read_msgs_is_empty_when_nothing_is_queued(guest: Guest) -> None:
    assert guest.uffd.read_msgs() == []


def test_data_extents_and_punch_hole() -> None:
    fd = memfd_create("extents", 8 * PS)
    try:
        assert data_extents(fd, 0, 8 * PS) == []
        os.pwrite(fd, b"x" * (3 * PS), 2 * PS)
        os.pwrite(fd, b"y", 7 * PS)
        assert data_extents(fd, 0, 8 * PS) == [(2 * PS, 5 * PS), (7 * PS, 8 * PS)]
        assert data_extents(fd, 3 * PS, 6 * PS) == [(3 * PS, 5 * PS)]
        punch_hole(fd, 3 * PS, PS)
        assert data_extents(fd, 0, 8 * PS) == [(2 * PS, 3 * PS), (4 * PS, 5 * PS), (7 * PS, 8 * PS)]
        with pytest.raises(OSError) as ei:
            punch_hole(fd, -PS, PS)
        assert ei.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_mapping_errors_are_oserrors() -> None:
    with pytest.raises(OSError) as ei:
        Mapping(-1, PS)
    assert ei.value.errno == errno.EBADF
    with pytest.raises(OSError) as ei:
        madvise(1, PS, uapi.MADV_DONTNEED)  # unaligned
    assert ei.value.errno == errno.EINVAL
