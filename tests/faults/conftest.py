"""Fixtures of the reliability suite: agents on real stores, private Redis servers, fault proxies."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.toxic_proxy import ToxicProxy
from tests.helpers.servers import RedisServer
from tiermem.agent.node import Agent
from tiermem.config import AgentSettings


def pytest_configure(config: pytest.Config) -> None:
    # tests/faults/common.py reads this at import time to pick the soak hypothesis profile
    if config.getoption("--soak", default=False):
        os.environ["TIERMEM_SOAK"] = "1"


@pytest.fixture
def redis_own(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (tests kill, restart and fill it)."""
    d = tmp_path / "redis"
    d.mkdir()
    srv = RedisServer(d).start()
    yield srv
    srv.stop()


@pytest.fixture
def redis_proxy(redis_own: RedisServer) -> Iterator[ToxicProxy]:
    """A fault proxy in front of ``redis_own``."""
    p = ToxicProxy("127.0.0.1", redis_own.port).start()
    yield p
    p.stop()


def redis_url(port: int, **opts: object) -> str:
    """A Redis store URL with short timeouts (a dead server is noticed in about a second)."""
    q = {"timeout": 1, "connect_timeout": 0.5, "retries": 2, **opts}
    return f"redis://127.0.0.1:{port}/0?" + "&".join(f"{k}={v}" for k, v in q.items())


AgentFactory = Callable[..., Agent]


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[AgentFactory]:
    """Build in-process agents (no autonomous cycles); closed at teardown."""
    made: list[Agent] = []

    def factory(stores: dict[str, str] | None = None, node_id: str = "n1", **kw: object) -> Agent:
        d = tmp_path / f"agent-{node_id}-{len(made)}"
        s = AgentSettings(
            node_id=node_id,
            data_dir=str(d),
            stores=stores or {},
            autonomous=False,
            handoff_socket=str(tmp_path / f"h{len(made)}" / "handoff.sock"),
            **kw,  # type: ignore[arg-type]
        )
        a = Agent(s)
        made.append(a)
        return a

    yield factory
    for a in made:
        a.close()
