"""ControlPlane clients returning domain dataclasses: blocking (the CLI) and asyncio (the node agent).

Every call carries the bearer token and a deadline (``timeout_s`` unless the
method says otherwise); gRPC failures are raised as the tiermem error tree
(``tiermem.rpc.status.error_from_rpc``), so callers never see grpc.RpcError.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from tiermem.api import EffectivePolicy, HeartbeatResult, NodeInfo, PolicyEntry, PolicyScope, VmSpec
from tiermem.config import ClientSettings, TlsSettings
from tiermem.errors import NotLeader, TiermemError
from tiermem.model import CycleMode, CycleReport, DrainProgress, Event, EvictionPolicy, VmStatus
from tiermem.rpc import convert as c
from tiermem.rpc import convert_api as cc
from tiermem.rpc.channel import aio_channel, auth_metadata, sync_channel
from tiermem.rpc.status import error_from_rpc
from tiermem.v1 import control_pb2 as cpb
from tiermem.v1 import control_pb2_grpc as cgrpc
from tiermem.v1 import types_pb2 as tpb

__all__ = ["AsyncControlPlaneClient", "ControlPlaneClient"]

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 7 * 24 * 3600.0


# ---------------------------------------------------------------- requests and responses (shared)


def _register_node(node: NodeInfo) -> cpb.RegisterNodeRequest:
    return cpb.RegisterNodeRequest(node=cc.node_to_pb(node))


def _heartbeat(node_id: str, statuses: Iterable[VmStatus]) -> cpb.HeartbeatRequest:
    return cpb.HeartbeatRequest(node_id=node_id, vms=[c.status_to_pb(s) for s in statuses])


def _report_cycles(node_id: str, reports: Iterable[CycleReport]) -> cpb.ReportCyclesRequest:
    return cpb.ReportCyclesRequest(node_id=node_id, reports=[c.report_to_pb(r) for r in reports])


def _set_policy(scope: PolicyScope, policy: EvictionPolicy, fields: Sequence[str]) -> cpb.SetPolicyRequest:
    return cpb.SetPolicyRequest(
        scope=cc.scope_to_pb(scope), policy=c.policy_to_pb(policy), fields=list(fields)
    )


def _trigger(vm_id: str, mode: CycleMode, interval_ms: int) -> cpb.TriggerCycleRequest:
    mode_pb: Any = c.mode_to_pb(mode)
    return cpb.TriggerCycleRequest(vm_id=vm_id, mode=mode_pb, interval_ms=interval_ms)


def _nodes(m: cpb.ListNodesResponse) -> list[NodeInfo]:
    return [cc.node_from_pb(n) for n in m.nodes]


def _statuses(m: cpb.ListVmStatusResponse) -> list[VmStatus]:
    return [c.status_from_pb(s) for s in m.vms]


def _entries(m: cpb.ListPoliciesResponse) -> list[PolicyEntry]:
    return [cc.entry_from_pb(e) for e in m.entries]


def _reports(m: cpb.ListCycleReportsResponse) -> list[CycleReport]:
    return [c.report_from_pb(r) for r in m.reports]


class _Base:
    def __init__(self, address: str, token: str, tls: TlsSettings | None, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.address = address
        self.token = token
        self.tls = tls or TlsSettings()
        self.timeout_s = timeout_s
        self._md = auth_metadata(token)
        self.follow_leader = True
        """Retry a write refused by a follower replica once, on the leader it names (and stay there)."""
        self._channel: Any = self._open_channel(address)
        self._stub = cgrpc.ControlPlaneStub(self._channel)
        self._old_channels: list[Any] = []

    def _open_channel(self, address: str) -> Any:
        raise NotImplementedError

    def _follow(self, address: str) -> None:
        # the old channel may carry other calls (a stream): it is closed with the client
        self._old_channels.append(self._channel)
        self.address = address
        self._channel = self._open_channel(address)
        self._stub = cgrpc.ControlPlaneStub(self._channel)

    def _leader_to_follow(self, err: TiermemError, attempt: int) -> str | None:
        if attempt or not self.follow_leader or not isinstance(err, NotLeader):
            return None
        if not err.leader_address or err.leader_address == self.address:
            return None
        return err.leader_address

    def _t(self, timeout: float | None) -> float:
        # gRPC turns absurd deadlines into DEADLINE_EXCEEDED at once: cap them at a week
        return min(MAX_TIMEOUT_S, self.timeout_s if timeout is None else timeout)


# ---------------------------------------------------------------- blocking client


class ControlPlaneClient(_Base):
    """Blocking ControlPlane client (the CLI). Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        address: str,
        token: str = "",
        tls: TlsSettings | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(address, token, tls, timeout_s)

    def _open_channel(self, address: str) -> grpc.Channel:
        return sync_channel(address, self.tls)

    @classmethod
    def from_settings(cls, settings: ClientSettings) -> ControlPlaneClient:
        """A client for ``settings.server`` with its token, TLS and default deadline."""
        return cls(settings.server, settings.token, settings.tls, settings.timeout_s)

    def __enter__(self) -> ControlPlaneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        for ch in (*self._old_channels, self._channel):
            ch.close()

    def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        for attempt in (0, 1):
            try:
                return getattr(self._stub, method)(request, timeout=self._t(timeout), metadata=self._md)
            except grpc.RpcError as e:
                err = error_from_rpc(e)
                leader = self._leader_to_follow(err, attempt)
                if leader is None:
                    raise err from None
                self._follow(leader)
        raise AssertionError("unreachable")

    def _stream(
        self, method: str, request: Any, timeout: float | None, conv: Callable[[Any], T]
    ) -> Iterator[T]:
        for attempt in (0, 1):
            call = getattr(self._stub, method)(request, timeout=timeout, metadata=self._md)
            started = False
            try:
                for m in call:
                    started = True
                    yield conv(m)
                return
            except grpc.RpcError as e:
                err = error_from_rpc(e)
                leader = None if started else self._leader_to_follow(err, attempt)
                if leader is None:
                    raise err from None
                self._follow(leader)
            finally:
                call.cancel()

    # -- nodes
    def register_node(self, node: NodeInfo, timeout: float | None = None) -> int:
        """Register a node; returns the lease TTL, ms."""
        return int(self._call("RegisterNode", _register_node(node), timeout).lease_ttl_ms)

    def heartbeat(
        self, node_id: str, statuses: Iterable[VmStatus] = (), timeout: float | None = None
    ) -> HeartbeatResult:
        """Renew a node's lease, sending its VMs' statuses."""
        return cc.heartbeat_from_pb(self._call("Heartbeat", _heartbeat(node_id, statuses), timeout))

    def deregister_node(self, node_id: str, timeout: float | None = None) -> None:
        """Forget a node (refused while it has VMs)."""
        self._call("DeregisterNode", cpb.DeregisterNodeRequest(node_id=node_id), timeout)

    def list_nodes(self, timeout: float | None = None) -> list[NodeInfo]:
        """Every node."""
        return _nodes(self._call("ListNodes", cpb.ListNodesRequest(), timeout))

    def report_cycles(
        self, node_id: str, reports: Iterable[CycleReport], timeout: float | None = None
    ) -> None:
        """Send reports of cycles the agent ran on its own."""
        self._call("ReportCycles", _report_cycles(node_id, reports), timeout)

    # -- VMs
    def register_vm(self, spec: VmSpec, attach: bool = False, timeout: float | None = None) -> VmStatus:
        """Register a VM (and attach it on its node with ``attach``)."""
        req = cpb.RegisterVmRequest(vm=cc.spec_to_pb(spec), attach=attach)
        return c.status_from_pb(self._call("RegisterVm", req, timeout).status)

    def deregister_vm(self, vm_id: str, purge: bool = False, timeout: float | None = None) -> int:
        """Drain (or purge) and forget a VM; returns pages purged. No deadline by default: a drain takes its time."""
        req = cpb.DeregisterVmRequest(vm_id=vm_id, purge=purge)
        return int(
            self._call("DeregisterVm", req, timeout if timeout is not None else 24 * 3600).pages_purged
        )

    def get_vm_status(self, vm_id: str, timeout: float | None = None) -> VmStatus:
        """A VM's status."""
        return c.status_from_pb(self._call("GetVmStatus", cpb.GetVmStatusRequest(vm_id=vm_id), timeout))

    def list_vm_status(
        self, node_id: str = "", selector: str = "", timeout: float | None = None
    ) -> list[VmStatus]:
        """Statuses of the VMs of a node and/or matching a selector."""
        req = cpb.ListVmStatusRequest(node_id=node_id, selector=selector)
        return _statuses(self._call("ListVmStatus", req, timeout))

    def drain_vm(self, vm_id: str, timeout: float | None = None) -> Iterator[DrainProgress]:
        """Bring every evicted page back; yields progress (no deadline unless given)."""
        return self._stream("DrainVm", cpb.DrainVmRequest(vm_id=vm_id), timeout, c.drain_from_pb)

    # -- policies
    def set_policy(
        self,
        scope: PolicyScope,
        policy: EvictionPolicy,
        fields: Sequence[str] = (),
        timeout: float | None = None,
    ) -> PolicyEntry:
        """Set a policy; with ``fields`` only those fields change."""
        return cc.entry_from_pb(self._call("SetPolicy", _set_policy(scope, policy, fields), timeout))

    def get_policy(self, vm_id: str, timeout: float | None = None) -> EffectivePolicy:
        """The policy a VM runs with."""
        return cc.effective_from_pb(self._call("GetPolicy", cpb.GetPolicyRequest(vm_id=vm_id), timeout))

    def list_policies(self, selector: str = "", timeout: float | None = None) -> list[PolicyEntry]:
        """Policy entries, optionally filtered."""
        return _entries(self._call("ListPolicies", cpb.ListPoliciesRequest(selector=selector), timeout))

    def delete_policy(self, scope: PolicyScope, timeout: float | None = None) -> None:
        """Remove a policy entry."""
        self._call("DeletePolicy", cpb.DeletePolicyRequest(scope=cc.scope_to_pb(scope)), timeout)

    # -- cycles and events
    def trigger_cycle(
        self,
        vm_id: str,
        mode: CycleMode = CycleMode.EVICT,
        interval_ms: int = 0,
        timeout: float | None = None,
    ) -> CycleReport:
        """Run one cycle now; the default deadline is the cycle's interval plus ``timeout_s``."""
        if timeout is None:
            iv = interval_ms or self.get_policy(vm_id).policy.interval_ms
            timeout = iv / 1000 + self.timeout_s
        return c.report_from_pb(self._call("TriggerCycle", _trigger(vm_id, mode, interval_ms), timeout))

    def list_cycle_reports(
        self, vm_id: str = "", limit: int = 0, timeout: float | None = None
    ) -> list[CycleReport]:
        """Newest reports first."""
        req = cpb.ListCycleReportsRequest(vm_id=vm_id, limit=limit)
        return _reports(self._call("ListCycleReports", req, timeout))

    def stream_events(
        self, vm_id: str = "", after_seq: int = 0, follow: bool = False, timeout: float | None = None
    ) -> Iterator[Event]:
        """Events after ``after_seq``; with ``follow``, then new ones until cancelled."""
        req = tpb.StreamEventsRequest(vm_id=vm_id, after_seq=after_seq, follow=follow)
        t = timeout if (timeout is not None or follow) else self.timeout_s
        return self._stream("StreamEvents", req, t, c.event_from_pb)


