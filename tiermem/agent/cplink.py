"""The agent's link to the control plane: register, heartbeat with VM statuses, report autonomous cycles.

While the control plane answers, it orders every cycle and the agent runs none on
its own. When it has been unreachable for ``autonomous_after_ms`` the agent falls
back to autonomous cycles from each VM's last policy, so a host keeps tiering
(and always keeps serving faults) alone; the reports of those cycles are sent
when the control plane is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from tiermem.agent.node import Agent
from tiermem.api import NodeInfo
from tiermem.config import AgentSettings
from tiermem.errors import TiermemError
from tiermem.kernel.probe import probe_host
from tiermem.model import Backend
from tiermem.rpc.clients import AsyncControlPlaneClient

__all__ = ["ControlPlaneLink"]

log = structlog.get_logger(__name__)


class ControlPlaneLink:
    """Keeps this node registered and its lease alive."""

    def __init__(
        self,
        agent: Agent,
        settings: AgentSettings,
        address: str,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = agent
        self.monotonic = monotonic
        """Seconds on a monotonic clock: injectable, so a test can pass the autonomous deadline without waiting it."""
        self.settings = settings
        self.address = address
        self.registered = False

    def _node(self) -> NodeInfo:
        try:
            avail = probe_host().backends
        except OSError:
            avail = {"sim": True}
        backends = tuple(Backend(name) for name, ok in avail.items() if ok)
        return NodeInfo(
            node_id=self.agent.node_id,
            address=self.address,
            backends=backends,
            capacity_bytes=self.agent.capacity_bytes,
        )

    async def run(self) -> None:
        """Heartbeat until cancelled."""
        s = self.settings
        client = AsyncControlPlaneClient(s.control_plane, s.control_plane_token, s.client_tls, timeout_s=5.0)
        node = await asyncio.to_thread(self._node)
        last_ok = self.monotonic()
        self.agent.autonomous.clear()  # the control plane drives cycles while it is reachable
        period = max(s.heartbeat_ms, 100) / 1000.0
        try:
            while True:
                try:
                    if not self.registered:
                        await client.register_node(node)
                        self.registered = True
                        log.info(
                            "registered with the control plane", node=node.node_id, address=s.control_plane
                        )
                    res = await client.heartbeat(
                        node.node_id, await asyncio.to_thread(self.agent.list_status)
                    )
                    if res.reregister:
                        self.registered = False
                        continue
                    reports = self.agent.take_autonomous_reports()
                    if reports:
                        await client.report_cycles(node.node_id, reports)
                    last_ok = self.monotonic()
                    if self.agent.autonomous.is_set():
                        log.info("control plane is back; autonomous cycles stop", node=node.node_id)
                        self.agent.autonomous.clear()
                    if res.lease_ttl_ms:
                        period = min(period, max(res.lease_ttl_ms / 3000.0, 0.1))
                except TiermemError as e:
                    down_for = self.monotonic() - last_ok
                    if (
                        s.autonomous
                        and down_for * 1000 >= s.autonomous_after_ms
                        and not self.agent.autonomous.is_set()
                    ):
                        log.warning(
                            "control plane unreachable; running autonomous cycles",
                            error=str(e),
                            down_s=round(down_for, 1),
                        )
                        self.agent.autonomous.set()
                    self.registered = self.registered and "not registered" not in str(e).lower()
                await asyncio.sleep(period)
        finally:
            await client.close()
