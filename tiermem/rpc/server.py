"""Build a grpc.aio server the same way for every tiermem service.

Health service (always), reflection (behind a flag), TLS/mTLS, bearer-token
auth and message-size limits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tiermem.config import TlsSettings
from tiermem.errors import ConfigurationError
from tiermem.rpc.options import MAX_MESSAGE_BYTES, SERVER_MIN_PING_INTERVAL_MS, server_options
from tiermem.rpc.security import TokenAuthInterceptor, server_credentials

__all__ = ["MAX_MESSAGE_BYTES", "ServerOptions", "StartedServer", "start_server"]


@dataclass
class ServerOptions:
    """How to expose a service."""

    listen: str = "127.0.0.1:0"
    tls: TlsSettings = field(default_factory=TlsSettings)
    token: str = ""
    reflection: bool = False
    reflection_without_token: bool = False
    """Serve reflection to callers without a token (grpcurl against a token-protected server)."""
    min_ping_interval_ms: int = SERVER_MIN_PING_INTERVAL_MS
    """Keepalive enforcement: clients may ping this often (tests shorten it)."""


@dataclass
class StartedServer:
    """A running server and the port it bound."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer

    async def stop(self, grace: float = 2.0) -> None:
        """Mark NOT_SERVING, then stop with a grace period."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    opts: ServerOptions,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> StartedServer:
    """Create, populate (``register``) and start a server; returns the bound port."""
    chain: list[Any] = list(interceptors)
    if opts.token:
        chain.insert(0, TokenAuthInterceptor(opts.token, opts.reflection_without_token))
    server = grpc.aio.server(
        interceptors=chain,
        options=server_options(opts.min_ping_interval_ms),
    )
    register(server)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    if opts.reflection:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection(
            [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
    creds = server_credentials(opts.tls)
    try:
        port = server.add_secure_port(opts.listen, creds) if creds else server.add_insecure_port(opts.listen)
    except RuntimeError as e:
        raise ConfigurationError(f"cannot listen on {opts.listen}: {e}") from None
    if port == 0:
        raise ConfigurationError(f"cannot listen on {opts.listen}")
    await server.start()
    for name in ("", *service_names):
        await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    return StartedServer(server, port, hs)
