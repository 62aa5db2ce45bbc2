"""An in-process node agent with its handoff socket open, as the real-kernel e2e tests use it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tiermem.agent.attach import start_handoff
from tiermem.agent.node import Agent
from tiermem.config import AgentSettings


@contextmanager
def handoff_agent(tmp_path: Path, **settings: Any) -> Iterator[Agent]:
    """Agent ``n1`` (no control plane, no autonomous cycles) listening on ``tmp_path/h/handoff.sock``;
    ``settings`` override AgentSettings fields. Stops the listener and closes the agent on exit."""
    s = AgentSettings(
        **{
            "node_id": "n1",
            "data_dir": str(tmp_path / "agent"),
            "autonomous": False,
            "handoff_socket": str(tmp_path / "h" / "handoff.sock"),
            **settings,
        }
    )
    a = Agent(s)
    stop = start_handoff(a)
    try:
        yield a
    finally:
        if stop:
            stop()
        a.close()
