"""The uapi module against rwp-uapi.md: every ioctl number, exact struct bytes, constants."""

from __future__ import annotations

import fcntl
import os
import struct

import numpy as np
import pytest

from tiermem.kernel import uapi

# (request, expected) from the table in rwp-uapi.md §1 "Full layout after the patch, x86_64".
IOCTLS = [
    ("UFFDIO_REGISTER", 0xC020AA00),
    ("UFFDIO_UNREGISTER", 0x8010AA01),
    ("UFFDIO_WAKE", 0x8010AA02),
    ("UFFDIO_COPY", 0xC028AA03),
    ("UFFDIO_ZEROPAGE", 0xC020AA04),
    ("UFFDIO_MOVE", 0xC028AA05),
    ("UFFDIO_WRITEPROTECT", 0xC018AA06),
    ("UFFDIO_CONTINUE", 0xC020AA07),
    ("UFFDIO_POISON", 0xC020AA08),
    ("UFFDIO_RWPROTECT", 0xC018AA09),
    ("UFFDIO_SET_MODE", 0x4010AA0A),
    ("UFFDIO_API", 0xC018AA3F),
    ("USERFAULTFD_IOC_NEW", 0xAA00),
    ("PAGEMAP_SCAN", 0xC0606610),
]


@pytest.mark.parametrize(("name", "value"), IOCTLS)
def test_ioctl_request_numbers(name: str, value: int) -> None:
    assert getattr(uapi, name) == value


@pytest.mark.parametrize(
    ("fmt", "size"),
    [
        (uapi.UFFDIO_API_FMT, 24),
        (uapi.UFFDIO_RANGE_FMT, 16),
        (uapi.UFFDIO_REGISTER_FMT, 32),
        (uapi.UFFDIO_COPY_FMT, 40),
        (uapi.UFFDIO_ZEROPAGE_FMT, 32),
        (uapi.UFFDIO_MOVE_FMT, 40),
        (uapi.UFFDIO_WRITEPROTECT_FMT, 24),
        (uapi.UFFDIO_CONTINUE_FMT, 32),
        (uapi.UFFDIO_POISON_FMT, 32),
        (uapi.UFFDIO_RWPROTECT_FMT, 24),
        (uapi.UFFDIO_SET_MODE_FMT, 16),
        (uapi.PM_SCAN_ARG_FMT, 96),
        (uapi.PAGE_REGION_FMT, 24),
        (uapi.UFFD_MSG_PAGEFAULT_FMT, 32),
    ],
)
def test_struct_sizes(fmt: str, size: int) -> None:
    assert struct.calcsize(fmt) == size


def test_rwprotect_and_set_mode_bytes() -> None:
    rw = struct.pack(uapi.UFFDIO_RWPROTECT_FMT, 0x7F00_0000_1000, 0x2000, uapi.UFFDIO_RWPROTECT_MODE_RWP)
    assert rw == (
        bytes.fromhex("00100000007f0000")
        + bytes.fromhex("0020000000000000")
        + bytes.fromhex("0100000000000000")
    )
    sm = struct.pack(uapi.UFFDIO_SET_MODE_FMT, 0, uapi.UFFD_FEATURE_RWP_ASYNC)
    assert sm == bytes(8) + (0x40000).to_bytes(8, "little")


def test_pm_scan_arg_field_offsets() -> None:
    fields = list(range(1, 13))
    raw = struct.pack(uapi.PM_SCAN_ARG_FMT, *fields)
    # size, flags, start, end, walk_end, vec, vec_len, max_pages, inverted, mask, anyof, return
    for i, v in enumerate(fields):
        assert int.from_bytes(raw[8 * i : 8 * i + 8], "little") == v
    region = np.zeros(1, dtype=uapi.PAGE_REGION_DTYPE)
    region[0] = (0x1000, 0x3000, uapi.PAGE_IS_ACCESSED)
    assert region.tobytes() == struct.pack(uapi.PAGE_REGION_FMT, 0x1000, 0x3000, 0x200)


