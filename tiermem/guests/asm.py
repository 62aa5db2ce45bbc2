"""The KVM test guest: its memory layout, its mailbox format and its program, assembled here.

The guest runs in 64-bit long mode with identity paging (2 MiB pages), and its
program runs at CPL 3 with IOPL 3 so that ``OUT`` works without an I/O bitmap.
Ring 3 is deliberate: under PVM (the page-table-based KVM of this project's
nested hosts, ``kvm_pvm``) ring-0 code of an unmodified guest is emulated one
instruction at a time (about 10 µs per guest access, measured), while ring-3
code runs natively, two orders of magnitude faster. On VMX/SVM hosts both run
natively, so nothing is lost there.

Guest-physical memory has two KVM memory slots::

    0x0000_0000  system slot (SYS_SIZE, private anonymous memory, never tracked)
       0x1000      GDT (null, kernel code/data, user code/data)
       0x2000      the guest program (below)
       0x3000      PML4; 0x4000 PDPT; PDs from 0x200000 (one per GiB mapped)
       0x10000     mailbox of vCPU 0, then one every 64 KiB (MAX_VCPUS of them)
    RAM_GPA      guest RAM slot: the memfd that tiermem tracks and evicts
                 page i holds a u32 counter at ``counter_offset`` (tiermem.sim.content)

The mailboxes sit outside the tracked RAM on purpose: the VMM writes every batch
into them, and those writes must neither count as guest accesses nor ever fault
into a userfaultfd handler (a VMM thread faulting with the GIL held would stall an
in-process handler).

Mailbox (per vCPU, little-endian u32 fields)::

    +0  count     entries in this batch (VMM)        +4  seq       batch number (VMM)
    +8  done_seq  copied from seq when done (guest)  +12 read_sum  u32 sum of counters read (guest)
    +64 entries   count x u32: (page_index << 1) | is_write

The program: ``OUT PORT_DONE`` (the VMM posts the next batch while the vCPU is
stopped in that exit), then for each entry either ``lock inc`` the page's counter
(a write) or add it to ``read_sum`` (a read), then publish ``done_seq`` and loop.
``lock inc`` keeps increments exact when several vCPUs write one page.

The assembler is deliberately tiny: the handful of x86-64 encodings the program
uses, with rel8 branches. ``tests/unit/test_kvm_guest_asm.py`` checks the bytes
against a committed copy and, where GNU ``as`` exists, against its output for
``listing()``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tiermem.errors import InvalidArgument

__all__ = [
    "CODE_GPA",
    "GDT_GPA",
    "MAILBOX_ENTRIES_OFF",
    "MAILBOX_GPA",
    "MAILBOX_STRIDE",
    "MAX_BATCH",
    "MAX_RAM_BYTES",
    "MAX_VCPUS",
    "MB_COUNT",
    "MB_DONE_SEQ",
    "MB_READ_SUM",
    "MB_SEQ",
    "PML4_GPA",
    "PORT_DONE",
    "RAM_GPA",
    "SYS_SIZE",
    "TSS_GPA",
    "USER_CS",
    "USER_DS",
    "Asm",
    "GuestProgram",
    "build_gdt",
    "build_guest_program",
    "build_page_tables",
    "mailbox_gpa",
]

SYS_SIZE = 4 << 20
GDT_GPA = 0x1000
CODE_GPA = 0x2000
PML4_GPA = 0x3000
PDPT_GPA = 0x4000
PD_GPA = 0x20_0000
MAILBOX_GPA = 0x1_0000
MAILBOX_STRIDE = 0x1_0000
MAX_VCPUS = 16
MB_COUNT, MB_SEQ, MB_DONE_SEQ, MB_READ_SUM = 0, 4, 8, 12
MAILBOX_ENTRIES_OFF = 64
MAX_BATCH = (MAILBOX_STRIDE - MAILBOX_ENTRIES_OFF) // 4
RAM_GPA = SYS_SIZE
GIB = 1 << 30
# One PD page maps 1 GiB; the PD area of the system slot holds 512 of them, and
# entries carry page indexes in 31 bits. 64 GiB is far above what a test host needs.
MAX_RAM_BYTES = 64 * GIB
# KVM wants three pages for a TSS on Intel hosts; keep them out of every slot.
TSS_GPA = 0xFFFB_D000
PORT_DONE = 0x10
KERNEL_CS, KERNEL_DS, USER_CS, USER_DS = 0x08, 0x10, 0x1B, 0x23

assert MAILBOX_GPA + MAX_VCPUS * MAILBOX_STRIDE <= PD_GPA
assert PD_GPA + (RAM_GPA + MAX_RAM_BYTES) // GIB * 4096 <= SYS_SIZE
assert RAM_GPA % (2 << 20) == 0

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
_R32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
_R64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")
_REX_W = b"\x48"


def mailbox_gpa(vcpu: int) -> int:
    """Guest-physical address of vCPU ``vcpu``'s mailbox."""
    if not 0 <= vcpu < MAX_VCPUS:
        raise InvalidArgument(f"vcpu index must be between 0 and {MAX_VCPUS - 1}, got {vcpu}")
    return MAILBOX_GPA + vcpu * MAILBOX_STRIDE


