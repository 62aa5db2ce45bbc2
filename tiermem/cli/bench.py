"""``tiermem bench``: the benchmark suite, one command per scenario.

Every scenario prints its figures beside a baseline measured in the same run,
and the ratio; ``--json`` prints the figures instead (the keys documented in
``docs/benchmarks.md``); ``--quick`` uses small sizes. Servers a scenario needs
are started with ``--spawn redis|s3`` or used at ``--store URL``. Goals are
reported as met or MISSED, never asserted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from tiermem.cli.errors import fail
from tiermem.cli.output import console, emit_json, kv_table, table

__all__ = ["bench", "host_info"]

F = TypeVar("F", bound=Callable[..., Any])


def host_info() -> dict[str, Any]:
    """The machine a result was measured on."""
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        pass
    u = os.uname()
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "kernel": u.release,
        "machine": u.machine,
        "python": sys.version.split()[0],
    }


def _common(f: F) -> F:
    f = click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")(f)
    return click.option(
        "--quick", is_flag=True, help="Small sizes (seconds): a smoke run, not a measurement."
    )(f)


def _stores(f: F) -> F:
    f = click.option(
        "--spawn",
        multiple=True,
        type=click.Choice(["redis", "s3"]),
        help="Start a throwaway redis-server or SeaweedFS for the run (repeatable).",
    )(f)
    return click.option(
        "--store",
        "urls",
        multiple=True,
        metavar="URL",
        help="Store URL to benchmark (repeatable): file://, redis://, s3://...",
    )(f)


def _mode(f: F) -> F:
    return click.option(
        "--mode",
        type=click.Choice(["auto", "uffd", "rwp"]),
        default="auto",
        show_default=True,
        help="How the process guest registers its memory: auto follows the kernel probe "
        "(rwp on Linux 7.3+, else uffd).",
    )(f)


def _quiet_logs() -> None:
    # The agent logs through structlog; keep stdout for the table or the JSON.
    from tiermem.logging import configure_logging

    configure_logging(json=True, level="WARNING", stream=sys.stderr)


def _out(name: str, result: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], None]) -> None:
    if as_json:
        emit_json({"scenario": name, "host": host_info(), **result})
    else:
        render(result)


def _goals(goals: dict[str, Any]) -> None:
    con = console()
    for name, ok in goals.items():
        con.print(f"goal {name}: {'n/a' if ok is None else 'met' if ok else 'MISSED'}")


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _x(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _show(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    console().print(table(title, columns, rows))


@click.group()
def bench() -> None:
    """Benchmarks: each figure beside a baseline measured in the same run, and the ratio."""
    _quiet_logs()


# --- store -------------------------------------------------------------------------------------------
@bench.command("store")
@_stores
@click.option("--pages", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--batch-sizes", default="1,64,1024", show_default=True)
@click.option("--compression", type=click.Choice(["none", "zstd", "lz4"]), default="none", show_default=True)
@_common
def bench_store(
    urls: tuple[str, ...],
    spawn: tuple[str, ...],
    pages: int,
    batch_sizes: str,
    compression: str,
    quick: bool,
    as_json: bool,
) -> None:
    """Page-store put/get throughput and single-page latency vs the plain client (a local store by default)."""
    from tiermem.bench import store as mod
    from tiermem.bench.common import store_targets

    try:
        sizes = tuple(int(x) for x in batch_sizes.split(","))
    except ValueError:
        fail(f"--batch-sizes: integers separated by commas, got {batch_sizes!r}")
    if not sizes or min(sizes) < 1:
        fail("--batch-sizes: give sizes >= 1")
    with store_targets(urls, spawn, local=not urls and not spawn) as targets:
        runs = [mod.run(t.url, pages, sizes, quick, compression) for t in targets]

    def render(r: dict[str, Any]) -> None:
        for s in r["runs"]:
            _show(
                f"store {s['store']} ({s['kind']}); baseline: {s['baseline']}",
                [
                    "batch",
                    "put p/s",
                    "raw p/s",
                    "put ratio",
                    "put MB/s",
                    "get p/s",
                    "raw p/s",
                    "get ratio",
                    "get MB/s",
                ],
                [
                    [
                        t["batch"],
                        _f(t["put"]["pages_per_s"], 0),
                        _f(t.get("put_raw", {}).get("pages_per_s"), 0),
                        _x(t.get("put_ratio")),
                        _f(t["put"]["mb_per_s"]),
                        _f(t["get"]["pages_per_s"], 0),
                        _f(t.get("get_raw", {}).get("pages_per_s"), 0),
                        _x(t.get("get_ratio")),
                        _f(t["get"]["mb_per_s"]),
                    ]
                    for t in s["throughput"]
                ],
            )
            lat, z = s["single_get_latency"], s["zero_half"]
            console().print(
                kv_table(
                    None,
                    [
                        (
                            "single-page get",
                            f"p50 {lat['p50_us']} µs (raw {lat.get('raw_p50_us')}, {_x(lat.get('ratio_p50'))})"
                            f", p99 {lat['p99_us']} µs (raw {lat.get('raw_p99_us')}, {_x(lat.get('ratio_p99'))})",
                        ),
                        (
                            "50% zero pages",
                            f"stored {z['ratio']:.3f}x the input"
                            + (f", backend {z['backend_ratio']:.3f}x" if "backend_ratio" in z else ""),
                        ),
                    ],
                )
            )
            _goals(s["goals"])

    _out("store", {"runs": runs}, as_json, render)


# --- fault -------------------------------------------------------------------------------------------
@bench.command("fault")
@_stores
@click.option(
    "--faults", type=click.IntRange(min=1), default=10240, show_default=True, help="Pages faulted back."
)
@click.option("--prefetch", type=click.IntRange(0, 512), default=0, show_default=True)
@click.option("--no-local", is_flag=True, help="Skip the local store.")
@click.option(
    "--pin/--no-pin",
    "pin",
    default=None,
    help="Only pinned to one CPU (--pin) or only unpinned (--no-pin). [default: both; the goal "
    "ratio uses the pinned run]",
)
@_mode
@_common
def bench_fault(
    urls: tuple[str, ...],
    spawn: tuple[str, ...],
    faults: int,
    prefetch: int,
    no_local: bool,
    pin: bool | None,
    mode: str,
    quick: bool,
    as_json: bool,
) -> None:
    """Real uffd fault latency with a process guest, per store and CPU placement, vs a reference C handler,
    UFFDIO_COPY and the store's raw get."""
    from tiermem.bench.fault import PLACEMENTS, run

    placements = PLACEMENTS if pin is None else ("pinned",) if pin else ("unpinned",)
    res = run(urls, spawn, quick, faults, prefetch, local=not no_local, placements=placements, mode=mode)

    def render(r: dict[str, Any]) -> None:
        _show(
            f"fault service latency, µs ({r['faults']} faults per store, prefetch {r['prefetch']})",
            [
                "store",
                "placement",
                "path",
                "fault p50",
                "p99",
                "C handler p50",
                "p50 / C",
                "agent p50",
                "agent p99",
                "COPY p50",
                "raw get p50",
                "p50 / get",
                "p50 / (COPY+get)",
                "resident touch",
                "mismatches",
            ],
            [
                [
                    x["store"],
                    x["placement"],
                    x["fault_path"],
                    x["guest"]["p50_us"],
                    x["guest"]["p99_us"],
                    x["baseline_c_handler"]["p50_us"],
                    _x(x["ratio_p50_vs_c_handler"]),
                    x["agent"]["p50_us"],
                    x["agent"]["p99_us"],
                    x["baseline_copy"]["p50_us"],
                    x["baseline_get"]["p50_us"],
                    _x(x["ratio_p50_vs_get"]),
                    _x(x["ratio_p50_vs_copy_plus_get"]),
                    x["resident_touch"]["p50_us"],
                    x["mismatches"],
                ]
                for x in r["rows"]
            ],
        )
        _goals(r["goals"])

    _out("fault", res, as_json, render)


