"""Probe the host for what each kernel backend needs; never guess from the kernel version.

The RWP probe follows the patch's v10 advice: open a throwaway userfaultfd, call
UFFDIO_API with ``features=0`` and read back the feature bits; then check that
PAGEMAP_SCAN accepts ``PAGE_IS_ACCESSED`` (EINVAL on kernels without the series).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import struct
from dataclasses import dataclass, field

from tiermem.kernel import uapi

__all__ = ["Capability", "HostReport", "open_userfaultfd", "probe_host", "uffd_api_features"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

KVM_GET_API_VERSION = 0xAE00


def open_userfaultfd(flags: int = uapi.O_CLOEXEC | uapi.O_NONBLOCK) -> int:
    """Create a userfaultfd: the syscall first, then /dev/userfaultfd. Raises OSError."""
    fd = _libc.syscall(uapi.NR_USERFAULTFD, ctypes.c_int(flags))
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        raise OSError(err, f"userfaultfd: {os.strerror(err)}") from None
    try:
        return fcntl.ioctl(dev, uapi.USERFAULTFD_IOC_NEW, flags)
    finally:
        os.close(dev)


def uffd_api_features() -> tuple[int, int]:
    """Features and ioctls reported by UFFDIO_API(features=0) on a throwaway uffd."""
    fd = open_userfaultfd()
    try:
        buf = bytearray(struct.pack(uapi.UFFDIO_API_FMT, uapi.UFFD_API, 0, 0))
        fcntl.ioctl(fd, uapi.UFFDIO_API, buf)
        _, features, ioctls = struct.unpack(uapi.UFFDIO_API_FMT, buf)
        return int(features), int(ioctls)
    finally:
        os.close(fd)


def pagemap_scan_accepts(category: int) -> bool | None:
    """True if PAGEMAP_SCAN accepts ``category`` on our own pagemap; None if PAGEMAP_SCAN is missing."""
    m = mmap.mmap(-1, 4096)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        vec = (ctypes.c_uint64 * 3)()
        arg = bytearray(
            struct.pack(
                uapi.PM_SCAN_ARG_FMT,
                96,
                0,
                addr,
                addr + 4096,
                0,
                ctypes.addressof(vec),
                1,
                0,
                0,
                category,
                0,
                category,
            )
        )
        fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        try:
            fcntl.ioctl(fd, uapi.PAGEMAP_SCAN, arg)
            return True
        except OSError as e:
            if e.errno == errno.EINVAL:
                return False
            if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
                return None
            raise
        finally:
            os.close(fd)
    finally:
        # the ctypes view must be gone before the mmap can close
        del addr
        m.close()


def kvm_api_version() -> int | None:
    """KVM_GET_API_VERSION on /dev/kvm, or None if KVM is unusable."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return int(fcntl.ioctl(fd, KVM_GET_API_VERSION, 0))
    except OSError:
        return None
    finally:
        os.close(fd)


def _has_ptrace_cap() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 19))  # CAP_SYS_PTRACE
    except OSError:
        pass
    return False


@dataclass
class Capability:
    """One probed capability: whether it is there, and if not, why and how to fix it."""

    name: str
    ok: bool
    detail: str = ""
    fix: str = ""


@dataclass
class HostReport:
    """What ``tiermem doctor`` reports."""

    kernel: str
    machine: str
    features: int = 0
    checks: list[Capability] = field(default_factory=list)
    backends: dict[str, bool] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    kvm: bool = False

    @property
    def uffd_features(self) -> list[str]:
        """Names of the UFFDIO_API feature bits."""
        return uapi.feature_names(self.features)

    def to_json(self) -> dict[str, object]:
        """The ``--json`` form."""
        return {
            "kernel": self.kernel,
            "machine": self.machine,
            "backends": self.backends,
            "backend_reasons": self.reasons,
            "uffd_features": self.uffd_features,
            "uffd_features_mask": self.features,
            "kvm": self.kvm,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail, "fix": c.fix} for c in self.checks],
        }