def _mem_operand(reg_field: int, base: int, disp: int) -> bytes:
    """ModRM (+SIB) (+disp) for ``[base + disp]`` with a 64-bit base, as GNU as encodes it."""
    sib = b"\x24" if base == RSP else b""
    if disp == 0 and base != RBP:
        return bytes([(reg_field << 3) | base]) + sib
    if -128 <= disp <= 127:
        return bytes([0x40 | (reg_field << 3) | base]) + sib + disp.to_bytes(1, "little", signed=True)
    return bytes([0x80 | (reg_field << 3) | base]) + sib + disp.to_bytes(4, "little", signed=True)


def _mem_text(base: int, disp: int) -> str:
    return f"[{_R64[base]}]" if disp == 0 else f"[{_R64[base]}{disp:+d}]"


def _modrm_rr(reg_field: int, rm: int) -> int:
    return 0xC0 | (reg_field << 3) | rm


def _reg(wide: bool, r: int) -> str:
    return (_R64 if wide else _R32)[r]


@dataclass
class Asm:
    """A two-pass x86-64 assembler for the few instructions the guest needs (registers 0-7 only)."""

    _items: list[tuple[str, bytes | None, str | None, int]] = field(default_factory=list)
    """(intel-syntax text, bytes or None for a branch, branch label, branch opcode)."""
    _labels: dict[str, int] = field(default_factory=dict)

    def _emit(self, text: str, code: bytes) -> None:
        self._items.append((text, code, None, 0))

    def label(self, name: str) -> None:
        """Define ``name`` at the current position."""
        if name in self._labels:
            raise InvalidArgument(f"label {name!r} defined twice")
        self._labels[name] = len(self._items)
        self._items.append((f"{name}:", b"", None, 0))

    def _branch(self, mnemonic: str, opcode: int, target: str) -> None:
        self._items.append((f"{mnemonic} {target}", None, target, opcode))

    def jmp(self, target: str) -> None:
        """``jmp rel8``."""
        self._branch("jmp", 0xEB, target)

    def jz(self, target: str) -> None:
        """``jz rel8``."""
        self._branch("jz", 0x74, target)

    def jnz(self, target: str) -> None:
        """``jnz rel8``."""
        self._branch("jnz", 0x75, target)

    def out_imm8_al(self, port: int) -> None:
        """``out imm8, al``."""
        self._emit(f"out {port:#x}, al", bytes([0xE6, port]))

    def mov_load32(self, dst: int, base: int, disp: int = 0) -> None:
        """``mov r32, dword [base+disp]`` (zero-extends into the 64-bit register)."""
        self._emit(
            f"mov {_R32[dst]}, dword ptr {_mem_text(base, disp)}", b"\x8b" + _mem_operand(dst, base, disp)
        )

    def mov_store32(self, base: int, disp: int, src: int) -> None:
        """``mov dword [base+disp], r32``."""
        self._emit(
            f"mov dword ptr {_mem_text(base, disp)}, {_R32[src]}", b"\x89" + _mem_operand(src, base, disp)
        )

    def mov_store64(self, base: int, disp: int, src: int) -> None:
        """``mov qword [base+disp], r64``."""
        self._emit(
            f"mov qword ptr {_mem_text(base, disp)}, {_R64[src]}",
            _REX_W + b"\x89" + _mem_operand(src, base, disp),
        )

    def lea64(self, dst: int, base: int, disp: int) -> None:
        """``lea r64, [base+disp]``."""
        self._emit(
            f"lea {_R64[dst]}, {_mem_text(base, disp)}", _REX_W + b"\x8d" + _mem_operand(dst, base, disp)
        )

    def mov_rr32(self, dst: int, src: int) -> None:
        """``mov r32, r32`` (89 /r, as GNU as picks; zero-extends)."""
        self._emit(f"mov {_R32[dst]}, {_R32[src]}", bytes([0x89, _modrm_rr(src, dst)]))

    def xor_rr32(self, dst: int, src: int) -> None:
        """``xor r32, r32``."""
        self._emit(f"xor {_R32[dst]}, {_R32[src]}", bytes([0x31, _modrm_rr(src, dst)]))

    def add_rr64(self, dst: int, src: int) -> None:
        """``add r64, r64``."""
        self._emit(f"add {_R64[dst]}, {_R64[src]}", _REX_W + bytes([0x01, _modrm_rr(src, dst)]))

    def test_rr32(self, a: int, b: int) -> None:
        """``test r32, r32``."""
        self._emit(f"test {_R32[a]}, {_R32[b]}", bytes([0x85, _modrm_rr(b, a)]))

    def add_imm8_64(self, dst: int, imm: int) -> None:
        """``add r64, imm8`` (sign-extended)."""
        if not -128 <= imm <= 127:
            raise InvalidArgument(f"add imm8 out of range: {imm}")
        code = _REX_W + bytes([0x83, _modrm_rr(0, dst)]) + imm.to_bytes(1, "little", signed=True)
        self._emit(f"add {_R64[dst]}, {imm}", code)

    def shift64(self, op: str, dst: int, count: int) -> None:
        """``shl``/``shr`` r64, imm8 (the one-bit form for a count of 1, as GNU as does)."""
        ext = {"shl": 4, "shr": 5}[op]
        if count == 1:
            code = _REX_W + bytes([0xD1, _modrm_rr(ext, dst)])
        else:
            code = _REX_W + bytes([0xC1, _modrm_rr(ext, dst), count])
        self._emit(f"{op} {_R64[dst]}, {count}", code)

    def shr32(self, dst: int, count: int) -> None:
        """``shr r32, imm8`` (zero-extends into the 64-bit register)."""
        code = bytes([0xD1, _modrm_rr(5, dst)]) if count == 1 else bytes([0xC1, _modrm_rr(5, dst), count])
        self._emit(f"shr {_R32[dst]}, {count}", code)

    def test_al_imm8(self, imm: int) -> None:
        """``test al, imm8``."""
        self._emit(f"test al, {imm}", bytes([0xA8, imm]))

    def lock_inc_mem32(self, base: int, disp: int = 0) -> None:
        """``lock inc dword [base+disp]``: an atomic read-modify-write of one guest word."""
        self._emit(f"lock inc dword ptr {_mem_text(base, disp)}", b"\xf0\xff" + _mem_operand(0, base, disp))

    def add_load32(self, dst: int, base: int, disp: int = 0) -> None:
        """``add r32, dword [base+disp]``."""
        self._emit(
            f"add {_R32[dst]}, dword ptr {_mem_text(base, disp)}", b"\x03" + _mem_operand(dst, base, disp)
        )

    def dec32(self, reg: int) -> None:
        """``dec r32`` (FF /1: 48+r is a REX prefix in 64-bit mode)."""
        self._emit(f"dec {_R32[reg]}", bytes([0xFF, _modrm_rr(1, reg)]))

    def assemble(self) -> bytes:
        """Resolve labels (every branch is rel8) and return the machine code."""
        offsets: list[int] = []
        pos = 0
        for _text, code, _label, _op in self._items:
            offsets.append(pos)
            pos += 2 if code is None else len(code)
        out = bytearray()
        for i, (_text, code, label, op) in enumerate(self._items):
            if code is not None:
                out += code
                continue
            assert label is not None
            if label not in self._labels:
                raise InvalidArgument(f"undefined label {label!r}")
            rel = offsets[self._labels[label]] - (offsets[i] + 2)
            if not -128 <= rel <= 127:
                raise InvalidArgument(f"branch to {label!r} out of rel8 range ({rel})")
            out += bytes([op]) + rel.to_bytes(1, "little", signed=True)
        return bytes(out)

    def listing(self) -> str:
        """The program as GNU as source (``.intel_syntax noprefix``, ``.code64``)."""
        lines = [".intel_syntax noprefix", ".code64", ".text"]
        lines += [text if text.endswith(":") else f"    {text}" for text, *_ in self._items]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class GuestProgram:
    """The assembled guest and how to enter it."""

    code: bytes
    entry_gpa: int
    listing: str