# ---------------------------------------------------------------- asyncio client


class AsyncControlPlaneClient(_Base):
    """asyncio ControlPlane client (the node agent: register, heartbeat, report; and tests)."""

    def __init__(
        self,
        address: str,
        token: str = "",
        tls: TlsSettings | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(address, token, tls, timeout_s)

    def _open_channel(self, address: str) -> grpc.aio.Channel:
        return aio_channel(address, self.tls)

    @classmethod
    def from_settings(cls, settings: ClientSettings) -> AsyncControlPlaneClient:
        """A client for ``settings.server``."""
        return cls(settings.server, settings.token, settings.tls, settings.timeout_s)

    async def __aenter__(self) -> AsyncControlPlaneClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        for ch in (*self._old_channels, self._channel):
            await ch.close()

    async def _call(self, method: str, request: Any, timeout: float | None) -> Any:
        for attempt in (0, 1):
            try:
                return await getattr(self._stub, method)(request, timeout=self._t(timeout), metadata=self._md)
            except grpc.aio.AioRpcError as e:
                err = error_from_rpc(e)
                leader = self._leader_to_follow(err, attempt)
                if leader is None:
                    raise err from None
                self._follow(leader)
        raise AssertionError("unreachable")

    async def _stream(
        self, method: str, request: Any, timeout: float | None, conv: Callable[[Any], T]
    ) -> AsyncIterator[T]:
        for attempt in (0, 1):
            call = getattr(self._stub, method)(request, timeout=timeout, metadata=self._md)
            started = False
            try:
                async for m in call:
                    started = True
                    yield conv(m)
                return
            except grpc.aio.AioRpcError as e:
                err = error_from_rpc(e)
                leader = None if started else self._leader_to_follow(err, attempt)
                if leader is None:
                    raise err from None
                self._follow(leader)
            finally:
                call.cancel()

    # -- nodes
    async def register_node(self, node: NodeInfo, timeout: float | None = None) -> int:
        """Register a node; returns the lease TTL, ms (heartbeat well within it)."""
        return int((await self._call("RegisterNode", _register_node(node), timeout)).lease_ttl_ms)

    async def heartbeat(
        self, node_id: str, statuses: Iterable[VmStatus] = (), timeout: float | None = None
    ) -> HeartbeatResult:
        """Renew the lease with the VMs' statuses; ``reregister`` asks for a new RegisterNode."""
        return cc.heartbeat_from_pb(await self._call("Heartbeat", _heartbeat(node_id, statuses), timeout))

    async def deregister_node(self, node_id: str, timeout: float | None = None) -> None:
        """Forget a node."""
        await self._call("DeregisterNode", cpb.DeregisterNodeRequest(node_id=node_id), timeout)

    async def list_nodes(self, timeout: float | None = None) -> list[NodeInfo]:
        """Every node."""
        return _nodes(await self._call("ListNodes", cpb.ListNodesRequest(), timeout))

    async def report_cycles(
        self, node_id: str, reports: Iterable[CycleReport], timeout: float | None = None
    ) -> None:
        """Send reports of cycles run autonomously."""
        await self._call("ReportCycles", _report_cycles(node_id, reports), timeout)

    # -- VMs
    async def register_vm(self, spec: VmSpec, attach: bool = False, timeout: float | None = None) -> VmStatus:
        """Register a VM."""
        req = cpb.RegisterVmRequest(vm=cc.spec_to_pb(spec), attach=attach)
        return c.status_from_pb((await self._call("RegisterVm", req, timeout)).status)

    async def deregister_vm(self, vm_id: str, purge: bool = False, timeout: float | None = None) -> int:
        """Drain (or purge) and forget a VM."""
        req = cpb.DeregisterVmRequest(vm_id=vm_id, purge=purge)
        resp = await self._call("DeregisterVm", req, timeout if timeout is not None else 24 * 3600)
        return int(resp.pages_purged)

    async def get_vm_status(self, vm_id: str, timeout: float | None = None) -> VmStatus:
        """A VM's status."""
        return c.status_from_pb(await self._call("GetVmStatus", cpb.GetVmStatusRequest(vm_id=vm_id), timeout))

    async def list_vm_status(
        self, node_id: str = "", selector: str = "", timeout: float | None = None
    ) -> list[VmStatus]:
        """VM statuses."""
        req = cpb.ListVmStatusRequest(node_id=node_id, selector=selector)
        return _statuses(await self._call("ListVmStatus", req, timeout))

    def drain_vm(self, vm_id: str, timeout: float | None = None) -> AsyncIterator[DrainProgress]:
        """Drain progress."""
        return self._stream("DrainVm", cpb.DrainVmRequest(vm_id=vm_id), timeout, c.drain_from_pb)

    # -- policies
    async def set_policy(
        self,
        scope: PolicyScope,
        policy: EvictionPolicy,
        fields: Sequence[str] = (),
        timeout: float | None = None,
    ) -> PolicyEntry:
        """Set a policy."""
        return cc.entry_from_pb(await self._call("SetPolicy", _set_policy(scope, policy, fields), timeout))

    async def get_policy(self, vm_id: str, timeout: float | None = None) -> EffectivePolicy:
        """The policy a VM runs with."""
        resp = await self._call("GetPolicy", cpb.GetPolicyRequest(vm_id=vm_id), timeout)
        return cc.effective_from_pb(resp)

    async def list_policies(self, selector: str = "", timeout: float | None = None) -> list[PolicyEntry]:
        """Policy entries."""
        req = cpb.ListPoliciesRequest(selector=selector)
        return _entries(await self._call("ListPolicies", req, timeout))

    async def delete_policy(self, scope: PolicyScope, timeout: float | None = None) -> None:
        """Remove a policy entry."""
        await self._call("DeletePolicy", cpb.DeletePolicyRequest(scope=cc.scope_to_pb(scope)), timeout)

    # -- cycles and events
    async def trigger_cycle(
        self,
        vm_id: str,
        mode: CycleMode = CycleMode.EVICT,
        interval_ms: int = 0,
        timeout: float | None = None,
    ) -> CycleReport:
        """Run one cycle now."""
        if timeout is None:
            iv = interval_ms or (await self.get_policy(vm_id)).policy.interval_ms
            timeout = iv / 1000 + self.timeout_s
        resp = await self._call("TriggerCycle", _trigger(vm_id, mode, interval_ms), timeout)
        return c.report_from_pb(resp)

    async def list_cycle_reports(
        self, vm_id: str = "", limit: int = 0, timeout: float | None = None
    ) -> list[CycleReport]:
        """Newest reports first."""
        req = cpb.ListCycleReportsRequest(vm_id=vm_id, limit=limit)
        return _reports(await self._call("ListCycleReports", req, timeout))

    def stream_events(
        self, vm_id: str = "", after_seq: int = 0, follow: bool = False, timeout: float | None = None
    ) -> AsyncIterator[Event]:
        """Events after ``after_seq``; with ``follow``, then new ones."""
        req = tpb.StreamEventsRequest(vm_id=vm_id, after_seq=after_seq, follow=follow)
        t = timeout if (timeout is not None or follow) else self.timeout_s
        return self._stream("StreamEvents", req, t, c.event_from_pb)
