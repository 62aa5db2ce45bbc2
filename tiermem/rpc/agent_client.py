"""Clients of node agents (NodeAgent gRPC), returning domain dataclasses.

:class:`GrpcAgents` is the control plane's asyncio client; :class:`AgentClient` is the
synchronous client of one agent for the CLI's ``--agent ADDR`` commands (snapshot import).

One channel per agent address, reused by every call; each call carries the
agent token and a deadline. gRPC failures come back as the tiermem error tree
(UNAVAILABLE and DEADLINE_EXCEEDED as :class:`tiermem.errors.Unavailable`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from tiermem.agent.snapshot import SnapshotInfo
from tiermem.api import VmSpec
from tiermem.config import TlsSettings
from tiermem.model import Compression, CycleMode, CycleReport, DrainProgress, EvictionPolicy, VmStatus
from tiermem.rpc import convert as c
from tiermem.rpc.channel import aio_channel, auth_metadata, sync_channel
from tiermem.rpc.status import error_from_rpc
from tiermem.v1 import agent_pb2 as apb
from tiermem.v1 import agent_pb2_grpc as agrpc

__all__ = ["AgentClient", "GrpcAgents", "ImportProgress"]


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
            vm_id=spec.vm_id,
            backend=c.backend_to_pb(spec.backend),  # type: ignore[arg-type]
            memory_bytes=spec.memory_bytes,
            policy=c.policy_to_pb(policy),
            labels=spec.labels,
            workload=spec.workload,
            synthetic=spec.synthetic,
        )
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


@dataclass(frozen=True)
class ImportProgress:
    """One message of an import: pages read so far, and the result on the last one."""

    pages_done: int
    pages_total: int
    result: SnapshotInfo | None = None


class AgentClient:
    """NodeAgent calls on one agent."""

    def __init__(
        self, address: str, token: str = "", tls: TlsSettings | None = None, timeout_s: float = 30.0
    ) -> None:
        self.address = address
        self._channel = sync_channel(address, tls or TlsSettings())
        self._stub = agrpc.NodeAgentStub(self._channel)
        self._md = auth_metadata(token)
        self.timeout_s = timeout_s

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def import_snapshot(
        self,
        vm_id: str,
        *,
        mem_file: str = "",
        mem_object: str = "",
        store: str = "",
        compression: Compression = Compression.NONE,
        prefault_pages_per_s: float | None = None,
        prefetch_pages: int | None = None,
        timeout: float | None = None,
    ) -> Iterator[ImportProgress]:
        """ImportSnapshot: progress, then the result (no deadline by default: a big file takes its time)."""
        req = apb.ImportSnapshotRequest(
            vm_id=vm_id,
            mem_file=mem_file,
            mem_object=mem_object,
            store=store,
            compression=c.compression_to_pb(compression),  # type: ignore[arg-type]
            prefault_pages_per_second=prefault_pages_per_s or 0.0,
            has_prefault=prefault_pages_per_s is not None,
            prefetch_pages=prefetch_pages or 0,
            has_prefetch=prefetch_pages is not None,
        )
        try:
            for m in self._stub.ImportSnapshot(req, timeout=timeout, metadata=self._md):
                info = None
                if m.done:
                    info = SnapshotInfo(
                        m.vm_id, m.pages, m.zero_pages, m.stored_bytes, m.store, m.source, m.socket
                    )
                yield ImportProgress(m.pages_done, m.pages_total, info)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
