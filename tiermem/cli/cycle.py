"""``tiermem cycle``: run one detection (and eviction) cycle now, and show the cycle history."""

from __future__ import annotations

import click

from tiermem.cli.options import DURATION, complete_vm_ids, connection_options, get_client, json_option
from tiermem.cli.output import console, emit_json, fmt_time, kv_table, phase_table
from tiermem.cli.vm import check_id, cycle_table
from tiermem.errors import InvalidArgument
from tiermem.model import CycleMode, CycleReport, EvictionPolicy
from tiermem.units import format_bytes

__all__ = ["cycle"]


@click.group()
def cycle() -> None:
    """Detection and eviction cycles."""


@cycle.command("run")
@click.argument("vm_id", metavar="VM", shell_complete=complete_vm_ids)
@click.option("--dry-run", is_flag=True, help="Detect only: report the hot and cold pages, evict nothing.")
@click.option(
    "--interval",
    type=DURATION,
    metavar="DURATION",
    help="Detection wait for this cycle, e.g. 5s (default: the VM's policy).",
)
@json_option
@connection_options
@click.pass_context
def run_cycle(ctx: click.Context, vm_id: str, dry_run: bool, interval: int | None, as_json: bool) -> None:
    """Run one cycle on a VM now and print its report with the time spent in each phase.

    JSON: the CycleReport object (every field of tiermem.model.CycleReport; phases in microseconds).
    """
    check_id(vm_id, "VM id", "VM")
    if interval is not None and not 0 < interval <= EvictionPolicy.MAX_INTERVAL_MS:
        raise InvalidArgument("--interval: must be > 0 and at most 7 days")
    mode = CycleMode.DETECT if dry_run else CycleMode.EVICT
    r: CycleReport = get_client(ctx).trigger_cycle(vm_id, mode, interval or 0)
    if as_json:
        emit_json(r)
        return
    rows = [
        ("node", r.node_id or "-"),
        ("mode", r.mode.value + (" (dry run: nothing evicted)" if r.mode is CycleMode.DETECT else "")),
        ("started", fmt_time(r.started_unix_ms)),
        ("pages scanned", r.pages_scanned),
        ("hot", r.pages_hot),
        ("cold", r.pages_cold),
        ("evicted", f"{r.pages_evicted} ({r.zero_pages} zero)" + (" [yellow]capped[/]" if r.capped else "")),
        ("written", format_bytes(r.bytes_written)),
        ("faults served", r.faults_served),
        ("policy version", r.policy_version),
    ]
    con = console()
    con.print(kv_table(f"VM {r.vm_id} cycle {r.cycle}", rows))
    con.print(phase_table(r.phases))
    if r.error:
        con.print(f"[red]stopped early:[/] {r.error}")


@cycle.command("history")
@click.argument("vm_id", metavar="[VM]", required=False, shell_complete=complete_vm_ids)
@click.option(
    "--limit", type=click.IntRange(1, 10_000), default=20, show_default=True, help="Newest reports to show."
)
@json_option
@connection_options
@click.pass_context
def history(ctx: click.Context, vm_id: str | None, limit: int, as_json: bool) -> None:
    """Recent cycle reports of a VM (or of every VM), newest first.

    JSON: a list of CycleReport objects.
    """
    if vm_id:
        check_id(vm_id, "VM id", "VM")
    reports: list[CycleReport] = get_client(ctx).list_cycle_reports(vm_id or "", limit)
    if as_json:
        emit_json(reports)
        return
    if not reports:
        click.echo("no cycles recorded yet")
        return
    console().print(cycle_table(reports, None))
