"""``tiermem simulate``: what-if replay of an access trace (memory saved versus promotions).

The model is exact and documented in :mod:`tiermem.sim.replay`. Two engines
compute it: ``fast`` (default, :func:`tiermem.sim.fast.simulate`, numpy per
cycle: seconds for ten million lines) and ``agent`` (the agent's own cycle
engine, fault server, sim kernel and an in-memory store, page by page: the
reference, about 60 µs per evicted or promoted page). Tests hold the two equal.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import click

from tiermem import evict
from tiermem.cli.errors import fail, require_extra
from tiermem.cli.options import CAP, SIZE
from tiermem.cli.output import console, emit_json, kv_table, table
from tiermem.errors import InvalidArgument
from tiermem.model import EvictionCap
from tiermem.sim.replay import ReplayResult
from tiermem.units import format_bytes

__all__ = ["parse_sweep", "simulate", "write_plot"]

_SWEEPABLE = {"cold-after": "cold_after", "interval-ticks": "interval_ticks"}


def parse_sweep(specs: tuple[str, ...]) -> dict[str, list[int]]:
    """``("cold-after=1,2,4",)`` -> ``{"cold_after": [1, 2, 4]}``; a one-line error otherwise."""
    out: dict[str, list[int]] = {}
    for spec in specs:
        name, eq, values = spec.partition("=")
        key = _SWEEPABLE.get(name.strip())
        if not eq or key is None:
            fail(f"--sweep: expected cold-after=1,2,4 or interval-ticks=1,5,10, got {spec!r}")
        try:
            vals = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            fail(f"--sweep {name}: values must be integers, got {values!r}")
        if not vals or min(vals) < 1:
            fail(f"--sweep {name}: give one or more integers >= 1, got {values!r}")
        if key in out:
            fail(f"--sweep {name} given twice")
        out[key] = sorted(set(vals))
    return out


def _run(
    trace: Any,
    engine: str,
    k: int,
    a: int,
    cap: EvictionCap | None,
    min_res: int,
    policy: str = "age",
    options: str = "",
    series: bool = False,
) -> ReplayResult:
    if engine == "agent":
        from tiermem.sim.replay import replay

        return replay(trace, k, a, cap, min_res, policy_name=policy, options=options, series=series)
    from tiermem.sim.fast import simulate as fast

    return fast(trace, k, a, cap, min_res, policy=policy, options=options, series=series).result


def write_plot(path: Path, runs: list[dict[str, Any]], title: str) -> Path:
    """Memory saved versus promotions per tick, one line per interval (matplotlib, Agg, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        for k in sorted({r["interval_ticks"] for r in runs}):
            pts = sorted((r for r in runs if r["interval_ticks"] == k), key=lambda r: r["cold_after"])
            xs = [r["promotions_per_tick"] for r in pts]
            ys = [100 * r["evicted_fraction"] for r in pts]
            ax.plot(xs, ys, marker="o", label=f"interval {k} ticks")
            for r, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(
                    f"A={r['cold_after']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
        ax.set_xlabel("promotions per tick (faults on evicted pages)")
        ax.set_ylabel("memory saved (% of guest pages, mean over ticks)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    except OSError as e:
        fail(f"--plot: cannot write {path}: {e.strerror or e}")
    finally:
        plt.close(fig)
    return path


def _row(r: dict[str, Any], page_size: int) -> list[str]:
    saved = r["evicted_fraction"]
    return [
        str(r["interval_ticks"]),
        str(r["cold_after"]),
        f"{100 * saved:.2f}%",
        format_bytes(saved * r["pages"] * page_size),
        str(r["promotions"]),
        f"{r['promotions_per_tick']:.3f}",
        str(r["cycles"]),
        str(r["peak_evicted"]),
    ]


_COLUMNS = [
    "interval",
    "cold-after",
    "saved",
    "saved (mean)",
    "promotions",
    "promotions/tick",
    "cycles",
    "peak evicted",
]


@click.command()
@click.option(
    "--trace",
    "trace_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="CSV trace 'tick,page,op' (gzip recognised).",
)
@click.option(
    "--pages",
    type=click.IntRange(min=1),
    default=None,
    help="Guest size in pages [default: 1 + the largest page].",
)
@click.option(
    "--interval-ticks", type=click.IntRange(min=1), default=1, show_default=True, help="Ticks per cycle (K)."
)
@click.option(
    "--cold-after",
    type=click.IntRange(1, 250),
    default=3,
    show_default=True,
    help="Cycles without an access before a page is evicted (A).",
)
@click.option("--max-evict", type=CAP, default=None, help="Per-cycle cap: 20%, 512MiB, 1000pages or none.")
@click.option(
    "--min-resident", type=SIZE, default="0", help="Never evict below this resident size, e.g. 64MiB."
)
@click.option(
    "--sweep",
    multiple=True,
    metavar="NAME=V1,V2,...",
    help="Sweep cold-after=1,2,4,8 and/or interval-ticks=1,5,10 (repeatable; all combinations).",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="PNG of the sweep [default: <trace>-sweep.png in the current directory].",
)
@click.option(
    "--engine",
    type=click.Choice(["fast", "agent"]),
    default="fast",
    show_default=True,
    help="fast: numpy model; agent: the agent's cycle engine page by page (slow, the reference).",
)
@click.option(
    "--policy",
    "policy_name",
    type=click.Choice(list(evict.NAMES)),
    default="age",
    show_default=True,
    help="Eviction algorithm (tiermem.evict); recommended = " + evict.ALIASES["recommended"] + ".",
)
@click.option(
    "--policy-opt",
    "policy_opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="An option of the algorithm (repeatable), e.g. fast=1.",
)
@click.option("--series", is_flag=True, help="With --json: per-tick evicted and promotions arrays.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (the documented fields).")
def simulate(
    trace_path: str,
    pages: int | None,
    interval_ticks: int,
    cold_after: int,
    max_evict: EvictionCap | None,
    min_resident: int,
    sweep: tuple[str, ...],
    plot_path: str | None,
    engine: str,
    policy_name: str,
    policy_opts: tuple[str, ...],
    series: bool,
    as_json: bool,
) -> None:
    """What-if: replay an access trace and report memory saved versus promotions.

    \b
    Model (exact, reproducible by hand): N = 1 + the largest page; ticks 0..T-1.
    A cycle closes after every K ticks: pages accessed in it get age 0, other
    resident pages age + 1; resident pages with age >= A are evicted (caps:
    oldest first, then lowest page). An access to an evicted page is a promotion.
    evicted_fraction = mean over ticks of evicted pages / N. --policy picks
    another decision at the close (age is the model above); bound_promotions is
    the fewest promotions any policy knowing the future pays for the same saving
    (bound_delayed_promotions: evicting only after a whole untouched cycle).
    """
    from tiermem.sim.bound import gaps
    from tiermem.sim.trace import load_trace

    try:
        options = ",".join(
            f"{k}={v}" for k, v in sorted(evict.parse_options(policy_name, policy_opts).items())
        )
    except InvalidArgument as e:
        fail(f"--policy-opt: {e}")
    if series and sweep:
        fail("--series goes with a single run, not with --sweep")

    axes = parse_sweep(sweep)
    if plot_path is not None and not axes:
        fail("--plot goes with --sweep")
    if axes:
        require_extra("matplotlib", "demo", "tiermem simulate --sweep (its plot)")
    t0 = time.perf_counter()
    trace = load_trace(trace_path, n_pages=pages)
    t_parse = time.perf_counter() - t0
    if trace.n_ticks == 0:
        fail(f"trace {trace_path}: no accesses, nothing to replay")
    page_size = 4096
    if not axes:
        t1 = time.perf_counter()
        res = _run(
            trace, engine, interval_ticks, cold_after, max_evict, min_resident, policy_name, options, series
        )
        t_run = time.perf_counter() - t1
        bound = gaps(trace, interval_ticks).promotions_at(res.evicted_fraction)
        late = gaps(trace, interval_ticks, delay_cycles=1).promotions_at(res.evicted_fraction)
        out = {
            **res.to_json(),
            "bound_promotions": bound,
            "bound_delayed_promotions": late,
            "trace": trace_path,
            "lines": len(trace),
            "engine": engine,
            "parse_s": round(t_parse, 3),
            "replay_s": round(t_run, 3),
        }
        if as_json:
            emit_json(out)
            return
        con = console()
        con.print(
            kv_table(
                f"simulate {trace_path} ({engine} engine)",
                [
                    ("guest", f"{res.pages} pages ({format_bytes(res.pages * page_size)})"),
                    ("trace", f"{len(trace)} accesses over {res.ticks} ticks"),
                    (
                        "policy",
                        f"{policy_name}{' (' + options + ')' if options else ''}, "
                        f"interval {interval_ticks} ticks, cold after {cold_after} cycles"
                        + (f", cap {_cap_text(max_evict)}" if max_evict else "")
                        + (f", min resident {format_bytes(min_resident)}" if min_resident else ""),
                    ),
                    ("cycles", str(res.cycles)),
                    (
                        "memory saved",
                        f"{100 * res.evicted_fraction:.2f}% of guest pages (mean over ticks), "
                        f"peak {res.peak_evicted} pages",
                    ),
                    ("promotions", f"{res.promotions} ({res.promotions_per_tick:.3f} per tick)"),
                    (
                        "bound",
                        f"{bound} promotions at the same saving"
                        + (f" (this run: {res.promotions / bound:.2f}x)" if bound else "")
                        + f"; {late} if evicting only after a whole untouched cycle, as the agent does",
                    ),
                    ("pages evicted", f"{res.pages_evicted_total} in all"),
                    ("time", f"parse {t_parse:.2f} s, replay {t_run:.2f} s"),
                ],
            )
        )
        return
    ks = axes.get("interval_ticks", [interval_ticks])
    as_ = axes.get("cold_after", [cold_after])
    runs: list[dict[str, Any]] = []
    t1 = time.perf_counter()
    for k in ks:
        for a in as_:
            if a > 250:
                fail(f"--sweep cold-after: {a} is above the maximum 250")
            runs.append(_run(trace, engine, k, a, max_evict, min_resident, policy_name, options).to_json())
    t_run = time.perf_counter() - t1
    plot = Path(plot_path) if plot_path else Path.cwd() / f"{_stem(trace_path)}-sweep.png"
    title = f"{os.path.basename(trace_path)}: {trace.n_pages} pages, {trace.n_ticks} ticks"
    write_plot(plot, runs, title)
    if as_json:
        emit_json(
            {
                "trace": trace_path,
                "lines": len(trace),
                "engine": engine,
                "runs": runs,
                "plot": str(plot),
                "parse_s": round(t_parse, 3),
                "replay_s": round(t_run, 3),
            }
        )
        return
    con = console()
    con.print(
        table(
            f"simulate {trace_path}: memory saved vs promotions ({engine} engine)",
            _COLUMNS,
            [_row(r, page_size) for r in runs],
        )
    )
    con.print(f"plot: {plot}")


def _cap_text(cap: EvictionCap) -> str:
    from tiermem.cli.output import fmt_cap

    return fmt_cap(cap)


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".gz", ".csv"):
        name = name.removesuffix(suffix)
    return name or "trace"
