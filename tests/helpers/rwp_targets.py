"""The sim and the real kernel behind one small interface, for the RWP selftest table and the
differential test (tests/e2e/test_rwp_selftests.py, test_rwp_differential.py).

``KernelTarget`` is a shmem memfd mapped MAP_SHARED in this process with its own userfaultfd: the
test is the VMM, its guest accesses are ctypes loads/stores (which release the GIL, so a thread
can block on a sync fault while another resolves it).
"""

from __future__ import annotations

import ctypes
import os
import select
import signal

import numpy as np

from tiermem.kernel import uapi
from tiermem.kernel.uapi import UffdMsg
from tiermem.sim.kernel import SimKernel

PS = 4096
RWP_NEEDS = (
    uapi.UFFD_FEATURE_RWP
    | uapi.UFFD_FEATURE_RWP_ASYNC
    | uapi.UFFD_FEATURE_MISSING_SHMEM
    | uapi.UFFD_FEATURE_MINOR_SHMEM
)


class Target:
    """A guest mapping of a shmem memfd and one uffd: the sim, or the real kernel in this process."""

    name = "abstract"
    models_mprotect_and_gup = True
    models_fork = True

    def __init__(self, features: int, n: int) -> None:
        self.base = 0
        self.n = n

    def addr(self, p: int) -> int:
        return self.base + p * PS

    # uffd ioctls
    def register(self, p0: int, n: int, mode: int) -> None:
        raise NotImplementedError

    def unregister(self, p0: int, n: int) -> None:
        raise NotImplementedError

    def rwprotect(self, p0: int, n: int, protect: bool) -> None:
        raise NotImplementedError

    def set_mode(self, enable: int = 0, disable: int = 0) -> None:
        raise NotImplementedError

    def copy(self, p: int, data: bytes) -> None:
        raise NotImplementedError

    def continue_(self, p: int) -> None:
        raise NotImplementedError

    def scan(self, flags: int = 0, **masks: int) -> list[tuple[int, int, int]]:
        raise NotImplementedError

    def messages(self, timeout: float) -> list[UffdMsg]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def wake(self, p0: int, n: int) -> None:
        raise NotImplementedError

    def share_fd(self) -> None:
        """A second fd of the context, as the VMM always holds."""
        raise NotImplementedError

    def close_shared(self) -> None:
        """Close that second fd."""
        raise NotImplementedError

    def madvise(self, p0: int, n: int, advice: int) -> None:
        """The VMM's madvise on the guest mapping."""
        raise NotImplementedError

    # the memfd and the guest
    def pwrite(self, p: int, data: bytes) -> None:
        raise NotImplementedError

    def punch(self, p: int) -> None:
        raise NotImplementedError

    def read(self, p: int) -> int:
        """A guest load of the page's first byte (blocks on a sync fault)."""
        raise NotImplementedError

    def write(self, p: int, value: int) -> None:
        """A guest store to the page's first byte (blocks on a sync fault)."""
        raise NotImplementedError

    def mprotect(self, prot: int) -> None:
        raise NotImplementedError

    def gup_read(self, p: int) -> int:
        """The kernel reads the page on the process's behalf (write(2) to a pipe: GUP)."""
        raise NotImplementedError

    def marker(self, p: int) -> bool:
        """Bit 57 of the page's /proc/self/pagemap entry (PM_UFFD_WP: the RWP marker is set)."""
        raise NotImplementedError

    def read_in_child(self, p: int) -> int:
        """fork(); the child reads the page's first byte and exits with it; returns it."""
        raise NotImplementedError


