"""One KVM virtual machine running the batch-runner guest: memory slots, vCPUs, batch execution.

This is the hypervisor half of the reference VMM, with no workload logic:
:class:`KvmMachine` creates the VM, puts the system slot (GDT, page tables,
program, mailboxes; see :mod:`tiermem.guests.asm`) and the guest RAM slot in
place, boots every vCPU into the guest's loop, and runs one batch of accesses on
one vCPU per :meth:`KvmMachine.run_batch` call. Several machines can live in one
process: each has its own VM fd.

Guest RAM is any host mapping (``base``, ``size``); the reference VMM passes a
:class:`tiermem.handoff.client.GuestMemory` mapping (memfd + uffd handed to the
agent) or a :class:`PlainRam` (a memfd and nothing else). KVM never touches guest
RAM by itself, so a 1 GiB guest costs nothing until the guest writes to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading

import numpy as np

from tiermem.errors import InvalidArgument, KernelError, TiermemError
from tiermem.guests import asm as g
from tiermem.guests import kvm_ioctl as k
from tiermem.kernel.uffd_ioctl import Mapping, memfd_create

__all__ = ["GuestFault", "KvmMachine", "PlainRam"]

# stdlib logging, not structlog: this module runs inside the VMM's own process, whose logging setup is
# the VMM's; an unconfigured structlog would print to its stdout (docs/architecture.md, "Logging").
log = logging.getLogger(__name__)


class GuestFault(TiermemError):
    """The guest stopped somewhere other than its batch-done port (a crash, or a VMM bug)."""


class PlainRam:
    """Guest RAM as a bare memfd with one MAP_SHARED mapping: no userfaultfd, no agent."""

    def __init__(self, vm_id: str, size: int) -> None:
        self.size = size
        self.memfd = memfd_create(f"tiermem-{vm_id}", size)
        try:
            self._mapping = Mapping(self.memfd, size)
        except BaseException:
            os.close(self.memfd)
            raise
        self.base = self._mapping.addr

    def view(self) -> memoryview:
        """The guest mapping; loads and stores through it are guest accesses. Dead after :meth:`close`."""
        return self._mapping.view()

    def close(self) -> None:
        """Unmap and close the memfd (idempotent)."""
        self._mapping.close()
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


class _Vcpu:
    """A vCPU with its mailbox view; used by one thread at a time."""

    def __init__(self, cpu: k.KvmVcpu, mailbox: np.ndarray) -> None:
        self.cpu = cpu
        self.mailbox = mailbox
        self.entries = mailbox[g.MAILBOX_ENTRIES_OFF // 4 :]
        self.seq = 0
        self.lock = threading.Lock()


class KvmMachine:
    """A KVM VM with the system slot, one guest RAM slot and ``vcpus`` vCPUs parked in the guest loop."""

    def __init__(
        self,
        name: str,
        ram_base: int,
        ram_size: int,
        vcpus: int,
        *,
        counter_offset: int = 0,
        index_offset: int = 8,
    ) -> None:
        if not 1 <= vcpus <= g.MAX_VCPUS:
            raise InvalidArgument(f"vcpus must be between 1 and {g.MAX_VCPUS}, got {vcpus}")
        if ram_size <= 0 or ram_size % 4096 or ram_size > g.MAX_RAM_BYTES:
            raise InvalidArgument(
                f"guest memory must be a positive multiple of 4 KiB up to {g.MAX_RAM_BYTES >> 30} GiB,"
                f" got {ram_size} bytes"
            )
        self.name = name
        self.ram_base = ram_base
        self.ram_size = ram_size
        self.n_pages = ram_size // 4096
        self.program = g.build_guest_program(counter_offset, index_offset)
        self._sys_fd = -1
        self._sys: Mapping | None = None
        self._vm: k.KvmVmFd | None = None
        self._vcpus: list[_Vcpu] = []
        kvm = k.KvmSystem()
        try:
            self._vm = kvm.create_vm()
            self._vm.set_tss_addr(g.TSS_GPA)
            self._setup_system_slot()
            self._vm.set_memory_region(1, g.RAM_GPA, ram_size, ram_base)
            cpuid = kvm.supported_cpuid()
            for i in range(vcpus):
                self._vcpus.append(self._make_vcpu(i, cpuid))
            for i in range(vcpus):
                self._boot(i)
        except BaseException:
            self.close()
            raise
        finally:
            kvm.close()

    @property
    def vcpus(self) -> int:
        """Number of vCPUs."""
        return len(self._vcpus)

    def _setup_system_slot(self) -> None:
        assert self._vm is not None
        # A private memfd (not anonymous memory) so the mapping has a plain address we can unmap.
        self._sys_fd = memfd_create(f"tiermem-{self.name}-sys", g.SYS_SIZE)
        self._sys = Mapping(self._sys_fd, g.SYS_SIZE)
        view = self._sys.view()
        gdt = g.build_gdt()
        view[g.GDT_GPA : g.GDT_GPA + len(gdt)] = gdt
        view[g.CODE_GPA : g.CODE_GPA + len(self.program.code)] = self.program.code
        for gpa, chunk in g.build_page_tables(g.RAM_GPA + self.ram_size):
            view[gpa : gpa + len(chunk)] = chunk
        self._vm.set_memory_region(0, 0, g.SYS_SIZE, self._sys.addr)

    def _make_vcpu(self, index: int, cpuid: bytes) -> _Vcpu:
        assert self._vm is not None and self._sys is not None
        cpu = self._vm.create_vcpu(index)
        try:
            cpu.set_cpuid(cpuid)
            sregs = cpu.get_sregs()
            _flat(sregs.cs, g.USER_CS, seg_type=0xB, long_mode=True)
            for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
                _flat(seg, g.USER_DS, seg_type=0x3, long_mode=False)
            sregs.gdt.base, sregs.gdt.limit = g.GDT_GPA, len(g.build_gdt()) - 1
            sregs.cr3 = g.PML4_GPA
            sregs.cr4 = k.CR4_PAE
            sregs.efer = k.EFER_LME | k.EFER_LMA
            sregs.cr0 = k.CR0_PE | k.CR0_ET | k.CR0_WP | k.CR0_PG
            cpu.set_sregs(sregs)
            regs = k.KvmRegs()
            regs.rip = self.program.entry_gpa
            regs.rsi = g.mailbox_gpa(index)
            regs.rbp = g.RAM_GPA
            regs.rflags = k.RFLAGS_RESERVED | k.RFLAGS_IOPL3
            cpu.set_regs(regs)
        except OSError as e:
            cpu.close()
            raise KernelError(f"vCPU {index} setup: {os.strerror(e.errno or 0)}", e.errno or 0) from None
        view = self._sys.view()
        off = g.mailbox_gpa(index)
        mailbox = np.frombuffer(view, dtype="<u4", count=g.MAILBOX_STRIDE // 4, offset=off)
        return _Vcpu(cpu, mailbox)

    def _expect_done(self, v: _Vcpu, reason: int) -> None:
        info = v.cpu.exit_info()
        if reason == k.KVM_EXIT_IO and info.io_port == g.PORT_DONE and info.io_direction == k.KVM_EXIT_IO_OUT:
            return
        regs = v.cpu.get_regs()
        what = f"{info.name} exit" + (f" ({info.detail})" if info.detail else "")
        if reason == k.KVM_EXIT_IO:
            what += f" on port {info.io_port:#x}"
        raise GuestFault(f"VM {self.name} vCPU {v.cpu.index}: unexpected {what} at rip={regs.rip:#x}")

    def _boot(self, index: int) -> None:
        v = self._vcpus[index]
        v.mailbox[g.MB_COUNT // 4] = 0
        self._expect_done(v, v.cpu.run())

    def run_batch(self, vcpu: int, entries: np.ndarray) -> int:
        """Run one batch of encoded accesses on ``vcpu``; returns the u32 sum of the counters read.

        ``entries`` are ``(page << 1) | is_write`` (see :func:`encode`), at most
        ``guest_asm.MAX_BATCH`` of them, every page inside guest RAM. Blocks while
        the guest waits on faults.
        """
        n = len(entries)
        if n > g.MAX_BATCH:
            raise InvalidArgument(f"a batch holds at most {g.MAX_BATCH} entries, got {n}")
        v = self._vcpus[vcpu]
        with v.lock:
            if self._vm is None:
                raise TiermemError(f"VM {self.name} is closed")
            v.seq = (v.seq + 1) & 0xFFFF_FFFF
            v.entries[:n] = entries
            v.mailbox[g.MB_COUNT // 4] = n
            v.mailbox[g.MB_SEQ // 4] = v.seq
            self._expect_done(v, v.cpu.run())
            if int(v.mailbox[g.MB_DONE_SEQ // 4]) != v.seq:
                raise GuestFault(f"VM {self.name} vCPU {vcpu}: batch {v.seq} reported done but not run")
            return int(v.mailbox[g.MB_READ_SUM // 4])

    def encode(self, pages: np.ndarray, writes: np.ndarray) -> np.ndarray:
        """Mailbox entries for (pages, writes); InvalidArgument if a page is outside guest RAM."""
        p = np.asarray(pages, dtype=np.int64)
        if len(p) and (int(p.min()) < 0 or int(p.max()) >= self.n_pages):
            raise InvalidArgument(f"page index outside 0..{self.n_pages - 1}")
        return ((p.astype(np.uint32) << np.uint32(1)) | np.asarray(writes, dtype=np.uint32)).astype(np.uint32)

    def read_ram(self, offset: int, dst: np.ndarray) -> None:
        """Copy guest RAM [offset, offset + dst.nbytes) into ``dst`` through the guest mapping.

        ctypes.memmove releases the GIL, so a page that faults into an in-process
        userfaultfd handler does not deadlock it.
        """
        if offset < 0 or offset + dst.nbytes > self.ram_size:
            raise InvalidArgument(f"range {offset}+{dst.nbytes} outside guest memory")
        ctypes.memmove(dst.ctypes.data, self.ram_base + offset, dst.nbytes)

    def close(self, timeout: float = 5.0) -> None:
        """Close vCPUs, the VM and the system slot; guest RAM belongs to the caller (idempotent).

        A vCPU whose batch does not end within ``timeout`` seconds is left open.
        """
        stuck = 0
        for v in self._vcpus:
            # A vCPU still inside KVM_RUN (blocked on a fault nobody serves) keeps its fd.
            if v.lock.acquire(timeout=timeout):
                try:
                    v.cpu.close()
                finally:
                    v.lock.release()
            else:
                stuck += 1
        self._vcpus = []
        if self._vm is not None:
            self._vm.close()
            self._vm = None
        if stuck:
            # Its thread reads the mailbox when KVM_RUN returns: leak the system slot rather than
            # unmap memory under it.
            log.warning(
                "VM %s: %d vCPU(s) still in KVM_RUN at close; system slot left mapped", self.name, stuck
            )
            return
        if self._sys is not None:
            self._sys.close()
            self._sys = None
        if self._sys_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._sys_fd)
            self._sys_fd = -1


def _flat(seg: k.KvmSegment, selector: int, *, seg_type: int, long_mode: bool) -> None:
    """A flat ring-3 segment (base 0, 4 GiB, present, DPL 3)."""
    seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFF_FFFF, selector, seg_type
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 3, 1, 1, 0, 0
    seg.l, seg.db = (1, 0) if long_mode else (0, 1)
