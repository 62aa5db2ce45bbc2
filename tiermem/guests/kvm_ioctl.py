"""KVM uapi for x86_64: ioctl numbers, struct layouts, and thin wrappers on the fds.

Values are those of ``include/uapi/linux/kvm.h`` and ``arch/x86/include/uapi/asm/kvm.h``;
every struct size and request number is asserted at import (a wrong layout would
corrupt memory), and ``tests/unit/test_kvm_ioctl.py`` checks them against the
system headers with a C compiler when one is present.

Only what the reference VMM needs is here: create a VM, add memory slots, create
vCPUs, set their registers and run them, and decode the exits.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from dataclasses import dataclass

from tiermem.errors import FailedPrecondition, KernelError

__all__ = [
    "KVM_EXIT_NAMES",
    "KvmRegs",
    "KvmSegment",
    "KvmSregs",
    "KvmSystem",
    "KvmUserspaceMemoryRegion",
    "KvmVcpu",
    "KvmVmFd",
    "VcpuExit",
    "kvm_unavailable_reason",
]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.restype = ctypes.c_int

KVM_PATH = "/dev/kvm"
KVM_API_VERSION = 12
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(1, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(2, nr, size)


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region``."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs`` (x86_64 general-purpose registers)."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "rax",
            "rbx",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "rsp",
            "rbp",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
            "rip",
            "rflags",
        )
    ]


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment``: the hidden part of a segment register."""

    _fields_ = [
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable`` (GDTR/IDTR)."""

    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs`` (x86 special registers)."""

    _fields_ = [
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", ctypes.c_uint64),
        ("cr2", ctypes.c_uint64),
        ("cr3", ctypes.c_uint64),
        ("cr4", ctypes.c_uint64),
        ("cr8", ctypes.c_uint64),
        ("efer", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    ]


KVM_CPUID2_HEADER = 8  # struct kvm_cpuid2: u32 nent, u32 padding, then entries
KVM_CPUID_ENTRY2_SIZE = 40  # function, index, flags, eax, ebx, ecx, edx, padding[3]

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _ioc(3, 0x05, KVM_CPUID2_HEADER)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR = _io(0x47)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(KvmSregs))
KVM_SET_CPUID2 = _iow(0x90, KVM_CPUID2_HEADER)

KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MAX_VCPUS = 66

# kvm_run layout: exit_reason at 8, the exit union at 32.
RUN_EXIT_REASON_OFF = 8
RUN_EXIT_UNION_OFF = 32

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
KVM_EXIT_NAMES: dict[int, str] = {
    0: "UNKNOWN",
    1: "EXCEPTION",
    2: "IO",
    3: "HYPERCALL",
    4: "DEBUG",
    5: "HLT",
    6: "MMIO",
    7: "IRQ_WINDOW_OPEN",
    8: "SHUTDOWN",
    9: "FAIL_ENTRY",
    10: "INTR",
    17: "INTERNAL_ERROR",
    24: "SYSTEM_EVENT",
    33: "X86_BUS_LOCK",
    37: "NOTIFY",
    39: "MEMORY_FAULT",
}

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1
RFLAGS_IOPL3 = 3 << 12

assert ctypes.sizeof(KvmRegs) == 144
assert ctypes.sizeof(KvmSegment) == 24
assert ctypes.sizeof(KvmDtable) == 16
assert ctypes.sizeof(KvmSregs) == 312
assert KvmSregs.cr0.offset == 224 and KvmSregs.efer.offset == 264
assert ctypes.sizeof(KvmUserspaceMemoryRegion) == 32
assert KVM_SET_USER_MEMORY_REGION == 0x4020AE46
assert KVM_GET_SREGS == 0x8138AE83 and KVM_SET_SREGS == 0x4138AE84
assert KVM_GET_REGS == 0x8090AE81 and KVM_SET_REGS == 0x4090AE82
assert KVM_GET_SUPPORTED_CPUID == 0xC008AE05 and KVM_SET_CPUID2 == 0x4008AE90


def _kernel_error(what: str, e: OSError) -> KernelError:
    return KernelError(f"{what}: {os.strerror(e.errno or 0)}", e.errno or 0)


def kvm_unavailable_reason() -> str | None:
    """None if /dev/kvm opens and speaks API 12, else a one-line reason."""
    try:
        fd = os.open(KVM_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"{KVM_PATH}: {os.strerror(e.errno or 0)}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            return f"{KVM_PATH} speaks KVM API {version}, expected {KVM_API_VERSION}"
        if fcntl.ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY) <= 0:
            return f"{KVM_PATH} lacks KVM_CAP_USER_MEMORY"
        return None
    except OSError as e:
        return f"{KVM_PATH}: {os.strerror(e.errno or 0)}"
    finally:
        os.close(fd)


class KvmSystem:
    """An open ``/dev/kvm``: the entry point that creates VMs."""

    def __init__(self) -> None:
        if why := kvm_unavailable_reason():
            raise FailedPrecondition(
                f"KVM is not available ({why}); use the process guest or --backend sim instead"
            )
        self.fd = os.open(KVM_PATH, os.O_RDWR | os.O_CLOEXEC)
        self.vcpu_mmap_size = fcntl.ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE, 0)
        self.max_vcpus = max(1, fcntl.ioctl(self.fd, KVM_CHECK_EXTENSION, KVM_CAP_MAX_VCPUS))

    def supported_cpuid(self) -> bytes:
        """KVM_GET_SUPPORTED_CPUID as a ``struct kvm_cpuid2`` blob, ready for KVM_SET_CPUID2.

        The guest needs CPUID (long mode at least) before KVM accepts EFER.LME.
        """
        nent = 64
        while True:
            buf = bytearray(struct.pack("=II", nent, 0) + bytes(KVM_CPUID_ENTRY2_SIZE * nent))
            try:
                fcntl.ioctl(self.fd, KVM_GET_SUPPORTED_CPUID, buf)
            except OSError as e:
                if e.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise _kernel_error("KVM_GET_SUPPORTED_CPUID", e) from None
            got = struct.unpack_from("=I", buf)[0]
            return bytes(buf[: KVM_CPUID2_HEADER + got * KVM_CPUID_ENTRY2_SIZE])

    def create_vm(self) -> KvmVmFd:
        """KVM_CREATE_VM (machine type 0)."""
        try:
            fd = fcntl.ioctl(self.fd, KVM_CREATE_VM, 0)
        except OSError as e:
            raise _kernel_error("KVM_CREATE_VM", e) from None
        return KvmVmFd(fd, self.vcpu_mmap_size)

    def close(self) -> None:
        """Close /dev/kvm (VMs stay alive through their own fds)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class KvmVmFd:
    """One VM file descriptor: memory slots and vCPU creation."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages KVM needs on Intel hosts (a no-op on AMD)."""
        # fcntl.ioctl passes a C int; the kernel reads an unsigned long above 2 GiB.
        if _libc.ioctl(self.fd, ctypes.c_ulong(KVM_SET_TSS_ADDR), ctypes.c_ulong(addr)) < 0:
            err = ctypes.get_errno()
            raise KernelError(f"KVM_SET_TSS_ADDR: {os.strerror(err)}", err)

    def set_memory_region(self, slot: int, guest_phys_addr: int, size: int, userspace_addr: int) -> None:
        """KVM_SET_USER_MEMORY_REGION: map ``size`` bytes at ``userspace_addr`` to guest-physical ``guest_phys_addr``."""
        region = KvmUserspaceMemoryRegion(slot, 0, guest_phys_addr, size, userspace_addr)
        try:
            fcntl.ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, region)
        except OSError as e:
            raise _kernel_error(f"KVM_SET_USER_MEMORY_REGION slot {slot}", e) from None

    def create_vcpu(self, index: int) -> KvmVcpu:
        """KVM_CREATE_VCPU and mmap its ``kvm_run`` area."""
        try:
            fd = fcntl.ioctl(self.fd, KVM_CREATE_VCPU, index)
        except OSError as e:
            raise _kernel_error(f"KVM_CREATE_VCPU {index}", e) from None
        return KvmVcpu(index, fd, self.vcpu_mmap_size)

    def close(self) -> None:
        """Close the VM fd (the kernel frees the VM once every vCPU fd is closed too)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class VcpuExit:
    """One KVM_RUN exit, decoded."""

    reason: int
    io_direction: int = 0
    io_size: int = 0
    io_port: int = 0
    io_count: int = 0
    io_data: int = 0
    detail: str = ""

    @property
    def name(self) -> str:
        """The exit reason's name, e.g. ``IO``."""
        return KVM_EXIT_NAMES.get(self.reason, str(self.reason))