def _program(a: Asm, counter_offset: int, index_offset: int) -> None:
    # Registers: rsi = this vCPU's mailbox, rbp = RAM base (both set by the VMM),
    # ecx = entries left, rdi = next entry, eax = entry, then page index,
    # ebx = read sum, rdx = page address.
    a.label("top")
    a.out_imm8_al(PORT_DONE)
    a.mov_load32(RCX, RSI, MB_COUNT)
    a.lea64(RDI, RSI, MAILBOX_ENTRIES_OFF)
    a.xor_rr32(RBX, RBX)
    a.test_rr32(RCX, RCX)
    a.jz("finish")
    a.label("next")
    a.mov_load32(RAX, RDI)
    a.add_imm8_64(RDI, 4)
    a.mov_rr32(RDX, RAX)
    a.shift64("shr", RDX, 1)
    a.shift64("shl", RDX, 12)
    a.add_rr64(RDX, RBP)
    a.test_al_imm8(1)
    a.jz("read")
    a.lock_inc_mem32(RDX, counter_offset)
    a.shr32(RAX, 1)
    a.mov_store64(RDX, index_offset, RAX)  # the content model's page-index stamp
    a.dec32(RCX)
    a.jnz("next")
    a.jmp("finish")
    a.label("read")
    a.add_load32(RBX, RDX, counter_offset)
    a.dec32(RCX)
    a.jnz("next")
    a.label("finish")
    a.mov_store32(RSI, MB_READ_SUM, RBX)
    a.mov_load32(RAX, RSI, MB_SEQ)
    a.mov_store32(RSI, MB_DONE_SEQ, RAX)
    a.jmp("top")


