"""The agent's own registry carries the process series; the metrics endpoint's TLS is its own setting."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tiermem.config import AgentSettings, ControlPlaneSettings, TlsSettings
from tiermem.metrics import service_registry, start_metrics, stop_metrics


def test_process_series_on_a_private_registry() -> None:
    assert b"process_resident_memory_bytes" not in generate_latest(CollectorRegistry())
    text = generate_latest(service_registry()).decode()
    for name in (
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "python_info",
        "python_gc_objects_collected_total",
    ):
        assert name in text, name


def test_metrics_tls_is_separate_from_the_grpc_tls() -> None:
    tls = TlsSettings(cert_file="/etc/tiermem/tls/tls.crt", key_file="/etc/tiermem/tls/tls.key")
    for cls in (AgentSettings, ControlPlaneSettings):
        s = cls(tls=tls)
        assert s.tls.cert_file and not s.metrics_tls.cert_file  # gRPC over TLS, metrics plain by default


def test_plain_http_scrape() -> None:
    port = start_metrics("127.0.0.1:0", service_registry(), TlsSettings())
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert b"process_resident_memory_bytes" in r.read()
    finally:
        stop_metrics()


@pytest.mark.parametrize("kind", ["agent", "controlplane"])
def test_busy_metrics_port_is_one_line_error(kind: str, tmp_path: Path) -> None:
    """The gRPC server already runs when the metrics port turns out busy: it is stopped cleanly."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        extra = (
            ["--data-dir", str(tmp_path)] if kind == "agent" else ["--state", f"sqlite:///{tmp_path}/cp.db"]
        )
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "tiermem",
                "serve",
                kind,
                "--listen",
                "127.0.0.1:0",
                "--metrics",
                f"127.0.0.1:{port}",
                "--log-level",
                "warning",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"tiermem: error: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    ]
