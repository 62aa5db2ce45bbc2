"""The Prometheus endpoint of a tiermem process.

One registry strategy: each service instance (an agent, a control plane) keeps
its series on its own registry from :func:`service_registry`, which also carries
the process and Python runtime collectors, so several instances can share a
process (tests, the demo). :func:`start_metrics` serves one registry on
``metrics_listen``. The series are listed in docs/metrics.md.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from tiermem.config import TlsSettings
from tiermem.errors import ConfigurationError

__all__ = ["metrics_port", "service_registry", "start_metrics", "stop_metrics"]

_lock = threading.Lock()
_server: Any = None
_thread: threading.Thread | None = None
_listen = ""


def _split(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigurationError(f"metrics_listen {listen!r} is not host:port")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def service_registry() -> CollectorRegistry:
    """A new registry for one service instance, with the process, platform and GC collectors."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def start_metrics(listen: str, registry: CollectorRegistry, tls: TlsSettings | None = None) -> int:
    """Serve ``/metrics`` on ``listen`` (host:port; port 0 picks one) and return the bound port.

    Idempotent for the same ``listen``; a second, different address is an error.
    With ``tls.cert_file`` the endpoint speaks HTTPS, and with
    ``tls.require_client_cert`` it demands client certificates signed by ``tls.ca_file``.
    """
    global _server, _thread, _listen
    with _lock:
        if _server is not None:
            if listen != _listen:
                raise ConfigurationError(f"metrics already served on {_listen}, not {listen}")
            return int(_server.server_port)
        host, port = _split(listen)
        kw: dict[str, Any] = {}
        if tls is not None and tls.cert_file:
            if not tls.key_file:
                raise ConfigurationError("metrics TLS needs tls.key_file with tls.cert_file")
            kw = {"certfile": tls.cert_file, "keyfile": tls.key_file}
            if tls.ca_file:
                kw["client_cafile"] = tls.ca_file
            kw["client_auth_required"] = tls.require_client_cert
        try:
            _server, _thread = start_http_server(port, host, registry, **kw)
        except OSError as e:
            raise ConfigurationError(f"cannot serve metrics on {listen}: {e.strerror or e}") from None
        _listen = listen
        return int(_server.server_port)


def metrics_port() -> int | None:
    """The port of the running endpoint, or None."""
    return int(_server.server_port) if _server is not None else None


def stop_metrics() -> None:
    """Stop the endpoint (tests, shutdown)."""
    global _server, _thread, _listen
    with _lock:
        if _server is not None:
            _server.shutdown()
            _server.server_close()
            if _thread is not None:
                _thread.join(5)
        _server, _thread, _listen = None, None, ""
