"""``tiermem vm``: list, show, register, drain and deregister VMs through the control plane."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tiermem.api import PolicyScope, VmSpec
from tiermem.cli.errors import fail
from tiermem.cli.options import (
    MEMORY,
    complete_node_ids,
    complete_vm_ids,
    connection_options,
    get_client,
    json_option,
)
from tiermem.cli.output import (
    console,
    emit_json,
    emit_json_line,
    fmt_cap,
    fmt_pages,
    fmt_time,
    kv_table,
    table,
)
from tiermem.errors import InvalidArgument
from tiermem.model import PAGE_SIZE, Backend, DrainProgress, EvictionPolicy, VmStatus, validate_id
from tiermem.selector import parse_selector, validate_labels
from tiermem.units import format_bytes, format_duration_ms, format_rate_per_min

__all__ = ["check_id", "check_selector", "cycle_table", "vm"]

LAST_CYCLES = 5


def check_id(value: str, what: str, flag: str) -> str:
    """``value`` if it is a valid id, else InvalidArgument naming ``flag``."""
    try:
        return validate_id(value, what)
    except InvalidArgument as e:
        raise InvalidArgument(f"{flag}: {e}") from None


def check_selector(selector: str | None) -> str:
    """The selector text if well-formed (or empty), else InvalidArgument naming --selector."""
    if not selector:
        return ""
    try:
        parse_selector(selector)
    except InvalidArgument as e:
        raise InvalidArgument(f"--selector: {e}") from None
    return selector


@click.group()
def vm() -> None:
    """VMs: list, show, register, drain, deregister."""


@vm.command("list")
@click.option(
    "--node", "node_id", metavar="NODE", shell_complete=complete_node_ids, help="Only VMs on this node."
)
@click.option("--selector", metavar="K=V[,K=V]", help="Only VMs whose labels match.")
@json_option
@connection_options
@click.pass_context
def list_vms(ctx: click.Context, node_id: str | None, selector: str | None, as_json: bool) -> None:
    """List VMs with their memory split (resident/evicted), working set and faults.

    JSON: a list of VmStatus objects (every field of tiermem.model.VmStatus).
    """
    if node_id:
        check_id(node_id, "node id", "--node")
    vms: list[VmStatus] = get_client(ctx).list_vm_status(node_id or "", check_selector(selector))
    if as_json:
        emit_json(vms)
        return
    if not vms:
        click.echo("no VMs registered")
        return
    cols = [
        "VM",
        "NODE",
        "STATE",
        "BACKEND",
        "TOTAL",
        "RESIDENT",
        "EVICTED",
        "WORKING SET",
        "FAULTS",
        "PROMOTION",
        "CYCLES",
    ]
    rows = [
        [
            s.vm_id,
            s.node_id + ("" if s.node_up else " (down)"),
            s.state.value,
            s.backend.value,
            format_bytes(s.total_pages * s.page_size),
            format_bytes(s.resident_pages * s.page_size),
            format_bytes(s.evicted_pages * s.page_size),
            format_bytes(s.working_set_pages * s.page_size),
            s.faults_served,
            format_rate_per_min(s.promotion_rate),
            s.cycles,
        ]
        for s in vms
    ]
    console().print(table(None, cols, rows))


@vm.command("show")
@click.argument("vm_id", metavar="VM", shell_complete=complete_vm_ids)
@click.option(
    "--cycles",
    "last",
    type=click.IntRange(0, 1000),
    default=LAST_CYCLES,
    show_default=True,
    help="How many recent cycles to show.",
)
@json_option
@connection_options
@click.pass_context
def show_vm(ctx: click.Context, vm_id: str, last: int, as_json: bool) -> None:
    """Show one VM: working set, resident and evicted memory, faults, promotion rate, store usage, last cycles.

    JSON: the VmStatus fields plus ``last_cycles`` (a list of CycleReport objects, newest first).
    """
    check_id(vm_id, "VM id", "VM")
    client = get_client(ctx)
    s: VmStatus = client.get_vm_status(vm_id)
    reports = client.list_cycle_reports(vm_id, last) if last else []
    if as_json:
        from tiermem.cli.output import to_jsonable

        doc = to_jsonable(s)
        doc["last_cycles"] = to_jsonable(reports)
        emit_json(doc)
        return
    ps = s.page_size or PAGE_SIZE
    u = s.store_usage
    ratio = f" (compressed to {u.stored_bytes / u.logical_bytes:.0%})" if u.logical_bytes else ""
    rows: list[tuple[str, Any]] = [
        ("node", s.node_id + ("" if s.node_up else " [red](down)[/]")),
        ("state", s.state.value),
        ("backend", s.backend.value),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(s.labels.items())) or "-"),
        ("memory", fmt_pages(s.total_pages, ps)),
        ("resident", fmt_pages(s.resident_pages, ps)),
        ("evicted", fmt_pages(s.evicted_pages, ps)),
        ("working set", fmt_pages(s.working_set_pages, ps)),
        ("faults served", f"{s.faults_served} (p50 {s.fault_p50_us} us, p99 {s.fault_p99_us} us)"),
        ("tracking faults", s.minor_faults),
        (
            "promotion rate",
            format_rate_per_min(s.promotion_rate)
            + (
                f" (SLO {format_rate_per_min(s.policy.slo_promotion_rate)})"
                if s.policy.slo_promotion_rate
                else ""
            ),
        ),
        ("store", f"{u.store_name or s.policy.store} {u.store_kind} {u.store_url}".strip()),
        (
            "store usage",
            f"{u.pages} pages + {u.zero_pages} zero pages, {format_bytes(u.stored_bytes)}{ratio}",
        ),
        ("cycles", s.cycles),
        (
            "policy",
            f"every {format_duration_ms(s.policy.interval_ms)}, cold after {s.policy.cold_after}, "
            f"cap {fmt_cap(s.policy.max_evict)}, v{s.policy.version}"
            + (" [yellow]paused[/]" if s.policy.paused else ""),
        ),
        ("updated", fmt_time(s.updated_unix_ms)),
    ]
    con = console()
    con.print(kv_table(f"VM {s.vm_id}", rows))
    if reports:
        con.print(cycle_table(reports, f"last {len(reports)} cycles"))


def cycle_table(reports: list[Any], title: str | None) -> Any:
    """A table of cycle reports (shared with ``tiermem cycle history``)."""
    cols = [
        "VM",
        "CYCLE",
        "MODE",
        "STARTED",
        "SCANNED",
        "HOT",
        "COLD",
        "EVICTED",
        "WRITTEN",
        "FAULTS",
        "TOTAL",
        "NOTE",
    ]
    rows = [
        [
            r.vm_id,
            r.cycle,
            r.mode.value,
            fmt_time(r.started_unix_ms),
            r.pages_scanned,
            r.pages_hot,
            r.pages_cold,
            r.pages_evicted,
            format_bytes(r.bytes_written),
            r.faults_served,
            format_duration_ms(r.phases.total_us / 1000),
            r.error or ("capped" if r.capped else ""),
        ]
        for r in reports
    ]
    return table(title, cols, rows)


@vm.command("register")
@click.argument("vm_id", metavar="VM")
@click.option(
    "--node",
    "node_id",
    required=True,
    metavar="NODE",
    shell_complete=complete_node_ids,
    help="Node whose agent tracks the VM.",
)
@click.option("--memory", type=MEMORY, required=True, metavar="SIZE", help="Guest memory, e.g. 1GiB, 256M.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="A label (repeatable).")
@click.option(
    "--backend",
    type=click.Choice([b.value for b in Backend]),
    default=Backend.SIM.value,
    show_default=True,
    help="Kernel backend.",
)
@click.option(
    "--workload",
    metavar="SPEC",
    default="",
    help="Sim backend only: guest workload spec, e.g. zipf:1.1, hotset:0.1, scan or idle.",
)
@click.option("--attach", is_flag=True, help="Also attach it on its node now.")
@json_option
@connection_options
@click.pass_context
def register_vm(
    ctx: click.Context,
    vm_id: str,
    node_id: str,
    memory: int,
    labels: tuple[str, ...],
    backend: str,
    workload: str,
    attach: bool,
    as_json: bool,
) -> None:
    """Register a VM with the control plane (and attach it with --attach).

    JSON: the VmStatus object.
    """
    check_id(vm_id, "VM id", "VM")
    check_id(node_id, "node id", "--node")
    if memory <= 0 or memory % PAGE_SIZE:
        raise InvalidArgument(f"--memory: must be a positive multiple of {PAGE_SIZE} bytes, got {memory}")
    label_map: dict[str, str] = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidArgument(f"--label: invalid label {item!r}: use k=v")
        if key.strip() in label_map:
            raise InvalidArgument(f"--label: {key.strip()!r} given twice")
        label_map[key.strip()] = value.strip()
    try:
        validate_labels(label_map)
    except InvalidArgument as e:
        raise InvalidArgument(f"--label: {e}") from None
    if workload and backend != Backend.SIM.value:
        raise InvalidArgument("--workload: only the sim backend runs an in-process workload")
    spec = VmSpec(
        vm_id=vm_id,
        node_id=node_id,
        memory_bytes=memory,
        labels=label_map,
        backend=Backend(backend),
        workload=workload,
    )
    status: VmStatus = get_client(ctx).register_vm(spec, attach)
    if as_json:
        emit_json(status)
        return
    what = "registered and attached" if attach else "registered"
    click.echo(f"VM {vm_id} {what} on {node_id} ({format_bytes(memory)}, {backend})")


@vm.command("drain")
@click.argument("vm_id", metavar="VM", shell_complete=complete_vm_ids)
@click.option(
    "--keep-paused",
    is_flag=True,
    help="Pause the VM's policy first, so no later cycle evicts it again (undo: policy set VM --resume).",
)
@json_option
@connection_options
@click.pass_context
def drain_vm(ctx: click.Context, vm_id: str, keep_paused: bool, as_json: bool) -> None:
    """Bring every evicted page of a VM back into its memory, with a progress bar.

    No cycle runs during the drain. Afterwards the VM's policy applies again, and the next scheduled
    cycle evicts its cold pages anew, unless --keep-paused paused it (a VM policy entry with
    paused=true; `tiermem policy set VM --resume` undoes it).

    JSON: one DrainProgress object per line (vm_id, pages_total, pages_restored, done).
    """
    check_id(vm_id, "VM id", "VM")
    client = get_client(ctx)
    if keep_paused:
        client.set_policy(PolicyScope.for_vm(vm_id), EvictionPolicy(paused=True), ["paused"])
    stream = client.drain_vm(vm_id)
    last = DrainProgress(vm_id)
    if as_json:
        for p in stream:
            emit_json_line(p)
            last = p
    else:
        con = console()
        with Progress(
            TextColumn("draining [bold]{task.description}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("pages"),
            TimeElapsedColumn(),
            console=con,
            transient=False,
            disable=not con.is_terminal,
        ) as bar:
            task = bar.add_task(vm_id, total=None)
            for p in stream:
                bar.update(task, total=max(p.pages_total, 1), completed=p.pages_restored)
                last = p
        paused = " (paused: policy set VM --resume to tier it again)" if keep_paused else ""
        click.echo(f"VM {vm_id} drained: {last.pages_restored} of {last.pages_total} pages restored{paused}")
    if not last.done:
        fail(f"drain of {vm_id} ended before it was done ({last.pages_restored}/{last.pages_total} pages)", 2)


@vm.command("deregister")
@click.argument("vm_id", metavar="VM", shell_complete=complete_vm_ids)
@click.option(
    "--purge",
    is_flag=True,
    help="The VM has shut down: discard its evicted pages instead of draining them back.",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask to confirm --purge.")
@json_option
@connection_options
@click.pass_context
def deregister_vm(ctx: click.Context, vm_id: str, purge: bool, yes: bool, as_json: bool) -> None:
    """Detach and forget a VM: drain its pages back first, or --purge them after shutdown.

    JSON: {vm_id, purged, pages_purged}.
    """
    check_id(vm_id, "VM id", "VM")
    if purge and not yes:
        if not sys.stdin.isatty():
            fail("--purge discards the VM's evicted pages for good: add --yes to confirm")
        click.confirm(f"Discard every evicted page of {vm_id}? Its guest must have shut down", abort=True)
    purged = int(get_client(ctx).deregister_vm(vm_id, purge))
    if as_json:
        emit_json({"vm_id": vm_id, "purged": purge, "pages_purged": purged})
        return
    click.echo(f"VM {vm_id} deregistered" + (f" ({purged} evicted pages purged)" if purge else " (drained)"))


# `tiermem vm run` (the reference KVM VMM) lives in its own module: it imports no gRPC code.
from tiermem.cli.vmrun import run_vm  # noqa: E402

vm.add_command(run_vm)
