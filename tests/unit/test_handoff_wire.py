"""Handoff wire format: framing, fd passing, region descriptions (ours and Firecracker's variants)."""

from __future__ import annotations

import json
import os
import socket
import struct

import pytest

from tiermem.handoff.wire import (
    MAX_MESSAGE,
    FrameReader,
    ProtocolError,
    decode_frame_length,
    encode_frame,
    parse_firecracker_regions,
    parse_regions,
    peercred,
    recv_fds,
    send_frame,
)
from tiermem.kernel.backend import Region

BASE = 0x7F00_0000_0000


def test_frame_is_big_endian_length_plus_compact_json() -> None:
    raw = encode_frame({"type": "ping", "id": 7})
    assert raw == b'\x00\x00\x00\x16{"type":"ping","id":7}'
    assert decode_frame_length(raw[:4]) == 22


def test_frame_limits() -> None:
    with pytest.raises(ProtocolError):
        encode_frame({"x": "y" * MAX_MESSAGE})
    for n in (0, MAX_MESSAGE + 1, 0x68656C6C):
        with pytest.raises(ProtocolError):
            decode_frame_length(struct.pack(">I", n))
    assert decode_frame_length(struct.pack(">I", MAX_MESSAGE)) == MAX_MESSAGE


def test_frames_split_and_pipelined_over_a_stream() -> None:
    a, b = socket.socketpair()
    with a, b:
        data = encode_frame({"n": 1}) + encode_frame({"n": 2})
        a.sendall(data[:3])
        a.sendall(data[3:9])
        a.sendall(data[9:])
        a.shutdown(socket.SHUT_WR)
        r = FrameReader(b)
        assert r.read() == {"n": 1}
        assert r.read() == {"n": 2}
        assert r.read() is None


def test_frame_reader_rejects_bad_frames() -> None:
    for raw in (b"\x00\x00\x00\x03abc", b"\x00\x00\x00\x02[]", b'\x00\x00\x00\x09{"a":', b"\xff\xff\xff\xff"):
        a, b = socket.socketpair()
        with a, b:
            a.sendall(raw)
            a.shutdown(socket.SHUT_WR)
            with pytest.raises(ProtocolError):
                FrameReader(b).read()


def test_fds_travel_with_the_first_byte_and_extra_fds_are_detected() -> None:
    a, b = socket.socketpair()
    r1, w1 = os.pipe()
    with a, b:
        send_frame(a, {"hello": True}, [w1, w1])
        data, fds, truncated = recv_fds(b, 4096)
        assert json.loads(data[4:]) == {"hello": True} and len(fds) == 2 and not truncated
        for fd in fds:
            os.close(fd)
        send_frame(a, {"many": True}, [w1] * 5)
        data, fds, truncated = recv_fds(b, 4096, max_fds=2)
        assert truncated and len(fds) <= 2  # the kernel closed the ones that did not fit
        for fd in fds:
            os.close(fd)
        assert peercred(b)[0] == os.getpid()
    os.close(w1)
    assert os.read(r1, 1) == b""  # every copy of the write end is closed
    os.close(r1)


def test_our_regions_are_validated() -> None:
    one = [
        {"base_host_virt_addr": BASE, "size": 1 << 20, "offset": 0, "page_size": 4096, "future": "ignored"}
    ]
    assert parse_regions(one, memfd_backed=True) == (Region(BASE, 1 << 20, 0, 4096),)
    two = [
        *one,
        {"base_host_virt_addr": BASE + (1 << 20), "size": 8192, "offset": 1 << 20, "page_size": 4096},
    ]
    assert len(parse_regions(two, memfd_backed=True)) == 2
    bad: list[object] = [
        [],
        "regions",
        [{"base_host_virt_addr": "0x1000", "size": 4096}],
        [{"base_host_virt_addr": BASE, "size": -4096}],
        [{"base_host_virt_addr": BASE, "size": 4096, "page_size": True}],
        [{"base_host_virt_addr": BASE + 1, "size": 4096}],
        [{"base_host_virt_addr": BASE, "size": 4096, "page_size": 8192}],
        [{"base_host_virt_addr": BASE, "size": 4096, "offset": 4096}],  # memfd offset must follow the address
        [{"base_host_virt_addr": BASE, "size": 8192}, {"base_host_virt_addr": BASE + 4096, "size": 4096}],
        [1, 2],
    ]
    for value in bad:
        with pytest.raises(ProtocolError):
            parse_regions(value, memfd_backed=True)


def test_firecracker_regions_in_every_known_variant() -> None:
    current = json.dumps(
        [
            {
                "base_host_virt_addr": BASE,
                "size": 1 << 21,
                "offset": 0,
                "page_size": 4096,
                "page_size_kib": 4096,
            }
        ],
        separators=(",", ":"),
    ).encode()
    assert parse_firecracker_regions(current) == (Region(BASE, 1 << 21, 0, 4096),)
    oldest = b'[{"base_host_virt_addr":%d,"size":8192,"offset":0}]' % BASE
    assert parse_firecracker_regions(oldest)[0].page_size == 4096
    kib = b'[{"base_host_virt_addr":%d,"size":8192,"offset":0,"page_size_kib":4}]' % BASE
    assert parse_firecracker_regions(kib)[0].page_size == 4096
    # two regions around an MMIO hole: allowed for private anonymous memory
    gap = json.dumps(
        [
            {"base_host_virt_addr": BASE, "size": 8192, "offset": 0, "page_size": 4096},
            {"base_host_virt_addr": BASE + 65536, "size": 4096, "offset": 8192, "page_size": 4096},
        ]
    )
    assert len(parse_firecracker_regions(gap.encode())) == 2
    with pytest.raises(ProtocolError, match="page_size"):  # hugetlbfs: not served by these backends
        parse_firecracker_regions(
            b'[{"base_host_virt_addr":%d,"size":4194304,"offset":0,"page_size":2097152}]' % BASE
        )
    with pytest.raises(ProtocolError):
        parse_firecracker_regions(b"[{]")
