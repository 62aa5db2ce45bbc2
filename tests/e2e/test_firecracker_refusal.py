"""The agent refuses a Firecracker handshake it has no snapshot for: never zeroed memory.

The client behaves exactly like Firecracker's restore path (private anonymous memory,
UFFDIO_API with EVENT_REMOVE only, REGISTER MISSING, one sendmsg with the compact JSON
array and one fd, the socket left open, vCPU threads touching pages).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.agents import handoff_agent
from tiermem.agent.node import Agent
from tiermem.guests.firecracker import FirecrackerProcess
from tiermem.model import EventKind

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(120)]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with handoff_agent(tmp_path) as a:
        yield a


def _refusals(agent: Agent) -> list[str]:
    return [e.message for e in agent.events.history() if e.kind is EventKind.HANDOFF_REFUSED]


def test_a_handshake_without_a_snapshot_is_refused_and_no_zero_page_is_served(agent: Agent) -> None:
    fc = FirecrackerProcess(agent.settings.handoff_path(), "1M,1M", hole="64K", vcpus=2)
    try:
        assert fc.hello["handshake"].startswith('[{"base_host_virt_addr":')
        fc.cmd("start 0-511")  # the vCPUs touch guest memory right away, as after a resume
        deadline = time.monotonic() + 10
        while not _refusals(agent):
            assert time.monotonic() < deadline, "no refusal event"
            time.sleep(0.02)
        assert "no snapshot source" in _refusals(agent)[0]
        assert not agent.sessions  # no VM was attached
        time.sleep(1.0)  # give a (wrong) handler every chance to serve something
        prog = fc.cmd("progress")
        assert prog["done"] == 0 and prog["first_touch_s"] is None  # no touch returned: nothing was served
        assert fc.proc.poll() is None  # the process is alive, its vCPUs wait (Firecracker fails its load)
    finally:
        fc.kill()
        fc.close()


def test_the_refusal_is_an_error_line_then_the_socket_closes(agent: Agent) -> None:
    """What Firecracker's socket receives (a human with socat reads it)."""
    from tiermem.guests.firecracker import FirecrackerGuest

    g = FirecrackerGuest([64 * 1024], vcpus=1)
    g.handshake(agent.settings.handoff_path())
    assert g.sock is not None
    sock: socket.socket = g.sock
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(4096):  # EOF: the agent closed its end
        data += chunk
    err = json.loads(data.decode().splitlines()[0])
    assert err["type"] == "error" and err["code"] == "failed_precondition"
    assert "tiermem snapshot import" in err["error"]
    assert agent.sessions == {}
    sock.close()
