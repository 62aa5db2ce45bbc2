"""Fuzzing the agent's VMM handoff socket: random bytes, wrong fd counts and kinds, huge lengths, wrong JSON types.

A real agent listens on its handoff socket (the listener wired to the agent as
in production). Each fuzzed connection sends one message with some file
descriptors (pipes, a memfd, a real userfaultfd, or too many), half-closes, and
reads until the agent closes. The agent must answer with an error frame (or
just close), attach nothing, and close every descriptor it received: the
process's fd count is back to where it was after every connection. Afterwards a
real VMM (a process guest) attaches through the same listener, gets a cycle and
faults served, and verifies all its memory.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.faults.common import fuzz_settings, open_fds, record
from tests.helpers.guest import GuestProc
from tests.helpers.wait import wait_until
from tiermem.agent.attach import on_handoff
from tiermem.agent.node import Agent
from tiermem.config import AgentSettings
from tiermem.handoff.listener import HandoffListener
from tiermem.handoff.wire import decode_body, decode_frame_length
from tiermem.kernel.uffd_ioctl import memfd_create, new_uffd
from tiermem.model import CycleMode, EvictionPolicy

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(300)]

PS = 4096
CODES = {
    "invalid_argument",
    "unsupported_version",
    "already_exists",
    "failed_precondition",
    "unavailable",
    "internal",
}
STATS = {"connections": 0, "error_replies": 0, "silent_closes": 0, "fds_sent": 0}


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, HandoffListener]]:
    tmp: Path = tmp_path_factory.mktemp("handoff-fuzz")
    agent = Agent(
        AgentSettings(
            node_id="n1",
            data_dir=str(tmp / "agent"),
            stores={"default": "memory://"},
            autonomous=False,
            fsync=False,
        )
    )
    lst = HandoffListener(
        str(tmp / "h" / "handoff.sock"), lambda att: on_handoff(agent, att), handshake_timeout=0.5
    ).start()
    yield agent, lst
    lst.stop()
    agent.close()


# --- inputs ------------------------------------------------------------------------------------------
def good(vm_id: str = "fz") -> dict[str, Any]:
    return {
        "version": 1,
        "type": "attach",
        "vm_id": vm_id,
        "mode": "uffd",
        "vmm_pid": os.getpid(),
        "features": 0,
        "regions": [{"base_host_virt_addr": 0x7F00_0000_0000, "size": 16 * PS, "offset": 0, "page_size": PS}],
    }


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ["version", "type", "vm_id", "mode", "vmm_pid", "features", "regions"]
REGION_FIELDS = ["base_host_virt_addr", "size", "offset", "page_size"]


@st.composite
def wrong_types(draw: st.DrawFn) -> bytes:
    """A good handshake with one or more fields replaced (or removed) by values of the wrong type."""
    desc = good()
    for f in draw(
        st.lists(
            st.sampled_from(FIELDS + ["region." + r for r in REGION_FIELDS]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    ):
        value = draw(JSON_VALUES | st.just(...))
        regions = desc.get("regions")
        if f.startswith("region.") and not (
            isinstance(regions, list) and regions and isinstance(regions[0], dict)
        ):
            continue  # the regions themselves were replaced already
        target, key = (desc["regions"][0], f[7:]) if f.startswith("region.") else (desc, f)
        if value is ...:
            target.pop(key, None)
        else:
            target[key] = value
    if desc == good():
        desc["version"] = "1"  # never a valid handshake: nothing must attach
    body = json.dumps(desc).encode()
    return struct.pack(">I", len(body)) + body


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A length prefix that lies (0, huge, too short, too long) in front of JSON-ish or random bytes."""
    body = draw(st.one_of(st.binary(max_size=200), st.builds(lambda v: json.dumps(v).encode(), JSON_VALUES)))
    length = draw(st.sampled_from([len(body), 0, 2**32 - 1, 65537, len(body) + 50, max(len(body) - 1, 0)]))
    return struct.pack(">I", length) + body


