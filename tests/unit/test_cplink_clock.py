"""The agent's control-plane link on an injected clock: autonomous cycles start once the control plane
has been unreachable for ``autonomous_after_ms`` of that clock, not of the wall clock."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.wait import wait_until_async
from tiermem.agent.cplink import ControlPlaneLink
from tiermem.agent.node import Agent
from tiermem.config import AgentSettings
from tiermem.control.clock import ManualClock

HOUR_MS = 3_600_000


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound but not listening, and held so nothing else takes it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.fixture
def agent(tmp_path: Path, refusing_port: int) -> Iterator[Agent]:
    settings = AgentSettings(
        node_id="n1",
        data_dir=str(tmp_path),
        stores={"default": "memory://"},
        fsync=False,
        control_plane=f"127.0.0.1:{refusing_port}",
        heartbeat_ms=100,
        autonomous_after_ms=HOUR_MS,
    )
    a = Agent(settings)
    yield a
    a.close()


async def test_autonomous_mode_follows_the_injected_clock(agent: Agent) -> None:
    clock = ManualClock()
    link = ControlPlaneLink(agent, agent.settings, "127.0.0.1:1", monotonic=clock.now)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.sleep(0.5)  # several failed heartbeats, an hour short of the deadline on this clock
        assert not agent.autonomous.is_set()
        clock.advance(HOUR_MS / 1000 - 1)
        await asyncio.sleep(0.3)
        assert not agent.autonomous.is_set()  # one second short still
        clock.advance(1)

        async def autonomous() -> bool:
            return agent.autonomous.is_set()

        await wait_until_async(autonomous, 20, "autonomous mode after the clock passed autonomous_after_ms")
        assert not link.registered
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