# --- evict -------------------------------------------------------------------------------------------
@bench.command("evict")
@_stores
@click.option("--pages", type=click.IntRange(min=1), default=65536, show_default=True)
@click.option("--backend", type=click.Choice(["uffd", "sim"]), default="uffd", show_default=True)
@click.option("--no-local", is_flag=True, help="Skip the local store.")
@_mode
@_common
def bench_evict(
    urls: tuple[str, ...],
    spawn: tuple[str, ...],
    pages: int,
    backend: str,
    no_local: bool,
    mode: str,
    quick: bool,
    as_json: bool,
) -> None:
    """Eviction throughput per store: the agent's path vs the store's raw put and put_pages."""
    from tiermem.bench.evict import run

    res = run(urls, spawn, quick, pages, backend, local=not no_local, mode=mode)

    def render(r: dict[str, Any]) -> None:
        _show(
            f"eviction throughput ({r['pages']} pages per store, {r['backend']} backend)",
            [
                "store",
                "agent p/s",
                "agent MB/s",
                "raw put p/s",
                "agent/raw",
                "put_pages p/s",
                "agent/put_pages",
                "evict ms",
                "cycle ms",
            ],
            [
                [
                    x["store"],
                    _f(x["agent"]["pages_per_s"], 0),
                    _f(x["agent"]["mb_per_s"]),
                    _f(x["raw"]["pages_per_s"], 0),
                    _x(x["ratio_vs_raw"]),
                    _f(x["store_put"]["pages_per_s"], 0),
                    _x(x["ratio_vs_store_put"]),
                    x["phases_ms"]["evict"],
                    x["phases_ms"]["total"],
                ]
                for x in r["rows"]
            ],
        )
        for x in r["rows"]:
            console().print(f"{x['store']} raw baseline: {x['raw']['client']}")

    _out("evict", res, as_json, render)


