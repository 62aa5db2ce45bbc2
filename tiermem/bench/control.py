"""Control-plane scale benchmark: 1,000 VMs across 50 agents, scheduling lag, order rate, CPU and RSS.

The control plane runs in this process exactly as ``tiermem serve controlplane``
would (SQLite state, gRPC server, scheduler). The 50 agents are a tiny NodeAgent
servicer in one child process (one gRPC server listening on 50 ports, so the
fleet fits 2 cores): each RunCycle answers after a short sleep, and every node
heartbeats its VMs' statuses like a real agent. Lag is the actual start of each
order minus its planned start.

Baseline, measured in the same run: the same number of bare asyncio timer
wakeups on the same grid (one sleeping task per VM), with no gRPC, state or
limits. Goals: lag p99 < 1 s, control-plane RSS < 500 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any

__all__ = ["main", "run"]

MiB = 1 << 20
HEARTBEAT_S = 2.0


def _rss() -> tuple[float, float]:
    """(current, peak) RSS of this process, MiB."""
    cur = peak = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return cur, peak


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---------------------------------------------------------------- the agents (child process)


def _agent_main(conn: Connection, agents: int, vms: int, cycle_ms: int, cp_address: str) -> None:
    asyncio.run(_agents(conn, agents, vms, cycle_ms, cp_address))


async def _agents(conn: Connection, agents: int, vms: int, cycle_ms: int, cp_address: str) -> None:
    import grpc

    from tiermem.api import NodeInfo
    from tiermem.model import VmState, VmStatus
    from tiermem.rpc.clients import AsyncControlPlaneClient
    from tiermem.v1 import agent_pb2 as apb
    from tiermem.v1 import agent_pb2_grpc as agrpc
    from tiermem.v1 import types_pb2 as tpb

    cycles: dict[str, int] = {}

    class TinyAgent(agrpc.NodeAgentServicer):
        async def RunCycle(self, request: apb.RunCycleRequest, context: Any) -> tpb.CycleReport:
            await asyncio.sleep(cycle_ms / 1000)
            n = cycles[request.vm_id] = cycles.get(request.vm_id, 0) + 1
            return tpb.CycleReport(
                vm_id=request.vm_id,
                cycle=n,
                mode=request.mode,
                pages_scanned=65536,
                pages_hot=6000,
                pages_cold=2000 + n % 7,
                pages_evicted=2000,
                bytes_written=2000 * 4096,
                policy_version=request.policy.version,
            )

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    agrpc.add_NodeAgentServicer_to_server(TinyAgent(), server)  # type: ignore[abstract]
    ports = [server.add_insecure_port("127.0.0.1:0") for _ in range(agents)]
    await server.start()
    client = AsyncControlPlaneClient(cp_address, timeout_s=10)
    for i, port in enumerate(ports):
        await client.register_node(NodeInfo(f"node-{i}", f"127.0.0.1:{port}"))
    conn.send(ports)

    async def heartbeat(i: int) -> None:
        mine = [f"vm-{j}" for j in range(i, vms, agents)]
        await asyncio.sleep(HEARTBEAT_S * i / agents)  # spread the nodes' heartbeats
        k = 0
        while True:
            k += 1
            statuses = [
                VmStatus(
                    v,
                    state=VmState.ARMED,
                    total_pages=65536,
                    resident_pages=60000 - (j * 37) % 5000,
                    working_set_pages=6000,
                    evicted_pages=5536,
                    faults_served=k,
                )
                for j, v in enumerate(mine)
            ]
            with contextlib.suppress(Exception):
                await client.heartbeat(f"node-{i}", statuses)
            await asyncio.sleep(HEARTBEAT_S)

    tasks = [asyncio.create_task(heartbeat(i)) for i in range(agents)]
    await asyncio.to_thread(conn.recv)  # the parent says stop
    for t in tasks:
        t.cancel()
    await client.close()
    await server.stop(0)


# ---------------------------------------------------------------- baseline


async def _baseline(vms: int, interval_s: float, jitter: float, duration_s: float) -> dict[str, float]:
    """Bare asyncio timer wakeups on the scheduler's grid: one sleeping task per VM."""
    from tiermem.control.limits import phase_fraction

    loop = asyncio.get_running_loop()
    iv = interval_s
    start = time.time() + 0.2
    end = start + duration_s
    lags: list[float] = []

    async def vm(i: int) -> None:
        phase = phase_fraction(f"vm-{i}") * jitter * iv
        planned = (start - phase) // iv * iv + phase + iv
        while planned < end:
            await asyncio.sleep(max(0.0, planned - time.time()))
            lags.append((time.time() - planned) * 1000)
            planned += iv

    cpu0, t0 = time.process_time(), loop.time()
    await asyncio.gather(*(vm(i) for i in range(vms)))
    cpu = time.process_time() - cpu0
    return {
        "wakeups": len(lags),
        "lag_p50_ms": _pct(lags, 0.5),
        "lag_p99_ms": _pct(lags, 0.99),
        "lag_max_ms": max(lags, default=0.0),
        "cpu_s": cpu,
        "wall_s": loop.time() - t0,
    }


