"""``tiermem events``: the control plane's event stream (cycles, policy changes, node leases, errors)."""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator

import click

from tiermem.cli.options import complete_vm_ids, connection_options, get_client, json_option
from tiermem.cli.output import emit_json_line, fmt_time
from tiermem.cli.vm import check_id
from tiermem.errors import Unavailable
from tiermem.model import Event, EventKind

__all__ = ["events", "format_event", "resuming"]

RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0

_ERROR_KINDS = {
    EventKind.CYCLE_FAILED,
    EventKind.STORE_ERROR,
    EventKind.INTEGRITY_ERROR,
    EventKind.NODE_DOWN,
    EventKind.EVICTION_STOPPED,
    EventKind.VMM_DISCONNECTED,
}


def format_event(e: Event) -> str:
    """One line: time, kind, VM/node, message and attributes."""
    where = " ".join(
        x for x in (f"vm={e.vm_id}" if e.vm_id else "", f"node={e.node_id}" if e.node_id else "") if x
    )
    attrs = " ".join(f"{k}={v}" for k, v in sorted(e.attributes.items()))
    parts = [fmt_time(e.time_unix_ms), f"#{e.seq}", e.kind.value, where, e.message, attrs]
    return "  ".join(p for p in parts if p)


@click.command()
@click.option(
    "--vm", "vm_id", metavar="VM", shell_complete=complete_vm_ids, help="Only events about this VM."
)
@click.option("--follow", "-f", is_flag=True, help="Keep streaming new events (Ctrl-C stops).")
@click.option(
    "--after",
    "after_seq",
    type=click.IntRange(0),
    default=0,
    metavar="SEQ",
    help="Only events after this sequence number.",
)
@json_option
@connection_options
@click.pass_context
def events(ctx: click.Context, vm_id: str | None, follow: bool, after_seq: int, as_json: bool) -> None:
    """Print the buffered events, then (with --follow) new ones as they happen.

    JSON: one Event object per line (kind, message, vm_id, node_id, seq, time_unix_ms, attributes).
    """
    if vm_id:
        check_id(vm_id, "VM id", "--vm")
    client = get_client(ctx)

    def show(e: Event) -> None:
        if as_json:
            emit_json_line(e)
        else:
            click.secho(format_event(e), fg="red" if e.kind in _ERROR_KINDS else None)

    if not follow:
        for e in client.stream_events(vm_id or "", after_seq, False):
            show(e)
        return
    _follow(resuming(lambda seq: client.stream_events(vm_id or "", seq, True), after_seq), show)


def resuming(
    open_stream: Callable[[int], Iterator[Event]], after_seq: int, sleep: Callable[[float], None] = time.sleep
) -> Iterator[Event]:
    """Events of ``open_stream(after_seq)``, reopened after the last seq seen when the server is unavailable.

    A restarting control plane, a leader change or a dropped connection is UNAVAILABLE: the follow
    waits (0.5 s doubling to 10 s, reset by any event) and resumes after the last event it printed,
    so nothing is shown twice and nothing buffered is lost. Any other error ends the follow.
    """
    seq, delay = after_seq, RETRY_FIRST_S
    while True:
        try:
            for e in open_stream(seq):
                seq, delay = max(seq, e.seq), RETRY_FIRST_S
                yield e
            return
        except Unavailable:
            sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)


_END = object()


def _follow(stream: Iterator[Event], show: Callable[[Event], None]) -> None:
    """Print ``stream`` until it ends or Ctrl-C; Ctrl-C is how ``--follow`` ends, not an error.

    The stream is read on a helper thread and Ctrl-C only sets a flag: a KeyboardInterrupt raised
    inside gRPC's blocking iterator can land while it holds its call's lock, and cancelling the call
    then hangs. Returning closes the client (the command's context does), which cancels the call.
    """
    items: queue.Queue[object] = queue.Queue()

    def pump() -> None:
        try:
            for e in stream:
                items.put(e)
        except BaseException as exc:  # handed to the main thread, which raises it
            items.put(exc)
            return
        items.put(_END)

    stop = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, lambda *_: stop.set()) if main else None
    threading.Thread(target=pump, name="events-stream", daemon=True).start()
    try:
        while not stop.is_set():
            try:
                item = items.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            show(item)  # type: ignore[arg-type]
    finally:
        if main:
            signal.signal(signal.SIGINT, old)