# --- scan --------------------------------------------------------------------------------------------
@bench.command("scan")
@click.option("--pages", type=click.IntRange(min=1), default=1 << 20, show_default=True)
@click.option("--accessed", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True)
@click.option("--fleet-vms", type=click.IntRange(min=0), default=None, help="[default: 1000; 0 with --quick]")
@click.option("--fleet-pages", type=click.IntRange(min=1), default=262144, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=5, show_default=True)
@_common
def bench_scan(
    pages: int,
    accessed: float,
    fleet_vms: int | None,
    fleet_pages: int,
    repeat: int,
    quick: bool,
    as_json: bool,
) -> None:
    """The sim's full-range rwprotect and hot-set scan vs one numpy pass; state per page; fleet RSS."""
    from tiermem.bench.scan import run

    if quick:
        pages, repeat, fleet_pages = min(pages, 65536), min(repeat, 3), min(fleet_pages, 4096)
    vms = fleet_vms if fleet_vms is not None else (10 if quick else 1000)
    res = run(pages, accessed, vms, fleet_pages, repeat)

    def render(r: dict[str, Any]) -> None:
        base = r["baseline_count_nonzero_s"]
        rows = [
            ["np.count_nonzero (baseline)", _f(base * 1e6), "1.00x", "-"],
            [
                "full-range rwprotect",
                _f(r["rwprotect_s"] * 1e6),
                _x(r["rwprotect_ratio"]),
                _x(r["rwprotect_ratio_best"]),
            ],
        ]
        for layout in ("clustered", "scattered"):
            rows.append(
                [
                    f"hot-set scan, {layout}",
                    _f(r[f"scan_{layout}_s"] * 1e6),
                    _x(r[f"scan_{layout}_ratio"]),
                    _x(r[f"scan_{layout}_ratio_best"]),
                ]
            )
        _show(
            f"sim scan: {r['pages']:,} pages, {r['accessed_fraction']:.0%} accessed (median of {r['repeat']})",
            ["operation", "µs", "vs baseline", "best vs best"],
            rows,
        )
        pairs = [
            (
                "state per page",
                f"{r['state_bytes_per_page']} B (+{r['synthetic_content_bytes_per_page']} B synthetic content)",
            )
        ]
        if "fleet_vms" in r:
            pairs.append(
                (
                    "fleet",
                    f"{r['fleet_vms']:,} VMs x {r['fleet_pages_per_vm']:,} pages: RSS "
                    f"{r['fleet_rss_bytes'] / 2**30:.2f} GiB ({r['fleet_bytes_per_page']:.2f} B/page)",
                )
            )
        console().print(kv_table(None, pairs))
        _goals(_scan_goals(r))

    _out("scan", {**res, "goals": _scan_goals(res)}, as_json, render)


