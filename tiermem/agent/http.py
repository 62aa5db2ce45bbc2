"""The Prometheus endpoint of a service (one registry per service instance)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server

from tiermem.errors import ConfigurationError

__all__ = ["start_metrics_endpoint"]


def start_metrics_endpoint(listen: str, registry: CollectorRegistry) -> Callable[[], None]:
    """Serve ``registry`` at http://listen/metrics; returns a function that stops it."""
    host, _, port = listen.rpartition(":")
    try:
        server, thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    except (ValueError, OSError) as e:
        raise ConfigurationError(f"cannot serve metrics on {listen!r}: {e}") from None

    def stop() -> None:
        server.shutdown()
        thread.join(timeout=5)

    return stop
