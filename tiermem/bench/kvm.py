"""KVM guest benchmark: the cost of RWP emulated with MINOR faults, on a real VM and on a process guest.

Two guests run the same workload (``hotset:0.1`` by default, from the shared
generators) over the same kind of memory, a prefilled memfd mapping registered
MISSING|MINOR with a userfaultfd served by a child process
(:class:`tiermem.guests.kvm_pager.PagerProcess`, like an agent out of process):

* the KVM guest: the reference VMM (:class:`tiermem.guests.kvm.KvmVm`), one vCPU;
* the process guest: a Python thread doing the loads and stores with numpy on
  the mapping (a counter increment and an index stamp per write, as the content
  model says).

Each guest runs ``duration_s`` with tracking off (no zaps) and ``duration_s`` on,
alternated in three rounds so both see the same background load (the VMM
zaps every PTE of the guest mapping every ``interval_s`` with MADV_DONTNEED; each
first touch after a zap is a MINOR fault resolved with UFFDIO_CONTINUE: the
``uffd`` backend's emulation of RWP, which the RWP kernel makes free with
RWP_ASYNC). Printed: accesses/s on and off and their ratio per guest, MINOR
faults/s, and the MISSING -> UFFDIO_COPY fault latency p50/p99 (each evicted page
touched alone; the same touch of a resident page, measured in the same run, is
subtracted as the baseline). Every guest is verified at the end.

The same MISSING -> COPY probe then runs with the KVM guest handed off to an
in-process node agent (local store): each sampled page is evicted by an agent
cycle and touched alone, once served by the agent's native fault thread and once
by its pure-Python path (``agent_latency``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tiermem import native
from tiermem.bench.common import bench_agent, settled_count, wait_attached
from tiermem.guests.kvm import KvmVm
from tiermem.guests.kvm_machine import PlainRam
from tiermem.guests.kvm_pager import PagerProcess
from tiermem.kernel import uapi
from tiermem.kernel.uffd_ioctl import madvise
from tiermem.model import CycleMode, EvictionPolicy
from tiermem.sim import content
from tiermem.sim.workloads import ExpectedCounters, parse_workload

__all__ = ["main", "run"]

MiB = 1 << 20
PAGE = 4096


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


class _Zapper:
    """Zaps the whole guest mapping now and every ``interval_s`` from this (the VMM's) process."""

    def __init__(self, base: int, size: int, interval_s: float) -> None:
        self.base, self.size, self.interval_s = base, size, interval_s
        self.zaps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="zapper", daemon=True)

    def _loop(self) -> None:
        while True:  # a zap at once, then one every interval, like a cycle's detect phase
            madvise(self.base, self.size, uapi.MADV_DONTNEED)
            self.zaps += 1
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> _Zapper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _segment(
    run_for: Callable[[float], int], pager: PagerProcess, secs: float, zap: tuple[int, int, float] | None
) -> tuple[int, float, int, int, int]:
    """(accesses, seconds, zaps, MINOR faults, MISSING faults) of one run of ``secs``."""
    pager.reset()
    t0 = time.perf_counter()
    if zap is None:
        accesses, zaps = run_for(secs), 0
    else:
        with _Zapper(*zap) as z:
            accesses = run_for(secs)
        zaps = z.zaps
    elapsed = time.perf_counter() - t0
    st = pager.stats()
    return accesses, elapsed, zaps, int(st["minor"]), int(st["missing"])


