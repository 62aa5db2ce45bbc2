"""Run the control plane: state store, agents client, the domain ControlPlane, its gRPC server, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from dataclasses import dataclass

import structlog

from tiermem.config import ControlPlaneSettings
from tiermem.control.agentapi import AgentApi
from tiermem.control.clock import Clock
from tiermem.control.plane import ControlPlane, PlaneConfig
from tiermem.control.scheduler import SchedulerConfig
from tiermem.control.service import SERVICE_NAME, ControlPlaneServicer
from tiermem.control.state import StateStore
from tiermem.control.state_open import open_state
from tiermem.metrics import start_metrics, stop_metrics
from tiermem.rpc.agent_client import GrpcAgents
from tiermem.rpc.security import TokenAuthInterceptor
from tiermem.rpc.server import ServerOptions, StartedServer, start_server
from tiermem.v1 import control_pb2_grpc as cgrpc

__all__ = ["RunningControlPlane", "plane_config", "run_control_plane", "serve_control_plane"]

log = structlog.get_logger(__name__)


def plane_config(settings: ControlPlaneSettings) -> PlaneConfig:
    """The domain configuration for ``settings``.

    Known stores: ``settings.known_stores`` when non-empty, else ``default``
    plus every store named in ``store_write_mbps``.
    """
    stores = set(settings.known_stores) or {"default", *settings.store_write_mbps}
    return PlaneConfig(
        lease_ttl_ms=settings.lease_ttl_ms,
        leader_lease_ms=settings.leader_lease_ms,
        known_stores=frozenset(stores),
        run_scheduler=settings.scheduler,
        scheduler=SchedulerConfig(
            max_concurrent_per_node=settings.max_concurrent_cycles_per_node,
            node_evict_mbps=settings.node_evict_mbps,
            store_write_mbps=dict(settings.store_write_mbps),
            jitter=settings.jitter,
            tenant_manual_cycles=settings.tenant_manual_cycles,
            tenant_manual_cycles_per_node=settings.tenant_manual_cycles_per_node,
            tenant_manual_max_interval_ms=settings.tenant_manual_max_interval_ms,
        ),
    )


@dataclass
class RunningControlPlane:
    """A serving control-plane replica."""

    plane: ControlPlane
    server: StartedServer
    address: str
    state: StateStore
    agents: AgentApi

    @property
    def port(self) -> int:
        """The bound gRPC port."""
        return self.server.port

    metrics_port: int | None = None
    """The Prometheus endpoint's port when ``metrics_listen`` is set."""
    stopped: bool = False

    async def stop(self, grace: float = 1.0, resign: bool = True) -> None:
        """Stop scheduling (giving up the leader lease unless ``resign`` is false), then serving; close the store.

        Idempotent. ``resign=False`` leaves the lease to expire, as a crash would.
        """
        if self.stopped:
            return
        self.stopped = True
        if self.metrics_port is not None:
            stop_metrics()
        await self.plane.stop(resign)
        await self.server.stop(grace)
        await self.agents.close()
        await self.state.close()


async def serve_control_plane(
    settings: ControlPlaneSettings,
    *,
    clock: Clock | None = None,
    agents: AgentApi | None = None,
    config: PlaneConfig | None = None,
) -> RunningControlPlane:
    """Open the state store, start the gRPC server and campaign for leadership; returns once serving."""
    state = open_state(settings.state, clock)
    await state.open()
    agents = agents or GrpcAgents(settings.agent_token, settings.agent_tls)
    try:
        plane = ControlPlane(
            state,
            agents,
            clock=clock,
            config=config or plane_config(settings),
            replica_id=settings.replica_id,
        )
        servicer = ControlPlaneServicer(plane)
        auth = TokenAuthInterceptor.from_spec(settings.token, settings.reflection_without_token)
        started = await start_server(
            lambda srv: cgrpc.add_ControlPlaneServicer_to_server(servicer, srv),
            [SERVICE_NAME],
            ServerOptions(listen=settings.listen, tls=settings.tls, reflection=settings.reflection),
            interceptors=[auth] if auth else [],
        )
    except BaseException:
        await agents.close()
        await state.close()
        raise
    host = settings.listen.rsplit(":", 1)[0] or "127.0.0.1"
    address = f"{host}:{started.port}"
    plane.address = settings.advertise or address
    await plane.start()
    running = RunningControlPlane(plane, started, address, state, agents)
    if settings.metrics_listen:
        try:
            running.metrics_port = start_metrics(
                settings.metrics_listen, plane.metrics.registry, settings.metrics_tls
            )
        except BaseException:
            await running.stop(0)  # the gRPC server is up: stop it on this loop, not at interpreter exit
            raise
    log.info(
        "control plane serving",
        address=address,
        state=state.url,
        replica=settings.replica_id,
        leader=plane.is_leader,
    )
    return running


def run_control_plane(settings: ControlPlaneSettings) -> None:
    """Blocking entry point of ``tiermem serve controlplane``: serve until SIGINT/SIGTERM."""

    async def main() -> None:
        running = await serve_control_plane(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        print(f"tiermem control plane listening on {running.address} (state {running.state.url})", flush=True)
        await stop.wait()
        await running.stop()

    asyncio.run(main())
