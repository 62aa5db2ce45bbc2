"""gRPC keepalive: servers accept the clients' pings on an idle stream (``events --follow``).

The client pings every second here and the servers' enforcement is scaled down with it, so the
test takes seconds instead of the minutes of the real settings (30 s pings, 10 s server minimum);
the deployment tier follows events for more than 5 real minutes. The control case shows what the
option prevents: a server with gRPC's default minimum (5 minutes) sends GOAWAY too_many_pings.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tiermem.rpc.channel import sync_channel
from tiermem.rpc.options import (
    CLIENT_KEEPALIVE_MS,
    SERVER_MIN_PING_INTERVAL_MS,
    client_options,
    server_options,
)
from tiermem.rpc.server import ServerOptions, start_server

IDLE_S = 6.0


def test_server_minimum_is_below_client_interval() -> None:
    assert SERVER_MIN_PING_INTERVAL_MS < CLIENT_KEEPALIVE_MS
    srv = dict(server_options())
    cli = dict(client_options())
    assert srv["grpc.http2.min_ping_interval_without_data_ms"] == SERVER_MIN_PING_INTERVAL_MS
    assert srv["grpc.keepalive_permit_without_calls"] == 1
    assert cli["grpc.keepalive_time_ms"] == CLIENT_KEEPALIVE_MS
    assert "retryPolicy" in str(cli["grpc.service_config"])


def _idle_watch(port: int, keepalive_ms: int) -> str | None:
    """Watch health (one message, then an idle stream) for IDLE_S; the error code if the stream died."""
    channel = sync_channel(f"127.0.0.1:{port}", keepalive_ms=keepalive_ms)
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
    result: list[str] = []

    def read() -> None:
        try:
            for _ in call:
                pass
            result.append("ended")
        except grpc.RpcError as e:
            result.append(f"{e.code().name}: {e.details()}")

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(IDLE_S)
    call.cancel()
    t.join(5)
    channel.close()
    return result[0] if result and not result[0].startswith("CANCELLED") else None


async def _run(min_ping_ms: int, keepalive_ms: int) -> str | None:
    started = await start_server(lambda srv: None, [], ServerOptions(min_ping_interval_ms=min_ping_ms))
    try:
        return await asyncio.to_thread(_idle_watch, started.port, keepalive_ms)
    finally:
        await started.stop(0)


@pytest.mark.slow
async def test_idle_stream_survives_pings_the_server_accepts() -> None:
    t0 = time.monotonic()
    # the shipped ratio (client 30 s / server 10 s) scaled to 1.5 s / 0.5 s
    assert await _run(min_ping_ms=500, keepalive_ms=1500) is None
    assert time.monotonic() - t0 >= IDLE_S


@pytest.mark.slow
async def test_default_server_policy_kills_the_idle_stream() -> None:
    # gRPC's default minimum (5 min) against 1 s pings: GOAWAY too_many_pings after two strikes
    err = await _run(min_ping_ms=300_000, keepalive_ms=1000)
    assert err is not None and "UNAVAILABLE" in err, err
