"""Probes need no credentials; reflection needs a token unless ``reflection_without_token`` opens it."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tiermem.rpc.channel import sync_channel
from tiermem.rpc.server import ServerOptions, start_server


def _calls(port: int) -> tuple[int, str]:
    ch = sync_channel(f"127.0.0.1:{port}")
    try:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        try:
            replies = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            names = [s.name for r in replies for s in r.list_services_response.service]
            return health, ",".join(names)
        except grpc.RpcError as e:
            return health, e.code().name
    finally:
        ch.close()


async def _run(open_reflection: bool) -> tuple[int, str]:
    opts = ServerOptions(token="secret-token", reflection=True, reflection_without_token=open_reflection)
    started = await start_server(lambda srv: None, [], opts)
    try:
        return await asyncio.to_thread(_calls, started.port)
    finally:
        await started.stop(0)


@pytest.mark.parametrize("open_reflection", [False, True])
async def test_health_open_reflection_configurable(open_reflection: bool) -> None:
    health, reflection = await _run(open_reflection)
    assert health == health_pb2.HealthCheckResponse.SERVING  # no token, as probes call it
    if open_reflection:
        assert "grpc.health.v1.Health" in reflection
    else:
        assert reflection == "UNAUTHENTICATED"
