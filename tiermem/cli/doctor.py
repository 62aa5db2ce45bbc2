"""``tiermem doctor``: which kernel backends can run on this host, and why not."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from tiermem import native
from tiermem.kernel.probe import probe_host


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def doctor(as_json: bool) -> None:
    """Probe the host: userfaultfd, RWP, PAGEMAP_SCAN, KVM and privileges."""
    rep = probe_host()
    if as_json:
        click.echo(
            json.dumps(
                {**rep.to_json(), "selected_backend": _selected(rep.backends), "native": native.paths()},
                indent=2,
            )
        )
        return
    console = Console()
    console.print(f"kernel [bold]{rep.kernel}[/] ({rep.machine})")
    t = Table(title="capabilities")
    for col in ("check", "ok", "detail", "fix"):
        t.add_column(col)
    for c in rep.checks:
        t.add_row(c.name, "[green]yes[/]" if c.ok else "[red]no[/]", c.detail, c.fix)
    console.print(t)
    b = Table(title="kernel backends")
    b.add_column("backend")
    b.add_column("available")
    b.add_column("why")
    for name, ok in rep.backends.items():
        b.add_row(name, "[green]yes[/]" if ok else "[red]no[/]", rep.reasons.get(name, ""))
    console.print(b)
    console.print(f"uffd features: {', '.join(rep.uffd_features) or 'none'}")
    console.print(
        f"selected backend: [bold]{_selected(rep.backends)}[/] (probed, never guessed from the kernel version)"
    )
    paths = native.paths()
    console.print(f"native extension: {paths['extension']}")
    console.print(
        f"sim scan: [bold]{paths['sim_scan']}[/]; fault serve path: [bold]{paths['fault_serve']}[/] "
        f"(Redis pages: [bold]{paths['fault_serve_redis']}[/])"
    )


def _selected(backends: dict[str, bool]) -> str:
    return next(name for name in ("rwp", "uffd", "sim") if backends.get(name))