# ---------------------------------------------------------------- the run


async def _run(
    vms: int,
    agents: int,
    interval_s: float,
    duration_s: float,
    cycle_ms: int,
    jitter: float,
    max_concurrent: int,
) -> dict[str, Any]:
    from tiermem.api import PolicyScope, VmSpec
    from tiermem.config import ControlPlaneSettings
    from tiermem.control.server import serve_control_plane
    from tiermem.model import EvictionPolicy
    from tiermem.rpc.clients import AsyncControlPlaneClient

    baseline = await _baseline(vms, interval_s, jitter, duration_s)
    with tempfile.TemporaryDirectory(prefix="tiermem-bench-cp-") as tmp:
        settings = ControlPlaneSettings(
            listen="127.0.0.1:0",
            state=f"sqlite:///{tmp}/control.db",
            jitter=jitter,
            replica_id="bench",
            max_concurrent_cycles_per_node=max_concurrent,
            lease_ttl_ms=30_000,
            log_json=True,
        )
        from tiermem.logging import configure_logging

        configure_logging(json=True, level="WARNING")
        cp = await serve_control_plane(settings)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_agent_main, args=(child, agents, vms, cycle_ms, cp.address), daemon=True)
        proc.start()
        try:
            await asyncio.to_thread(parent.poll, 60)
            ports = parent.recv()
            assert len(ports) == agents
            client = AsyncControlPlaneClient(cp.address, timeout_s=30)
            await client.set_policy(PolicyScope.fleet(), EvictionPolicy(interval_ms=int(interval_s * 1000)))
            t_reg = time.perf_counter()
            sem = asyncio.Semaphore(32)

            async def register(i: int) -> None:
                async with sem:
                    await client.register_vm(VmSpec(f"vm-{i}", f"node-{i % agents}", 256 * MiB))

            await asyncio.gather(*(register(i) for i in range(vms)))
            reg_s = time.perf_counter() - t_reg
            await asyncio.sleep(interval_s + 1.0)  # every VM has reached its first slot
            sched = cp.plane.scheduler
            st = sched.stats
            orders0, failed0, lag_n0 = st.orders, st.failed, len(st.lags_ms)
            cpu0, t0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(duration_s)
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
            lags = list(st.lags_ms)[lag_n0:]
            rss, peak = _rss()
            orders, failed = st.orders - orders0, st.failed - failed0
            reports = len(await client.list_cycle_reports(limit=1000))
            await client.close()
        finally:
            parent.send("stop")
            proc.join(20)
            if proc.is_alive():
                proc.kill()
            await cp.stop()
    lag_p99 = _pct([float(x) for x in lags], 0.99)
    return {
        "vms": vms,
        "agents": agents,
        "interval_s": interval_s,
        "duration_s": round(wall, 2),
        "cycle_ms": cycle_ms,
        "jitter": jitter,
        "max_concurrent_per_node": max_concurrent,
        "register_s": round(reg_s, 2),
        "orders": orders,
        "orders_per_s": round(orders / wall, 1),
        "expected_orders_per_s": round(vms / interval_s, 1),
        "failed": failed,
        "reports_listed": reports,
        "lag_p50_ms": _pct([float(x) for x in lags], 0.5),
        "lag_p99_ms": lag_p99,
        "lag_max_ms": float(max(lags, default=0)),
        "lag_mean_ms": round(statistics.fmean(lags), 1) if lags else 0.0,
        "cpu_s": round(cpu, 2),
        "cpu_pct_of_one_core": round(100 * cpu / wall, 1),
        "rss_mib": round(rss, 1),
        "rss_peak_mib": round(peak, 1),
        "baseline": {k: round(v, 2) for k, v in baseline.items()},
        "goals": {"lag_p99_under_1s": lag_p99 < 1000, "rss_under_500mib": rss < 500},
    }


