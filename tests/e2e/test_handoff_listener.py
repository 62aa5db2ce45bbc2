"""The handoff listener on the real kernel: bad handshakes, Firecracker's handshake, the control channel."""

from __future__ import annotations

import array
import ctypes
import json
import os
import select
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.uffd_harness import ROOT, MiniAgent
from tiermem import errors
from tiermem.handoff.client import GuestMemory
from tiermem.handoff.listener import HandoffAttach, HandoffListener
from tiermem.handoff.wire import encode_frame, recv_frame
from tiermem.kernel import uapi
from tiermem.kernel.uffd import MissingOnlyBackend
from tiermem.kernel.uffd_ioctl import memfd_create, new_uffd

pytestmark = pytest.mark.uffd

PS = 4096


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[MiniAgent]:
    a = MiniAgent(tmp_path / "sock" / "h.sock", handshake_timeout=0.5)
    yield a
    a.close()


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def reply(s: socket.socket) -> dict[str, Any]:
    msg = recv_frame(s)
    assert msg is not None
    return msg


def closed_by_peer(read_end: int, timeout: float = 5.0) -> bool:
    """True once every copy of the pipe's write end is closed (the listener closed what it received)."""
    r, _, _ = select.select([read_end], [], [], timeout)
    return bool(r) and os.read(read_end, 1) == b""


def good_description(vm_id: str = "vm-ok", base: int = 0x7F00_0000_0000) -> dict[str, Any]:
    return {
        "version": 1,
        "vm_id": vm_id,
        "mode": "uffd",
        "vmm_pid": os.getpid(),
        "features": 0,
        "regions": [{"base_host_virt_addr": base, "size": 16 * PS, "offset": 0, "page_size": PS}],
    }


def send(s: socket.socket, data: bytes, fds: list[int]) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    s.sendmsg([data], anc)


def test_the_socket_is_owner_only(agent: MiniAgent) -> None:
    assert stat.S_IMODE(os.stat(agent.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(agent.path)).st_mode) == 0o700
    with pytest.raises(errors.FailedPrecondition, match="listening"):
        HandoffListener(agent.path, lambda a: None).start()


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # a dead agent's socket file
    lst = HandoffListener(path, lambda a: None).start()
    connect(path).close()
    lst.stop()
    assert not os.path.exists(path)
    with pytest.raises(errors.ConfigurationError):
        HandoffListener("/tmp/" + "x" * 120, lambda a: None)


BAD_HANDSHAKES: list[tuple[str, object, int, str]] = [
    ("garbage", b"hello, this is not a handshake at all", 0, "invalid_argument"),
    ("oversized length", struct.pack(">I", 1 << 20) + b"{}", 2, "invalid_argument"),
    ("json without prefix", b'{"version": 1}', 2, "invalid_argument"),
    ("malformed json", struct.pack(">I", 5) + b"{abc}", 2, "invalid_argument"),
    ("json array in a frame", encode_frame({"x": 1})[:4] + b"[1,2,3,4]"[:7], 2, "invalid_argument"),
    ("unknown version", {**good_description(), "version": 2}, 2, "unsupported_version"),
    ("version as string", {**good_description(), "version": "1"}, 2, "unsupported_version"),
    ("vm_id not a string", {**good_description(), "vm_id": 5}, 2, "invalid_argument"),
    ("bad vm_id", {**good_description(), "vm_id": "../etc"}, 2, "invalid_argument"),
    ("unknown mode", {**good_description(), "mode": "swap"}, 2, "invalid_argument"),
    ("regions not a list", {**good_description(), "regions": "all"}, 2, "invalid_argument"),
    (
        "region field type",
        {**good_description(), "regions": [{"base_host_virt_addr": "0x1", "size": 4096}]},
        2,
        "invalid_argument",
    ),
    ("features negative", {**good_description(), "features": -1}, 2, "invalid_argument"),
    ("unknown first message", {**good_description(), "type": "zap"}, 2, "invalid_argument"),
    ("no fds", good_description(), 0, "invalid_argument"),
    ("one fd", good_description(), 1, "invalid_argument"),
    ("three fds", good_description(), 3, "invalid_argument"),
    ("fds of the wrong kind", good_description(), 2, "invalid_argument"),
    ("too many fds", good_description(), 12, "invalid_argument"),
    (
        "firecracker with two fds",
        b'[{"base_host_virt_addr":140000000000000,"size":8192,"offset":0}]',
        2,
        "invalid_argument",
    ),
    (
        "firecracker with a pipe",
        b'[{"base_host_virt_addr":140000000000000,"size":8192,"offset":0}]',
        1,
        "invalid_argument",
    ),
    ("firecracker malformed", b'[{"base_host_virt_addr":1', 1, "invalid_argument"),
]