def _scan_goals(r: dict[str, Any]) -> dict[str, Any]:
    g: dict[str, Any] = {
        "rwprotect_le_10x": r["rwprotect_ratio_best"] <= 10,
        "scan_le_10x": max(r["scan_clustered_ratio_best"], r["scan_scattered_ratio_best"]) <= 10,
        "state_le_4_bytes_per_page": r["state_bytes_per_page"] <= 4,
    }
    if r.get("fleet_vms") == 1000 and r.get("fleet_pages_per_vm") == 262144:
        g["fleet_1000x262144_under_2gib"] = r["fleet_rss_bytes"] < 2 << 30
    return g


# --- kvm ---------------------------------------------------------------------------------------------
@bench.command("kvm")
@click.option("--memory-mib", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds per phase.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Seconds between zaps with tracking on.",
)
@click.option("--workload", default="hotset:0.1", show_default=True)
@click.option("--fault-samples", type=click.IntRange(min=1), default=2000, show_default=True)
@_common
def bench_kvm(
    memory_mib: int,
    duration: float,
    interval: float,
    workload: str,
    fault_samples: int,
    quick: bool,
    as_json: bool,
) -> None:
    """A KVM guest vs a process guest: accesses/s with tracking off and on, fault latency."""
    from tiermem.kernel.probe import kvm_api_version

    if kvm_api_version() != 12:
        fail("/dev/kvm is missing or unusable here: try 'tiermem bench fault' (process guest) instead")
    from tiermem.bench.kvm import run

    res = run(
        memory_mib, duration, quick, interval_s=interval, workload=workload, fault_samples=fault_samples
    )

    def render(r: dict[str, Any]) -> None:
        rows = []
        for name in ("kvm", "process"):
            g = r[name]
            off, on, lat = g["off"], g["on"], g["latency"]
            rows.append(
                [
                    name,
                    _f(off["accesses_per_s"], 0),
                    _f(on["accesses_per_s"], 0),
                    _x(on["accesses_per_s"] / off["accesses_per_s"] if off["accesses_per_s"] else None),
                    _f(on["minor_faults_per_s"], 0),
                    on["lost_us_per_minor_fault"],
                    lat["fault_p50_us"],
                    lat["fault_p99_us"],
                    lat["touch_resident_p50_us"],
                    g["mismatches"],
                ]
            )
        _show(
            f"KVM vs process guest: {r['memory_mib']} MiB, {r['workload']}, {r['duration_s']} s per phase, "
            f"zap every {r['interval_s']} s",
            [
                "guest",
                "off acc/s",
                "on acc/s",
                "on/off",
                "MINOR/s",
                "µs lost/MINOR",
                "fault p50 µs",
                "p99 µs",
                "resident touch µs",
                "mismatches",
            ],
            rows,
        )
        _show(
            "MISSING->COPY on the KVM guest through the node agent (local store), µs",
            [
                "fault path",
                "faults",
                "served natively",
                "fault p50",
                "p99",
                "resident touch",
                "p50 / pager's",
                "mismatches",
            ],
            [
                [
                    a["fault_path"],
                    a["faults"],
                    a["native_served"],
                    a["fault_p50_us"],
                    a["fault_p99_us"],
                    a["touch_resident_p50_us"],
                    _x(r["ratios"].get(f"agent_{a['fault_path']}_fault_p50_over_pager")),
                    a["mismatches"],
                ]
                for a in r["agent_latency"]
            ],
        )
        x = r["ratios"]
        console().print(
            f"KVM/process accesses (off) {_x(x['kvm_over_process_off'])}, fault p50 "
            f"{_x(x['kvm_fault_p50_over_process'])}, p99 {_x(x['kvm_fault_p99_over_process'])}"
        )

    _out("kvm", res, as_json, render)