def run(
    vms: int = 1000,
    agents: int = 50,
    interval_s: float = 10,
    duration_s: float = 30,
    quick: bool = False,
    cycle_ms: int = 50,
    jitter: float = 0.1,
    max_concurrent: int = 4,
) -> dict[str, Any]:
    """Run the benchmark and return its figures (``quick``: 100 VMs, 5 agents, 2 s intervals, 6 s)."""
    if quick:
        vms, agents, interval_s, duration_s = (
            min(vms, 100),
            min(agents, 5),
            min(interval_s, 2),
            min(duration_s, 6),
        )
    return asyncio.run(_run(vms, agents, interval_s, duration_s, cycle_ms, jitter, max_concurrent))


def _print(r: dict[str, Any]) -> None:
    b = r["baseline"]
    print(
        f"control plane: {r['vms']} VMs on {r['agents']} agents, interval {r['interval_s']} s, jitter {r['jitter']}, "
        f"{r['duration_s']} s measured (RunCycle answers after {r['cycle_ms']} ms)"
    )
    print(f"  registration          {r['register_s']} s for {r['vms']} VMs")
    print(
        f"  cycle orders          {r['orders']} ({r['orders_per_s']}/s sustained, {r['expected_orders_per_s']}/s due)"
        f", {r['failed']} failed"
    )
    ratio = r["lag_p99_ms"] / b["lag_p99_ms"] if b["lag_p99_ms"] else float("inf")
    print(
        f"  scheduling lag        p50 {r['lag_p50_ms']:.0f} ms  p99 {r['lag_p99_ms']:.0f} ms  "
        f"max {r['lag_max_ms']:.0f} ms"
    )
    print(
        f"  baseline (bare timer) p50 {b['lag_p50_ms']:.1f} ms  p99 {b['lag_p99_ms']:.1f} ms  "
        f"({b['wakeups']:.0f} wakeups, {b['cpu_s']:.2f} CPU s); control-plane p99 = {ratio:.1f}x the baseline"
    )
    print(
        f"  control-plane CPU     {r['cpu_s']} s = {r['cpu_pct_of_one_core']}% of one core; "
        f"baseline {b['cpu_s']:.2f} s"
    )
    print(f"  control-plane RSS     {r['rss_mib']} MiB (peak {r['rss_peak_mib']} MiB)")
    g = r["goals"]
    print(
        f"  goals: lag p99 < 1 s: {'met' if g['lag_p99_under_1s'] else 'MISSED'}; "
        f"RSS < 500 MiB: {'met' if g['rss_under_500mib'] else 'MISSED'}"
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m tiermem.bench.control``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--interval", type=float, default=10.0, help="cycle interval, seconds")
    ap.add_argument("--duration", type=float, default=30.0, help="measured window, seconds")
    ap.add_argument("--cycle-ms", type=int, default=50, help="how long each fake RunCycle takes")
    ap.add_argument("--jitter", type=float, default=0.1)
    ap.add_argument("--max-concurrent", type=int, default=4, help="per-node concurrent cycles")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    r = run(a.vms, a.agents, a.interval, a.duration, a.quick, a.cycle_ms, a.jitter, a.max_concurrent)
    print(json.dumps(r, indent=2)) if a.json else _print(r)


if __name__ == "__main__":
    main()