def probe_host() -> HostReport:
    """Probe userfaultfd, RWP, PAGEMAP_SCAN, KVM and privileges."""
    rep = HostReport(kernel=platform.release(), machine=platform.machine())
    add = rep.checks.append
    uffd_ok = False
    try:
        rep.features, _ = uffd_api_features()
        uffd_ok = True
        add(Capability("userfaultfd", True, "syscall or /dev/userfaultfd works; UFFDIO_API answered"))
    except OSError as e:
        add(
            Capability(
                "userfaultfd",
                False,
                f"cannot create a userfaultfd: {e.strerror}",
                "run as root, grant CAP_SYS_PTRACE, set vm.unprivileged_userfaultfd=1, or give access to "
                "/dev/userfaultfd; in containers allow the userfaultfd syscall (services/agent/seccomp.json)",
            )
        )
    add(
        Capability(
            "/dev/userfaultfd",
            os.path.exists("/dev/userfaultfd"),
            "present" if os.path.exists("/dev/userfaultfd") else "missing",
            "" if os.path.exists("/dev/userfaultfd") else "Linux >= 6.1 with CONFIG_USERFAULTFD",
        )
    )
    f = rep.features
    minor = bool(f & uapi.UFFD_FEATURE_MINOR_SHMEM)
    add(
        Capability(
            "MINOR_SHMEM",
            minor,
            "MINOR faults on shmem/memfd" if minor else "not reported by UFFDIO_API",
            "" if minor else "Linux >= 5.14",
        )
    )
    add(
        Capability(
            "MISSING_SHMEM", bool(f & uapi.UFFD_FEATURE_MISSING_SHMEM), "MISSING faults on shmem/memfd"
        )
    )
    add(Capability("WP_ASYNC", bool(f & uapi.UFFD_FEATURE_WP_ASYNC), "async write-protect (informational)"))
    rwp = bool(f & uapi.UFFD_FEATURE_RWP)
    rwp_async = bool(f & uapi.UFFD_FEATURE_RWP_ASYNC)
    add(
        Capability(
            "RWP (bit 17)",
            rwp,
            "UFFD_FEATURE_RWP reported" if rwp else "UFFD_FEATURE_RWP not reported",
            "" if rwp else "needs a kernel with the userfaultfd RWP series (linux-next, Linux 7.2)",
        )
    )
    add(
        Capability(
            "RWP_ASYNC (bit 18)",
            rwp_async,
            "reported" if rwp_async else "not reported",
            "" if rwp_async else "needs the RWP series",
        )
    )
    try:
        scan = pagemap_scan_accepts(uapi.PAGE_IS_ACCESSED)
    except OSError as e:
        scan = None
        add(Capability("PAGEMAP_SCAN", False, f"probe failed: {e.strerror}"))
    add(
        Capability(
            "PAGEMAP_SCAN PAGE_IS_ACCESSED",
            bool(scan),
            {
                True: "accepted",
                False: "EINVAL: category unknown to this kernel",
                None: "PAGEMAP_SCAN unavailable",
            }[scan],
            "" if scan else "needs the RWP series (PAGEMAP_SCAN itself needs Linux >= 6.7)",
        )
    )
    kvm = kvm_api_version()
    rep.kvm = kvm == 12
    add(
        Capability(
            "/dev/kvm",
            rep.kvm,
            f"KVM API version {kvm}" if kvm is not None else "cannot open /dev/kvm",
            "" if rep.kvm else "enable virtualisation (or nested) and give access to /dev/kvm",
        )
    )
    ptrace = _has_ptrace_cap()
    add(
        Capability(
            "root or CAP_SYS_PTRACE",
            ptrace,
            "yes" if ptrace else "no",
            "" if ptrace else "needed to open another process's pagemap (rwp) and to trap kernel faults",
        )
    )
    rep.backends = {
        "sim": True,
        "uffd": uffd_ok and minor,
        "rwp": uffd_ok and rwp and rwp_async and bool(scan),
    }
    rep.reasons = {"sim": "always available"}
    rep.reasons["uffd"] = (
        "userfaultfd with MINOR_SHMEM"
        if rep.backends["uffd"]
        else "needs a working userfaultfd with MINOR_SHMEM"
    )
    if rep.backends["rwp"]:
        rep.reasons["rwp"] = "UFFD_FEATURE_RWP, RWP_ASYNC and PAGEMAP_SCAN PAGE_IS_ACCESSED"
    else:
        missing = [
            n
            for n, ok in (
                ("UFFD_FEATURE_RWP", rwp),
                ("UFFD_FEATURE_RWP_ASYNC", rwp_async),
                ("PAGEMAP_SCAN PAGE_IS_ACCESSED", bool(scan)),
            )
            if not ok
        ]
        rep.reasons["rwp"] = "kernel lacks " + ", ".join(missing) + " (the userfaultfd RWP series)"
    return rep