def _phases(
    run_for: Callable[[float], int],
    pager: PagerProcess,
    duration_s: float,
    zap: tuple[int, int, float],
    rounds: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Tracking off and on, ``duration_s`` each, alternated in ``rounds`` segments so both see the same load."""
    totals = {False: [0, 0.0, 0, 0, 0], True: [0, 0.0, 0, 0, 0]}
    for _ in range(rounds):
        for on in (False, True):
            run_for(min(0.5, duration_s / rounds))  # unmeasured: remap what the last zap unmapped
            seg = _segment(run_for, pager, duration_s / rounds, zap if on else None)
            totals[on] = [a + b for a, b in zip(totals[on], seg, strict=True)]
    out = []
    for on in (False, True):
        acc, secs, zaps, minor, missing = totals[on]
        out.append(
            {
                "accesses": int(acc),
                "seconds": round(secs, 3),
                "accesses_per_s": round(acc / secs),
                "zaps": int(zaps),
                "minor_faults": int(minor),
                "minor_faults_per_s": round(minor / secs),
                "missing_faults": int(missing),
            }
        )
    _lost_per_fault(out[0], out[1])
    return out[0], out[1]


def _lost_per_fault(off: dict[str, Any], on: dict[str, Any]) -> None:
    """Guest time lost per MINOR fault: the tracking-on run's time minus what its accesses cost untracked."""
    lost_s = on["seconds"] - on["accesses"] / off["accesses_per_s"]
    on["lost_us_per_minor_fault"] = (
        round(lost_s / on["minor_faults"] * 1e6, 1) if on["minor_faults"] else None
    )


def _latency(
    touch: Callable[[int], None], pager: PagerProcess, resident: np.ndarray, victims: np.ndarray
) -> dict[str, Any]:
    """Per-access time of resident pages (baseline) and of evicted ones (MISSING -> COPY), µs."""
    base = np.empty(len(resident))
    for i, p in enumerate(resident.tolist()):
        t = time.perf_counter_ns()
        touch(p)
        base[i] = time.perf_counter_ns() - t
    pager.evict(victims)
    pager.reset()
    lat = np.empty(len(victims))
    for i, p in enumerate(victims.tolist()):
        t = time.perf_counter_ns()
        touch(p)
        lat[i] = time.perf_counter_ns() - t
    st = pager.stats()
    assert st["missing"] == len(victims), st["missing"]  # one MISSING fault per evicted page, no more
    svc = np.asarray(pager.service_ns(), dtype=float) / 1e3
    lat /= 1e3
    base /= 1e3
    b50 = _pct(base, 50)
    return {
        "faults": len(victims),
        "touch_resident_p50_us": round(b50, 2),
        "touch_evicted_p50_us": round(_pct(lat, 50), 2),
        "touch_evicted_p99_us": round(_pct(lat, 99), 2),
        "fault_p50_us": round(_pct(lat, 50) - b50, 2),
        "fault_p99_us": round(_pct(lat, 99) - b50, 2),
        "handler_service_p50_us": round(_pct(svc, 50), 2),
        "handler_service_p99_us": round(_pct(svc, 99), 2),
    }


def _kvm_guest(
    memory: int, workload: str, duration_s: float, interval_s: float, n_lat: int, rounds: int
) -> dict[str, Any]:
    with KvmVm("bench-kvm", memory, vcpus=1, workload_spec=workload, seed=1) as vm:
        vm.start()
        vm.prefill()
        assert vm.ram is not None
        pager = PagerProcess(vm.ram.base, vm.ram.size, vm.ram.memfd)
        try:

            def run_for(secs: float) -> int:
                a0 = vm.accesses
                vm.run(secs, verify=False)
                return vm.accesses - a0

            off, on = _phases(run_for, pager, duration_s, (vm.ram.base, vm.ram.size, interval_s), rounds)
            hot = vm.workload.hot_pages()
            cold = np.setdiff1d(np.arange(vm.n_pages), hot if hot is not None else [])
            rng = np.random.default_rng(2)
            victims = rng.choice(cold, min(n_lat, len(cold) // 2), replace=False)
            resident = rng.choice(np.setdiff1d(cold, victims), min(n_lat, 500), replace=False)
            vm.touch(resident)  # map them: the baseline is a resident page

            def touch(p: int) -> None:
                vm.touch([p])

            lat = _latency(touch, pager, resident, victims)
            checked, bad = vm.verify()
        finally:
            pager.close()
    return {"off": off, "on": on, "latency": lat, "verified_pages": checked, "mismatches": bad}


def _agent_latency(memory: int, workload: str, n_lat: int, native_faults: bool) -> dict[str, Any]:
    """MISSING -> COPY with the KVM guest attached to a node agent (local store): every page evicted
    by one cycle, a resident sample faulted back, then each sampled evicted page touched alone."""
    with tempfile.TemporaryDirectory(prefix="tiermem-bench-kvm-") as tmp:
        stores = {"default": f"file://{tmp}/pages"}
        with (
            bench_agent(stores, native_faults=native_faults) as agent,
            KvmVm("bench-kvm-agent", memory, vcpus=1, workload_spec=workload, seed=1) as vm,
        ):
            vm.start(agent.settings.handoff_path())
            s = wait_attached(agent, vm.vm_id)
            vm.prefill()
            agent.set_policy(vm.vm_id, EvictionPolicy(cold_after=1, prefetch_pages=0, store="default"))
            rep = agent.run_cycle(vm.vm_id, CycleMode.EVICT, interval_ms=20)
            if rep.error or rep.pages_evicted < vm.n_pages // 2:
                raise RuntimeError(f"the agent evicted {rep.pages_evicted}/{vm.n_pages} pages: {rep.error}")
            evicted = agent.index.evicted_pages(vm.vm_id)
            rng = np.random.default_rng(2)
            victims = rng.choice(evicted, min(n_lat, len(evicted) // 2), replace=False)
            resident = rng.choice(np.setdiff1d(evicted, victims), min(n_lat, 500), replace=False)
            vm.touch(resident)  # faulted back: the baseline touches below are of resident pages
            base = np.empty(len(resident))
            for i, p in enumerate(resident.tolist()):
                t = time.perf_counter_ns()
                vm.touch([p])
                base[i] = time.perf_counter_ns() - t
            fs = agent.faults[vm.vm_id]
            served0 = fs.native.stats()["served"] if fs.native is not None else 0
            faults0 = settled_count(lambda: s.counters.faults_served)
            lat = np.empty(len(victims))
            for i, p in enumerate(victims.tolist()):
                t = time.perf_counter_ns()
                vm.touch([p])
                lat[i] = time.perf_counter_ns() - t
            native_served = (fs.native.stats()["served"] - served0) if fs.native is not None else 0
            n_served = settled_count(lambda: s.counters.faults_served) - faults0
            svc = np.asarray(s.fault_latency.samples()[-n_served:] if n_served else [], dtype=float)
            path = "native" if fs.native is not None else "python"
            agent.set_policy(vm.vm_id, EvictionPolicy(cold_after=1, prefetch_pages=256, store="default"))
            checked, bad = vm.verify()  # every page; the evicted ones fault back (with prefetch: quick)
    lat /= 1e3
    base /= 1e3
    b50 = _pct(base, 50)
    return {
        "fault_path": path,
        "faults": len(victims),
        "native_served": int(native_served),
        "touch_resident_p50_us": round(b50, 2),
        "touch_evicted_p50_us": round(_pct(lat, 50), 2),
        "touch_evicted_p99_us": round(_pct(lat, 99), 2),
        "fault_p50_us": round(_pct(lat, 50) - b50, 2),
        "fault_p99_us": round(_pct(lat, 99) - b50, 2),
        "agent_service_p50_us": round(_pct(svc, 50), 2),
        "verified_pages": checked,
        "mismatches": bad,
    }


def _process_guest(
    memory: int, workload: str, duration_s: float, interval_s: float, n_lat: int, rounds: int
) -> dict[str, Any]:
    ram = PlainRam("bench-proc", memory)
    try:
        n = memory // PAGE
        img = np.frombuffer(ram.view(), dtype=np.uint8)
        w32 = img.view("<u4")
        wl = parse_workload(workload, n, seed=1)
        expected = ExpectedCounters(n)
        data = content.pages_bytes(np.arange(n), np.ones(n, dtype=np.uint32))
        os.pwrite(ram.memfd, data, 0)  # prefill through the memfd, as the KVM guest's
        del data
        expected.counts[:] = 1
        batches = wl.batches()
        pager = PagerProcess(ram.base, ram.size, ram.memfd)
        try:

            def run_for(secs: float) -> int:
                # Loads and stores run in numpy with the GIL held; the pager is another process.
                end = time.perf_counter() + secs
                done = 0
                while time.perf_counter() < end:
                    pages, writes = next(batches)
                    r = pages[~writes]
                    if len(r):
                        int(w32[r * (PAGE // 4)].sum())
                    content.apply_writes(img, pages[writes])
                    expected.apply(pages, writes)
                    done += len(pages)
                return done

            off, on = _phases(run_for, pager, duration_s, (ram.base, ram.size, interval_s), rounds)
            hot = wl.hot_pages()
            cold = np.setdiff1d(np.arange(n), hot if hot is not None else [])
            rng = np.random.default_rng(2)
            victims = rng.choice(cold, min(n_lat, len(cold) // 2), replace=False)
            resident = rng.choice(np.setdiff1d(cold, victims), min(n_lat, 500), replace=False)
            int(w32[resident * (PAGE // 4)].sum())

            def touch(p: int) -> None:
                int(w32[p * (PAGE // 4)])

            lat = _latency(touch, pager, resident, victims)
            bad = len(content.check_image(img, expected.counts))
        finally:
            pager.close()
    finally:
        ram.close()
    return {"off": off, "on": on, "latency": lat, "verified_pages": n, "mismatches": bad}


def run(
    memory_mib: int = 256,
    duration_s: float = 5,
    quick: bool = False,
    *,
    interval_s: float = 1.0,
    workload: str = "hotset:0.1",
    fault_samples: int = 2000,
) -> dict[str, Any]:
    """Run both guests (tracking off, then on) and the fault-latency probe; a JSON-able dict."""
    if quick:
        memory_mib, duration_s, fault_samples = (
            min(memory_mib, 64),
            min(duration_s, 1.0),
            min(fault_samples, 300),
        )
    memory = memory_mib * MiB
    rounds = 1 if quick else 3
    kvm = _kvm_guest(memory, workload, duration_s, interval_s, fault_samples, rounds)
    proc = _process_guest(memory, workload, duration_s, interval_s, fault_samples, rounds)
    # the agent's two fault paths, the native one only where the extension is built
    paths = [True, False] if native.paths()["fault_serve"] == "native" else [False]
    agent_lat = [_agent_latency(memory, workload, fault_samples, use) for use in paths]

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    return {
        "memory_mib": memory_mib,
        "duration_s": duration_s,
        "interval_s": interval_s,
        "workload": workload,
        "rounds": rounds,
        "kvm": kvm,
        "process": proc,
        "agent_latency": agent_lat,
        "ratios": {
            "kvm_on_over_off": ratio(kvm["on"]["accesses_per_s"], kvm["off"]["accesses_per_s"]),
            "process_on_over_off": ratio(proc["on"]["accesses_per_s"], proc["off"]["accesses_per_s"]),
            "kvm_over_process_off": ratio(kvm["off"]["accesses_per_s"], proc["off"]["accesses_per_s"]),
            "kvm_fault_p50_over_process": ratio(
                kvm["latency"]["fault_p50_us"], proc["latency"]["fault_p50_us"]
            ),
            "kvm_fault_p99_over_process": ratio(
                kvm["latency"]["fault_p99_us"], proc["latency"]["fault_p99_us"]
            ),
            # the agent's fault against the bare pager process's, both on the KVM guest
            **{
                f"agent_{a['fault_path']}_fault_p50_over_pager": ratio(
                    a["fault_p50_us"], kvm["latency"]["fault_p50_us"]
                )
                for a in agent_lat
            },
        },
    }


def _print(r: dict[str, Any]) -> None:
    print(
        f"KVM guest vs process guest: {r['memory_mib']} MiB, workload {r['workload']}, {r['duration_s']} s per "
        f"phase in {r['rounds']} alternating rounds, tracking on = zap all PTEs every {r['interval_s']} s, MINOR faults resolved with CONTINUE"
    )
    for name in ("kvm", "process"):
        g = r[name]
        off, on, lat = g["off"], g["on"], g["latency"]
        print(
            f"  {name:8} off {off['accesses_per_s']:>12,} acc/s   on {on['accesses_per_s']:>12,} acc/s   "
            f"({on['minor_faults_per_s']:,} MINOR faults/s, {on['zaps']} zaps)"
        )
        print(f"  {'':8} guest time lost per MINOR fault: {on['lost_us_per_minor_fault']} us")
        print(
            f"  {'':8} MISSING->COPY fault: p50 {lat['fault_p50_us']} us  p99 {lat['fault_p99_us']} us over "
            f"{lat['faults']} faults (touch of a resident page {lat['touch_resident_p50_us']} us subtracted; "
            f"handler service p50 {lat['handler_service_p50_us']} us, p99 {lat['handler_service_p99_us']} us)"
        )
        print(f"  {'':8} verified {g['verified_pages']} pages, {g['mismatches']} mismatches")
    for a in r["agent_latency"]:
        print(
            f"  agent ({a['fault_path']} path, KVM guest, local store) MISSING->COPY fault: p50 {a['fault_p50_us']} us"
            f"  p99 {a['fault_p99_us']} us over {a['faults']} faults ({a['native_served']} served natively; "
            f"verified {a['verified_pages']} pages, {a['mismatches']} mismatches)"
        )
    x = r["ratios"]
    print(
        f"  ratios: KVM on/off {x['kvm_on_over_off']}, process on/off {x['process_on_over_off']}, "
        f"KVM/process (off) {x['kvm_over_process_off']}, KVM/process fault p50 {x['kvm_fault_p50_over_process']}, "
        f"p99 {x['kvm_fault_p99_over_process']}"
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m tiermem.bench.kvm [--memory-mib N] [--duration S] [--interval S] [--quick] [--json]``."""
    p = argparse.ArgumentParser(prog="tiermem bench kvm", description=__doc__.splitlines()[0])
    p.add_argument("--memory-mib", type=int, default=256)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between zaps with tracking on")
    p.add_argument("--workload", default="hotset:0.1")
    p.add_argument("--fault-samples", type=int, default=2000)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = run(
        a.memory_mib,
        a.duration,
        a.quick,
        interval_s=a.interval,
        workload=a.workload,
        fault_samples=a.fault_samples,
    )
    print(json.dumps(r, indent=2)) if a.json else _print(r)


if __name__ == "__main__":
    main()
