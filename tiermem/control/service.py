"""The ControlPlane gRPC servicer: convert, call :class:`tiermem.control.plane.ControlPlane`, convert back.

Status codes come from the tiermem error tree (``tiermem.rpc.status``). The
caller's deadline is passed on to agent calls, less a small margin so this
server can still answer before the caller gives up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from tiermem.control.plane import ControlPlane
from tiermem.errors import InvalidArgument
from tiermem.model import validate_id
from tiermem.rpc import convert as c
from tiermem.rpc import convert_api as cc
from tiermem.rpc.security import caller_tenant, is_tenant_caller
from tiermem.rpc.status import grpc_errors, grpc_stream_errors
from tiermem.v1 import control_pb2 as cpb
from tiermem.v1 import control_pb2_grpc as cgrpc
from tiermem.v1 import types_pb2 as tpb

__all__ = ["SERVICE_NAME", "ControlPlaneServicer"]

SERVICE_NAME = "tiermem.v1.ControlPlane"
Ctx = grpc.aio.ServicerContext[Any, Any]
MAX_BATCH = 10_000


def _budget(context: Ctx) -> float | None:
    """Seconds left for downstream calls: the caller's deadline minus a margin, or None without one."""
    left = context.time_remaining()
    if left is None:
        return None
    return max(0.0, left - min(0.5, left * 0.1))


class ControlPlaneServicer(cgrpc.ControlPlaneServicer):
    """Thin servicer over one :class:`ControlPlane`."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    # -- nodes
    @grpc_errors
    async def RegisterNode(self, request: cpb.RegisterNodeRequest, context: Ctx) -> cpb.RegisterNodeResponse:
        if not request.HasField("node"):
            raise InvalidArgument("node is required")
        ttl = await self.plane.register_node(cc.node_from_pb(request.node))
        return cpb.RegisterNodeResponse(lease_ttl_ms=ttl)

    @grpc_errors
    async def Heartbeat(self, request: cpb.HeartbeatRequest, context: Ctx) -> cpb.HeartbeatResponse:
        if len(request.vms) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} VM statuses per heartbeat")
        statuses = [c.status_from_pb(m) for m in request.vms]
        for s in statuses:
            validate_id(s.vm_id, "VM id")
        hb = await self.plane.heartbeat(request.node_id, statuses)
        return cpb.HeartbeatResponse(lease_ttl_ms=hb.lease_ttl_ms, reregister=hb.reregister)

    @grpc_errors
    async def DeregisterNode(
        self, request: cpb.DeregisterNodeRequest, context: Ctx
    ) -> cpb.DeregisterNodeResponse:
        await self.plane.deregister_node(request.node_id)
        return cpb.DeregisterNodeResponse()

    @grpc_errors
    async def ListNodes(self, request: cpb.ListNodesRequest, context: Ctx) -> cpb.ListNodesResponse:
        return cpb.ListNodesResponse(nodes=[cc.node_to_pb(n) for n in await self.plane.list_nodes()])

    @grpc_errors
    async def ReportCycles(self, request: cpb.ReportCyclesRequest, context: Ctx) -> cpb.ReportCyclesResponse:
        if len(request.reports) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} reports per call")
        reports = [c.report_from_pb(m) for m in request.reports]
        for r in reports:
            validate_id(r.vm_id, "VM id")
        await self.plane.report_cycles(request.node_id, reports)
        return cpb.ReportCyclesResponse()

    # -- VMs
    @grpc_errors
    async def RegisterVm(self, request: cpb.RegisterVmRequest, context: Ctx) -> cpb.RegisterVmResponse:
        if not request.HasField("vm"):
            raise InvalidArgument("vm is required")
        tenant = caller_tenant() if is_tenant_caller() else None
        spec = cc.spec_from_pb(request.vm)
        status = await self.plane.register_vm(spec, request.attach, _budget(context), tenant=tenant)
        return cpb.RegisterVmResponse(status=c.status_to_pb(status))

    @grpc_errors
    async def DeregisterVm(self, request: cpb.DeregisterVmRequest, context: Ctx) -> cpb.DeregisterVmResponse:
        validate_id(request.vm_id, "VM id")
        pages = await self.plane.deregister_vm(request.vm_id, request.purge, _budget(context))
        return cpb.DeregisterVmResponse(pages_purged=pages)

    @grpc_errors
    async def GetVmStatus(self, request: cpb.GetVmStatusRequest, context: Ctx) -> tpb.VmStatus:
        validate_id(request.vm_id, "VM id")
        return c.status_to_pb(await self.plane.vm_status(request.vm_id))

    @grpc_errors
    async def ListVmStatus(self, request: cpb.ListVmStatusRequest, context: Ctx) -> cpb.ListVmStatusResponse:
        vms = await self.plane.list_vm_status(request.node_id, request.selector)
        return cpb.ListVmStatusResponse(vms=[c.status_to_pb(s) for s in vms])

    @grpc_stream_errors
    async def DrainVm(self, request: cpb.DrainVmRequest, context: Ctx) -> AsyncIterator[tpb.DrainProgress]:
        validate_id(request.vm_id, "VM id")
        async for p in self.plane.drain_vm(request.vm_id, _budget(context)):
            yield c.drain_to_pb(p)

    # -- policies
    @grpc_errors
    async def SetPolicy(self, request: cpb.SetPolicyRequest, context: Ctx) -> cpb.PolicyEntry:
        scope = cc.scope_from_pb(request.scope)
        assert scope is not None
        policy = cc.policy_request(request.policy, list(request.fields))
        entry = await self.plane.set_policy(scope, policy, list(request.fields))
        return cc.entry_to_pb(entry)

    @grpc_errors
    async def GetPolicy(self, request: cpb.GetPolicyRequest, context: Ctx) -> cpb.GetPolicyResponse:
        return cc.effective_to_pb(await self.plane.get_policy(request.vm_id))

    @grpc_errors
    async def ListPolicies(self, request: cpb.ListPoliciesRequest, context: Ctx) -> cpb.ListPoliciesResponse:
        entries = await self.plane.list_policies(request.selector)
        return cpb.ListPoliciesResponse(entries=[cc.entry_to_pb(e) for e in entries])

    @grpc_errors
    async def DeletePolicy(self, request: cpb.DeletePolicyRequest, context: Ctx) -> cpb.DeletePolicyResponse:
        scope = cc.scope_from_pb(request.scope)
        assert scope is not None
        await self.plane.delete_policy(scope)
        return cpb.DeletePolicyResponse()

    # -- cycles and events
    @grpc_errors
    async def TriggerCycle(self, request: cpb.TriggerCycleRequest, context: Ctx) -> tpb.CycleReport:
        validate_id(request.vm_id, "VM id")
        mode = c.mode_from_pb(request.mode)
        tenant = caller_tenant() if is_tenant_caller() else None
        report = await self.plane.trigger_cycle(
            request.vm_id, mode, request.interval_ms, _budget(context), tenant=tenant
        )
        return c.report_to_pb(report)

    @grpc_errors
    async def ListCycleReports(
        self, request: cpb.ListCycleReportsRequest, context: Ctx
    ) -> cpb.ListCycleReportsResponse:
        reports = await self.plane.list_reports(request.vm_id, request.limit)
        return cpb.ListCycleReportsResponse(reports=[c.report_to_pb(r) for r in reports])

    @grpc_stream_errors
    async def StreamEvents(self, request: tpb.StreamEventsRequest, context: Ctx) -> AsyncIterator[tpb.Event]:
        async for ev in self.plane.stream_events(request.vm_id, request.after_seq, request.follow):
            yield c.event_to_pb(ev)
