"""The agent's own registry carries the process series; the metrics endpoint's TLS is its own setting."""

from __future__ import annotations

import urllib.request

from prometheus_client import CollectorRegistry, generate_latest

from tiermem.config import AgentSettings, ControlPlaneSettings, TlsSettings
from tiermem.metrics import add_process_collectors, start_metrics, stop_metrics


def test_process_series_on_a_private_registry() -> None:
    reg = CollectorRegistry()
    assert b"process_resident_memory_bytes" not in generate_latest(reg)
    add_process_collectors(reg)
    text = generate_latest(reg).decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 "python_info", "python_gc_objects_collected_total"):  # fmt: skip
        assert name in text, name


def test_metrics_tls_is_separate_from_the_grpc_tls() -> None:
    tls = TlsSettings(cert_file="/etc/tiermem/tls/tls.crt", key_file="/etc/tiermem/tls/tls.key")
    for cls in (AgentSettings, ControlPlaneSettings):
        s = cls(tls=tls)
        assert s.tls.cert_file and not s.metrics_tls.cert_file  # gRPC over TLS, metrics plain by default


def test_plain_http_scrape() -> None:
    reg = CollectorRegistry()
    add_process_collectors(reg)
    port = start_metrics("127.0.0.1:0", TlsSettings(), reg)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert b"process_resident_memory_bytes" in r.read()
    finally:
        stop_metrics()
