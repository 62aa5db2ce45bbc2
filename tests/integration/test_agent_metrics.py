"""The agent's Prometheus endpoint serves the documented series after a cycle and a fault."""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

from tests.helpers.servers import free_port
from tiermem.agent.server import serve_agent
from tiermem.config import AgentSettings
from tiermem.model import CycleMode, EvictionPolicy
from tiermem.sim.kernel import SimKernel

DOCUMENTED = [
    "tiermem_agent_vm_resident_pages",
    "tiermem_agent_vm_evicted_pages",
    "tiermem_agent_vm_working_set_pages",
    "tiermem_agent_faults_total",
    "tiermem_agent_fault_seconds_bucket",
    "tiermem_agent_fault_stage_seconds_bucket",
    "tiermem_agent_cycle_phase_seconds_bucket",
    "tiermem_agent_cycles_total",
    "tiermem_agent_pages_evicted_total",
    "tiermem_agent_pages_restored_total",
    "tiermem_agent_store_bytes_written_total",
]


async def test_metrics_after_a_cycle_and_a_fault(tmp_path: Path) -> None:
    port = free_port()
    running = await serve_agent(
        AgentSettings(
            node_id="m1",
            listen="127.0.0.1:0",
            data_dir=str(tmp_path),
            autonomous=False,
            metrics_listen=f"127.0.0.1:{port}",
        )
    )
    try:
        a = running.agent
        a.attach_sim("vm1", 64 * 4096, EvictionPolicy(cold_after=1))
        sim = a.sessions["vm1"].backend
        assert isinstance(sim, SimKernel)
        for p in range(64):
            sim.access(p, write=True)
        rep = a.run_cycle("vm1", CycleMode.EVICT, interval_ms=10)
        assert rep.pages_evicted == 64
        t = threading.Thread(target=sim.access, args=(5,))
        t.start()
        t.join(10)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        for name in DOCUMENTED:
            assert name in body, name
        assert 'tiermem_agent_vm_evicted_pages{vm="vm1"}' in body
        assert 'tiermem_agent_faults_total{kind="missing",vm="vm1"} 1.0' in body
        a.detach("vm1", purge=True)  # a detached VM's series go away (no label-set growth with VM churn)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'vm="vm1"' not in body
        doc = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
        for name in DOCUMENTED:
            assert name.removesuffix("_bucket") in doc, f"{name} missing from docs/metrics.md"
    finally:
        await running.stop()
