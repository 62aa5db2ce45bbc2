"""``tiermem demo``: the main job — tiering in action on embedded defaults (no Redis, no S3)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tiermem.cli.errors import EXIT_PRECONDITION, CliExit, require_extra
from tiermem.demo.runner import DEFAULT_WORKLOADS, DemoConfig, DemoSummary, Sample, run_demo
from tiermem.units import parse_duration_ms

MIB = 1024 * 1024


def _table(sample: Sample, duration: float) -> Table:
    t = Table(title=f"tiermem demo — {sample.t:4.0f}s / {duration:.0f}s", title_justify="left")
    for col in (
        "vm",
        "total MiB",
        "resident MiB",
        "evicted MiB",
        "working set MiB",
        "faults/s",
        "promotion %/min",
        "cycles",
    ):
        t.add_column(col, justify="right" if col != "vm" else "left")
    for s in sorted(sample.statuses, key=lambda s: s.vm_id):
        ps = s.page_size
        t.add_row(
            s.vm_id,
            f"{s.total_pages * ps / MIB:.0f}",
            f"{s.resident_pages * ps / MIB:.1f}",
            f"{s.evicted_pages * ps / MIB:.1f}",
            f"{s.working_set_pages * ps / MIB:.1f}",
            f"{sample.faults_per_s.get(s.vm_id, 0.0):.0f}",
            f"{s.promotion_rate * 100:.2f}",
            str(s.cycles),
        )
    return t


def _print_summary(console: Console, s: DemoSummary) -> None:
    t = Table(title="summary", title_justify="left")
    for col in ("vm", "workload", "evicted", "faults served", "cycles", "verified pages", "mismatches"):
        t.add_column(col)
    for v in s.vms:
        total = int(v["total_pages"])  # type: ignore[call-overload]
        ev = int(v["evicted_pages"])  # type: ignore[call-overload]
        t.add_row(
            str(v["vm_id"]),
            str(v["workload"]),
            f"{ev}/{total} ({ev / max(total, 1):.0%})",
            str(v["faults_served"]),
            str(v["cycles"]),
            str(v["pages_verified"]),
            str(v["mismatches"]),
        )
    console.print(t)
    ok = "[green]intact[/]" if s.integrity_ok else "[red]MISMATCHES[/]"
    console.print(
        f"memory saved: [bold]{s.saved_fraction:.0%}[/] of {s.total_pages * 4096 / MIB:.0f} MiB "
        f"({s.evicted_pages} pages in the local store); faults served: {s.faults_served}; "
        f"every guest's memory {ok} ({s.pages_verified} pages verified)"
    )
    console.print(f"plot: {s.plot}")


@click.command()
@click.option("--duration", default="30s", show_default=True, help="How long to run, e.g. 20s, 2m.")
@click.option(
    "--backend",
    type=click.Choice(["sim", "uffd", "rwp"]),
    default="sim",
    show_default=True,
    help="sim: simulated RWP kernel; uffd: real process guests, RWP emulated over userfaultfd "
    "MINOR faults; rwp: real process guests tracked by the kernel's userfaultfd RWP "
    "(Linux 7.3+).",
)
@click.option("--kvm", is_flag=True, help="Run the four workloads as real KVM guests (needs /dev/kvm).")
@click.option(
    "--memory",
    "memory_mib",
    type=click.IntRange(4, 65536),
    default=None,
    help="MiB per VM [default: 128 sim, 64 uffd and KVM].",
)
@click.option(
    "--interval", default="1s", show_default=True, help="Detection interval of the demo's fleet policy."
)
@click.option("--cold-after", type=click.IntRange(1, 250), default=2, show_default=True)
@click.option("--plot", "plot", type=click.Path(dir_okay=False), default=None, help="PNG path for the plot.")
@click.option(
    "--workdir", type=click.Path(file_okay=False), default=None, help="Keep state here (default: a temp dir)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the final summary as JSON.")
def demo(
    duration: str,
    backend: str,
    kvm: bool,
    memory_mib: int | None,
    interval: str,
    cold_after: int,
    plot: str | None,
    workdir: str | None,
    as_json: bool,
) -> None:
    """Start a control plane, an agent and four VMs (hot set, Zipf, phase shift, idle); tier them live."""
    require_extra("matplotlib", "demo", "tiermem demo")
    try:
        dur = parse_duration_ms(duration) / 1000
    except Exception as e:
        raise click.BadParameter(str(e), param_hint="--duration") from None
    try:
        interval_ms = parse_duration_ms(interval)
    except Exception as e:
        raise click.BadParameter(str(e), param_hint="--interval") from None
    if kvm:
        from tiermem.kernel.probe import kvm_api_version

        if kvm_api_version() != 12:
            raise CliExit(
                "/dev/kvm is missing or unusable here: run the demo on the sim (default) or with "
                "--backend uffd (process guests)",
                EXIT_PRECONDITION,
            )
        backend = "kvm"
    elif backend in ("uffd", "rwp"):
        _require_backend(backend)
    cfg = DemoConfig(
        duration_s=dur,
        backend=backend,
        memory_mib=memory_mib or 0,
        interval_ms=interval_ms,
        cold_after=cold_after,
        plot=plot or "",
        workdir=workdir or "",
    )
    _quiet_logs()
    console = Console(stderr=as_json)
    if not as_json:
        console.print(
            f"tiermem demo: control plane + agent + {len(DEFAULT_WORKLOADS)} {backend} VMs "
            f"(workloads: {', '.join(DEFAULT_WORKLOADS.values())}); policy: every {interval}, "
            f"cold after {cold_after} cycles; local directory store"
        )
    summary = _run(cfg, console, as_json)
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    else:
        _print_summary(console, summary)
    if not summary.integrity_ok:
        raise SystemExit(3)


def _require_backend(backend: str) -> None:
    from tiermem.kernel.probe import probe_host

    rep = probe_host()
    if not rep.backends.get(backend):
        hint = "; `tiermem doctor` shows what this host has" if backend == "rwp" else ""
        raise CliExit(
            f"--backend {backend} is not available here: {rep.reasons.get(backend, 'unknown')}{hint}",
            EXIT_PRECONDITION,
        )


def _run(cfg: DemoConfig, console: Console, as_json: bool) -> DemoSummary:
    async def main() -> DemoSummary:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        assert task is not None
        loop.add_signal_handler(signal.SIGINT, task.cancel)  # Ctrl-C: cancel, and the runner cleans up
        if as_json:
            return await run_demo(cfg)
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            return await run_demo(cfg, lambda s: live.update(_table(s, cfg.duration_s)))

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        console.print("interrupted; everything was stopped cleanly")
        raise SystemExit(130) from None


def _quiet_logs() -> None:
    # Warnings and errors only, and on stderr: stdout carries the live table or, with --json, nothing but
    # the JSON (structlog's unconfigured default prints to stdout).
    from tiermem.logging import configure_logging

    configure_logging(json=False, level="WARNING", stream=sys.stderr)
