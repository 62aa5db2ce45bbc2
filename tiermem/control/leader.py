"""Leader election among control-plane replicas through the state store's lease.

The leader renews its lease every third of the lease period. A replica that
cannot renew steps down before its lease could have expired, so two replicas
never both believe they lead for longer than the clock skew between them; the
order claims in the state store cover that window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from tiermem.api import LeaderInfo
from tiermem.control.events import EventLog
from tiermem.control.state import StateStore
from tiermem.errors import TiermemError
from tiermem.model import EventKind

__all__ = ["LeaderElector"]

log = structlog.get_logger(__name__)


class LeaderElector:
    """Holds (or waits for) the scheduling lease; calls ``on_change(is_leader)`` on every change."""

    def __init__(
        self,
        state: StateStore,
        replica_id: str,
        address: str,
        lease_ms: int,
        on_change: Callable[[bool], Awaitable[None]],
        events: EventLog | None = None,
    ) -> None:
        self.state = state
        self.replica_id = replica_id
        self.address = address
        self.lease_ms = max(100, lease_ms)
        self.on_change = on_change
        self.events = events
        self.is_leader = False
        self._last_ok = 0.0
        self._halted = False

    async def step(self) -> bool:
        """Try to take or renew the lease once; returns whether this replica leads now."""
        t0 = time.monotonic()
        try:
            held = await self.state.acquire_leadership(self.replica_id, self.address, self.lease_ms)
        except TiermemError as e:
            # Unknown outcome: keep leading only while the last renewal surely still holds.
            held = self.is_leader and (t0 - self._last_ok) * 1000 < self.lease_ms * 2 / 3
            log.warning(
                "leader lease renewal failed", replica=self.replica_id, error=str(e), still_leader=held
            )
        else:
            if held:
                self._last_ok = t0
        if held != self.is_leader:
            self.is_leader = held
            log.info("leadership changed", replica=self.replica_id, leader=held)
            if held and self.events is not None:
                try:
                    await self.events.publish(
                        EventKind.LEADER_CHANGED,
                        f"replica {self.replica_id} at {self.address} is now the leader",
                        replica=self.replica_id,
                        address=self.address,
                    )
                except TiermemError as e:
                    log.warning("could not record the leader change", error=str(e))
            await self.on_change(held)
        return held

    async def run(self) -> None:
        """Campaign and renew until cancelled or :meth:`halt`."""
        while not self._halted:
            await self.step()
            await asyncio.sleep(self.lease_ms / 3000)

    def halt(self) -> None:
        """Stop campaigning after the current step (backs up task cancellation)."""
        self._halted = True

    async def resign(self) -> None:
        """Give the lease up (shutdown), so another replica takes over at once."""
        was = self.is_leader
        self.is_leader = False
        if was:
            await self.on_change(False)
        try:
            await self.state.release_leadership(self.replica_id)
        except TiermemError as e:
            log.warning("could not release the leader lease", error=str(e))

    async def leader(self) -> LeaderInfo | None:
        """The current lease holder, as the store sees it."""
        return await self.state.get_leader()
