"""``tiermem policy``: per-VM eviction policies, label-selector defaults and the fleet default.

Resolution on the control plane: the VM's own policy, else the newest matching
selector default, else the fleet default, else the built-in defaults. ``set``
is a partial update: only the flags given change (``SetPolicyRequest.fields``).
"""

from __future__ import annotations

from typing import Any

import click

from tiermem import evict
from tiermem.api import PolicyScope, ScopeKind
from tiermem.cli.errors import fail
from tiermem.cli.options import (
    CAP,
    DURATION,
    RATE,
    SIZE,
    complete_vm_ids,
    connection_options,
    get_client,
    json_option,
)
from tiermem.cli.output import console, emit_json, fmt_cap, fmt_time, kv_table, policy_rows, table
from tiermem.errors import InvalidArgument
from tiermem.model import Compression, EvictionCap, EvictionPolicy, validate_id
from tiermem.units import format_bytes, format_duration_ms, format_rate_per_min

__all__ = ["policy", "resolve_scope", "scope_json", "scope_text"]


def resolve_scope(vm_id: str | None, selector: str | None, fleet: bool) -> PolicyScope:
    """The scope named by exactly one of VM, ``--selector`` or ``--fleet``."""
    given = [x for x in (vm_id, selector, fleet or None) if x]
    if len(given) != 1:
        raise InvalidArgument("name exactly one target: a VM, --selector k=v[,k2=v2] or --fleet")
    try:
        if vm_id:
            return PolicyScope.for_vm(vm_id)
        if selector is not None:
            return PolicyScope.for_selector(selector)
    except InvalidArgument as e:
        raise InvalidArgument(f"{'VM' if vm_id else '--selector'}: {e}") from None
    return PolicyScope.fleet()


def scope_text(scope: PolicyScope | None) -> str:
    """``vm/web-1``, ``selector/tier=batch``, ``fleet`` or ``built-in defaults``."""
    if scope is None:
        return "built-in defaults"
    return "fleet" if scope.kind is ScopeKind.FLEET else f"{scope.kind.value}/{scope.value}"


def scope_json(scope: PolicyScope | None) -> dict[str, str] | None:
    """``{"kind": "vm"|"selector"|"fleet", "value": ...}`` or None for the built-in defaults."""
    return None if scope is None else {"kind": scope.kind.value, "value": scope.value}


@click.group()
def policy() -> None:
    """Per-VM eviction policies, label-selector defaults and the fleet default."""


def _target_options(f: Any) -> Any:
    f = click.option(
        "--fleet", is_flag=True, help="The fleet default (applies to every VM without a closer policy)."
    )(f)
    f = click.option("--selector", metavar="K=V[,K=V]", help="A default for VMs whose labels match.")(f)
    return click.argument("vm_id", metavar="[VM]", required=False, shell_complete=complete_vm_ids)(f)


def _check_range(flag: str, value: int | None, lo: int, hi: int) -> None:
    if value is not None and not lo <= value <= hi:
        raise InvalidArgument(f"{flag}: must be between {lo} and {hi}, got {value}")


@policy.command("set")
@_target_options
@click.option(
    "--interval", type=DURATION, metavar="DURATION", help="Detection interval, e.g. 30s, 500ms, 2m."
)
@click.option(
    "--cold-after", type=int, metavar="N", help="Cycles without access before a page is cold (1-250)."
)
@click.option("--max-evict", type=CAP, metavar="CAP", help="Per-cycle cap: 20%, 512MiB, 1000pages or none.")
@click.option(
    "--min-resident", type=SIZE, metavar="SIZE", help="Never evict below this resident size, e.g. 1GiB."
)
@click.option("--store", metavar="NAME", help="Page store name, as configured on the agent.")
@click.option("--compression", type=click.Choice([c.value for c in Compression]), help="Payload compression.")
@click.option("--prefetch", type=int, metavar="PAGES", help="Neighbouring pages fetched per fault (0-512).")
@click.option("--slo", type=RATE, metavar="RATE", help="Promotion-rate SLO, e.g. 0.2%/min; 0 disables it.")
@click.option("--pause/--resume", default=None, help="Stop or restart cycles for the target.")
@click.option(
    "--poison-missing/--wait-missing",
    "poison",
    default=None,
    help="A page lost from its store: SIGBUS the guest (UFFDIO_POISON) or keep it waiting (default).",
)
@click.option(
    "--policy",
    "algorithm",
    type=click.Choice(list(evict.NAMES)),
    help="Eviction algorithm (its options reset unless --policy-opt is given).",
)
@click.option(
    "--policy-opt",
    "policy_opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="An option of the eviction algorithm (repeatable); needs --policy.",
)
@json_option
@connection_options
@click.pass_context
def set_policy(
    ctx: click.Context,
    vm_id: str | None,
    selector: str | None,
    fleet: bool,
    interval: int | None,
    cold_after: int | None,
    max_evict: EvictionCap | None,
    min_resident: int | None,
    store: str | None,
    compression: str | None,
    prefetch: int | None,
    slo: float | None,
    pause: bool | None,
    poison: bool | None,
    algorithm: str | None,
    policy_opts: tuple[str, ...],
    as_json: bool,
) -> None:
    """Set (part of) a policy: only the flags given change.

    \b
    Examples:
      tiermem policy set web-1 --interval 30s --cold-after 3 --max-evict 20%
      tiermem policy set --selector tier=batch --compression zstd --slo 0.2%/min
      tiermem policy set --fleet --min-resident 256MiB
      tiermem policy set web-1 --pause
      tiermem policy set web-1 --policy recommended
      tiermem policy set web-1 --policy rrd --policy-opt fast=2
    """
    scope = resolve_scope(vm_id, selector, fleet)
    if interval is not None and not 0 < interval <= EvictionPolicy.MAX_INTERVAL_MS:
        raise InvalidArgument(
            f"--interval: must be > 0 and at most 7 days, got {format_duration_ms(interval)}"
        )
    _check_range("--cold-after", cold_after, 1, EvictionPolicy.MAX_COLD_AFTER)
    _check_range("--prefetch", prefetch, 0, EvictionPolicy.MAX_PREFETCH)
    if store is not None:
        try:
            validate_id(store, "store name")
        except InvalidArgument as e:
            raise InvalidArgument(f"--store: {e}") from None
    changes: dict[str, Any] = {
        "interval_ms": interval,
        "cold_after": cold_after,
        "max_evict": max_evict,
        "min_resident_bytes": min_resident,
        "store": store,
        "compression": Compression(compression) if compression else None,
        "prefetch_pages": prefetch,
        "slo_promotion_rate": slo,
        "paused": pause,
        "poison_missing": poison,
    }
    if policy_opts and algorithm is None:
        fail("--policy-opt needs --policy (the options belong to one algorithm)")
    if algorithm is not None:
        try:
            opts = evict.parse_options(algorithm, policy_opts)
        except InvalidArgument as e:
            raise InvalidArgument(f"--policy-opt: {e}") from None
        changes["algorithm"] = algorithm
        changes["algorithm_options"] = ",".join(f"{k}={v}" for k, v in sorted(opts.items()))
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        fail(
            "nothing to set: give at least one of --interval, --cold-after, --max-evict, --min-resident, "
            "--store, --compression, --prefetch, --slo, --pause/--resume, --poison-missing/--wait-missing, "
            "--policy"
        )
    new = EvictionPolicy().with_changes(**changes)
    entry = get_client(ctx).set_policy(scope, new, sorted(changes))
    if as_json:
        emit_json(_entry_json(entry))
        return
    con = console()
    con.print(f"policy for [bold]{scope_text(entry.scope)}[/] set (version {entry.policy.version})")
    con.print(kv_table(None, policy_rows(entry.policy)))


