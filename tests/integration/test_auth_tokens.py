"""Bearer tokens and tenant scoping on a real grpc.aio server, for unary and server-streaming methods.

The servicer is a small in-test implementation of a few ControlPlane methods,
registered through a generic handler, so the interceptor is exercised exactly as
it wraps the real servicers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tiermem.rpc.channel import aio_channel, auth_metadata
from tiermem.rpc.security import TENANT_HEADER, TokenAuthInterceptor, caller_tenant, require_tenant
from tiermem.rpc.server import ServerOptions, StartedServer, start_server
from tiermem.v1 import control_pb2 as cp
from tiermem.v1 import control_pb2_grpc as cpg
from tiermem.v1 import types_pb2 as t

ADMIN, ACME, GLOBEX = "admin-token-0123456789", "acme-token-0123456789", "globex-token-0123456789"
SPEC = f"{ADMIN},acme:{ACME},globex:{GLOBEX}"
VMS = ["acme.vm-1", "acme.vm-2", "globex.vm-1", "untenanted"]


class Recorder:
    """What the servicer saw: the caller's tenant per call."""

    def __init__(self) -> None:
        self.tenants: list[str | None] = []
        self.calls = 0


def _handlers(rec: Recorder) -> grpc.GenericRpcHandler:
    async def get_vm_status(
        req: cp.GetVmStatusRequest, ctx: grpc.aio.ServicerContext[Any, Any]
    ) -> t.VmStatus:
        rec.calls += 1
        rec.tenants.append(caller_tenant())
        await require_tenant(ctx, req.vm_id)  # explicit check, as a servicer may do
        return t.VmStatus(vm_id=req.vm_id, resident_pages=7)

    async def list_vm_status(req: cp.ListVmStatusRequest, ctx: Any) -> cp.ListVmStatusResponse:
        rec.calls += 1
        return cp.ListVmStatusResponse(vms=[t.VmStatus(vm_id=v) for v in VMS])

    async def register_node(req: cp.RegisterNodeRequest, ctx: Any) -> cp.RegisterNodeResponse:
        rec.calls += 1
        return cp.RegisterNodeResponse(lease_ttl_ms=1000)

    async def drain_vm(req: cp.DrainVmRequest, ctx: Any) -> AsyncIterator[t.DrainProgress]:
        rec.calls += 1
        rec.tenants.append(caller_tenant())
        for i in range(3):
            yield t.DrainProgress(vm_id=req.vm_id, pages_total=3, pages_restored=i + 1, done=i == 2)

    async def stream_events(req: t.StreamEventsRequest, ctx: Any) -> AsyncIterator[t.Event]:
        rec.calls += 1
        for i, v in enumerate([*VMS, ""]):
            yield t.Event(seq=i + 1, vm_id=v, message="node event" if not v else "vm event")

    def u(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_unary_rpc_method_handler(fn, req.FromString, resp.SerializeToString)

    def s(fn: Any, req: Any, resp: Any) -> grpc.RpcMethodHandler[Any, Any]:
        return grpc.unary_stream_rpc_method_handler(fn, req.FromString, resp.SerializeToString)

    return grpc.method_handlers_generic_handler(
        "tiermem.v1.ControlPlane",
        {
            "GetVmStatus": u(get_vm_status, cp.GetVmStatusRequest, t.VmStatus),
            "ListVmStatus": u(list_vm_status, cp.ListVmStatusRequest, cp.ListVmStatusResponse),
            "RegisterNode": u(register_node, cp.RegisterNodeRequest, cp.RegisterNodeResponse),
            "DrainVm": s(drain_vm, cp.DrainVmRequest, t.DrainProgress),
            "StreamEvents": s(stream_events, t.StreamEventsRequest, t.Event),
        },
    )


@pytest.fixture
async def served() -> AsyncIterator[tuple[StartedServer, Recorder]]:
    rec = Recorder()
    srv = await start_server(
        lambda s: s.add_generic_rpc_handlers((_handlers(rec),)),
        ["tiermem.v1.ControlPlane"],
        ServerOptions(listen="127.0.0.1:0"),
        interceptors=[TokenAuthInterceptor(SPEC)],
    )
    yield srv, rec
    await srv.stop(0)


def _md(token: str = "", tenant: str = "") -> tuple[tuple[str, str], ...]:
    md = auth_metadata(token)
    return (*md, (TENANT_HEADER, tenant)) if tenant else md


async def _code(coro: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await coro
    return ei.value.code()


async def _stream(call: Any) -> list[Any]:
    return [m async for m in call]


async def test_missing_or_bad_token_is_unauthenticated_unary_and_stream(served: Any) -> None:
    srv, rec = served
    async with aio_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = cpg.ControlPlaneStub(ch)
        req = cp.GetVmStatusRequest(vm_id="acme.vm-1")
        for md in [(), _md("wrong-token"), (("authorization", ACME),), (("authorization", "Basic " + ACME),)]:
            assert (
                await _code(stub.GetVmStatus(req, metadata=md, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
            )
            call = stub.DrainVm(cp.DrainVmRequest(vm_id="acme.vm-1"), metadata=md, timeout=5)
            assert await _code(_stream(call)) == grpc.StatusCode.UNAUTHENTICATED
    assert rec.calls == 0  # the servicer never ran


async def test_valid_tokens_reach_the_servicer(served: Any) -> None:
    srv, rec = served
    async with aio_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = cpg.ControlPlaneStub(ch)
        r = await stub.GetVmStatus(cp.GetVmStatusRequest(vm_id="acme.vm-1"), metadata=_md(ACME), timeout=5)
        assert r.resident_pages == 7
        r = await stub.GetVmStatus(cp.GetVmStatusRequest(vm_id="globex.vm-1"), metadata=_md(ADMIN), timeout=5)
        assert r.vm_id == "globex.vm-1"
        got = await _stream(stub.DrainVm(cp.DrainVmRequest(vm_id="acme.vm-1"), metadata=_md(ACME), timeout=5))
        assert [p.pages_restored for p in got] == [1, 2, 3]
    assert rec.tenants == ["acme", "*", "acme"]


async def test_other_tenant_is_permission_denied_unary_and_stream(served: Any) -> None:
    srv, rec = served
    async with aio_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = cpg.ControlPlaneStub(ch)
        for vm in ["globex.vm-1", "untenanted", "acme"]:
            call = stub.GetVmStatus(cp.GetVmStatusRequest(vm_id=vm), metadata=_md(ACME), timeout=5)
            assert await _code(call) == grpc.StatusCode.PERMISSION_DENIED
            stream = stub.DrainVm(cp.DrainVmRequest(vm_id=vm), metadata=_md(ACME), timeout=5)
            assert await _code(_stream(stream)) == grpc.StatusCode.PERMISSION_DENIED
        # a tenant token may not claim another tenant, an admin token may narrow to one
        call = stub.GetVmStatus(
            cp.GetVmStatusRequest(vm_id="acme.vm-1"), metadata=_md(ACME, "globex"), timeout=5
        )
        assert await _code(call) == grpc.StatusCode.PERMISSION_DENIED
        call = stub.GetVmStatus(
            cp.GetVmStatusRequest(vm_id="globex.vm-1"), metadata=_md(ADMIN, "acme"), timeout=5
        )
        assert await _code(call) == grpc.StatusCode.PERMISSION_DENIED
    assert rec.calls == 0


async def test_node_methods_need_an_all_tenant_token(served: Any) -> None:
    srv, _ = served
    async with aio_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = cpg.ControlPlaneStub(ch)
        req = cp.RegisterNodeRequest(node=cp.NodeInfo(node_id="n1", address="127.0.0.1:1"))
        assert (
            await _code(stub.RegisterNode(req, metadata=_md(ACME), timeout=5))
            == grpc.StatusCode.PERMISSION_DENIED
        )
        assert (await stub.RegisterNode(req, metadata=_md(ADMIN), timeout=5)).lease_ttl_ms == 1000


async def test_reads_are_filtered_to_the_tenant(served: Any) -> None:
    srv, _ = served
    async with aio_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = cpg.ControlPlaneStub(ch)
        listed = await stub.ListVmStatus(cp.ListVmStatusRequest(), metadata=_md(ACME), timeout=5)
        assert [v.vm_id for v in listed.vms] == ["acme.vm-1", "acme.vm-2"]
        listed = await stub.ListVmStatus(cp.ListVmStatusRequest(), metadata=_md(ADMIN), timeout=5)
        assert [v.vm_id for v in listed.vms] == VMS
        events = await _stream(stub.StreamEvents(t.StreamEventsRequest(), metadata=_md(GLOBEX), timeout=5))
        # default-deny: node-level events (no vm_id) are hidden from tenants (issue 17, item 13)
        assert [e.vm_id for e in events] == ["globex.vm-1"]
        events = await _stream(stub.StreamEvents(t.StreamEventsRequest(), metadata=_md(ADMIN), timeout=5))
        assert len(events) == len(VMS) + 1


async def test_health_is_open_without_a_token(served: Any) -> None:
    srv, _ = served
    async with aio_channel(f"127.0.0.1:{srv.port}") as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_unknown_method_needs_a_token_before_unimplemented(served: Any) -> None:
    srv, _ = served
    async with aio_channel(f"127.0.0.1:{srv.port}") as ch:
        call: Any = ch.unary_unary("/tiermem.v1.ControlPlane/NoSuchMethod")
        assert await _code(call(b"", timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        assert await _code(call(b"", metadata=_md(ADMIN), timeout=5)) == grpc.StatusCode.UNIMPLEMENTED


async def test_server_options_token_enforced_by_start_server() -> None:
    """The plain ``token`` setting path of start_server uses the same interceptor."""
    rec = Recorder()
    srv = await start_server(
        lambda s: s.add_generic_rpc_handlers((_handlers(rec),)),
        ["tiermem.v1.ControlPlane"],
        ServerOptions(listen="127.0.0.1:0", token=ADMIN),
    )
    try:
        async with aio_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = cpg.ControlPlaneStub(ch)
            req = cp.GetVmStatusRequest(vm_id="any-vm")
            assert await _code(stub.GetVmStatus(req, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
            assert (await stub.GetVmStatus(req, metadata=_md(ADMIN), timeout=5)).vm_id == "any-vm"
            call = stub.DrainVm(cp.DrainVmRequest(vm_id="any-vm"), timeout=5)
            assert await _code(_stream(call)) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await srv.stop(0)