class KvmVcpu:
    """One vCPU fd with its mmapped ``kvm_run``. Run it from a single thread."""

    def __init__(self, index: int, fd: int, mmap_size: int) -> None:
        self.index = index
        self.fd = fd
        self._run = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_view = memoryview(self._run)
        self._exit_reason = self._run_view[RUN_EXIT_REASON_OFF : RUN_EXIT_REASON_OFF + 4].cast("I")

    def get_regs(self) -> KvmRegs:
        """KVM_GET_REGS."""
        regs = KvmRegs()
        fcntl.ioctl(self.fd, KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        """KVM_SET_REGS."""
        fcntl.ioctl(self.fd, KVM_SET_REGS, regs)

    def get_sregs(self) -> KvmSregs:
        """KVM_GET_SREGS."""
        sregs = KvmSregs()
        fcntl.ioctl(self.fd, KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        """KVM_SET_SREGS."""
        fcntl.ioctl(self.fd, KVM_SET_SREGS, sregs)

    def set_cpuid(self, cpuid2: bytes) -> None:
        """KVM_SET_CPUID2 with a blob from :meth:`KvmSystem.supported_cpuid`."""
        try:
            fcntl.ioctl(self.fd, KVM_SET_CPUID2, bytearray(cpuid2))
        except OSError as e:
            raise _kernel_error("KVM_SET_CPUID2", e) from None

    def run(self) -> int:
        """KVM_RUN until the next exit; returns the exit reason.

        ``fcntl.ioctl`` releases the GIL, so a vCPU blocked on a userfaultfd fault
        (EPT violation -> GUP -> handle_userfault) never stalls a fault handler
        running in another thread of this process. EINTR is retried.
        """
        while True:
            try:
                fcntl.ioctl(self.fd, KVM_RUN, 0)
                return int(self._exit_reason[0])
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise _kernel_error(f"KVM_RUN vcpu {self.index}", e) from None

    def exit_info(self) -> VcpuExit:
        """Decode the current exit (IO exits in full, others as a short detail string)."""
        v = self._run_view
        reason = int(self._exit_reason[0])
        u = RUN_EXIT_UNION_OFF
        if reason == KVM_EXIT_IO:
            direction, size = v[u], v[u + 1]
            port = int.from_bytes(v[u + 2 : u + 4], "little")
            count = int.from_bytes(v[u + 4 : u + 8], "little")
            data_off = int.from_bytes(v[u + 8 : u + 16], "little")
            data = int.from_bytes(v[data_off : data_off + size], "little") if size <= 8 else 0
            return VcpuExit(reason, direction, size, port, count, data)
        if reason == KVM_EXIT_FAIL_ENTRY:
            hw = int.from_bytes(v[u : u + 8], "little")
            return VcpuExit(reason, detail=f"hardware_entry_failure_reason={hw:#x}")
        if reason == KVM_EXIT_INTERNAL_ERROR:
            sub = int.from_bytes(v[u : u + 4], "little")
            return VcpuExit(reason, detail=f"suberror={sub}")
        if reason == KVM_EXIT_MMIO:
            gpa = int.from_bytes(v[u : u + 8], "little")
            return VcpuExit(reason, detail=f"mmio at guest-physical {gpa:#x} (outside every memory slot)")
        return VcpuExit(reason)

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the vCPU fd."""
        if self.fd >= 0:
            self._exit_reason.release()
            self._run_view.release()
            self._run.close()
            os.close(self.fd)
            self.fd = -1
