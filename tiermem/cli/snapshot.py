"""``tiermem snapshot import``: put a Firecracker snapshot's memory file under a node agent.

The agent stores every non-zero page in a page store and opens a restore socket for
the VM; Firecracker restores the snapshot with that socket as its UFFD
``backend_path`` and the agent serves its memory lazily from the store.
"""

from __future__ import annotations

import os

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tiermem.cli.errors import fail
from tiermem.cli.options import client_settings, connection_options, json_option
from tiermem.cli.output import console, emit_json
from tiermem.cli.vm import check_id
from tiermem.errors import InvalidArgument
from tiermem.model import Compression
from tiermem.units import format_bytes

__all__ = ["DEFAULT_AGENT", "snapshot"]

DEFAULT_AGENT = "127.0.0.1:7070"


@click.group()
def snapshot() -> None:
    """Firecracker snapshots restored lazily from a page store."""


@snapshot.command("import")
@click.argument("vm_id", metavar="VM")
@click.option("--mem-file", metavar="PATH", help="The snapshot memory file, on the agent's host.")
@click.option(
    "--mem-object",
    metavar="S3_URL",
    help="Or an object in S3: s3://bucket/key[?endpoint=http://host:port&region=R] (read in ranges).",
)
@click.option(
    "--store", default="", metavar="NAME", help="Agent store to put the pages in [default: default]."
)
@click.option(
    "--compression",
    type=click.Choice([c.value for c in Compression]),
    default="none",
    show_default=True,
    help="Page compression in the store.",
)
@click.option(
    "--prefault",
    "prefault",
    type=float,
    default=None,
    metavar="PAGES_PER_S",
    help="Prefault the pages not touched yet in the background, once the guest runs, at this rate "
    "[default: the agent's restore_prefault_pages_per_s].",
)
@click.option(
    "--prefetch",
    "prefetch",
    type=click.IntRange(0, 512),
    default=None,
    metavar="PAGES",
    help="Pages after a faulting page fetched in the same store round trip [default: 8].",
)
@click.option(
    "--agent",
    "agent",
    default=None,
    metavar="HOST:PORT",
    help=f"Node agent address [env TIERMEM_AGENT; default {DEFAULT_AGENT}].",
)
@json_option
@connection_options
@click.pass_context
def import_snapshot(
    ctx: click.Context,
    vm_id: str,
    mem_file: str | None,
    mem_object: str | None,
    store: str,
    compression: str,
    prefault: float | None,
    prefetch: int | None,
    agent: str | None,
    as_json: bool,
) -> None:
    """Import a Firecracker snapshot memory file for VM and print its restore socket.

    Give Firecracker the socket as the UFFD backend_path of PUT /snapshot/load.
    JSON: vm_id, pages, zero_pages, stored_bytes, store, source, socket.
    """
    from tiermem.rpc.agent_client import AgentClient

    check_id(vm_id, "VM id", "VM")
    if bool(mem_file) == bool(mem_object):
        raise InvalidArgument("give exactly one of --mem-file PATH or --mem-object s3://bucket/key")
    if prefault is not None and prefault < 0:
        raise InvalidArgument("--prefault: must be >= 0 pages/s")
    if mem_file:  # the agent resolves nothing relative to the CLI's directory
        mem_file = os.path.abspath(mem_file)
    settings = client_settings(ctx)
    address = agent or os.environ.get("TIERMEM_AGENT") or DEFAULT_AGENT
    client = AgentClient(address, settings.token, settings.tls)
    ctx.call_on_close(client.close)
    stream = client.import_snapshot(
        vm_id,
        mem_file=mem_file or "",
        mem_object=mem_object or "",
        store=store,
        compression=Compression(compression),
        prefault_pages_per_s=prefault,
        prefetch_pages=prefetch,
    )
    result = None
    con = console()
    with Progress(
        TextColumn("importing [bold]{task.description}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("pages"),
        TimeElapsedColumn(),
        console=con,
        transient=True,
        disable=as_json or not con.is_terminal,
    ) as bar:
        task = bar.add_task(vm_id, total=None)
        for p in stream:
            bar.update(task, total=max(p.pages_total, 1), completed=p.pages_done)
            result = p.result or result
    if result is None:
        fail(f"import of {vm_id} ended without a result", 2)
    if as_json:
        emit_json(
            {
                "vm_id": result.vm_id,
                "pages": result.pages,
                "zero_pages": result.zero_pages,
                "stored_bytes": result.stored_bytes,
                "store": result.store,
                "source": result.source,
                "socket": result.socket,
            }
        )
        return
    click.echo(
        f"VM {result.vm_id}: {result.pages} pages imported from {result.source} into store {result.store} "
        f"({result.zero_pages} zero pages, {format_bytes(result.stored_bytes)} stored)"
    )
    click.echo(f"restore socket: {result.socket}")
    click.echo(
        'Firecracker: PUT /snapshot/load with "mem_backend": {"backend_type": "Uffd", "backend_path": '
        f'"{result.socket}"}}'
    )
