"""The control plane's asyncio client of node agents (NodeAgent gRPC), returning domain dataclasses.

One channel per agent address, reused by every call; each call carries the
agent token and a deadline. gRPC failures come back as the tiermem error tree
(UNAVAILABLE and DEADLINE_EXCEEDED as :class:`tiermem.errors.Unavailable`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from tiermem.api import VmSpec
from tiermem.config import TlsSettings
from tiermem.model import CycleMode, CycleReport, DrainProgress, EvictionPolicy, VmStatus
from tiermem.rpc import convert as c
from tiermem.rpc.channel import aio_channel, auth_metadata
from tiermem.rpc.status import error_from_rpc
from tiermem.v1 import agent_pb2 as apb
from tiermem.v1 import agent_pb2_grpc as agrpc

__all__ = ["GrpcAgents"]


class GrpcAgents:
    """NodeAgent calls by agent address (implements ``tiermem.control.agentapi.AgentApi``)."""

    def __init__(self, token: str = "", tls: TlsSettings | None = None) -> None:
        self._md = auth_metadata(token)
        self._tls = tls or TlsSettings()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, agrpc.NodeAgentStub] = {}

    def _stub(self, address: str) -> agrpc.NodeAgentStub:
        stub = self._stubs.get(address)
        if stub is None:
            ch = self._channels[address] = aio_channel(address, self._tls)
            stub = self._stubs[address] = agrpc.NodeAgentStub(ch)
        return stub

    async def _call(self, method: Any, request: Any, timeout: float) -> Any:
        try:
            return await method(request, timeout=max(0.001, timeout), metadata=self._md)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None

    async def attach_vm(self, address: str, spec: VmSpec, policy: EvictionPolicy, timeout: float) -> VmStatus:
        """AttachVm."""
        req = apb.AttachVmRequest(
            vm_id=spec.vm_id, backend=c.backend_to_pb(spec.backend), memory_bytes=spec.memory_bytes,  # type: ignore[arg-type]
            policy=c.policy_to_pb(policy), labels=spec.labels, workload=spec.workload, synthetic=spec.synthetic,
        )  # fmt: skip
        resp = await self._call(self._stub(address).AttachVm, req, timeout)
        return c.status_from_pb(resp.status)

    async def detach_vm(self, address: str, vm_id: str, purge: bool, timeout: float) -> int:
        """DetachVm; returns the pages purged."""
        resp = await self._call(
            self._stub(address).DetachVm, apb.DetachVmRequest(vm_id=vm_id, purge=purge), timeout
        )
        return int(resp.pages_purged)

    async def run_cycle(
        self,
        address: str,
        vm_id: str,
        mode: CycleMode,
        interval_ms: int,
        policy: EvictionPolicy | None,
        order_id: str,
        timeout: float,
    ) -> CycleReport:
        """RunCycle, with the policy to install first."""
        mode_pb: Any = c.mode_to_pb(mode)
        req = apb.RunCycleRequest(vm_id=vm_id, mode=mode_pb, interval_ms=interval_ms, order_id=order_id)
        if policy is not None:
            req.policy.CopyFrom(c.policy_to_pb(policy))
        return c.report_from_pb(await self._call(self._stub(address).RunCycle, req, timeout))

    async def drain(self, address: str, vm_id: str, timeout: float) -> AsyncIterator[DrainProgress]:
        """Drain: progress until done."""
        call: Any = self._stub(address).Drain(
            apb.DrainRequest(vm_id=vm_id), timeout=max(0.001, timeout), metadata=self._md
        )
        try:
            async for m in call:
                yield c.drain_from_pb(m)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels, self._stubs = self._channels, {}, {}
        for ch in channels.values():
            await ch.close()