@pytest.mark.parametrize("name,payload,nfds,code", BAD_HANDSHAKES, ids=[b[0] for b in BAD_HANDSHAKES])
def test_bad_handshakes_get_an_error_their_fds_closed_and_others_are_served(
    agent: MiniAgent, name: str, payload: object, nfds: int, code: str
) -> None:
    if isinstance(payload, dict):
        data = encode_frame(payload)
    else:
        assert isinstance(payload, bytes)
        data = payload
    r, w = os.pipe()
    with connect(agent.path) as s:
        send(s, data, [w] * nfds)
        os.close(w)
        if data.lstrip().startswith(b"["):  # Firecracker format: the error is a plain JSON line
            line = s.makefile().readline()
            err = json.loads(line)
        else:
            err = reply(s)
        assert err["type"] == "error" and err["code"] == code and err["error"]
        assert s.recv(1) == b""  # and the listener hung up
    assert closed_by_peer(r), "the listener kept a received fd open"
    os.close(r)
    assert agent.listener.rejected == 1
    assert agent.attaches.empty()
    # another VM attaches fine afterwards
    with GuestMemory.create("vm-after", 16 * PS, mode="uffd") as gm:
        gm.handoff(agent.path, timeout=5)
        a = agent.wait_attach()
        assert a.vm_id == "vm-after"
        a.close_fds()


def test_a_silent_or_truncated_peer_never_blocks_others(agent: MiniAgent) -> None:
    silent = connect(agent.path)
    truncated = connect(agent.path)
    truncated.sendall(struct.pack(">I", 100) + b"{")
    with GuestMemory.create("vm-busy", 16 * PS, mode="uffd") as gm:
        gm.handoff(agent.path, timeout=5)  # served while both of them are still stuck
        agent.wait_attach().close_fds()
    err = reply(silent)  # then the handshake timeout answers them
    assert err["code"] == "invalid_argument" and "timed out" in err["error"]
    assert reply(truncated)["code"] == "invalid_argument"
    silent.close()
    truncated.close()


def test_a_refused_attach_reports_the_agents_error(tmp_path: Path) -> None:
    def refuse(a: HandoffAttach) -> None:
        raise errors.AlreadyExists(f"VM {a.vm_id} is already attached")

    lst = HandoffListener(str(tmp_path / "h.sock"), refuse).start()
    try:
        with (
            GuestMemory.create("vm-dup", 16 * PS, mode="uffd") as gm,
            pytest.raises(errors.AlreadyExists, match="already attached"),
        ):
            gm.handoff(lst.path, timeout=5)
    finally:
        lst.stop()


