"""Run a node agent: the domain Agent, its gRPC server, metrics, handoff listener and control-plane link."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass, field
from typing import Any

import structlog

from tiermem.agent.attach import start_handoff
from tiermem.agent.cplink import ControlPlaneLink
from tiermem.agent.malloc import pin_malloc_thresholds
from tiermem.agent.metrics import AgentMetrics
from tiermem.agent.node import Agent
from tiermem.agent.restore import RestoreService
from tiermem.agent.service import SERVICE_NAME, NodeAgentServicer
from tiermem.config import AgentSettings
from tiermem.metrics import start_metrics, stop_metrics
from tiermem.rpc.server import ServerOptions, StartedServer, start_server
from tiermem.v1 import agent_pb2_grpc

__all__ = ["RunningAgent", "run_agent", "serve_agent"]

log = structlog.get_logger(__name__)


@dataclass
class RunningAgent:
    """A started agent; ``address`` is where its gRPC server listens."""

    agent: Agent
    server: StartedServer
    address: str
    servicer: NodeAgentServicer | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    closers: list[Any] = field(default_factory=list)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving; VM sessions close with their pages kept evicted and indexed."""
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for c in self.closers:
            with contextlib.suppress(Exception):
                c()
        await self.server.stop(grace)
        if self.servicer is not None:
            self.servicer.close()
        await asyncio.to_thread(self.agent.close)


async def serve_agent(settings: AgentSettings, metrics: AgentMetrics | None = None) -> RunningAgent:
    """Start an agent from ``settings`` and return once it serves."""
    agent = await asyncio.to_thread(Agent, settings, metrics)
    restores = await asyncio.to_thread(RestoreService(agent).start)
    servicer = NodeAgentServicer(agent, restores)
    opts = ServerOptions(
        listen=settings.listen,
        tls=settings.tls,
        token=settings.token,
        reflection=settings.reflection,
        reflection_without_token=settings.reflection_without_token,
    )
    started = await start_server(
        lambda srv: agent_pb2_grpc.add_NodeAgentServicer_to_server(servicer, srv), [SERVICE_NAME], opts
    )
    host = settings.listen.rsplit(":", 1)[0] or "127.0.0.1"
    address = settings.advertise or f"{host}:{started.port}"
    running = RunningAgent(agent, started, address, servicer)
    running.closers.append(restores.close)
    if settings.metrics_listen:
        try:
            start_metrics(settings.metrics_listen, agent.metrics.registry, settings.metrics_tls)
        except BaseException:
            await running.stop(0)  # the gRPC server is up: stop it on this loop, not at interpreter exit
            raise
        running.closers.append(stop_metrics)
    closer = start_handoff(agent)
    if closer is not None:
        running.closers.append(closer)
    if settings.control_plane:
        link = ControlPlaneLink(agent, settings, address)
        running.tasks.append(asyncio.create_task(link.run(), name="cplink"))
    log.info("agent serving", node=agent.node_id, address=address, handoff=settings.handoff_path())
    return running


def run_agent(settings: AgentSettings) -> None:
    """Blocking entry point of ``tiermem serve agent``: serve until SIGINT/SIGTERM."""
    pin_malloc_thresholds()  # a whole-process setting: only here, where the agent owns the process

    async def main() -> None:
        running = await serve_agent(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"tiermem agent {running.agent.node_id} listening on {running.address}", flush=True)
        await stop.wait()
        await running.stop()

    asyncio.run(main())
