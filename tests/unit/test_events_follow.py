"""``tiermem events --follow`` resumes after the last event it printed when the server is unavailable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tiermem.cli.events import RETRY_MAX_S, resuming
from tiermem.control.clock import ManualClock
from tiermem.control.events import EventLog
from tiermem.control.state_open import open_state
from tiermem.errors import FailedPrecondition, Unavailable
from tiermem.events import log_level
from tiermem.model import Event, EventKind


def _ev(seq: int) -> Event:
    return Event(kind=EventKind.CYCLE_COMPLETED, message=f"e{seq}", vm_id="vm", seq=seq)


def test_resumes_after_last_seq_without_duplicates() -> None:
    opened: list[int] = []
    sleeps: list[float] = []
    # a drop mid-stream, then one while reconnecting
    script: list[list[int | str]] = [[1, 2, "drop"], ["drop"], [3, 4]]

    def open_stream(after: int) -> Iterator[Event]:
        opened.append(after)
        for item in script[len(opened) - 1]:
            if item == "drop":
                raise Unavailable("connection reset")
            assert isinstance(item, int) and item > after
            yield _ev(item)

    got = [e.seq for e in resuming(open_stream, 0, sleep=sleeps.append)]
    assert got == [1, 2, 3, 4]
    assert opened == [0, 2, 2]
    assert sleeps == [0.5, 1.0]


def test_backoff_is_capped_and_reset_by_events() -> None:
    sleeps: list[float] = []
    calls = {"n": 0}

    def open_stream(after: int) -> Iterator[Event]:
        calls["n"] += 1
        if calls["n"] < 8:
            raise Unavailable("down")
        yield _ev(after + 1)

    assert [e.seq for e in resuming(open_stream, 41, sleep=sleeps.append)] == [42]
    assert sleeps[-1] == RETRY_MAX_S and max(sleeps) == RETRY_MAX_S and sleeps[0] == 0.5


def test_other_errors_end_the_follow() -> None:
    def open_stream(after: int) -> Iterator[Event]:
        raise FailedPrecondition("bad")
        yield _ev(1)  # pragma: no cover

    with pytest.raises(FailedPrecondition):
        list(resuming(open_stream, 0, sleep=lambda s: None))


@pytest.mark.parametrize(
    ("kind", "level"),
    [
        (EventKind.CYCLE_FAILED, "warning"),
        (EventKind.NODE_DOWN, "warning"),
        (EventKind.STORE_ERROR, "error"),
        (EventKind.INTEGRITY_ERROR, "error"),
        (EventKind.POLICY_CHANGED, "info"),
        (EventKind.CYCLE_COMPLETED, "debug"),
    ],
)
async def test_control_plane_logs_failure_events_at_warning_or_error(
    kind: EventKind, level: str, tmp_path: Path
) -> None:
    assert log_level(kind) == level
    state = open_state(f"sqlite:///{tmp_path / 'cp.db'}", clock=ManualClock())
    await state.open()
    try:
        with capture_logs() as logs:
            await EventLog(state, ManualClock()).publish(kind, "something happened", vm_id="vm-1")
    finally:
        await state.close()
    assert [(e["event"], e["log_level"], e["kind"]) for e in logs] == [("event", level, kind.value)]
