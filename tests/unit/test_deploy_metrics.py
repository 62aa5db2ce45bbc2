"""docs/metrics.md against the series the code registers, and the shared metrics endpoint."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from tiermem.agent import metrics as agent_metrics
from tiermem.control import metrics as control_metrics
from tiermem.errors import ConfigurationError
from tiermem.metrics import metrics_port, start_metrics, stop_metrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def _documented() -> set[str]:
    return set(re.findall(r"^\| `(tiermem_[a-z0-9_]+)` \|", DOC.read_text(), re.M))


def _families(registry: CollectorRegistry) -> set[str]:
    names = set()
    for fam in registry.collect():
        if fam.name.startswith("tiermem_"):
            names.add(fam.name + "_total" if fam.type == "counter" else fam.name)
    return names


def _agent_series() -> set[str]:
    m = agent_metrics.AgentMetrics(CollectorRegistry())
    m.watch_vms(lambda: [("acme.vm-1", 10, 5, 3)])
    return _families(m.registry)


def _control_series() -> set[str]:
    return _families(control_metrics.ControlPlaneMetrics(CollectorRegistry()).registry)


def test_every_agent_series_is_documented_and_nothing_more() -> None:
    code = _agent_series()
    doc = {n for n in _documented() if n.startswith("tiermem_agent_")}
    assert code == doc, f"code only: {sorted(code - doc)}; doc only: {sorted(doc - code)}"


def test_every_control_plane_series_is_documented_and_nothing_more() -> None:
    code = _control_series()
    doc = {n for n in _documented() if n.startswith("tiermem_cp_")}
    assert code == doc, f"code only: {sorted(code - doc)}; doc only: {sorted(doc - code)}"


@pytest.fixture
def endpoint() -> Iterator[None]:
    stop_metrics()
    yield
    stop_metrics()


def test_start_metrics_serves_the_registry(endpoint: None) -> None:
    reg = CollectorRegistry()
    Counter("tiermem_test_things_total", "Things.", registry=reg).inc(3)
    port = start_metrics("127.0.0.1:0", registry=reg)
    assert metrics_port() == port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body = r.read().decode()
    assert "tiermem_test_things_total 3.0" in body
    assert start_metrics("127.0.0.1:0", registry=reg) == port  # idempotent for the same address
    with pytest.raises(ConfigurationError, match="already served"):
        start_metrics("127.0.0.1:1", registry=reg)
    stop_metrics()
    assert metrics_port() is None


@pytest.mark.parametrize("bad", ["", "9100", "host:port", "127.0.0.1:99999"])
def test_bad_listen_addresses_are_configuration_errors(bad: str, endpoint: None) -> None:
    with pytest.raises(ConfigurationError):
        start_metrics(bad, registry=CollectorRegistry())


def test_a_busy_port_is_a_configuration_error(endpoint: None) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigurationError, match="cannot serve metrics"):
            start_metrics(f"127.0.0.1:{s.getsockname()[1]}", registry=CollectorRegistry())


def test_a_service_registry_carries_the_runtime_series_and_instances_do_not_collide() -> None:
    a = agent_metrics.AgentMetrics()
    b = agent_metrics.AgentMetrics()
    cp = control_metrics.ControlPlaneMetrics()
    for reg in (a.registry, b.registry, cp.registry):
        names = {fam.name for fam in reg.collect()}
        assert "process_cpu_seconds" in names and "python_info" in names
    a.faults.labels("vm", "missing").inc()
    assert b.registry.get_sample_value("tiermem_agent_faults_total", {"vm": "vm", "kind": "missing"}) is None


def test_control_plane_label_values_come_from_enums() -> None:
    cp = control_metrics.ControlPlaneMetrics(CollectorRegistry())
    cp.failure(control_metrics.FailureReason.AGENT_ERROR)
    cp.order(control_metrics.OrderResult.SKIPPED, 3)
    cp.slo_adjustment(control_metrics.SloDirection.TIGHTEN)
    get = cp.registry.get_sample_value
    assert get("tiermem_cp_cycle_orders_total", {"result": "error"}) == 1
    assert get("tiermem_cp_order_failures_total", {"reason": "agent_error"}) == 1
    assert get("tiermem_cp_cycle_orders_total", {"result": "skipped"}) == 3
    assert get("tiermem_cp_slo_adjustments_total", {"direction": "tighten"}) == 1
