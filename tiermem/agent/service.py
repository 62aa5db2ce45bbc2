"""The ``NodeAgent`` gRPC servicer: proto <-> domain conversion over :class:`tiermem.agent.node.Agent`.

grpc.aio is used (as for the control plane) so event streams and many concurrent
calls cost no threads; every blocking domain call runs in a worker thread, and the
fault path never touches this event loop at all. Two pools: long calls (a cycle
holds its thread for the whole detection interval; drains and verifications move
data) and short ones (attach, detach). The event loop's default executor has
cpu_count + 4 threads — six here — so a node scheduled with more concurrent cycles
than that would otherwise queue every attach and detach behind them.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from tiermem.agent.node import Agent
from tiermem.agent.restore import RestoreService
from tiermem.agent.snapshot import SnapshotInfo
from tiermem.errors import FailedPrecondition, InvalidArgument, PermissionDenied, ResourceExhausted
from tiermem.model import Backend, DrainProgress, EvictionPolicy
from tiermem.rpc import convert
from tiermem.rpc.security import caller_tenant, is_tenant_caller
from tiermem.rpc.status import grpc_errors, grpc_stream_errors
from tiermem.v1 import agent_pb2 as apb
from tiermem.v1 import agent_pb2_grpc as agrpc
from tiermem.v1 import types_pb2 as tpb

__all__ = ["SERVICE_NAME", "NodeAgentServicer"]

SERVICE_NAME = "tiermem.v1.NodeAgent"
Ctx = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R")
SHORT_WORKERS = 16


def _deadline(context: Ctx, default: float) -> float:
    left = context.time_remaining()
    return default if left is None else max(left, 0.0)


class NodeAgentServicer(agrpc.NodeAgentServicer):
    """Thin servicer: validate, convert, call the Agent, convert back."""

    def __init__(self, agent: Agent, restores: RestoreService | None = None) -> None:
        self.agent = agent
        self.restores = restores
        self._long = ThreadPoolExecutor(
            agent.settings.max_concurrent_cycles, thread_name_prefix="agent-cycle"
        )
        self._short = ThreadPoolExecutor(SHORT_WORKERS, thread_name_prefix="agent-rpc")
        self._tenant_cycles: dict[str, int] = {}

    def close(self) -> None:
        """Stop the worker pools (calls in flight finish)."""
        self._long.shutdown(wait=False, cancel_futures=True)
        self._short.shutdown(wait=False, cancel_futures=True)

    async def _run(self, pool: ThreadPoolExecutor, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def _policy(
        self, m: tpb.EvictionPolicy, has: bool, base: EvictionPolicy | None = None
    ) -> EvictionPolicy | None:
        if not has:
            return None
        p = convert.policy_from_pb(m, base=base)
        return p.validate(self.agent.known_stores())

    @grpc_errors
    async def AttachVm(self, request: apb.AttachVmRequest, context: Ctx) -> apb.AttachVmResponse:
        backend = convert.backend_from_pb(request.backend, default=Backend.SIM)
        policy = self._policy(request.policy, request.HasField("policy")) or EvictionPolicy()
        if is_tenant_caller():
            raise PermissionDenied(
                "sim VMs and workloads are a demo and test facility for operators (admin token); "
                "a tenant's VMs attach through the handoff socket"
            )
        if backend is not Backend.SIM:
            raise InvalidArgument(
                f"{backend.value} VMs attach through the handoff socket ({self.agent.settings.handoff_path()}); "
                "AttachVm creates sim VMs only"
            )
        vcpus = request.vcpus or (1 if request.workload else 0)  # a workload with no vCPU would never run
        status = await self._run(
            self._short,
            self.agent.attach_sim,
            request.vm_id,
            request.memory_bytes,
            policy,
            dict(request.labels),
            request.workload,
            request.synthetic,
            vcpus,
        )
        return apb.AttachVmResponse(status=convert.status_to_pb(status))

    @grpc_errors
    async def DetachVm(self, request: apb.DetachVmRequest, context: Ctx) -> apb.DetachVmResponse:
        detach = self.restores.detach if self.restores is not None else self.agent.detach
        n = await self._run(self._short, detach, request.vm_id, request.purge)
        return apb.DetachVmResponse(pages_purged=n)

    @grpc_errors
    async def SetPolicy(self, request: apb.SetVmPolicyRequest, context: Ctx) -> apb.SetVmPolicyResponse:
        if not request.HasField("policy"):
            raise InvalidArgument("policy is required")
        p = convert.policy_from_pb(request.policy)
        v = self.agent.set_policy(request.vm_id, p)
        return apb.SetVmPolicyResponse(version=v)

    @grpc_errors
    async def RunCycle(self, request: apb.RunCycleRequest, context: Ctx) -> tpb.CycleReport:
        mode = convert.mode_from_pb(request.mode)
        self.agent.session(request.vm_id)  # NOT_FOUND before any work
        policy = self._policy(request.policy, request.HasField("policy"))
        interval_ms = request.interval_ms
        if interval_ms == 0:
            interval_ms = (policy or self.agent.session(request.vm_id).policy).interval_ms
        tenant = caller_tenant() if is_tenant_caller() else None
        s = self.agent.settings
        if tenant is not None and interval_ms > s.tenant_manual_max_interval_ms:
            raise InvalidArgument(
                f"a tenant's manual cycle may wait at most {s.tenant_manual_max_interval_ms} ms, not {interval_ms}"
            )
        # Honour the caller's deadline: the detection wait cannot outlast it.
        budget_ms = int(_deadline(context, 1e9) * 1000)
        if budget_ms < interval_ms:
            interval_ms = max(budget_ms - 500, 1)
        if tenant is None:
            rep = await self._run(
                self._long, self.agent.run_cycle, request.vm_id, mode, interval_ms, policy, request.order_id
            )
            return convert.report_to_pb(rep)
        # A tenant calling the agent directly: the same limits as at the control plane, so its cycles
        # cannot hold the threads the scheduled cycles need (this event loop is single-threaded: no lock).
        if self._tenant_cycles.get(tenant, 0) >= s.tenant_manual_cycles:
            raise ResourceExhausted(
                f"tenant {tenant!r} already runs {s.tenant_manual_cycles} manual cycle(s)"
            )
        self._tenant_cycles[tenant] = self._tenant_cycles.get(tenant, 0) + 1
        try:
            rep = await self._run(
                self._long, self.agent.run_cycle, request.vm_id, mode, interval_ms, policy, request.order_id
            )
        finally:
            self._tenant_cycles[tenant] -= 1
        return convert.report_to_pb(rep)

    @grpc_stream_errors
    async def Drain(self, request: apb.DrainRequest, context: Ctx) -> AsyncIterator[tpb.DrainProgress]:
        self.agent.session(request.vm_id)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[DrainProgress | None] = asyncio.Queue()

        def progress(p: DrainProgress) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, p)

        task = asyncio.ensure_future(self._run(self._long, self.agent.drain, request.vm_id, progress))
        task.add_done_callback(lambda _t: loop.call_soon_threadsafe(queue.put_nowait, None))
        while True:
            item = await queue.get()
            if item is None:
                break
            yield convert.drain_to_pb(item)
        task.result()  # re-raise a drain error as its status code

    @grpc_errors
    async def VerifyVm(self, request: apb.VerifyVmRequest, context: Ctx) -> apb.VerifyVmResponse:
        checked, bad, ok = await self._run(self._long, self.agent.verify, request.vm_id)
        return apb.VerifyVmResponse(pages_checked=checked, mismatches=bad, supported=ok)

    @grpc_errors
    async def GetStats(self, request: apb.GetStatsRequest, context: Ctx) -> apb.GetStatsResponse:
        vms = [self.agent.status(request.vm_id)] if request.vm_id else self.agent.list_status()
        st = self.agent.node_stats()
        node = apb.NodeStats(
            node_id=self.agent.node_id,
            vms=int(st["vms"]),
            tracked_bytes=int(st["tracked_bytes"]),
            evicted_bytes=int(st["evicted_bytes"]),
            faults_served=int(st["faults_served"]),
            store_errors=int(st["store_errors"]),
            cpu_seconds=st["cpu_seconds"],
            rss_bytes=int(st["rss_bytes"]),
        )
        return apb.GetStatsResponse(node=node, vms=[convert.status_to_pb(s) for s in vms])

    @grpc_errors
    async def ListVms(self, request: apb.ListVmsRequest, context: Ctx) -> apb.ListVmsResponse:
        return apb.ListVmsResponse(vms=[convert.status_to_pb(s) for s in self.agent.list_status()])

    @grpc_stream_errors
    async def StreamEvents(self, request: tpb.StreamEventsRequest, context: Ctx) -> AsyncIterator[tpb.Event]:
        async for ev in self.agent.events.subscribe(request.vm_id, request.after_seq, request.follow):
            yield convert.event_to_pb(ev)

    @grpc_stream_errors
    async def ImportSnapshot(
        self, request: apb.ImportSnapshotRequest, context: Ctx
    ) -> AsyncIterator[apb.ImportSnapshotProgress]:
        if self.restores is None:
            raise FailedPrecondition("this agent serves no snapshot restores")
        if is_tenant_caller():
            raise PermissionDenied(
                "importing a snapshot reads a file or an S3 object with the agent's own access: "
                "an operator (admin token) imports it"
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
        comp = convert.compression_from_pb(request.compression).value

        def progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (done, total))

        def run() -> SnapshotInfo:
            assert self.restores is not None
            return self.restores.import_snapshot(
                request.vm_id,
                mem_file=request.mem_file,
                mem_object=request.mem_object,
                store=request.store,
                compression=comp,
                prefault_pages_per_s=request.prefault_pages_per_second if request.has_prefault else None,
                prefetch_pages=request.prefetch_pages if request.has_prefetch else None,
                progress=progress,
            )

        task = asyncio.ensure_future(self._run(self._long, run))
        task.add_done_callback(lambda _t: loop.call_soon_threadsafe(queue.put_nowait, None))
        while True:
            item = await queue.get()
            if item is None:
                break
            yield apb.ImportSnapshotProgress(pages_done=item[0], pages_total=item[1])
        info = task.result()  # an import error becomes its status code
        yield apb.ImportSnapshotProgress(
            pages_done=info.pages,
            pages_total=info.pages,
            done=True,
            vm_id=info.vm_id,
            pages=info.pages,
            zero_pages=info.zero_pages,
            stored_bytes=info.stored_bytes,
            socket=info.socket,
            store=info.store,
            source=info.source,
        )
