"""An in-process event bus: a bounded history plus live subscribers.

Publishers are plain threads (cycle and fault threads); subscribers are asyncio
consumers (gRPC streaming handlers). ``publish`` never blocks: a slow
subscriber's queue drops its oldest events rather than stalling the fault path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable

from tiermem.model import Event, EventKind

__all__ = ["EventBus", "log_level"]

# Failures are logged at warning or error so that a log pipeline filtering on level sees them.
_LEVELS = {
    EventKind.INTEGRITY_ERROR: "error",
    EventKind.STORE_ERROR: "error",
    EventKind.EVICTION_STOPPED: "error",
    EventKind.CYCLE_FAILED: "warning",
    EventKind.NODE_DOWN: "warning",
    EventKind.VMM_DISCONNECTED: "warning",
    EventKind.CYCLE_COMPLETED: "debug",
    EventKind.DRAIN_PROGRESS: "debug",
}


def log_level(kind: EventKind) -> str:
    """The level an event of ``kind`` is logged at: error, warning, info or debug."""
    return _LEVELS.get(kind, "info")


class _Subscriber:
    def __init__(self, loop: asyncio.AbstractEventLoop, vm_id: str, maxsize: int) -> None:
        self.loop = loop
        self.vm_id = vm_id
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize)

    def offer(self, ev: Event) -> None:
        # runs on the subscriber's loop
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
        self.queue.put_nowait(ev)


class EventBus:
    """Sequence-numbered events with replay (``after_seq``) and follow."""

    def __init__(self, node_id: str = "", history: int = 4096) -> None:
        self.node_id = node_id
        self._seq = itertools.count(1)
        self._history: deque[Event] = deque(maxlen=history)
        self._subs: list[_Subscriber] = []
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Event], None]] = []

    def publish(self, kind: EventKind, message: str, vm_id: str = "", **attributes: object) -> Event:
        """Record and fan out one event; safe from any thread."""
        with self._lock:
            ev = Event(
                kind=kind,
                message=message,
                vm_id=vm_id,
                node_id=self.node_id,
                seq=next(self._seq),
                attributes={k: str(v) for k, v in attributes.items()},
            )
            self._history.append(ev)
            subs = list(self._subs)
            listeners = list(self._listeners)
        for s in subs:
            if not s.vm_id or s.vm_id == vm_id:
                with contextlib.suppress(RuntimeError):  # loop closed
                    s.loop.call_soon_threadsafe(s.offer, ev)
        for fn in listeners:
            fn(ev)
        return ev

    def add_listener(self, fn: Callable[[Event], None]) -> None:
        """Call ``fn`` synchronously for every event (metrics, logs)."""
        with self._lock:
            self._listeners.append(fn)

    def history(self, vm_id: str = "", after_seq: int = 0) -> list[Event]:
        """Buffered events, oldest first."""
        with self._lock:
            return [e for e in self._history if e.seq > after_seq and (not vm_id or e.vm_id == vm_id)]

    async def subscribe(
        self, vm_id: str = "", after_seq: int = 0, follow: bool = True
    ) -> AsyncIterator[Event]:
        """Replay buffered events after ``after_seq``, then (with ``follow``) yield new ones forever."""
        sub = _Subscriber(asyncio.get_running_loop(), vm_id, 10_000)
        with self._lock:
            backlog = [e for e in self._history if e.seq > after_seq and (not vm_id or e.vm_id == vm_id)]
            if follow:
                self._subs.append(sub)
        try:
            last = after_seq
            for e in backlog:
                last = e.seq
                yield e
            if not follow:
                return
            while True:
                ev = await sub.queue.get()
                if ev is None:
                    return
                if ev.seq > last:
                    last = ev.seq
                    yield ev
        finally:
            with self._lock:
                if sub in self._subs:
                    self._subs.remove(sub)

    def close(self) -> None:
        """End every follower's stream."""
        with self._lock:
            subs, self._subs = self._subs, []
        for s in subs:
            with contextlib.suppress(RuntimeError):
                s.loop.call_soon_threadsafe(s.queue.put_nowait, None)
