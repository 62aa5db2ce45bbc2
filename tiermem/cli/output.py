"""CLI output: JSON for scripts and rich tables for people.

JSON output is the plain form of the domain dataclasses: every dataclass field
under its own name, enums as their string values, tuples as lists, and nested
dataclasses as objects. That is the documented shape of every ``--json``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.table import Table

from tiermem.model import EvictionCap, EvictionPolicy, PhaseTimes
from tiermem.units import format_bytes, format_duration_ms, format_rate_per_min

__all__ = [
    "console",
    "emit_json",
    "emit_json_line",
    "fmt_cap",
    "fmt_pages",
    "fmt_time",
    "kv_table",
    "phase_table",
    "policy_rows",
    "set_wide",
    "table",
    "to_jsonable",
]


_PIPE_WIDTH = 240
_WIDE_WIDTH = 100_000
_wide = False


def set_wide(wide: bool) -> None:
    """``-o wide``: tables at their natural width (cells never folded), on a terminal or not."""
    global _wide
    _wide = wide


def _box() -> box.Box:
    """Unicode rules on a terminal; plain ASCII (+, -, |) in pipes, files and dumb terminals."""
    return box.HEAVY_HEAD if sys.stdout.isatty() and os.environ.get("TERM") != "dumb" else box.ASCII


def to_jsonable(obj: Any) -> Any:
    """A JSON-serialisable structure for a dataclass, enum, mapping, sequence or scalar."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        return obj.hex()
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return str(obj)


def emit_json(obj: Any) -> None:
    """Print ``obj`` as one indented JSON document on stdout."""
    click.echo(json.dumps(to_jsonable(obj), indent=2, sort_keys=False))


def emit_json_line(obj: Any) -> None:
    """Print ``obj`` as one compact JSON line (streams: events, drain progress)."""
    click.echo(json.dumps(to_jsonable(obj), separators=(",", ":")))
    sys.stdout.flush()


def console() -> Console:
    """A console on the current stdout (resolved per call, so test runners capture it).

    Off a terminal (pipes, files) tables are not squeezed to 80 columns: a row stays
    on one line so ``grep`` and ``awk`` work on it. ``COLUMNS`` still wins.
    """
    if _wide:
        return Console(file=sys.stdout, soft_wrap=False, highlight=False, width=_WIDE_WIDTH)
    con = Console(file=sys.stdout, soft_wrap=False, highlight=False)
    if not con.is_terminal and "COLUMNS" not in os.environ:
        con = Console(file=sys.stdout, soft_wrap=False, highlight=False, width=_PIPE_WIDTH)
    return con


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A rich table with ``columns``; numeric-looking columns are right-aligned by the caller's text."""
    t = Table(title=title, show_edge=False, header_style="bold", pad_edge=False, box=_box())
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*(str(v) for v in row))
    return t


def kv_table(title: str | None, rows: Iterable[tuple[str, Any]]) -> Table:
    """A two-column key/value table."""
    t = Table(
        title=title, show_header=False, show_edge=False, pad_edge=False, title_justify="left", box=_box()
    )
    t.add_column("key", style="bold")
    t.add_column("value", overflow="fold")
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def fmt_pages(pages: int, page_size: int = 4096) -> str:
    """Pages with their size: ``2048 (8.0 MiB)``."""
    return f"{pages} ({format_bytes(pages * page_size)})"


def fmt_cap(cap: EvictionCap) -> str:
    """An eviction cap as the operator writes it."""
    if cap.fraction is not None:
        return f"{cap.fraction * 100:.3g}%"
    if cap.bytes is not None:
        return format_bytes(cap.bytes)
    if cap.pages is not None:
        return f"{cap.pages} pages"
    return "unlimited"


def fmt_time(unix_ms: int) -> str:
    """A Unix-ms timestamp as local ``YYYY-mm-dd HH:MM:SS`` (``-`` for 0)."""
    if not unix_ms:
        return "-"
    import datetime as dt

    return dt.datetime.fromtimestamp(unix_ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def policy_rows(p: EvictionPolicy) -> list[tuple[str, str]]:
    """The rows of a policy, labelled with the ``policy set`` flag that changes each."""
    return [
        ("policy", p.algorithm + (f" ({p.algorithm_options})" if p.algorithm_options else "")),
        ("interval", format_duration_ms(p.interval_ms)),
        ("cold-after", f"{p.cold_after} cycles"),
        ("max-evict", f"{fmt_cap(p.max_evict)} per cycle"),
        ("min-resident", format_bytes(p.min_resident_bytes)),
        ("store", p.store),
        ("compression", p.compression.value),
        ("prefetch", f"{p.prefetch_pages} pages"),
        ("slo", format_rate_per_min(p.slo_promotion_rate) if p.slo_promotion_rate else "off"),
        ("paused", "yes" if p.paused else "no"),
        ("version", str(p.version)),
    ]


def phase_table(phases: PhaseTimes) -> Table:
    """A cycle's phase times, in milliseconds."""
    names = [f.name for f in dataclasses.fields(phases)]
    return table(
        "phases (ms)",
        [n.removesuffix("_us") for n in names],
        [[f"{getattr(phases, n) / 1000:.2f}" for n in names]],
    )