class SimTarget(Target):
    name = "sim"
    models_mprotect_and_gup = False
    models_fork = False

    def __init__(self, features: int, n: int) -> None:
        self.n = n
        self.k = SimKernel(n, populated=False)  # a fresh memfd, as on the kernel
        self.k.api(features)
        self.base = self.k.base
        self.writes = np.zeros(n, dtype=np.uint32)  # the sim's content model counts writes

    def register(self, p0: int, n: int, mode: int) -> None:
        self.k.register(self.addr(p0), n * PS, mode)

    def unregister(self, p0: int, n: int) -> None:
        self.k.unregister(self.addr(p0), n * PS)

    def rwprotect(self, p0: int, n: int, protect: bool) -> None:
        self.k.rwprotect(self.addr(p0), n * PS, protect=protect)

    def set_mode(self, enable: int = 0, disable: int = 0) -> None:
        self.k.set_mode(enable=enable, disable=disable)

    def copy(self, p: int, data: bytes) -> None:
        self.k.copy(self.addr(p), data)

    def continue_(self, p: int) -> None:
        self.k.continue_(self.addr(p), PS)

    def scan(self, flags: int = 0, **masks: int) -> list[tuple[int, int, int]]:
        r = self.k.pagemap_scan(self.base, self.base + self.n * PS, flags=flags, **masks)
        return [((a - self.base) // PS, (b - self.base) // PS, c) for a, b, c in r.regions.tolist()]

    def messages(self, timeout: float) -> list[UffdMsg]:
        return self.k.read_messages(timeout)

    def close(self) -> None:
        self.k.close()

    def wake(self, p0: int, n: int) -> None:
        self.k.wake(self.addr(p0), n * PS)

    def share_fd(self) -> None:
        self.k.share_with_vmm()

    def close_shared(self) -> None:
        self.k.vmm_close()

    def madvise(self, p0: int, n: int, advice: int) -> None:
        self.k.madvise(self.addr(p0), n * PS, advice)

    def pwrite(self, p: int, data: bytes) -> None:
        self.k.io_write(p * PS, data)

    def punch(self, p: int) -> None:
        self.k.punch_hole(p * PS, PS)

    def read(self, p: int) -> int:
        return self.k.read_page(p)[0]

    def write(self, p: int, value: int) -> None:
        self.k.access(p, write=True)  # the sim counts writes; the byte value is not modelled
        self.writes[p] += 1

    def value(self, p: int) -> int:
        return self.k.io_read(p * PS, 1)[0]


class KernelTarget(Target):
    name = "kernel"

    def __init__(self, features: int, n: int) -> None:
        from tiermem.kernel.uffd_ioctl import Mapping, Uffd, madvise, memfd_create, new_uffd

        self.n = n
        self.memfd = memfd_create("rwp-selftest", n * PS)
        self.map = Mapping(self.memfd, n * PS)
        self.base = self.map.addr
        madvise(self.base, n * PS, uapi.MADV_NOHUGEPAGE)  # as the v10 selftests do
        fd, _ = new_uffd(features)
        self.fd = fd
        self.u = Uffd(fd)
        self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
        self.shared = -1
        self._libc = ctypes.CDLL(None, use_errno=True)

    def register(self, p0: int, n: int, mode: int) -> None:
        self.u.register(self.addr(p0), n * PS, mode)

    def unregister(self, p0: int, n: int) -> None:
        self.u.unregister(self.addr(p0), n * PS)

    def rwprotect(self, p0: int, n: int, protect: bool) -> None:
        self.u.rwprotect(self.addr(p0), n * PS, uapi.UFFDIO_RWPROTECT_MODE_RWP if protect else 0)

    def set_mode(self, enable: int = 0, disable: int = 0) -> None:
        self.u.set_mode(enable, disable)

    def copy(self, p: int, data: bytes) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        self.u.copy(self.addr(p), ctypes.addressof(buf), len(data))

    def continue_(self, p: int) -> None:
        self.u.continue_(self.addr(p), PS)

    def scan(self, flags: int = 0, **masks: int) -> list[tuple[int, int, int]]:
        from tiermem.kernel.uffd_ioctl import pagemap_scan

        vec = np.zeros(self.n, dtype=uapi.PAGE_REGION_DTYPE)
        n, _ = pagemap_scan(self.pagemap, self.base, self.base + self.n * PS, vec, flags=flags, **masks)  # type: ignore[arg-type]  # masks are the int keyword masks only
        return [((a - self.base) // PS, (b - self.base) // PS, c) for a, b, c in vec[:n].tolist()]

    def messages(self, timeout: float) -> list[UffdMsg]:
        r, _, _ = select.select([self.fd], [], [], timeout)
        return self.u.read_msgs() if r else []

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def wake(self, p0: int, n: int) -> None:
        self.u.wake(self.addr(p0), n * PS)

    def share_fd(self) -> None:
        self.shared = os.dup(self.fd)

    def madvise(self, p0: int, n: int, advice: int) -> None:
        from tiermem.kernel.uffd_ioctl import madvise

        madvise(self.addr(p0), n * PS, advice)

    def close_shared(self) -> None:
        if self.shared >= 0:
            os.close(self.shared)
            self.shared = -1

    def teardown(self) -> None:
        self.close()
        self.close_shared()
        os.close(self.pagemap)
        self.map.close()
        os.close(self.memfd)

    def pwrite(self, p: int, data: bytes) -> None:
        os.pwrite(self.memfd, data, p * PS)

    def punch(self, p: int) -> None:
        from tiermem.kernel.uffd_ioctl import punch_hole

        punch_hole(self.memfd, p * PS, PS)

    def read(self, p: int) -> int:
        b = ctypes.c_ubyte()
        ctypes.memmove(ctypes.addressof(b), self.addr(p), 1)  # releases the GIL while it faults
        return b.value

    def write(self, p: int, value: int) -> None:
        b = ctypes.c_ubyte(value)
        ctypes.memmove(self.addr(p), ctypes.addressof(b), 1)

    def value(self, p: int) -> int:
        return os.pread(self.memfd, 1, p * PS)[0]

    def mprotect(self, prot: int) -> None:
        if self._libc.mprotect(ctypes.c_void_p(self.base), ctypes.c_size_t(self.n * PS), prot) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")

    def marker(self, p: int) -> bool:
        entry = int.from_bytes(os.pread(self.pagemap, 8, self.addr(p) // PS * 8), "little")
        return bool(entry >> 57 & 1)

    def read_in_child(self, p: int) -> int:
        pid = os.fork()
        if pid == 0:  # the child: one load, then leave without running any Python cleanup
            code = 255
            try:
                signal.alarm(60)  # a child blocked on a fault dies (SIGALRM) instead of hanging the test
                code = self.read(p)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    def gup_read(self, p: int) -> int:
        r, w = os.pipe()
        try:
            n = self._libc.write(w, ctypes.c_void_p(self.addr(p)), ctypes.c_size_t(1))
            if n != 1:
                raise OSError(ctypes.get_errno(), "write from the guest mapping")
            return os.read(r, 1)[0]
        finally:
            os.close(r)
            os.close(w)


def kernel_skip_reason() -> str | None:
    """Why the real-kernel side cannot run here, or None."""
    try:
        from tiermem.kernel.probe import uffd_api_features

        features, _ = uffd_api_features()
    except OSError as e:
        return f"no userfaultfd here: {e}"
    if features & RWP_NEEDS != RWP_NEEDS:
        return "this kernel lacks UFFD_FEATURE_RWP (mainline since Linux 7.3); the kernel-VM tier runs this"
    return None
