"""What the kernel's RWP buys: the guest's access rate and the agent's CPU per GiB per cycle.

The same process guest (size, workload, seed) runs once per tracking mode, in one run:

* ``off``: the guest is handed to the agent but no cycle runs (the baseline);
* ``rwp``: detect-only cycles back to back, tracked by the kernel's async RWP (Linux 7.3+);
* ``uffd``: the same cycles with RWP emulated: the VMM zaps the guest's PTEs and the agent
  resolves every first touch as a MINOR fault.

For a fixed wall-clock window the driver keeps the guest running workload batches while
another thread runs the cycles. The modes run in ``rounds`` rounds, each in a rotated order,
and each figure is the median over the rounds, so a load change on a shared machine does not
land on one mode only. Access rate = loads and stores the guest completed per
second. Agent CPU = this process's CPU over the window (the agent is in-process, the guest
is its own process) per cycle and per GiB of guest memory. Only ratios are reported as
results: absolute figures depend on the machine (the kernel-VM tier runs under TCG).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from tiermem.bench.common import GuestDriver, bench_agent, cpu_seconds, ratio, require_uffd, wait_attached
from tiermem.errors import ConfigurationError, FailedPrecondition
from tiermem.model import PAGE_SIZE, CycleMode, EvictionPolicy

__all__ = ["MODES", "run"]

MODES = ("off", "rwp", "uffd")
MiB = 1 << 20
GiB = 1 << 30


def _one(
    mode: str, guest_mib: int, workload: str, seed: int, window_s: float, interval_ms: int
) -> dict[str, Any]:
    vm = f"track-{mode}"
    pages = guest_mib * MiB // PAGE_SIZE
    # "off" registers the guest the way the kernel allows best, and then never tracks it
    reg = "auto" if mode == "off" else mode
    with bench_agent({"default": "memory://"}, fsync=False) as agent:
        guest = GuestDriver(agent.settings.handoff_path(), vm, f"{guest_mib}M", "--workload", workload,
                            "--seed", str(seed), mode=reg)  # fmt: skip
        try:
            wait_attached(agent, vm)
            agent.set_policy(vm, EvictionPolicy(interval_ms=interval_ms, cold_after=1, prefetch_pages=0))
            guest.cmd(f"touch 0-{pages - 1} w", timeout=600)  # a booted guest: every page mapped and written
            guest.cmd("run 20", timeout=600)  # warm up: the workload's pages, the interpreter's caches
            stop = threading.Event()
            cycles: list[int] = []
            errors: list[str] = []

            def cycler() -> None:
                while not stop.is_set():
                    rep = agent.run_cycle(vm, CycleMode.DETECT, interval_ms=interval_ms)
                    if rep.error:
                        errors.append(rep.error)
                        return
                    cycles.append(rep.pages_hot)

            t = threading.Thread(target=cycler, name=f"cycles-{mode}", daemon=True)
            accesses = 0
            c0, t0 = cpu_seconds(), time.perf_counter()
            if mode != "off":
                t.start()
            while time.perf_counter() - t0 < window_s:
                r = guest.cmd("run 5", timeout=600)
                accesses += int(r["reads"]) + int(r["writes"])
            elapsed = time.perf_counter() - t0
            stop.set()
            if mode != "off":
                t.join(60)
            cpu = cpu_seconds() - c0
            if errors:
                raise FailedPrecondition(f"a {mode} cycle failed: {errors[0]}")
            check = guest.cmd("verify", timeout=600)
            registered = guest.mode
        finally:
            guest.close()
    n = len(cycles)
    gib = pages * PAGE_SIZE / GiB
    return {
        "mode": mode, "registered": registered, "pages": pages, "window_s": round(elapsed, 3),
        "accesses": accesses, "accesses_per_s": round(accesses / elapsed, 1), "cycles": n,
        "hot_pages_last_cycle": cycles[-1] if cycles else None,
        "agent_cpu_s": round(cpu, 4),
        "agent_cpu_ms_per_gib_per_cycle": round(cpu * 1000 / gib / n, 2) if n else None,
        "mismatches": check["mismatches"],
    }  # fmt: skip


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's rounds as one row: the median of each figure, every round's figures kept."""
    out = dict(rows[0])
    for k in (
        "window_s",
        "accesses",
        "accesses_per_s",
        "cycles",
        "agent_cpu_s",
        "agent_cpu_ms_per_gib_per_cycle",
    ):
        vals = [r[k] for r in rows if r[k] is not None]
        out[k] = round(statistics.median(vals), 2) if vals else None
    out["mismatches"] = sum(r["mismatches"] for r in rows)
    out["rounds"] = [
        {k: r[k] for k in ("accesses_per_s", "cycles", "agent_cpu_ms_per_gib_per_cycle")} for r in rows
    ]
    return out


def run(modes: str = "auto", quick: bool = False, guest_mib: int = 64, workload: str = "hotset:0.1",
        window_s: float = 8.0, interval_ms: int = 500, seed: int = 7, rounds: int = 3) -> dict[str, Any]:  # fmt: skip
    """Each mode in turn on the same guest; ratios against ``off`` (access rate) and ``rwp`` (CPU)."""
    from tiermem.kernel.probe import probe_host

    require_uffd()
    rep = probe_host()
    if modes == "auto":
        chosen = [m for m in MODES if m != "rwp" or rep.backends.get("rwp")]
    else:
        chosen = [m.strip() for m in modes.split(",") if m.strip()]
        if bad := [m for m in chosen if m not in MODES]:
            raise ConfigurationError(f"--modes takes {', '.join(MODES)} (comma-separated), not {bad}")
        if "rwp" in chosen:
            require_uffd("rwp")
    if quick:
        guest_mib, window_s, interval_ms, rounds = (
            min(guest_mib, 8),
            min(window_s, 1.5),
            min(interval_ms, 200),
            1,
        )
    if guest_mib < 1 or window_s <= 0 or interval_ms < 1 or rounds < 1:
        raise FailedPrecondition("the guest size, the window, the interval and the rounds must be > 0")
    per: dict[str, list[dict[str, Any]]] = {m: [] for m in chosen}
    for i in range(rounds):
        for m in chosen[i % len(chosen) :] + chosen[: i % len(chosen)]:
            per[m].append(_one(m, guest_mib, workload, seed, window_s, interval_ms))
    rows = {m: _median(per[m]) for m in chosen}
    out: dict[str, Any] = {
        "guest_mib": guest_mib, "workload": workload, "window_s": window_s, "interval_ms": interval_ms,
        "rounds": rounds,
        "kernel": rep.kernel, "rwp_available": bool(rep.backends.get("rwp")), "rows": list(rows.values()),
    }  # fmt: skip
    off = rows.get("off")
    for m in ("rwp", "uffd"):
        if m in rows and off is not None:
            out[f"access_rate_{m}_vs_off"] = ratio(rows[m]["accesses_per_s"], off["accesses_per_s"])
    if "rwp" in rows and "uffd" in rows:
        out["access_rate_rwp_vs_uffd"] = ratio(rows["rwp"]["accesses_per_s"], rows["uffd"]["accesses_per_s"])
        out["agent_cpu_per_gib_per_cycle_uffd_vs_rwp"] = ratio(
            rows["uffd"]["agent_cpu_ms_per_gib_per_cycle"], rows["rwp"]["agent_cpu_ms_per_gib_per_cycle"]
        )
    return out
