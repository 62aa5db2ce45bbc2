"""A TCP fault proxy for tests: put it between a client and Redis or S3, then switch faults on and off.

``tc netem`` is not available in this kernel, so faults are injected in user
space, on loopback, by a threaded proxy (one accept thread, two pump threads per
connection). Faults, switchable at runtime from the test:

* ``latency(s)``: every chunk is delayed by ``s`` seconds in each direction;
* ``reset()``: every open connection is closed with a TCP RST (SO_LINGER 0);
  ``reset_new(True)`` also resets each new connection right after accepting it;
* ``blackhole(True)``: connections are accepted and bytes are read, but nothing
  is forwarded in either direction (a silent network partition);
* ``refuse()``: the listening socket is closed, so new connections get
  ECONNREFUSED (open ones are reset); ``accept()`` listens again on the same port;
* ``truncate(n)``: each connection is closed after ``n`` bytes from upstream
  (responses cut short mid-message).

``clear()`` switches everything off. Counters (connections, bytes, resets) let a
test check that a fault was actually exercised.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

__all__ = ["ProxyStats", "ToxicProxy"]

_CHUNK = 65536
_POLL_S = 0.05


@dataclass
class ProxyStats:
    """What went through the proxy (for assertions that a fault was exercised)."""

    connections: int = 0
    refused_or_reset: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    dropped_bytes: int = 0
    truncated: int = 0


class _Conn:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self.down_budget: int | None = None
        self.lock = threading.Lock()

    def close(self, rst: bool = False) -> None:
        with self.lock:
            if self.closed.is_set():
                return
            self.closed.set()
            for s in (self.client, self.upstream):
                if rst:
                    with contextlib.suppress(OSError):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                with contextlib.suppress(OSError):
                    s.close()


class ToxicProxy:
    """A switchable TCP proxy from ``127.0.0.1:<port>`` to ``upstream``."""

    def __init__(self, upstream_host: str, upstream_port: int, listen_port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = listen_port
        self.stats = ProxyStats()
        self._latency = 0.0
        self._blackhole = False
        self._reset_new = False
        self._truncate: int | None = None
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # --- lifecycle ----------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> ToxicProxy:
        """Listen (on a free port the first time, then on the same port) and start accepting."""
        self._stopping.clear()
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(128)
        self.port = lst.getsockname()[1]
        self._listener = lst
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(lst,), name="toxic-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close every connection."""
        self._close_listener()
        for c in self._snapshot():
            c.close()

    def __enter__(self) -> ToxicProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults -------------------------------------------------------------------------------------
    def latency(self, seconds: float) -> None:
        """Delay every forwarded chunk by ``seconds`` (0 switches it off)."""
        self._latency = max(0.0, seconds)

    def blackhole(self, on: bool = True) -> None:
        """Swallow all bytes in both directions (open and new connections) while ``on``."""
        self._blackhole = on

    def reset(self) -> int:
        """RST every open connection now; returns how many."""
        conns = self._snapshot()
        for c in conns:
            c.close(rst=True)
        with self._lock:
            self.stats.refused_or_reset += len(conns)
        return len(conns)

    def reset_new(self, on: bool = True) -> None:
        """While ``on``, each new connection is reset right after it is accepted."""
        self._reset_new = on

    def truncate(self, n_bytes: int | None) -> None:
        """Close each connection (existing and new) after ``n_bytes`` more bytes from upstream; None: off."""
        self._truncate = n_bytes
        for c in self._snapshot():
            c.down_budget = n_bytes

    def refuse(self) -> None:
        """Stop listening (new connections are refused) and reset the open ones."""
        self._close_listener()
        self.reset()

    def accept(self) -> None:
        """Listen again on the same port after :meth:`refuse`."""
        if self._listener is None:
            deadline = time.monotonic() + 5
            while True:
                try:
                    self.start()
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

    def clear(self) -> None:
        """Switch every fault off (a refused proxy listens again)."""
        self._latency = 0.0
        self._blackhole = False
        self._reset_new = False
        self.truncate(None)
        self.accept()

    @property
    def open_connections(self) -> int:
        """Connections currently proxied."""
        return len(self._snapshot())

    # --- internals ----------------------------------------------------------------------------------
    def _snapshot(self) -> list[_Conn]:
        with self._lock:
            self._conns = {c for c in self._conns if not c.closed.is_set()}
            return list(self._conns)

    def _close_listener(self) -> None:
        self._stopping.set()
        lst, self._listener = self._listener, None
        if lst is not None:
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)
            lst.close()
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout=5)
        self._accept_thread = None

    def _accept_loop(self, lst: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                r, _, _ = select.select([lst], [], [], _POLL_S)
                if not r:
                    continue
                client, _ = lst.accept()
            except (OSError, ValueError):
                return
            with self._lock:
                self.stats.connections += 1
            if self._reset_new:
                with self._lock:
                    self.stats.refused_or_reset += 1
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                # the upstream is down: the client sees its connection reset, as through a real hop
                with contextlib.suppress(OSError):
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                with self._lock:
                    self.stats.refused_or_reset += 1
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(client, upstream)
            conn.down_budget = self._truncate
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._pump, args=(conn, True), name="toxic-up", daemon=True).start()
            threading.Thread(target=self._pump, args=(conn, False), name="toxic-down", daemon=True).start()

    def _pump(self, conn: _Conn, up: bool) -> None:
        src, dst = (conn.client, conn.upstream) if up else (conn.upstream, conn.client)
        try:
            while not conn.closed.is_set():
                try:
                    r, _, _ = select.select([src], [], [], _POLL_S)
                except (OSError, ValueError):
                    break
                if not r:
                    continue
                try:
                    data = src.recv(_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                if self._blackhole:
                    with self._lock:
                        self.stats.dropped_bytes += len(data)
                    continue
                if self._latency:
                    time.sleep(self._latency)
                cut = False
                if not up and conn.down_budget is not None:
                    if len(data) >= conn.down_budget:
                        data, cut = data[: conn.down_budget], True
                    conn.down_budget -= len(data)
                with self._lock:  # counted before the send, so a client that got them sees them counted
                    if up:
                        self.stats.bytes_up += len(data)
                    else:
                        self.stats.bytes_down += len(data)
                    if cut:
                        self.stats.truncated += 1
                try:
                    if data:
                        dst.sendall(data)
                except OSError:
                    break
                if cut:
                    break
        finally:
            conn.close()