def test_control_channel_ping_zap_nack_detach(agent: MiniAgent) -> None:
    with GuestMemory.create("vm-ctl", 16 * PS, mode="uffd") as gm:
        gm.handoff(agent.path, timeout=5)
        a = agent.wait_attach()
        assert (a.mode, a.peer_pid, a.reattach, a.tracking) == ("uffd", os.getpid(), False, True)
        assert a.features & uapi.UFFD_FEATURE_MINOR_SHMEM
        be = a.make_backend()
        agent.serve(be)
        conn = a.connection
        assert conn.ping() > 0
        conn.zap([(gm.base, 4 * PS)], timeout=5)
        assert gm.zaps == 1
        with pytest.raises(errors.KernelError) as ei:
            conn.zap([(gm.base + 1, PS)], timeout=5)
        assert ei.value.errno == 22 and "aligned" in str(ei.value)
        with pytest.raises(errors.KernelError):
            conn.zap([(gm.base - 16 * PS, PS)], timeout=5)
        closed = threading.Event()
        conn.on_close = closed.set
        conn.send_detach()
        assert gm.detached.wait(5)
        assert closed.wait(5) and conn.closed  # the VMM hung up after detaching
        with pytest.raises(errors.Unavailable):
            conn.zap([(gm.base, PS)], timeout=1)
        # unregistered: guest accesses no longer trap, even with nobody serving faults
        be.close()
        t = threading.Thread(target=ctypes.memmove, args=(gm.base + 9 * PS, b"x", 1), daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive()


def test_vmm_reattaches_after_the_agent_restarts(tmp_path: Path) -> None:
    path = str(tmp_path / "h.sock")
    first = MiniAgent(path)
    with GuestMemory.create("vm-re", 16 * PS, mode="uffd") as gm:
        gm.handoff(path, timeout=5)
        first.wait_attach().close_fds()
        first.close()  # the agent goes away: connection closed, socket removed
        assert not os.path.exists(path)
        deadline = time.monotonic() + 5
        while gm.attached.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        second = MiniAgent(path)
        try:
            again = second.wait_attach(timeout=10)
            assert again.vm_id == "vm-re" and again.reattach
            be = again.make_backend()
            second.serve(be)
            t = threading.Thread(target=ctypes.memmove, args=(gm.base, b"y", 1), daemon=True)
            t.start()  # a MISSING fault served by the new agent
            t.join(5)
            assert not t.is_alive()
            be.close()
        finally:
            second.close()


FIRECRACKER_LIKE = r"""
import array, ctypes, json, mmap, socket, sys
from tiermem.kernel import uapi
from tiermem.kernel.uffd_ioctl import Uffd, new_uffd
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
PS, R = 4096, 8 * 4096
# guest_memory_from_uffd: private anonymous memory, two regions around a hole (collapsed MMIO gap)
area = libc.mmap(None, 3 * R, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
bases = [area, area + 2 * R]
for b in bases:
    assert libc.mmap(b, R, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10, -1, 0) == b  # MAP_FIXED
# UffdBuilder: require_features(EVENT_REMOVE), close_on_exec, non_blocking; register() = MISSING
fd, _ = new_uffd(uapi.UFFD_FEATURE_EVENT_REMOVE)
for b in bases:
    Uffd(fd).register(b, R, uapi.UFFDIO_REGISTER_MODE_MISSING)
# send_uffd_handshake: serde_json::to_string(&Vec<GuestRegionUffdMapping>), one sendmsg with one fd
regions = [{"base_host_virt_addr": b, "size": R, "offset": i * R, "page_size": PS, "page_size_kib": PS}
           for i, b in enumerate(bases)]
payload = json.dumps(regions, separators=(",", ":")).encode()
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
# forget(socket): never read, never closed; the guest runs and faults every page in
print(json.dumps({"payload": payload.decode()}), flush=True)
got = [ctypes.string_at(b + p * PS, 16).hex() for b in bases for p in range(R // PS)]
print(json.dumps({"pages": got}), flush=True)
sys.stdin.readline()
"""


def snapshot_page(offset: int) -> bytes:
    return offset.to_bytes(8, "little") * (PS // 8)


def test_firecracker_handshake_is_served_missing_only(agent: MiniAgent) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", FIRECRACKER_LIKE, agent.path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        a = agent.wait_attach()
        assert a.mode == "firecracker" and not a.tracking and a.memfd is None
        assert a.vm_id == f"fc-{proc.pid}" and a.peer_pid == proc.pid
        assert [r.offset for r in a.regions] == [0, 8 * PS] and all(r.page_size == PS for r in a.regions)
        be = a.make_backend()
        assert isinstance(be, MissingOnlyBackend) and not be.tracking
        assert be.n_pages == 16  # pages of the snapshot file: the hole in the address space is no page
        hole = a.regions[0].base_host_virt_addr + 8 * PS
        assert be.page_of(hole) == -1 and be.addr(8) == a.regions[1].base_host_virt_addr
        for r in a.regions:  # lazy restore: what the store would hold, by snapshot offset
            for p in range(r.size // PS):
                addr = r.base_host_virt_addr + p * PS
                agent.saved[be.page_of(addr)] = snapshot_page(be.snapshot_offset(addr))
        agent.serve(be)
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["payload"].startswith('[{"base_host_virt_addr":')
        pages = json.loads(proc.stdout.readline())["pages"]
        expected = [snapshot_page(off)[:16].hex() for off in range(0, 16 * PS, PS)]
        assert pages == expected
        assert not agent.saved and be.stats["missing"] == 16
        assert be.populated().sum() == 16
        with pytest.raises(OSError) as ei:  # the hole between the regions is not guest memory
            be.zeropage(hole, PS)
        assert ei.value.errno == 22 and not be.closed
        for call in (
            lambda: be.rwprotect(be.base, PS, protect=True),
            lambda: be.pagemap_scan(be.base, be.base + PS),
            lambda: be.punch_hole(0, PS),
            lambda: be.io_read(0, PS),
        ):
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno == 95  # EOPNOTSUPP
        assert not a.connection.closed  # Firecracker never closes its end while it runs
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while not be.closed:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        be.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_memfd_and_uffd_must_be_the_right_kinds(agent: MiniAgent) -> None:
    memfd = memfd_create("not-a-uffd", 16 * PS)
    ufd, _ = new_uffd(0)
    try:
        with connect(agent.path) as s:
            send(s, encode_frame(good_description("vm-swapped")), [memfd, ufd])  # swapped order
            err = reply(s)
            assert "not a userfaultfd" in err["error"]
        small = memfd_create("too-small", PS)
        with connect(agent.path) as s:
            send(s, encode_frame(good_description("vm-small")), [ufd, small])
            assert "smaller" in reply(s)["error"]
        os.close(small)
    finally:
        os.close(memfd)
        os.close(ufd)
    assert agent.listener.rejected == 2
