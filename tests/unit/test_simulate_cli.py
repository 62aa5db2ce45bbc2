"""``tiermem simulate``: exact numbers of hand-computed traces, both engines equal, errors, sweep plot."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tiermem.bench.policy import simulate as fast_model
from tiermem.cli.main import cli
from tiermem.model import EvictionCap
from tiermem.sim.replay import replay
from tiermem.sim.trace import Trace, write_trace

# The trace of tests/unit/test_replay.py: N = 4 pages, T = 6 ticks.
TRACE = "tick,page,op\n0,0,r\n0,1,w\n1,0,r\n2,2,r\n4,1,r\n5,3,w\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return res.exit_code, res.output


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    p = tmp_path / "t.csv"
    p.write_text(TRACE)
    return p


@pytest.mark.parametrize("engine", ["fast", "agent"])
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        # cycles close after ticks 1, 3, 5. Uncapped, A=1: evicted at tick ends 0 2 1 3 2 2 -> 10/24;
        # promotions: page 2 (tick 2), pages 1 (tick 4) and 3 (tick 5).
        ([], {"promotions": 3, "evicted_fraction": 10 / 24, "pages_evicted_total": 5, "peak_evicted": 3}),
        # cap 1 page: evicts 2 (lowest of the age-1 pair), then 3 (oldest), then 0 -> 0 1 0 1 1 1 = 4/24
        (["--max-evict", "1pages"], {"promotions": 2, "evicted_fraction": 4 / 24, "pages_evicted_total": 3}),
        # A=2: only page 3 at the second close, page 0 at the third (3 promoted at tick 5) -> 3/24
        (["--cold-after", "2"], {"promotions": 1, "evicted_fraction": 3 / 24, "pages_evicted_total": 2}),
        # min resident 3 pages: room 1 per close: evict 2; then (2 promoted) 3; then (3 promoted) 0 -> 4/24
        (
            ["--min-resident", "12KiB"],
            {"promotions": 2, "evicted_fraction": 4 / 24, "pages_evicted_total": 3},
        ),
    ],
)
def test_hand_computed_traces(
    trace_file: Path, engine: str, extra: list[str], expected: dict[str, float]
) -> None:
    code, out = run(
        "simulate",
        "--trace",
        str(trace_file),
        "--interval-ticks",
        "2",
        "--cold-after",
        "1",
        *extra,
        "--engine",
        engine,
        "--json",
    )
    assert code == 0, out
    got = json.loads(out)
    assert (got["pages"], got["ticks"], got["cycles"]) == (4, 6, 3)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    assert got["promotions_per_tick"] == pytest.approx(got["promotions"] / 6)
    assert got["engine"] == engine and got["lines"] == 6


def test_promotion_in_the_middle_of_a_cycle_counts_from_its_tick(tmp_path: Path) -> None:
    # N = 2, T = 8, K = 3, A = 1: the close after tick 2 evicts page 1 -> tick ends 0 0 1. In the next
    # cycle page 1 is promoted at tick 4, its second tick -> ends 1 0, and the close after tick 5 evicts
    # the idle page 0 -> 1. Ticks 6-7 close no cycle: page 0 is promoted at tick 7 -> 1 0.
    # Sum 0+0+1+1+0+1+1+0 = 4 -> 4/16.
    p = tmp_path / "mid.csv"
    p.write_text("tick,page,op\n0,0,r\n4,1,w\n5,1,r\n7,0,r\n")
    for engine in ("fast", "agent"):
        code, out = run(
            "simulate",
            "--trace",
            str(p),
            "--interval-ticks",
            "3",
            "--cold-after",
            "1",
            "--engine",
            engine,
            "--json",
        )
        assert code == 0, out
        got = json.loads(out)
        assert (got["pages"], got["ticks"], got["cycles"]) == (2, 8, 2)
        assert (got["promotions"], got["peak_evicted"], got["pages_evicted_total"]) == (2, 1, 2)
        assert got["evicted_fraction"] == pytest.approx(4 / 16)


def test_fast_engine_equals_the_agent_engine_on_random_traces() -> None:
    rng = np.random.default_rng(11)
    pick = random.Random(11)
    for _ in range(60):
        n, t, m = int(rng.integers(1, 30)), int(rng.integers(1, 40)), int(rng.integers(1, 150))
        ticks = np.sort(rng.integers(0, t, m)).astype(np.int64)
        pages = rng.integers(0, n, m).astype(np.int64)
        tr = Trace(ticks, pages, rng.random(m) < 0.3, n, int(ticks[-1]) + 1)
        k, a = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        cap = pick.choice(
            [
                None,
                EvictionCap(pages=int(rng.integers(0, 4))),
                EvictionCap(fraction=0.25),
                EvictionCap(bytes=8192),
            ]
        )
        min_res = int(rng.integers(0, n + 1)) * 4096 if pick.random() < 0.3 else 0
        assert fast_model(tr, k, a, cap, min_res).result == replay(tr, k, a, cap, min_res)


def test_capped_order_follows_the_saturating_uint8_ages() -> None:
    # 400 pages, K = 1, A = 1, one eviction per close. Page 0 is touched at tick 0, the others never
    # (page 399 at the last tick), so page 0 is always one cycle younger than pages 1.. With exact ages
    # it would go after all of them; the agent's ages saturate at 255, so at the close of tick 255 it
    # ties with the rest and, as the lowest page, is evicted there; its access at tick 300 is a promotion.
    tr = Trace(np.array([0, 300, 399]), np.array([0, 0, 399]), np.zeros(3, dtype=bool), 400, 400)
    fast = fast_model(tr, 1, 1, EvictionCap(pages=1)).result
    assert fast == replay(tr, 1, 1, EvictionCap(pages=1))
    assert fast.promotions == 1
    assert fast.pages_evicted_total == 400


@pytest.mark.parametrize(
    ("body", "line", "what"),
    [
        ("tick,page,op\n0,1,r\n1,x,w\n", 3, "page must be"),
        ("tick,page,op\n0,1,r\n0,2\n", 3, "expected 3 comma-separated fields"),
        ("tick,page,op\n3,1,r\n2,2,w\n", 3, "tick decreases"),
        ("tick,page,op\n0,1,q\n", 2, "op must be"),
        ("time,page,op\n0,1,r\n", 1, "header"),
    ],
)
def test_malformed_traces_are_rejected_with_the_line(tmp_path: Path, body: str, line: int, what: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(body)
    res = CliRunner().invoke(cli, ["simulate", "--trace", str(p)])
    assert res.exit_code == 1
    assert f"trace {p} line {line}: " in res.output and what in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--sweep", "cold-after=1,x"], "--sweep cold-after: values must be integers"),
        (["--sweep", "speed=1,2"], "--sweep: expected cold-after="),
        (["--sweep", "cold-after=0,2"], ">= 1"),
        (["--plot", "x.png"], "--plot goes with --sweep"),
        (["--max-evict", "20"], "--max-evict"),
        (["--interval-ticks", "0"], "--interval-ticks"),
    ],
)
def test_bad_options_are_one_line_errors(trace_file: Path, args: list[str], msg: str) -> None:
    res = CliRunner().invoke(cli, ["simulate", "--trace", str(trace_file), *args])
    assert res.exit_code == 1
    assert msg in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_missing_trace_file_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["simulate", "--trace", str(tmp_path / "nope.csv")])
    assert res.exit_code == 1
    assert "cannot read" in res.output


def test_sweep_prints_the_table_and_writes_a_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    ticks = np.sort(rng.integers(0, 200, 3000))
    pages = np.where(rng.random(3000) < 0.8, rng.integers(0, 50, 3000), rng.integers(0, 1000, 3000))
    trace = write_trace(tmp_path / "w.csv.gz", ticks, pages, rng.random(3000) < 0.2)
    plot = tmp_path / "out" / "sweep.png"
    code, out = run(
        "simulate",
        "--trace",
        str(trace),
        "--sweep",
        "cold-after=1,2,4,8",
        "--sweep",
        "interval-ticks=5,10",
        "--plot",
        str(plot),
        "--json",
    )
    assert code == 0, out
    got = json.loads(out)
    runs = got["runs"]
    assert [(r["interval_ticks"], r["cold_after"]) for r in runs] == [
        (k, a) for k in (5, 10) for a in (1, 2, 4, 8)
    ]
    for k in (5, 10):  # waiting longer before evicting saves less and promotes less
        row = [r for r in runs if r["interval_ticks"] == k]
        saved = [r["evicted_fraction"] for r in row]
        assert saved == sorted(saved, reverse=True) and saved[0] > saved[-1]
        assert row[0]["promotions"] >= row[-1]["promotions"]
    assert got["plot"] == str(plot)
    data = plot.read_bytes()
    assert data[:8] == PNG_MAGIC
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    img = mpimg.imread(str(plot))
    assert img.shape[0] > 100 and img.shape[1] > 100
    # the table form names the plot
    code, out = run("simulate", "--trace", str(trace), "--sweep", "cold-after=1,2", "--plot", str(plot))
    assert code == 0
    assert "promotions" in out and f"plot: {plot}" in out.replace("\n", "")