firecracker = st.builds(lambda v: json.dumps(v).encode(), st.lists(JSON_VALUES, max_size=3))
payloads = st.one_of(
    st.binary(max_size=300),
    frames(),
    wrong_types(),
    firecracker,
    st.just(b"["),
    st.just(b"{}"),
    st.just(b"\x00\x00\x00"),
)
fd_kinds = st.sampled_from(
    ["none", "pipe", "2pipes", "uffd+memfd", "memfd+uffd", "uffd+pipe", "3fds", "9fds"]
)


def make_fds(kind: str) -> list[int]:
    """Descriptors to send (the caller closes its copies after sending)."""

    def pipe() -> int:
        r, w = os.pipe()
        os.close(r)
        return w

    def uffd() -> int:
        return new_uffd(0)[0]

    def memfd() -> int:
        return memfd_create("fuzz", 16 * PS)

    makers: dict[str, Callable[[], list[int]]] = {
        "none": list,
        "pipe": lambda: [pipe()],
        "2pipes": lambda: [pipe(), pipe()],
        "uffd+memfd": lambda: [uffd(), memfd()],
        "memfd+uffd": lambda: [memfd(), uffd()],
        "uffd+pipe": lambda: [uffd(), pipe()],
        "3fds": lambda: [uffd(), memfd(), pipe()],
        "9fds": lambda: [pipe() for _ in range(9)],
    }
    return makers[kind]()


def exchange(path: str, payload: bytes, fds: list[int]) -> dict[str, Any] | None:
    """Send one handshake attempt; return the agent's reply frame (None if it just closed)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendmsg([payload or b"\x00"], anc)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):  # until the agent closes (a timeout here fails the test)
                data += chunk
    finally:
        s.close()
    if not data:
        return None
    if data.startswith(b"{"):  # Firecracker-style plain JSON line
        return json.loads(data.splitlines()[0])  # type: ignore[no-any-return]
    n = decode_frame_length(data[:4])
    assert len(data) >= 4 + n, data
    msg = decode_body(data[4 : 4 + n])
    assert isinstance(msg, dict), data
    return msg


@fuzz_settings(120, 2000)
@given(payload=payloads, kind=fd_kinds)
def test_fuzzed_handshakes_are_refused_and_leak_nothing(
    listener: tuple[Agent, HandoffListener], payload: bytes, kind: str
) -> None:
    agent, lst = listener
    base = set(open_fds())
    fds = make_fds(kind)
    try:
        reply = exchange(lst.path, payload, fds)
    finally:
        for fd in fds:
            os.close(fd)
    STATS["connections"] += 1
    STATS["fds_sent"] += len(fds)
    if reply is None:
        STATS["silent_closes"] += 1
    else:
        STATS["error_replies"] += 1
        assert reply.get("type") == "error" and reply.get("code") in CODES, reply
    assert not agent.sessions, f"a fuzzed handshake attached a VM: {list(agent.sessions)}"
    # every descriptor the agent received is closed again (its connection thread may still be finishing)
    wait_until(lambda: set(open_fds()) <= base, 5, f"the agent to close the fds it got ({kind})")


def test_a_real_vmm_is_served_after_the_fuzzing(listener: tuple[Agent, HandoffListener]) -> None:
    agent, lst = listener
    rejected = lst.rejected
    g = GuestProc(lst.path, "after-fuzz", "8M", "--workload", "zipf:1.0", "--seed", "2")
    try:
        wait_until(lambda: "after-fuzz" in agent.sessions, 10, "the real VMM to attach")
        agent.set_policy("after-fuzz", EvictionPolicy(cold_after=1, prefetch_pages=4))
        g.cmd("touch 0-2047 w")
        rep = agent.run_cycle("after-fuzz", CycleMode.EVICT, 100)
        assert rep.pages_evicted > 1000
        g.cmd("run 30")
        ans = g.cmd("verify")
        assert ans["mismatches"] == 0
        assert agent.sessions["after-fuzz"].counters.faults_served > 0
        assert lst.rejected == rejected
        record(
            "handoff socket fuzzing, then a real VMM",
            pages_verified=ans["pages"],
            pages_lost=ans["mismatches"],
            crashes=0,
            **STATS,
        )
    finally:
        g.close()
        with contextlib.suppress(Exception):
            agent.drain("after-fuzz")