@policy.command("get")
@click.argument("vm_id", metavar="VM", shell_complete=complete_vm_ids)
@json_option
@connection_options
@click.pass_context
def get_policy(ctx: click.Context, vm_id: str, as_json: bool) -> None:
    """Show the policy a VM runs with, where it comes from, and whether the SLO controller adjusted it.

    JSON fields: vm_id, policy (EvictionPolicy fields), source ({kind, value} or null
    for the built-in defaults), adjusted.
    """
    _vm_arg(vm_id)
    eff = get_client(ctx).get_policy(vm_id)
    if as_json:
        emit_json(
            {"vm_id": vm_id, "policy": eff.policy, "source": scope_json(eff.source), "adjusted": eff.adjusted}
        )
        return
    con = console()
    adjusted = " [yellow](adjusted by the SLO controller)[/]" if eff.adjusted else ""
    con.print(f"[bold]{vm_id}[/]: policy from {scope_text(eff.source)}{adjusted}")
    con.print(kv_table(None, policy_rows(eff.policy)))


@policy.command("list")
@click.option("--selector", metavar="K=V[,K=V]", help="Only entries whose selector or VM labels match.")
@json_option
@connection_options
@click.pass_context
def list_policies(ctx: click.Context, selector: str | None, as_json: bool) -> None:
    """List the stored policies: per VM, per label selector and the fleet default.

    JSON: a list of {scope: {kind, value}, policy: EvictionPolicy fields, updated_ms}.
    """
    if selector is not None:
        from tiermem.selector import parse_selector

        try:
            parse_selector(selector)
        except InvalidArgument as e:
            raise InvalidArgument(f"--selector: {e}") from None
    entries = get_client(ctx).list_policies(selector or "")
    if as_json:
        emit_json([_entry_json(x) for x in entries])
        return
    rows = []
    for entry in entries:
        p = entry.policy
        rows.append(
            [
                scope_text(entry.scope),
                format_duration_ms(p.interval_ms),
                p.cold_after,
                fmt_cap(p.max_evict),
                format_bytes(p.min_resident_bytes),
                p.store,
                p.compression.value,
                p.prefetch_pages,
                format_rate_per_min(p.slo_promotion_rate) if p.slo_promotion_rate else "off",
                "yes" if p.paused else "no",
                p.version,
                fmt_time(entry.updated_ms),
            ]
        )
    cols = [
        "SCOPE",
        "INTERVAL",
        "COLD-AFTER",
        "MAX-EVICT",
        "MIN-RESIDENT",
        "STORE",
        "COMPRESSION",
        "PREFETCH",
        "SLO",
        "PAUSED",
        "VERSION",
        "UPDATED",
    ]
    if not rows:
        click.echo("no policies stored: every VM runs with the built-in defaults")
        return
    console().print(table(None, cols, rows))


@policy.command("unset")
@_target_options
@connection_options
@click.pass_context
def unset_policy(ctx: click.Context, vm_id: str | None, selector: str | None, fleet: bool) -> None:
    """Delete a policy entry; the target falls back to the next matching default."""
    scope = resolve_scope(vm_id, selector, fleet)
    get_client(ctx).delete_policy(scope)
    click.echo(f"policy for {scope_text(scope)} removed")


def _vm_arg(vm_id: str) -> None:
    try:
        validate_id(vm_id, "VM id")
    except InvalidArgument as e:
        raise InvalidArgument(f"VM: {e}") from None


def _entry_json(entry: Any) -> dict[str, Any]:
    return {"scope": scope_json(entry.scope), "policy": entry.policy, "updated_ms": entry.updated_ms}
