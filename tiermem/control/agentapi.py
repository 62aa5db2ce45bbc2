"""What the control plane needs from node agents, as a protocol of domain calls.

``tiermem.rpc.agent_client.GrpcAgents`` implements it over gRPC; unit tests use
an in-process object. Errors are the tiermem tree: :class:`Unavailable` when
the agent cannot be reached or the deadline passed, anything else as the agent
answered it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from tiermem.api import VmSpec
from tiermem.model import CycleMode, CycleReport, DrainProgress, EvictionPolicy, VmStatus

__all__ = ["AgentApi"]


class AgentApi(Protocol):
    """Calls the control plane makes on node agents (by agent address)."""

    async def attach_vm(self, address: str, spec: VmSpec, policy: EvictionPolicy, timeout: float) -> VmStatus:
        """AttachVm: create (sim) or pre-register (uffd/rwp) the VM on the agent."""
        ...

    async def detach_vm(self, address: str, vm_id: str, purge: bool, timeout: float) -> int:
        """DetachVm; returns the pages purged."""
        ...

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
        """RunCycle with the policy to install first and an idempotency key."""
        ...

    def drain(self, address: str, vm_id: str, timeout: float) -> AsyncIterator[DrainProgress]:
        """Drain: stream progress until every evicted page is back."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
