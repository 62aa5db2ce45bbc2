"""Run the demo: a control plane (SQLite), one agent (local directory store), contrasting VMs.

Everything runs in this process except process guests (``--backend uffd|rwp``),
which are real child processes handing their guest memory to the agent over
the handoff socket. The control plane's scheduler orders every cycle; the live
view reads VM status through the control plane, as an operator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from tiermem.agent.server import RunningAgent, serve_agent
from tiermem.api import PolicyScope, VmSpec
from tiermem.config import AgentSettings, ControlPlaneSettings
from tiermem.control.server import RunningControlPlane, serve_control_plane
from tiermem.demo.guests import DemoGuest, KvmGuestHandle, ProcessGuestHandle, SimGuestHandle
from tiermem.demo.plot import Series, write_plot
from tiermem.errors import FailedPrecondition, InvalidArgument
from tiermem.model import Backend, EvictionPolicy, VmStatus
from tiermem.rpc.clients import AsyncControlPlaneClient

__all__ = ["DEFAULT_WORKLOADS", "DemoConfig", "DemoSummary", "run_demo"]

log = structlog.get_logger(__name__)

MIB = 1024 * 1024
NODE = "demo-node"
DEFAULT_WORKLOADS: dict[str, str] = {
    "hotset": "hotset:0.1",
    "zipf": "zipf:1.2",
    "phases": "phases:0.1:period=150",
    "idle": "idle",
}


@dataclass
class DemoConfig:
    """Options of ``tiermem demo``."""

    duration_s: float = 30.0
    backend: str = "sim"
    memory_mib: int = 0
    """Per VM; 0 = 128 MiB on the sim, 64 MiB for process and KVM guests."""
    interval_ms: int = 1000
    cold_after: int = 2
    workdir: str = ""
    plot: str = ""
    keep: bool = False
    sample_s: float = 1.0


@dataclass
class DemoSummary:
    """The final summary (``--json``)."""

    vms: list[dict[str, object]] = field(default_factory=list)
    total_pages: int = 0
    evicted_pages: int = 0
    saved_fraction: float = 0.0
    faults_served: int = 0
    cycles: int = 0
    integrity_ok: bool = False
    pages_verified: int = 0
    mismatches: int = 0
    duration_s: float = 0.0
    backend: str = "sim"
    plot: str = ""
    workdir: str = ""

    def to_json(self) -> dict[str, object]:
        """The ``--json`` object."""
        return dict(vars(self))


@dataclass
class Sample:
    """One live-table refresh."""

    t: float
    statuses: list[VmStatus]
    faults_per_s: dict[str, float]


async def _wait_node(client: AsyncControlPlaneClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(n.node_id == NODE and n.up for n in await client.list_nodes()):
            return
        await asyncio.sleep(0.05)
    raise FailedPrecondition("the demo agent did not register with the control plane")


async def run_demo(cfg: DemoConfig, on_sample: Callable[[Sample], None] | None = None) -> DemoSummary:
    """Run the demo for ``cfg.duration_s`` and return its summary (cleans up on cancel)."""
    if cfg.backend not in ("sim", "uffd", "rwp", "kvm"):
        raise InvalidArgument(f"--backend must be sim, uffd or rwp (or --kvm), got {cfg.backend!r}")
    if cfg.duration_s <= 0:
        raise InvalidArgument("--duration must be > 0")
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="tiermem-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    cp: RunningControlPlane | None = None
    agent: RunningAgent | None = None
    client: AsyncControlPlaneClient | None = None
    guests: list[DemoGuest] = []
    summary = DemoSummary(backend=cfg.backend, workdir=str(work))
    try:
        cp = await serve_control_plane(
            ControlPlaneSettings(
                listen="127.0.0.1:0",
                state=f"sqlite:///{work / 'control.db'}",
                lease_ttl_ms=5000,
                jitter=0.2,
                log_json=False,
            )
        )
        agent = await serve_agent(
            AgentSettings(
                node_id=NODE,
                listen="127.0.0.1:0",
                data_dir=str(work / "agent"),
                control_plane=cp.address,
                heartbeat_ms=250,
                handoff_socket=str(work / "h" / "handoff.sock"),
                log_json=False,
                stores={"default": f"file://{work / 'pages'}"},
            )
        )
        client = AsyncControlPlaneClient(cp.address, timeout_s=10)
        await _wait_node(client)
        policy = EvictionPolicy(interval_ms=cfg.interval_ms, cold_after=cfg.cold_after, prefetch_pages=8)
        await client.set_policy(PolicyScope.fleet(), policy)
        guests = await _start_guests(cfg, client, agent)
        t0 = time.monotonic()
        series = {g.vm_id: Series(g.vm_id, g.workload) for g in guests}
        last_faults: dict[str, tuple[float, int]] = {}
        while (elapsed := time.monotonic() - t0) < cfg.duration_s:
            await asyncio.sleep(min(cfg.sample_s, cfg.duration_s - elapsed))
            statuses = [s for s in await client.list_vm_status() if s.vm_id in series]
            now = time.monotonic()
            rates: dict[str, float] = {}
            for s in statuses:
                pt, pf = last_faults.get(s.vm_id, (t0, 0))
                rates[s.vm_id] = (s.faults_served - pf) / max(now - pt, 1e-6)
                last_faults[s.vm_id] = (now, s.faults_served)
                ser = series[s.vm_id]
                ser.t.append(now - t0)
                ser.resident_mib.append(s.resident_pages * s.page_size / MIB)
                ser.evicted_mib.append(s.evicted_pages * s.page_size / MIB)
                ser.faults_per_s.append(rates[s.vm_id])
            if on_sample is not None:
                on_sample(Sample(now - t0, statuses, rates))
        summary.duration_s = round(time.monotonic() - t0, 2)
        # Freeze the picture before verifying: cycles stop, statuses are final.
        for g in guests:
            await client.set_policy(PolicyScope.for_vm(g.vm_id), policy.with_changes(paused=True))
            # Verification reads every page in order: a wide prefetch window turns ~N faults into
            # N/256 store round trips. Set on the agent directly: paused VMs get no cycle orders
            # that would carry it there.
            live = agent.agent.sessions[g.vm_id].policy
            agent.agent.set_policy(g.vm_id, live.with_changes(paused=True, prefetch_pages=256))
        final = {s.vm_id: s for s in await asyncio.to_thread(agent.agent.list_status)}
        results = await asyncio.gather(*(asyncio.to_thread(g.verify) for g in guests))
        for g, (checked, bad) in zip(guests, results, strict=True):
            s = final[g.vm_id]
            summary.vms.append(
                {
                    "vm_id": g.vm_id,
                    "workload": g.workload,
                    "total_pages": s.total_pages,
                    "evicted_pages": s.evicted_pages,
                    "resident_pages": s.resident_pages,
                    "working_set_pages": s.working_set_pages,
                    "faults_served": s.faults_served,
                    "cycles": s.cycles,
                    "pages_verified": checked,
                    "mismatches": bad,
                }
            )
            summary.total_pages += s.total_pages
            summary.evicted_pages += s.evicted_pages
            summary.faults_served += s.faults_served
            summary.cycles += s.cycles
            summary.pages_verified += checked
            summary.mismatches += bad
        summary.saved_fraction = round(summary.evicted_pages / max(summary.total_pages, 1), 4)
        summary.integrity_ok = summary.mismatches == 0 and summary.pages_verified == summary.total_pages
        plot_path = Path(cfg.plot) if cfg.plot else Path.cwd() / f"tiermem-demo-{int(time.time())}.png"
        summary.plot = str(await asyncio.to_thread(write_plot, list(series.values()), plot_path))
        return summary
    finally:
        await _shutdown(guests, agent, cp, client)
        if not cfg.keep and not cfg.workdir:
            shutil.rmtree(work, ignore_errors=True)
            summary.workdir = ""


async def _start_guests(
    cfg: DemoConfig, client: AsyncControlPlaneClient, agent: RunningAgent
) -> list[DemoGuest]:
    guests: list[DemoGuest] = []
    if cfg.backend == "sim":
        mem = (cfg.memory_mib or 128) * MIB
        for name, spec in DEFAULT_WORKLOADS.items():
            vm = f"sim-{name}"
            await client.register_vm(
                VmSpec(
                    vm_id=vm,
                    node_id=NODE,
                    memory_bytes=mem,
                    labels={"workload": name},
                    backend=Backend.SIM,
                    workload=spec,
                ),
                attach=True,
            )
            guests.append(SimGuestHandle(vm, spec, agent.agent.verify))
        return guests
    sock = agent.agent.settings.handoff_path()
    if cfg.backend == "kvm":
        mem = (cfg.memory_mib or 64) * MIB
        for i, (name, spec) in enumerate(DEFAULT_WORKLOADS.items()):
            kg = KvmGuestHandle(f"kvm-{name}", spec, sock, mem, seed=i + 1)
            await asyncio.to_thread(kg.spawn)
            guests.append(kg)
            await client.register_vm(
                VmSpec(
                    vm_id=kg.vm_id,
                    node_id=NODE,
                    memory_bytes=mem,
                    labels={"workload": name},
                    backend=Backend.UFFD,
                )
            )
            kg.start()
        return guests
    mem_mib = cfg.memory_mib or 64
    for i, (name, spec) in enumerate(DEFAULT_WORKLOADS.items()):
        vm = f"proc-{name}"
        # the guest registers its memory in the chosen mode (never the probe's pick: --backend means it)
        pg = ProcessGuestHandle(vm, spec, sock, memory=f"{mem_mib}M", seed=i + 1, mode=cfg.backend)
        await asyncio.to_thread(pg.spawn)
        guests.append(pg)
        await asyncio.to_thread(pg._cmd, f"touch 0-{mem_mib * MIB // 4096 - 1} w")  # a booted guest's memory
        await client.register_vm(
            VmSpec(
                vm_id=vm,
                node_id=NODE,
                memory_bytes=mem_mib * MIB,
                labels={"workload": name},
                backend=Backend(cfg.backend),
            )
        )
        pg.start()
    return guests


async def _shutdown(
    guests: list[DemoGuest],
    agent: RunningAgent | None,
    cp: RunningControlPlane | None,
    client: AsyncControlPlaneClient | None,
) -> None:
    for g in guests:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(g.stop)
        if isinstance(g, ProcessGuestHandle | KvmGuestHandle):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(g.close)
    if client is not None:
        with contextlib.suppress(Exception):
            await client.close()
    if cp is not None:
        with contextlib.suppress(Exception):
            await cp.stop(0.2)
    if agent is not None:
        with contextlib.suppress(Exception):
            await agent.stop(0.2)
