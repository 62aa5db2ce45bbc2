"""``tiermem node``: the hosts whose agents are registered with the control plane."""

from __future__ import annotations

from typing import Any

import click

from tiermem.cli.options import connection_options, get_client, json_option
from tiermem.cli.output import console, emit_json, fmt_time, table
from tiermem.units import format_bytes

__all__ = ["node"]


@click.group()
def node() -> None:
    """Nodes (hosts running a tiermem agent)."""


@node.command("list")
@json_option
@connection_options
@click.pass_context
def list_nodes(ctx: click.Context, as_json: bool) -> None:
    """List nodes with their lease state, capacity, backends and VM count.

    JSON: a list of NodeInfo objects (every field of tiermem.api.NodeInfo).
    """
    nodes: list[Any] = get_client(ctx).list_nodes()
    if as_json:
        emit_json(nodes)
        return
    if not nodes:
        click.echo("no nodes registered")
        return
    cols = ["NODE", "ADDRESS", "UP", "VMS", "CAPACITY", "BACKENDS", "MAX CYCLES", "EVICT MB/S", "LEASE UNTIL"]
    rows = [
        [
            n.node_id,
            n.address,
            "yes" if n.up else "[red]no[/]",
            n.vms,
            format_bytes(n.capacity_bytes) if n.capacity_bytes else "unlimited",
            ",".join(b.value for b in n.backends) or "any",
            n.max_concurrent_cycles or "default",
            f"{n.evict_mbps:g}" if n.evict_mbps else "unlimited",
            fmt_time(n.lease_expires_ms),
        ]
        for n in nodes
    ]
    console().print(table(None, cols, rows))
