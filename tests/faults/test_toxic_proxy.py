"""The fault proxy itself: each fault does what it says, against an echo server and a real Redis."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.faults.toxic_proxy import ToxicProxy
from tests.helpers.servers import RedisServer


class Echo:
    """A TCP echo server that can also send a fixed reply of N bytes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        with c, contextlib.suppress(OSError):
            while data := c.recv(65536):
                if data.startswith(b"BIG"):
                    c.sendall(b"x" * 100_000)
                else:
                    c.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    yield e
    e.close()


@pytest.fixture
def proxy(echo: Echo) -> Iterator[ToxicProxy]:
    p = ToxicProxy("127.0.0.1", echo.port).start()
    yield p
    p.stop()


def client(p: ToxicProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", p.port), timeout=timeout)


def roundtrip(s: socket.socket, data: bytes = b"ping") -> bytes:
    s.sendall(data)
    return s.recv(65536)


def test_passes_bytes_through_and_counts_them(proxy: ToxicProxy) -> None:
    with client(proxy) as s:
        assert roundtrip(s) == b"ping"
    assert proxy.stats.connections == 1
    assert proxy.stats.bytes_up == 4 and proxy.stats.bytes_down == 4


def test_latency_delays_each_direction(proxy: ToxicProxy) -> None:
    proxy.latency(0.2)
    with client(proxy) as s:
        t = time.monotonic()
        assert roundtrip(s) == b"ping"
        assert time.monotonic() - t >= 0.4  # 0.2 s up, 0.2 s down
    proxy.latency(10)
    proxy.latency(0)  # cleared: at 10 s each way the round trip would outlast the 5 s socket timeout
    with client(proxy, timeout=5.0) as s:
        assert roundtrip(s) == b"ping"


def test_blackhole_swallows_bytes_until_cleared(proxy: ToxicProxy) -> None:
    with client(proxy, timeout=0.5) as s:
        assert roundtrip(s) == b"ping"
        proxy.blackhole(True)
        s.sendall(b"lost")
        with pytest.raises(TimeoutError):
            s.recv(10)
        assert proxy.stats.dropped_bytes >= 4
    proxy.blackhole(False)
    with client(proxy) as s:
        assert roundtrip(s) == b"ping"


def test_reset_sends_rst_to_open_connections(proxy: ToxicProxy) -> None:
    s = client(proxy)
    assert roundtrip(s) == b"ping"
    assert proxy.reset() == 1
    with pytest.raises(ConnectionResetError):
        for _ in range(10):  # the RST may arrive after the first send
            s.sendall(b"ping")
            if not s.recv(10):
                raise ConnectionResetError("closed")
            time.sleep(0.05)
    s.close()
    proxy.reset_new(True)
    with (
        pytest.raises((ConnectionResetError, ConnectionAbortedError, BrokenPipeError, OSError)),
        client(proxy) as s2,
    ):
        s2.sendall(b"ping")
        if not s2.recv(10):
            raise ConnectionResetError("closed")


def test_refuse_closes_the_port_and_accept_reopens_it(proxy: ToxicProxy) -> None:
    port = proxy.port
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        client(proxy)
    proxy.accept()
    assert proxy.port == port
    with client(proxy) as s:
        assert roundtrip(s) == b"ping"


def test_truncate_cuts_responses_after_n_bytes(proxy: ToxicProxy) -> None:
    proxy.truncate(1000)
    with client(proxy) as s:
        s.sendall(b"BIG")
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        assert len(got) == 1000
    assert proxy.stats.truncated == 1
    proxy.clear()
    with client(proxy) as s:
        s.sendall(b"BIG")
        got = b""
        while len(got) < 100_000 and (chunk := s.recv(65536)):
            got += chunk
        assert len(got) == 100_000


@pytest.mark.redis
def test_redis_client_sees_each_fault(redis_own: RedisServer, redis_proxy: ToxicProxy) -> None:
    r = redis.Redis(
        host="127.0.0.1",
        port=redis_proxy.port,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )  # one try: each fault surfaces at once
    assert r.ping()
    redis_proxy.blackhole(True)
    with pytest.raises(redis.exceptions.TimeoutError):
        r.ping()
    redis_proxy.blackhole(False)
    redis_proxy.refuse()
    with pytest.raises(redis.exceptions.ConnectionError):
        r.ping()
    redis_proxy.clear()
    r.set("k", b"v" * 50_000)
    redis_proxy.truncate(100)
    with pytest.raises((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        r.get("k")
    redis_proxy.clear()
    assert r.get("k") == b"v" * 50_000
    r.close()
