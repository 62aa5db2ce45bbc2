"""The control plane's event log: publish to the state store, replay and follow.

Followers wake at once on events published by this replica and poll the store
(every ``poll_s``) for events other replicas published to a shared store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog

from tiermem.control.clock import Clock, clock_ms
from tiermem.control.state import StateStore
from tiermem.events import log_level
from tiermem.model import Event, EventKind

__all__ = ["EventLog"]

log = structlog.get_logger(__name__)


class EventLog:
    """Sequenced events, kept in the state store."""

    def __init__(self, state: StateStore, clock: Clock, poll_s: float = 0.5) -> None:
        self._state = state
        self._clock = clock
        self._poll_s = poll_s
        self._new = asyncio.Event()

    async def publish(
        self, kind: EventKind, message: str, vm_id: str = "", node_id: str = "", **attributes: object
    ) -> Event:
        """Append an event and wake followers; returns it with its seq."""
        ev = Event(
            kind=kind,
            message=message,
            vm_id=vm_id,
            node_id=node_id,
            time_unix_ms=clock_ms(self._clock),
            attributes={k: str(v) for k, v in attributes.items()},
        )
        ev = await self._state.append_event(ev)
        getattr(log, log_level(kind))(
            "event", kind=kind.value, seq=ev.seq, vm_id=vm_id or None, node_id=node_id or None, msg=message
        )
        self._new.set()
        self._new = asyncio.Event()
        return ev

    def make(
        self, kind: EventKind, message: str, vm_id: str = "", node_id: str = "", **attributes: object
    ) -> Event:
        """An event stamped now, not yet published (for :meth:`publish_many`)."""
        return Event(
            kind=kind,
            message=message,
            vm_id=vm_id,
            node_id=node_id,
            time_unix_ms=clock_ms(self._clock),
            attributes={k: str(v) for k, v in attributes.items()},
        )

    async def publish_many(self, events: list[Event]) -> list[Event]:
        """Append several events in one store operation and wake followers."""
        out = await self._state.append_events(events)
        for ev in out:
            getattr(log, log_level(ev.kind))(
                "event",
                kind=ev.kind.value,
                seq=ev.seq,
                vm_id=ev.vm_id or None,
                node_id=ev.node_id or None,
                msg=ev.message,
            )
        if out:
            self._new.set()
            self._new = asyncio.Event()
        return out

    async def follow(self, after_seq: int = 0, vm_id: str = "", follow: bool = False) -> AsyncIterator[Event]:
        """Events with seq > ``after_seq`` (of one VM, or all); with ``follow``, then new ones forever."""
        cursor = after_seq
        while True:
            waiter = self._new  # taken before the read, so nothing published after it is missed
            while True:
                batch = await self._state.events_after(cursor, vm_id, limit=500)
                for ev in batch:
                    cursor = max(cursor, ev.seq)
                    yield ev
                if len(batch) < 500:
                    break
            if not follow:
                return
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the inner wait completes, and the stream would never end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):
                    await waiter.wait()

    async def last_seq(self) -> int:
        """The newest event's seq."""
        return await self._state.last_event_seq()