def build_guest_program(counter_offset: int = 0, index_offset: int = 8) -> GuestProgram:
    """Assemble the batch-runner guest: a write does ``counter += 1`` (u32 at ``counter_offset``)
    and stores the page index (u64 at ``index_offset``), as :mod:`tiermem.sim.content` defines."""
    if counter_offset % 4 or not 0 <= counter_offset <= 4096 - 4:
        raise InvalidArgument(
            f"counter_offset must be a 4-aligned offset inside a page, got {counter_offset}"
        )
    if index_offset % 8 or not 0 <= index_offset <= 4096 - 8 or abs(index_offset - counter_offset) < 4:
        raise InvalidArgument(
            f"index_offset must be an 8-aligned offset clear of the counter, got {index_offset}"
        )
    asm = Asm()
    _program(asm, counter_offset, index_offset)
    return GuestProgram(asm.assemble(), CODE_GPA, asm.listing())


def build_gdt() -> bytes:
    """A flat GDT: null, kernel code64 (0x08), kernel data (0x10), user code64 (0x1b), user data (0x23)."""

    def desc(access: int, flags: int) -> bytes:
        # base 0, limit 0xfffff; flags nibble: G=1 plus L=1 (code64) or D/B=1 (data).
        return bytes([0xFF, 0xFF, 0, 0, 0, access, (flags << 4) | 0xF, 0])

    return bytes(8) + desc(0x9B, 0xA) + desc(0x93, 0xC) + desc(0xFB, 0xA) + desc(0xF3, 0xC)


def build_page_tables(mapped_bytes: int) -> list[tuple[int, bytes]]:
    """Identity-map guest-physical [0, mapped_bytes) with user-accessible 2 MiB pages.

    Returns ``(gpa, bytes)`` chunks to copy into the system slot: the PML4, the
    PDPT and one PD per GiB.
    """
    n_gib = -(-mapped_bytes // GIB)
    if not 1 <= n_gib <= 512 or PD_GPA + n_gib * 4096 > SYS_SIZE:
        raise InvalidArgument(f"cannot identity-map {mapped_bytes} bytes")
    present_rw_user = 0x7
    page_size_bit = 0x80
    pml4 = struct.pack("<Q", PDPT_GPA | present_rw_user).ljust(4096, b"\0")
    pdpt = b"".join(struct.pack("<Q", (PD_GPA + i * 4096) | present_rw_user) for i in range(n_gib))
    pds = b"".join(
        struct.pack("<Q", ((i << 21) | page_size_bit | present_rw_user)) for i in range(n_gib * 512)
    )
    return [(PML4_GPA, pml4), (PDPT_GPA, pdpt.ljust(4096, b"\0")), (PD_GPA, pds)]
