"""``UffdBackend`` semantics and errors, in one process: GuestMemory (the VMM side) handed over to
a listener, the backend driven directly, guest accesses from threads via ``ctypes.memmove``."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.uffd_harness import MiniAgent
from tiermem.errors import InvalidArgument
from tiermem.handoff.client import GuestMemory
from tiermem.kernel import uapi
from tiermem.kernel.uffd import UffdBackend

pytestmark = pytest.mark.uffd

PS = 4096
RWP, ASYNC = uapi.UFFD_FEATURE_RWP, uapi.UFFD_FEATURE_RWP_ASYNC
MISSING, MODE_RWP = uapi.UFFDIO_REGISTER_MODE_MISSING, uapi.UFFDIO_REGISTER_MODE_RWP


class Vm:
    def __init__(self, gm: GuestMemory, be: UffdBackend, agent: MiniAgent) -> None:
        self.gm, self.be, self.agent = gm, be, agent

    def touch(self, page: int, write: bool = False) -> threading.Thread:
        """A 'vCPU' access in a thread (the GIL is released while it is blocked in the fault)."""
        buf = ctypes.create_string_buffer(1)
        addr = self.gm.base + page * PS
        t = threading.Thread(
            target=lambda: ctypes.memmove(addr, buf, 1) if write else ctypes.memmove(buf, addr, 1),
            daemon=True,
        )
        t.start()
        return t


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[Vm]:
    agent = MiniAgent(tmp_path / "h.sock")
    gm = GuestMemory.create("vm-sem", 64 * PS, mode="uffd")
    gm.handoff(agent.path)
    be = agent.wait_attach().make_backend(arm=False)
    assert isinstance(be, UffdBackend)
    yield Vm(gm, be, agent)
    be.close()
    agent.close()
    gm.close()


def err(fn: object, *args: object, **kw: object) -> int:
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)  # type: ignore[operator]
    assert ei.value.errno is not None
    return ei.value.errno


def arm(be: UffdBackend) -> None:
    be.api(RWP | ASYNC)
    be.register(be.base, be.size, MISSING | MODE_RWP)


def test_api_register_and_tracking_errors_match_the_kernel(vm: Vm) -> None:
    be = vm.be
    assert err(be.register, be.base, be.size, MISSING | MODE_RWP) == errno.EINVAL  # RWP not negotiated
    assert err(be.api, ASYNC) == errno.EINVAL  # RWP_ASYNC requires RWP
    assert err(be.api, 1 << 40) == errno.EINVAL
    info = be.api(RWP | ASYNC)
    assert (
        info.features & (RWP | ASYNC | uapi.UFFD_FEATURE_MINOR_SHMEM)
        == RWP | ASYNC | uapi.UFFD_FEATURE_MINOR_SHMEM
    )
    assert err(be.api, RWP) == errno.EINVAL  # once per uffd
    assert err(be.rwprotect, be.base, be.size, protect=True) == errno.ENOENT  # not registered RWP yet
    assert err(be.register, be.base, be.size, uapi.UFFDIO_REGISTER_MODE_WP | MODE_RWP) == errno.EINVAL
    ioctls = be.register(be.base, be.size, MISSING | MODE_RWP)
    assert ioctls & (1 << uapi._UFFDIO_RWPROTECT) and ioctls & (1 << uapi._UFFDIO_COPY)
    assert err(be.register, be.base, be.size, MISSING) == errno.EBUSY  # would drop RWP
    assert err(be.rwprotect, be.base + 1, PS, protect=True) == errno.EINVAL
    assert err(be.rwprotect, be.base, be.size + PS, protect=True) == errno.EINVAL
    assert err(be.rwprotect, be.base, PS, protect=True, dontwake=True) == errno.EINVAL
    assert err(be.set_mode, enable=ASYNC, disable=ASYNC) == errno.EINVAL
    assert err(be.set_mode, enable=uapi.UFFD_FEATURE_WP_ASYNC) == errno.EINVAL
    assert err(be.pagemap_scan, be.base, be.base + be.size, category_mask=1 << 10) == errno.EINVAL
    assert err(be.pagemap_scan, be.base + 1, be.base + be.size) == errno.EINVAL
    assert err(be.copy, be.base, b"x" * 100) == errno.EINVAL
    assert err(be.punch_hole, 1, PS) == errno.EINVAL
    assert err(be.io_read, be.size - 1, 2) == errno.EINVAL


def test_missing_faults_copy_eexist_and_populated(vm: Vm) -> None:
    be, agent = vm.be, vm.agent
    arm(be)
    agent.serve(be)
    assert not be.populated().any()
    assert be.io_read(0, PS) == bytes(PS) and not be.populated()[0]  # reading a hole keeps it a hole
    be.io_write(2 * PS, b"\x07" * PS)
    assert be.populated()[2] and be.populated().sum() == 1
    data = b"\x01" * PS + b"\x02" * PS + b"\x03" * PS
    # COPY over pages 1..3 where page 2 is present: EEXIST once every page is present
    assert err(be.copy, be.addr(1), data) == errno.EEXIST
    assert be.io_read(PS, 3 * PS) == b"\x01" * PS + b"\x07" * PS + b"\x03" * PS
    assert be.populated()[1:4].all()
    t = vm.touch(10)  # a hole: MISSING, zero-filled by the harness
    t.join(5)
    assert not t.is_alive() and be.populated()[10]
    be.punch_hole(PS, 3 * PS)
    assert not be.populated()[1:4].any()


def test_async_records_accesses_and_sync_parks_them(vm: Vm) -> None:
    be, agent = vm.be, vm.agent
    arm(be)
    agent.serve(be)
    for p in range(8):
        be.io_write(p * PS, bytes([p + 1]) * PS)
    be.rwprotect(be.base, be.size, protect=True)
    for p in (1, 3):
        vm.touch(p).join(5)
    end = be.base + be.size
    hot = be.pagemap_scan(
        be.base, end, category_mask=uapi.PAGE_IS_ACCESSED, return_mask=uapi.PAGE_IS_ACCESSED
    )
    assert [(r["start"], r["end"]) for r in hot.regions] == [
        (be.addr(1), be.addr(2)),
        (be.addr(3), be.addr(4)),
    ]
    cold = be.pagemap_scan(
        be.base,
        end,
        category_mask=uapi.PAGE_IS_ACCESSED,
        category_inverted=uapi.PAGE_IS_ACCESSED,
        return_mask=uapi.PAGE_IS_ACCESSED,
    )
    # the inverted scan reports still-protected pages and, as mainline does, the pages not in the memfd
    assert [(r["start"], r["end"]) for r in cold.regions] == [
        (be.addr(0), be.addr(1)),
        (be.addr(2), be.addr(3)),
        (be.addr(4), be.addr(be.n_pages)),
    ]
    proven = be.pagemap_scan(
        be.base,
        end,
        category_mask=uapi.PAGE_IS_PRESENT | uapi.PAGE_IS_ACCESSED,
        category_inverted=uapi.PAGE_IS_ACCESSED,
        return_mask=0,
    )
    assert [(r["start"], r["end"]) for r in proven.regions] == [
        (be.addr(0), be.addr(1)),
        (be.addr(2), be.addr(3)),
        (be.addr(4), be.addr(8)),
    ]
    assert be.stats["rwp"] == 0 and be.stats["minor"] == 2

    be.set_mode(disable=ASYNC)
    agent.hold_rwp = True
    t = vm.touch(5, write=True)
    deadline = time.monotonic() + 5
    while 5 not in agent.rwp_faults:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    assert t.is_alive()  # parked until resolved
    assert not be.pagemap_scan(be.addr(5), be.addr(6), category_mask=uapi.PAGE_IS_ACCESSED).regions.size
    be.set_mode(enable=ASYNC)  # switching to async resolves parked faults
    t.join(5)
    assert not t.is_alive()
    assert be.pagemap_scan(be.addr(5), be.addr(6), category_mask=uapi.PAGE_IS_ACCESSED).regions.size == 1


def test_close_releases_a_parked_vcpu(vm: Vm) -> None:
    be, agent = vm.be, vm.agent
    arm(be)
    agent.hold_rwp = True
    agent.serve(be)
    be.io_write(0, b"z" * PS)
    be.rwprotect(be.base, be.size, protect=True)
    be.set_mode(disable=ASYNC)
    t = vm.touch(0)
    deadline = time.monotonic() + 5
    while 0 not in agent.rwp_faults:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    be.close()
    t.join(5)
    assert not t.is_alive()
    assert err(be.copy, be.base, bytes(PS)) == errno.ESRCH


def test_uffd_backend_needs_minor_faults(vm: Vm) -> None:
    with pytest.raises(InvalidArgument, match="MINOR_SHMEM"):
        UffdBackend(
            vm.gm.uffd, vm.gm.memfd, vm.be.regions, vm.be._control, features=uapi.UFFD_FEATURE_MISSING_SHMEM
        )


def test_many_guest_threads_fault_the_same_evicted_page(vm: Vm) -> None:
    be, agent = vm.be, vm.agent
    arm(be)
    agent.serve(be)
    be.io_write(4 * PS, b"\x2a" * PS)
    agent.evict(be, np.array([4]))
    threads = [vm.touch(4) for _ in range(8)]
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert be.io_read(4 * PS, PS) == b"\x2a" * PS


def test_a_blocking_uffd_is_made_non_blocking(tmp_path: Path) -> None:
    agent = MiniAgent(tmp_path / "b.sock")
    with GuestMemory.create("vm-blocking", 16 * PS, mode="uffd") as gm:
        os.set_blocking(gm.uffd, True)  # a VMM that did not ask for O_NONBLOCK
        gm.handoff(agent.path)
        be = agent.wait_attach().make_backend()
        try:
            assert not os.get_blocking(gm.uffd)  # one open file description, shared with the VMM
            be._read_and_process()  # nothing queued: must not block
            assert be.read_messages(0.05) == []
        finally:
            be.close()
            agent.close()