# --- control -----------------------------------------------------------------------------------------
@bench.command("control")
@click.option("--vms", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--agents", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Cycle interval, seconds.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Measured window, seconds.",
)
@_common
def bench_control(
    vms: int, agents: int, interval: float, duration: float, quick: bool, as_json: bool
) -> None:
    """Control-plane scale: cycle orders/s, scheduling lag vs bare timers, CPU and RSS."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from tiermem.bench.control import run

    res = run(vms, agents, interval, duration, quick)

    def render(r: dict[str, Any]) -> None:
        b = r["baseline"]
        _show(
            f"control plane: {r['vms']} VMs on {r['agents']} agents, interval {r['interval_s']} s, "
            f"{r['duration_s']} s measured",
            ["", "lag p50 ms", "lag p99 ms", "lag max ms", "CPU s"],
            [
                [
                    "control plane",
                    _f(r["lag_p50_ms"]),
                    _f(r["lag_p99_ms"]),
                    _f(r["lag_max_ms"]),
                    _f(r["cpu_s"], 2),
                ],
                [
                    "bare asyncio timers (baseline)",
                    _f(b["lag_p50_ms"]),
                    _f(b["lag_p99_ms"]),
                    _f(b["lag_max_ms"]),
                    _f(b["cpu_s"], 2),
                ],
            ],
        )
        console().print(
            kv_table(
                None,
                [
                    (
                        "cycle orders",
                        f"{r['orders']} ({r['orders_per_s']}/s sustained, {r['expected_orders_per_s']}/s due), "
                        f"{r['failed']} failed",
                    ),
                    (
                        "lag p99 vs baseline",
                        _x(r["lag_p99_ms"] / b["lag_p99_ms"] if b["lag_p99_ms"] else None),
                    ),
                    ("CPU", f"{r['cpu_pct_of_one_core']}% of one core"),
                    ("RSS", f"{r['rss_mib']} MiB (peak {r['rss_peak_mib']} MiB)"),
                ],
            )
        )
        _goals(r["goals"])

    _out("control", res, as_json, render)


# --- policy ------------------------------------------------------------------------------------------
@bench.command("policy")
@click.option("--pages", type=click.IntRange(min=1), default=16384, show_default=True)
@click.option("--ticks", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--interval-ticks", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--cold-after", default="1,2,4,8", show_default=True)
@click.option(
    "--workload", "workloads", multiple=True, help="Workload spec (repeatable) [default: the built-ins]."
)
@click.option(
    "--trace",
    "traces",
    multiple=True,
    type=click.Path(exists=True),
    help="Trace file or directory of *.csv.gz traces (repeatable), e.g. traces/.",
)
@click.option("--no-workloads", is_flag=True, help="Only the --trace files.")
@click.option(
    "--cost-pages",
    type=click.IntRange(min=64),
    default=262144,
    show_default=True,
    help="Guest pages of the agent CPU-per-cycle measurement (one sim VM per policy).",
)
@_common
def bench_policy(
    pages: int,
    ticks: int,
    interval_ticks: int,
    cold_after: str,
    workloads: tuple[str, ...],
    traces: tuple[str, ...],
    no_workloads: bool,
    cost_pages: int,
    quick: bool,
    as_json: bool,
) -> None:
    """Memory saved vs promotions per workload/trace and policy, beside the future-knowing bound."""
    from tiermem.bench.policy import WORKLOADS, run

    try:
        ages = tuple(int(x) for x in cold_after.split(","))
    except ValueError:
        fail(f"--cold-after: integers separated by commas, got {cold_after!r}")
    if not ages or min(ages) < 1 or max(ages) > 250:
        fail("--cold-after: values between 1 and 250")
    files = sorted(
        str(f) for t in traces for f in (sorted(Path(t).glob("*.csv.gz")) if Path(t).is_dir() else [t])
    )
    res = run(
        quick,
        pages,
        ticks,
        interval_ticks,
        ages,
        () if no_workloads else (workloads or WORKLOADS),
        traces=tuple(files),
        cost_pages=cost_pages,
    )

    def render(r: dict[str, Any]) -> None:
        _show(
            f"policy: cycle every {r['interval_ticks']} ticks; workloads {r['pages']} pages x {r['ticks']} ticks; "
            "bound = fewest promotions for the same saving; oracle/random evict as many pages at every close",
            [
                "workload",
                "policy",
                "A",
                "saved",
                "promotions",
                "bound",
                "vs bound",
                "vs delayed bound",
                "per tick",
                "oracle prom.",
                "random prom.",
            ],
            [
                [
                    x["workload"],
                    x["policy"],
                    x["cold_after"],
                    f"{100 * x['saved']:.1f}%",
                    x["promotions"],
                    x["bound_promotions"],
                    _x(x["vs_bound"]),
                    _x(x["vs_bound_delayed"]),
                    _f(x["promotions_per_tick"], 2),
                    x.get("oracle_promotions", "-"),
                    x.get("random_promotions", "-"),
                ]
                for x in r["rows"]
            ],
        )
        _show(
            "agent CPU per dry-run cycle (protect..resume), 10% of the pages touched per cycle",
            ["policy", "pages", "CPU ms/cycle", "decide ms", "vs age", "state B/page"],
            [
                [
                    c["policy"],
                    c["pages"],
                    _f(c["cpu_ms_per_cycle"], 2),
                    _f(c["decide_ms"], 2),
                    _x(c["cpu_vs_age"]),
                    c["state_bytes_per_page"],
                ]
                for c in r["cycle_cost"]
            ],
        )

    _out("policy", res, as_json, render)


# --- agent -------------------------------------------------------------------------------------------
@bench.command("agent")
@_stores
@click.option("--sim-vms", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--sim-mib", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--guest-mib", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--cap-mib",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Per-cycle eviction cap of each sim VM.",
)
@click.option("--interval-ms", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--python-path", is_flag=True, help="Serve faults on the pure-Python path (no native fault thread)."
)
@_mode
@_common
def bench_agent(
    urls: tuple[str, ...],
    spawn: tuple[str, ...],
    sim_vms: int,
    sim_mib: int,
    guest_mib: int,
    cap_mib: int,
    interval_ms: int,
    python_path: bool,
    mode: str,
    quick: bool,
    as_json: bool,
) -> None:
    """4 sim VMs of 1 GiB + 1 process guest (uffd or rwp), one store (default: a spawned Redis)."""
    from tiermem.bench.agent import run

    res = run(
        urls,
        spawn,
        quick,
        sim_vms,
        sim_mib,
        guest_mib,
        cap_mib,
        interval_ms,
        mode=mode,
        native_faults=not python_path,
    )

    def render(r: dict[str, Any]) -> None:
        _show(
            f"tracking: one detect cycle per VM ({r['interval_ms']} ms window), ms per phase",
            [
                "vm",
                "backend",
                "pages",
                "hot",
                "protect",
                "wait",
                "freeze",
                "scan",
                "decide",
                "resume",
                "total",
                "agent CPU ms",
            ],
            [
                [
                    t["vm"],
                    t["backend"],
                    t["pages"],
                    t["hot"],
                    *(
                        t["phases_ms"][p]
                        for p in ("protect", "wait", "freeze", "scan", "decide", "resume", "total")
                    ),
                    t["cpu_ms"],
                ]
                for t in r["tracking"]
            ],
        )
        ev = r["eviction"]
        _show(
            f"eviction: {ev['vms']} sim VMs at once, cap {r['cap_mib']} MiB each, ms per phase",
            ["vm", "pages", "protect", "scan", "decide", "evict", "total"],
            [
                [
                    v["vm"],
                    v["pages"],
                    *(v["phases_ms"][p] for p in ("protect", "scan", "decide", "evict", "total")),
                ]
                for v in ev["per_vm"]
            ],
        )
        i, d, g = r["faults_idle"], r["faults_during_eviction"], r["baseline_get"]
        _show(
            f"fault latency, µs ({r['store']['kind']}, {r['fault_path']} fault path); baseline: {g['client']}",
            ["", "faults", "p50", "p99", "agent p50", "agent p99", "p50 vs raw get"],
            [
                [
                    "faults, idle",
                    i["faults"],
                    i["p50_us"],
                    i["p99_us"],
                    i["agent_p50_us"],
                    i["agent_p99_us"],
                    _x(r["ratio_fault_p50_idle_vs_raw_get"]),
                ],
                [
                    f"faults during eviction ({100 * d['overlap']:.0f}% overlap)",
                    d["faults"],
                    d["p50_us"],
                    d["p99_us"],
                    d["agent_p50_us"],
                    d["agent_p99_us"],
                    _x(r["ratio_fault_p50_during_vs_raw_get"]),
                ],
                ["raw get (baseline)", g["samples"], g["p50_us"], g["p99_us"], "-", "-", "1.00x"],
            ],
        )
        c = r["cpu_per_gib"]
        console().print(
            kv_table(
                None,
                [
                    (
                        "evicted",
                        f"{ev['pages']} pages in {ev['seconds']} s: {_f(ev['pages_per_s'], 0)} pages/s, "
                        f"{ev['mb_per_s']} MB/s ({_x(r['ratio_evict_rate_vs_raw_put'])} the raw put, "
                        f"{_f(r['baseline_put']['pages_per_s'], 0)} pages/s)",
                    ),
                    (
                        "agent CPU per GiB tracked",
                        f"sim {c['sim_ms_per_cycle']} ms per cycle ({c['sim_pct_core_at_30s']}% "
                        f"of a core at a 30 s interval); uffd {c['uffd_ms_per_cycle']} ms per cycle; "
                        f"baseline numpy pass over a GiB's pages {c['baseline_numpy_pass_ms']} ms",
                    ),
                ],
            )
        )
        _goals(r["goals"])

    _out("agent", res, as_json, render)


# --- tracking ---------------------------------------------------------------------------------------
@bench.command("tracking")
@click.option(
    "--modes",
    default="auto",
    show_default=True,
    help="Comma-separated off,rwp,uffd; auto = all three, rwp only where the kernel has it.",
)
@click.option("--guest-mib", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--workload", default="hotset:0.1", show_default=True)
@click.option(
    "--window",
    "window_s",
    type=click.FloatRange(min=0, min_open=True),
    default=8.0,
    show_default=True,
    help="Seconds the guest runs per mode.",
)
@click.option("--interval-ms", type=click.IntRange(min=1), default=500, show_default=True)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Rounds of every mode, in rotated order; figures are medians. 1 with --quick.",
)
@_common
def bench_tracking(
    modes: str,
    guest_mib: int,
    workload: str,
    window_s: float,
    interval_ms: int,
    rounds: int,
    quick: bool,
    as_json: bool,
) -> None:
    """What RWP buys: guest access rate and agent CPU per GiB per cycle, tracking off / rwp / uffd emulation."""
    from tiermem.bench.common import ratio
    from tiermem.bench.tracking import run

    res = run(modes, quick, guest_mib, workload, window_s, interval_ms, rounds=rounds)

    def render(r: dict[str, Any]) -> None:
        off = next((x for x in r["rows"] if x["mode"] == "off"), None)
        rwp = next((x for x in r["rows"] if x["mode"] == "rwp"), None)
        _show(
            f"tracking cost: {r['guest_mib']} MiB guest, {r['workload']}, {r['window_s']} s per mode, "
            f"{r['interval_ms']} ms cycles, median of {r['rounds']} rounds (kernel {r['kernel']})",
            [
                "mode",
                "registered",
                "accesses/s",
                "vs off",
                "cycles",
                "agent CPU ms/GiB/cycle",
                "vs rwp",
                "mismatches",
            ],
            [
                [
                    x["mode"],
                    x["registered"],
                    _f(x["accesses_per_s"], 0),
                    _x(ratio(x["accesses_per_s"], off["accesses_per_s"])) if off else "-",
                    x["cycles"],
                    _f(x["agent_cpu_ms_per_gib_per_cycle"]),
                    _x(ratio(x["agent_cpu_ms_per_gib_per_cycle"], rwp["agent_cpu_ms_per_gib_per_cycle"]))
                    if rwp
                    else "-",
                    x["mismatches"],
                ]
                for x in r["rows"]
            ],
        )

    _out("tracking", res, as_json, render)


# --- restore -----------------------------------------------------------------------------------------
@bench.command("restore")
@_stores
@click.option(
    "--size",
    "size_mib",
    type=click.IntRange(min=2),
    default=64,
    show_default=True,
    help="Memory file size, MiB (even: two regions around an MMIO hole).",
)
@click.option(
    "--prefault-rate",
    type=click.FloatRange(min=1),
    default=1e6,
    show_default=True,
    help="Background prefault rate of the second restore, pages/s.",
)
@click.option(
    "--prefetch",
    type=click.IntRange(0, 512),
    default=8,
    show_default=True,
    help="Pages after a faulting page fetched in the same round trip.",
)
@click.option("--no-local", is_flag=True, help="Skip the local store.")
@_common
def bench_restore(
    urls: tuple[str, ...],
    spawn: tuple[str, ...],
    size_mib: int,
    prefault_rate: float,
    prefetch: int,
    no_local: bool,
    quick: bool,
    as_json: bool,
) -> None:
    """Firecracker snapshot restore per store: first touch, pages/s on demand and with prefault,
    vs reading the memory file locally and a plain ranged GET."""
    from tiermem.bench.restore import run

    res = run(urls, spawn, quick, size_mib, prefault_rate, local=not no_local, prefetch=prefetch)

    def render(r: dict[str, Any]) -> None:
        lr, rg = r["baseline_local_read"], r["baseline_ranged_get"]
        _show(
            f"snapshot restore of {r['size_mib']} MiB ({r['pages']} pages, prefetch {r['prefetch']}); "
            "every restore byte-identical",
            [
                "store",
                "import pages/s",
                "first touch ms",
                "on demand pages/s",
                "vs local read",
                "prefault pages/s",
                "vs local read",
                "first touch vs ranged GET",
                "prefault vs ranged GET",
            ],
            [
                [
                    x["store"],
                    _f(x["import_pages_per_s"], 0),
                    x["first_touch_ms"],
                    _f(x["on_demand_pages_per_s"], 0),
                    _x(x["ratio_on_demand_vs_local_read"]),
                    _f(x["prefault_pages_per_s"], 0),
                    _x(x["ratio_prefault_vs_local_read"]),
                    _x(x.get("ratio_first_touch_vs_ranged_get")),
                    _x(x.get("ratio_prefault_vs_ranged_get")),
                ]
                for x in r["rows"]
            ],
        )
        console().print(
            kv_table(
                None,
                [
                    (
                        "baseline: local file read",
                        f"pread one page p50 {lr['p50_us']} µs, {_f(lr['pages_per_s'], 0)} pages/s",
                    ),
                    (
                        "baseline: plain ranged GET",
                        "no S3 store in this run"
                        if rg is None
                        else f"one page p50 {rg['page_p50_us']} µs, 4 MiB ranges {_f(rg['chunk_pages_per_s'], 0)} pages/s",
                    ),
                ],
            )
        )

    _out("restore", res, as_json, render)
