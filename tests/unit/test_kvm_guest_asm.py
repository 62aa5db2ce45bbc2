"""The KVM guest program and its tiny assembler: committed bytes, GNU as cross-checks, layout."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tiermem.errors import InvalidArgument
from tiermem.guests import asm as g
from tiermem.sim import content

# The guest as shipped (counter at 0, index stamp at 8). A change to the program
# must update this on purpose; test_program_matches_gnu_as re-derives it.
GOLDEN_PROGRAM_HEX = (
    "e6108b0e488d7e4031db85c9742b8b074883c70489c248d1ea48c1e20c4801eaa801740ff0ff02d1e848894208"
    "ffc975ddeb06031affc975d5895e0c8b4604894608ebbc"
)


def _gnu_as(source: str, tmp_path: Path) -> bytes:
    src, obj, binary = tmp_path / "g.s", tmp_path / "g.o", tmp_path / "g.bin"
    src.write_text(source)
    subprocess.run(["as", "--64", str(src), "-o", str(obj)], check=True, capture_output=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(binary)], check=True)
    return binary.read_bytes()


needs_as = pytest.mark.skipif(
    shutil.which("as") is None or shutil.which("objcopy") is None, reason="GNU as/objcopy not installed"
)


def test_program_matches_committed_bytes() -> None:
    prog = g.build_guest_program(content.COUNTER_OFFSET, content.PAGE_INDEX_OFFSET)
    assert prog.code.hex() == GOLDEN_PROGRAM_HEX
    assert prog.entry_gpa == g.CODE_GPA
    assert g.CODE_GPA + len(prog.code) <= g.PML4_GPA


@needs_as
@pytest.mark.parametrize(("counter", "index"), [(0, 8), (16, 24), (200, 4000), (4092, 0)])
def test_program_matches_gnu_as(counter: int, index: int, tmp_path: Path) -> None:
    prog = g.build_guest_program(counter, index)
    assert _gnu_as(prog.listing, tmp_path) == prog.code


@needs_as
def test_encodings_beyond_the_program_match_gnu_as(tmp_path: Path) -> None:
    a = g.Asm()
    for base in range(8):  # every base register, incl. rsp (SIB) and rbp (no mod=00 form)
        for disp in (0, 8, -4, 127, 128, -129, 4000):
            a.mov_load32(g.RAX, base, disp)
            a.mov_store64(base, disp, g.RCX)
            a.lock_inc_mem32(base, disp)
            a.add_load32(g.RBX, base, disp)
    for reg in range(8):
        a.dec32(reg)
        a.shr32(reg, 1)
        a.shr32(reg, 3)
        a.shift64("shl", reg, 12)
        a.add_imm8_64(reg, -5)
        a.add_rr64(reg, 7 - reg)
        a.xor_rr32(reg, reg)
        a.test_rr32(reg, 2)
        a.mov_rr32(reg, 5)
    a.label("back")
    a.dec32(g.RCX)
    a.jz("back")
    a.jnz("start2")
    a.jmp("start2")
    a.label("start2")
    code = a.assemble()
    assert _gnu_as(a.listing(), tmp_path) == code


def test_branch_out_of_rel8_range_is_refused() -> None:
    a = g.Asm()
    a.label("top")
    for _ in range(70):
        a.dec32(g.RCX)  # 2 bytes each: 140 bytes back is out of range
    a.jmp("top")
    with pytest.raises(InvalidArgument, match="rel8"):
        a.assemble()


def test_label_errors() -> None:
    a = g.Asm()
    a.label("x")
    with pytest.raises(InvalidArgument, match="twice"):
        a.label("x")
    a.jz("nowhere")
    with pytest.raises(InvalidArgument, match="undefined"):
        a.assemble()


@pytest.mark.parametrize(("counter", "index"), [(2, 8), (4096, 8), (-4, 8), (0, 4), (0, 4096), (8, 8)])
def test_bad_offsets_are_refused(counter: int, index: int) -> None:
    with pytest.raises(InvalidArgument):
        g.build_guest_program(counter, index)


def test_gdt_descriptors() -> None:
    gdt = g.build_gdt()
    assert len(gdt) == 40 and gdt[:8] == bytes(8)
    # access byte and flags of each descriptor at its selector
    for selector, access, flags in (
        (0x08, 0x9B, 0xA),
        (0x10, 0x93, 0xC),
        (g.USER_CS & ~3, 0xFB, 0xA),
        (g.USER_DS & ~3, 0xF3, 0xC),
    ):
        d = gdt[selector : selector + 8]
        assert d[5] == access and d[6] >> 4 == flags and d[:2] == b"\xff\xff"
    assert g.USER_CS & 3 == 3 and g.USER_DS & 3 == 3


def test_page_tables_identity_map_with_user_2mib_pages() -> None:
    chunks = dict(g.build_page_tables(g.RAM_GPA + (3 << 30)))
    pml4, pdpt, pds = chunks[g.PML4_GPA], chunks[g.PDPT_GPA], chunks[g.PD_GPA]
    assert struct.unpack_from("<Q", pml4)[0] == 0x4000 | 7
    n_gib = 4  # 4 MiB + 3 GiB needs four 1 GiB directories
    assert [struct.unpack_from("<Q", pdpt, 8 * i)[0] for i in range(n_gib + 1)] == [
        *(0x20_0000 + 0x1000 * i | 7 for i in range(n_gib)),
        0,
    ]
    entries = struct.unpack(f"<{n_gib * 512}Q", pds)
    assert all(e == (i << 21) | 0x87 for i, e in enumerate(entries))
    assert all(gpa + len(b) <= g.SYS_SIZE for gpa, b in chunks.items())


def test_page_tables_limits() -> None:
    with pytest.raises(InvalidArgument):
        g.build_page_tables(0)
    with pytest.raises(InvalidArgument):
        g.build_page_tables(513 << 30)
    g.build_page_tables(g.RAM_GPA + g.MAX_RAM_BYTES)  # the largest supported guest fits


def test_mailboxes_do_not_overlap_anything() -> None:
    assert g.mailbox_gpa(0) == g.MAILBOX_GPA
    last = g.mailbox_gpa(g.MAX_VCPUS - 1)
    assert last + g.MAILBOX_STRIDE <= 0x20_0000  # below the page directories
    assert g.MAILBOX_ENTRIES_OFF + g.MAX_BATCH * 4 <= g.MAILBOX_STRIDE
    with pytest.raises(InvalidArgument):
        g.mailbox_gpa(g.MAX_VCPUS)
    with pytest.raises(InvalidArgument):
        g.mailbox_gpa(-1)
