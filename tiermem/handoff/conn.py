"""The agent's end of one VMM's handoff control channel (see :mod:`tiermem.handoff.listener`).

Requests (``zap``, ``ping``) carry an id; the VMM answers ``ack``/``nack``/``pong``
with the same id. The connection's thread (the listener's) reads the answers and
wakes the waiters; when the VMM goes away every waiter gets Unavailable and the
close callbacks run once.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from tiermem import errors
from tiermem.handoff.messages import (
    AgentNotice,
    AgentRequest,
    DetachNotice,
    ErrorNotice,
    Goodbye,
    PingRequest,
    Reply,
    VmmError,
    ZapRequest,
    parse_vmm_message,
)
from tiermem.handoff.wire import FrameReader, ProtocolError, encode_frame

__all__ = ["HandoffConnection"]

log = structlog.get_logger(__name__)

_ZAP_RANGES_PER_MSG = 1000
"""Ranges per zap message, so a zap of a fragmented range stays under the frame limit."""


class _Reply:
    """A request waiting for its answer (implements kernel.uffd_base.PendingReply)."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: errors.TiermemError | None = None

    def set(self, error: errors.TiermemError | None = None) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()

    def wait(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def result(self) -> None:
        if not self._done.is_set():
            raise errors.Unavailable("no answer from the VMM yet")
        if self._error is not None:
            raise self._error


class _AllReplies:
    def __init__(self, parts: list[_Reply]) -> None:
        self.parts = parts

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(p.wait(max(deadline - time.monotonic(), 0.0)) for p in self.parts)

    def result(self) -> None:
        for p in self.parts:
            p.result()


def _zap_request(ranges: list[list[int]]) -> Callable[[int], AgentRequest]:
    return lambda rid: ZapRequest(type="zap", id=rid, ranges=ranges)


class HandoffConnection:
    """The agent's end of one VMM's control channel."""

    def __init__(
        self, sock: socket.socket, *, vm_id: str, peer_pid: int, firecracker: bool, pending: bytes = b""
    ) -> None:
        self.vm_id = vm_id
        self.peer_pid = peer_pid
        self.firecracker = firecracker
        """Firecracker's handshake: the VMM never reads this socket (no zap, no detach)."""
        self._sock = sock
        self._reader = FrameReader(sock, pending)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._next_id = 1
        self._waiters: dict[int, tuple[_Reply, float]] = {}
        self._closed = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._on_close: Callable[[], None] | None = None

    # --- requests -------------------------------------------------------------------------------
    def _request(self, make: Callable[[int], AgentRequest]) -> _Reply:
        """Send the request ``make(id)`` and return the reply it will get."""
        reply = _Reply()
        if self.firecracker:
            reply.set(errors.FailedPrecondition("Firecracker's handshake has no control channel"))
            return reply
        with self._lock:
            if self._closed.is_set():
                reply.set(errors.Unavailable(f"VMM of {self.vm_id} is gone"))
                return reply
            rid = self._next_id
            self._next_id += 1
            self._waiters[rid] = (reply, time.monotonic())
        try:
            self._send(make(rid))
        except OSError as e:
            with self._lock:
                self._waiters.pop(rid, None)
            reply.set(errors.Unavailable(f"VMM of {self.vm_id} is gone: {e}"))
            self._shutdown()
        return reply

    def _send(self, msg: AgentRequest | AgentNotice) -> None:
        with self._send_lock:
            self._sock.sendall(encode_frame(msg))

    def zap_start(self, ranges: Sequence[tuple[int, int]]) -> _AllReplies:
        """Ask the VMM to zap the guest PTEs of ``[(start, length)]``; answer when all are done."""
        parts = [
            self._request(_zap_request([[int(s), int(n)] for s, n in ranges[i : i + _ZAP_RANGES_PER_MSG]]))
            for i in range(0, max(len(ranges), 1), _ZAP_RANGES_PER_MSG)
        ]
        return _AllReplies(parts)

    def zap(self, ranges: Sequence[tuple[int, int]], timeout: float) -> None:
        """Zap and wait for the ack; Unavailable if the VMM is gone or silent, KernelError on nack."""
        r = self.zap_start(ranges)
        if not r.wait(timeout):
            raise errors.Unavailable(f"VMM of {self.vm_id} did not ack a zap within {timeout}s")
        r.result()

    def ping(self, timeout: float = 5.0) -> float:
        """Round trip to the VMM in seconds; Unavailable if it does not answer."""
        t0 = time.perf_counter()
        r = self._request(lambda rid: PingRequest(type="ping", id=rid))
        if not r.wait(timeout):
            raise errors.Unavailable(f"VMM of {self.vm_id} did not answer a ping within {timeout}s")
        r.result()
        return time.perf_counter() - t0

    def send_detach(self) -> None:
        """Tell the VMM the agent is done with it: it unregisters its guest memory and stops reconnecting."""
        if self.firecracker or self._closed.is_set():
            return
        with contextlib.suppress(OSError):
            self._send(DetachNotice(type="detach"))

    # --- lifecycle ------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True once the connection is closed (by either side)."""
        return self._closed.is_set()

    @property
    def on_close(self) -> Callable[[], None] | None:
        """Callback run once when the connection closes (set after close: runs at once)."""
        return self._on_close

    @on_close.setter
    def on_close(self, cb: Callable[[], None] | None) -> None:
        self._on_close = cb
        if cb is not None and self._closed.is_set():
            cb()

    def add_close_callback(self, cb: Callable[[], None]) -> None:
        """Run ``cb`` once when the connection closes (immediately if it already has)."""
        with self._lock:
            if not self._closed.is_set():
                self._callbacks.append(cb)
                return
        cb()

    def close(self) -> None:
        """Close the socket; the VMM sees EOF (and reconnects if it wants to)."""
        self._shutdown()

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def serve(self) -> None:
        """Read the VMM's messages until EOF (runs on the listener's connection thread)."""
        try:
            if self.firecracker:  # Firecracker sends nothing after its handshake: wait for EOF, ignore data
                while self._sock.recv(4096):
                    pass
                return
            while True:
                msg = self._reader.read()
                if msg is None:
                    break
                self._dispatch(msg)
        except ProtocolError as e:
            log.warning("handoff: protocol error from the VMM, closing", vm=self.vm_id, error=str(e))
            with contextlib.suppress(OSError):
                self._send(ErrorNotice(type="error", error=str(e), code=e.code))
        except OSError as e:
            log.info("handoff: connection error", vm=self.vm_id, error=str(e))
        finally:
            self._finish()

    def _dispatch(self, raw: dict[str, Any]) -> None:
        msg = parse_vmm_message(raw)
        if isinstance(msg, Reply):
            with self._lock:
                entry = self._waiters.pop(msg.request_id, None) if msg.request_id is not None else None
            if entry is None:
                log.warning(
                    "handoff: answer to an unknown request", vm=self.vm_id, request=repr(raw.get("id"))
                )
                return
            if msg.kind == "nack":
                entry[0].set(errors.KernelError(f"VMM: {msg.error}", msg.errno))
            else:
                entry[0].set()
        elif isinstance(msg, Goodbye):
            log.info("handoff: VMM says goodbye", vm=self.vm_id)
            self._shutdown()
        elif isinstance(msg, VmmError):
            log.warning("handoff: VMM reports an error", vm=self.vm_id, error=msg.error)
        else:
            log.warning("handoff: ignoring an unknown message type", vm=self.vm_id, type=msg.type)

    def _finish(self) -> None:
        with self._lock:
            self._closed.set()
            waiters, self._waiters = self._waiters, {}
            callbacks, self._callbacks = self._callbacks, []
        for reply, _ in waiters.values():
            reply.set(errors.Unavailable(f"VMM of {self.vm_id} went away"))
        with contextlib.suppress(OSError):
            self._sock.close()
        for cb in [*callbacks, *([self._on_close] if self._on_close else [])]:
            try:
                cb()
            except Exception:
                log.exception("handoff: close callback failed", vm=self.vm_id)
