"""NodeAgent.ImportSnapshot over a real in-process gRPC server: progress, result, status codes, who may call it.

Restoring needs the real kernel (tests/e2e/test_firecracker_*.py); importing does not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from tiermem.agent.server import RunningAgent, serve_agent
from tiermem.config import AgentSettings
from tiermem.v1 import agent_pb2 as apb
from tiermem.v1 import agent_pb2_grpc as agrpc

PS = 4096
ADMIN, ACME = "admin-token-1", "acme-token-1"


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[RunningAgent, agrpc.NodeAgentAsyncStub]]:
    running = await serve_agent(
        AgentSettings(
            node_id="s1",
            listen="127.0.0.1:0",
            data_dir=str(tmp_path / "agent"),
            autonomous=False,
            fsync=False,
            handoff_socket=str(tmp_path / "h" / "h.sock"),
            restore_socket_dir=str(tmp_path / "r"),
            token=f"{ADMIN},acme:{ACME}",
        )
    )
    channel = grpc.aio.insecure_channel(running.address)
    yield running, agrpc.NodeAgentStub(channel)
    await channel.close()
    await running.stop()


def md(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def code_of(stream: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        async for _ in stream:  # type: ignore[attr-defined]
            pass
    return ei.value.code()


async def test_import_streams_progress_then_the_result(
    agent: tuple[RunningAgent, agrpc.NodeAgentAsyncStub], tmp_path: Path
) -> None:
    running, stub = agent
    mem = tmp_path / "mem"
    mem.write_bytes(b"\x01" * (2048 * PS) + bytes(1000 * PS))  # 2048 data pages, 1000 zero pages
    req = apb.ImportSnapshotRequest(vm_id="acme.vm1", mem_file=str(mem))
    msgs = [m async for m in stub.ImportSnapshot(req, metadata=md(ADMIN))]
    assert [m.pages_done for m in msgs[:-1]] == [1024, 2048, 3048] and all(not m.done for m in msgs[:-1])
    last = msgs[-1]
    assert last.done and (last.vm_id, last.pages, last.zero_pages, last.store) == (
        "acme.vm1",
        3048,
        1000,
        "default",
    )
    assert last.stored_bytes > 0 and last.socket == str(tmp_path / "r" / "acme.vm1.sock")
    assert running.agent.index.count("acme.vm1") == 2048
    # again: ALREADY_EXISTS, nothing changed
    assert await code_of(stub.ImportSnapshot(req, metadata=md(ADMIN))) == grpc.StatusCode.ALREADY_EXISTS
    # keep without purge: refused; purge: gone
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await stub.DetachVm(apb.DetachVmRequest(vm_id="acme.vm1"), metadata=md(ADMIN))
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    r = await stub.DetachVm(apb.DetachVmRequest(vm_id="acme.vm1", purge=True), metadata=md(ADMIN))
    assert r.pages_purged == 2048 and running.agent.index.record("acme.vm1") is None


async def test_bad_imports_get_status_codes_and_change_nothing(
    agent: tuple[RunningAgent, agrpc.NodeAgentAsyncStub], tmp_path: Path
) -> None:
    running, stub = agent
    mem = tmp_path / "mem"
    mem.write_bytes(b"\x02" * (4 * PS))
    odd = tmp_path / "odd"
    odd.write_bytes(b"\x02" * (PS + 3))
    cases = [
        (apb.ImportSnapshotRequest(vm_id="v", mem_file=str(tmp_path / "nope")), grpc.StatusCode.NOT_FOUND),
        (apb.ImportSnapshotRequest(vm_id="v", mem_file=str(odd)), grpc.StatusCode.INVALID_ARGUMENT),
        (apb.ImportSnapshotRequest(vm_id="v", mem_file="relative"), grpc.StatusCode.INVALID_ARGUMENT),
        (apb.ImportSnapshotRequest(vm_id="v"), grpc.StatusCode.INVALID_ARGUMENT),
        (apb.ImportSnapshotRequest(vm_id="v", mem_file=str(mem), store="nope"), grpc.StatusCode.NOT_FOUND),
        (apb.ImportSnapshotRequest(vm_id="../x", mem_file=str(mem)), grpc.StatusCode.INVALID_ARGUMENT),
        (
            apb.ImportSnapshotRequest(vm_id="v", mem_file=str(mem), prefetch_pages=9999, has_prefetch=True),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            apb.ImportSnapshotRequest(
                vm_id="v", mem_file=str(mem), prefault_pages_per_second=-1, has_prefault=True
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        # the agent reads S3 only from the endpoint of a configured S3 store (it signs with its credentials)
        (
            apb.ImportSnapshotRequest(vm_id="v", mem_object="s3://b/k?endpoint=http://127.0.0.1:1"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for req, code in cases:
        assert await code_of(stub.ImportSnapshot(req, metadata=md(ADMIN))) == code, req
    assert running.agent.index.vm_records() == []


async def test_a_tenant_token_may_not_import(
    agent: tuple[RunningAgent, agrpc.NodeAgentAsyncStub], tmp_path: Path
) -> None:
    running, stub = agent
    mem = tmp_path / "mem"
    mem.write_bytes(b"\x03" * (4 * PS))
    own = apb.ImportSnapshotRequest(vm_id="acme.vm2", mem_file=str(mem))
    assert await code_of(stub.ImportSnapshot(own, metadata=md(ACME))) == grpc.StatusCode.PERMISSION_DENIED
    other = apb.ImportSnapshotRequest(vm_id="other.vm2", mem_file=str(mem))
    assert await code_of(stub.ImportSnapshot(other, metadata=md(ACME))) == grpc.StatusCode.PERMISSION_DENIED
    assert await code_of(stub.ImportSnapshot(own)) == grpc.StatusCode.UNAUTHENTICATED
    assert running.agent.index.vm_records() == []
