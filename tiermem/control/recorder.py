"""Cycle reports and their events, written in groups.

At fleet scale reports arrive at the cycle rate (100/s for 1,000 VMs at 10 s),
in bursts when many VMs share an interval. Writing each one in its own
transaction would spend the event loop's time on commits just when it has
orders to dispatch; instead reports queue here and one writer stores each group
(reports, then their CYCLE_COMPLETED / CYCLE_FAILED events) in one operation
per kind. :meth:`Recorder.record` returns once its report is stored, so a
TriggerCycle caller finds the report in the history as soon as it has it.
"""

from __future__ import annotations

import asyncio

import structlog

from tiermem.control.events import EventLog
from tiermem.control.state import StateStore
from tiermem.errors import TiermemError
from tiermem.model import CycleReport, Event, EventKind

__all__ = ["Recorder"]

log = structlog.get_logger(__name__)


def _event(events: EventLog, r: CycleReport) -> Event:
    attrs = {"cycle": r.cycle, "mode": r.mode.value, "policy_version": r.policy_version}
    if r.error:
        return events.make(
            EventKind.CYCLE_FAILED,
            f"cycle of {r.vm_id} failed: {r.error}",
            vm_id=r.vm_id,
            node_id=r.node_id,
            **attrs,
        )
    return events.make(
        EventKind.CYCLE_COMPLETED,
        f"cycle {r.cycle} of {r.vm_id}: {r.pages_evicted} pages evicted, {r.pages_hot} hot, {r.pages_cold} cold",
        vm_id=r.vm_id,
        node_id=r.node_id,
        pages_evicted=r.pages_evicted,
        bytes_written=r.bytes_written,
        **attrs,
    )


class Recorder:
    """Group-commits cycle reports and their events."""

    def __init__(
        self, state: StateStore, events: EventLog, gather_s: float = 0.02, max_batch: int = 500
    ) -> None:
        self.state = state
        self.events = events
        self.gather_s = gather_s
        self.max_batch = max_batch
        self._queue: list[tuple[CycleReport, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Start the writer."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="report-recorder")

    async def stop(self) -> None:
        """Write what is queued, then stop."""
        if self._task is not None:
            # A flag as well as cancel(): a client library that turns a CancelledError into its own
            # error (then caught as a store failure) must not keep this loop alive.
            self._stopping = True
            self._wake.set()
            self._task.cancel()
            await asyncio.wait([self._task], timeout=5)
            self._task = None
        while self._queue:
            await self._flush()

    async def record(self, report: CycleReport, error: str = "") -> None:
        """Queue a report (``error`` marks a failed cycle) and wait until it is stored."""
        report.error = report.error or error
        if self._task is None:  # not started (tests, shutdown): write at once
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queue.append((report, fut))
            await self._flush()
            return await fut
        fut = asyncio.get_running_loop().create_future()
        self._queue.append((report, fut))
        self._wake.set()
        await fut

    async def _run(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            if len(self._queue) < self.max_batch:
                await asyncio.sleep(self.gather_s)  # let a burst of reports form one group
            while self._queue:
                await self._flush()

    async def _flush(self) -> None:
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        if not batch:
            return
        reports = [r for r, _ in batch]
        try:
            await self.state.add_reports(reports)
            await self.events.publish_many([_event(self.events, r) for r in reports])
        except TiermemError as e:
            log.warning("could not store cycle reports", count=len(reports), error=str(e))
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        for _, fut in batch:
            if not fut.done():
                fut.set_result(None)