def test_uffd_msg_pagefault_bytes_and_round_trip() -> None:
    msg = uapi.UffdMsg(
        uapi.UFFD_EVENT_PAGEFAULT,
        flags=uapi.UFFD_PAGEFAULT_FLAG_RWP | uapi.UFFD_PAGEFAULT_FLAG_WRITE,
        address=0x7F00_0000_5000,
        ptid=1234,
    )
    raw = msg.pack()
    assert len(raw) == 32
    assert raw[0] == 0x12 and raw[1:8] == bytes(7)
    assert raw[8:16] == (0x9).to_bytes(8, "little")
    assert raw[16:24] == (0x7F00_0000_5000).to_bytes(8, "little")
    assert raw[24:28] == (1234).to_bytes(4, "little") and raw[28:] == bytes(4)
    assert uapi.UffdMsg.unpack(raw) == msg
    remove = uapi.UffdMsg(uapi.UFFD_EVENT_REMOVE, start=0x1000, end=0x3000)
    assert uapi.UffdMsg.unpack(remove.pack()) == remove
    assert remove.pack()[8:24] == (0x1000).to_bytes(8, "little") + (0x3000).to_bytes(8, "little")


def test_rwp_constants_exactly_as_in_the_patch() -> None:
    assert uapi.UFFD_FEATURE_RWP == 0x20000
    assert uapi.UFFD_FEATURE_RWP_ASYNC == 0x40000
    assert uapi.UFFDIO_REGISTER_MODE_RWP == 0x8
    assert uapi.UFFD_PAGEFAULT_FLAG_RWP == 0x8
    assert uapi._UFFDIO_RWPROTECT == 0x09 and uapi._UFFDIO_SET_MODE == 0x0A
    assert uapi.UFFDIO_RWPROTECT_MODE_RWP == 1 and uapi.UFFDIO_RWPROTECT_MODE_DONTWAKE == 2
    assert uapi.PAGE_IS_ACCESSED == 0x200
    assert uapi.PM_SCAN_CATEGORIES == 0x3FF
    assert uapi.UFFD_API == 0xAA


def test_derived_ioctl_sets() -> None:
    assert uapi.UFFD_API_IOCTLS == 0x8000000000000403
    assert uapi.UFFD_API_RANGE_IOCTLS == 0x3FC
    assert uapi.UFFD_API_RANGE_IOCTLS_BASIC == 0x3CC


def test_feature_bits_and_names() -> None:
    expected = [
        "PAGEFAULT_FLAG_WP",
        "EVENT_FORK",
        "EVENT_REMAP",
        "EVENT_REMOVE",
        "MISSING_HUGETLBFS",
        "MISSING_SHMEM",
        "EVENT_UNMAP",
        "SIGBUS",
        "THREAD_ID",
        "MINOR_HUGETLBFS",
        "MINOR_SHMEM",
        "EXACT_ADDRESS",
        "WP_HUGETLBFS_SHMEM",
        "WP_UNPOPULATED",
        "POISON",
        "WP_ASYNC",
        "MOVE",
        "RWP",
        "RWP_ASYNC",
    ]
    for bit, name in enumerate(expected):
        assert getattr(uapi, f"UFFD_FEATURE_{name}") == 1 << bit
    assert uapi.feature_names((1 << 19) - 1) == expected
    assert uapi.feature_names(1 << 40) == ["BIT40"]
    assert [uapi.PAGE_IS_WPALLOWED, uapi.PAGE_IS_WRITTEN, uapi.PAGE_IS_FILE, uapi.PAGE_IS_PRESENT] == [
        1,
        2,
        4,
        8,
    ]
    assert uapi.PM_UFFD_WP == 1 << 57


@pytest.mark.uffd
def test_uffdio_api_request_accepted_by_the_real_kernel() -> None:
    """The request number and struct layout round-trip through this machine's kernel."""
    from tiermem.kernel.probe import open_userfaultfd

    fd = open_userfaultfd()
    try:
        buf = bytearray(struct.pack(uapi.UFFDIO_API_FMT, uapi.UFFD_API, 0, 0))
        fcntl.ioctl(fd, uapi.UFFDIO_API, buf)
        api, features, ioctls = struct.unpack(uapi.UFFDIO_API_FMT, buf)
        assert api == uapi.UFFD_API
        assert features & uapi.UFFD_FEATURE_MISSING_SHMEM
        base = (1 << uapi._UFFDIO_REGISTER) | (1 << uapi._UFFDIO_UNREGISTER) | (1 << uapi._UFFDIO_API)
        assert ioctls & base == base
    finally:
        os.close(fd)
