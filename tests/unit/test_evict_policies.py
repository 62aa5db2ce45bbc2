"""Eviction algorithms (tiermem.evict): online property, engine agreement, the bound, options and the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tiermem import evict
from tiermem.cli.main import cli
from tiermem.errors import InvalidArgument
from tiermem.model import EvictionCap, EvictionPolicy, policy_from_dict, policy_to_dict
from tiermem.sim.bound import bound_promotions, gaps
from tiermem.sim.fast import simulate
from tiermem.sim.replay import replay
from tiermem.sim.trace import Trace, write_trace

ALL = [n for n in evict.NAMES]


def random_trace(seed: int, n_pages: int = 40, n_ticks: int = 60, per_tick: int = 6) -> Trace:
    """Phased accesses: a hot set, a drifting window and rare returns, so every policy evicts and promotes."""
    rng = np.random.default_rng(seed)
    ts, ps = [], []
    for t in range(n_ticks):
        base = (t // 15) * 7 % n_pages
        pages = np.concatenate(
            [
                rng.integers(0, 4, 2),
                (base + rng.integers(0, 8, per_tick - 3)) % n_pages,
                rng.integers(0, n_pages, 1),
            ]
        )
        ps.append(np.unique(pages))
        ts.append(np.full(ps[-1].size, t))
    ticks, pages = np.concatenate(ts), np.concatenate(ps)
    return Trace(
        ticks.astype(np.int64), pages.astype(np.int64), rng.random(len(pages)) < 0.3, n_pages, n_ticks
    )


def prefix(trace: Trace, t: int) -> Trace:
    keep = trace.ticks < t
    return Trace(trace.ticks[keep], trace.pages[keep], trace.writes[keep], trace.n_pages, t)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("k", [1, 3])
def test_online_decisions_up_to_t_do_not_depend_on_the_rest(name: str, k: int) -> None:
    trace = random_trace(5)
    full = simulate(trace, k, 2, policy=name, series=True).result.series
    assert full is not None and sum(full["promotions"]) > 0 and max(full["evicted"]) > 0  # it did something
    for t in (7, 20, 31, 59):
        part = simulate(prefix(trace, t), k, 2, policy=name, series=True).result.series
        assert part is not None
        assert part["evicted"] == full["evicted"][:t] and part["promotions"] == full["promotions"][:t], t


@pytest.mark.parametrize("name", ALL)
def test_online_on_the_agent_engine_too(name: str) -> None:
    trace = random_trace(6, n_ticks=40)
    full = replay(trace, 2, 2, policy_name=name, series=True).series
    part = replay(prefix(trace, 23), 2, 2, policy_name=name, series=True).series
    assert full is not None and part is not None
    assert part["evicted"] == full["evicted"][:23] and part["promotions"] == full["promotions"][:23]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("cap", "min_res"), [(None, 0), (EvictionCap(pages=3), 0), (None, 30 * 4096)])
def test_fast_and_agent_engines_agree(name: str, cap: EvictionCap | None, min_res: int) -> None:
    trace = random_trace(7, n_ticks=45)
    for k, a in ((1, 1), (2, 2), (3, 4)):
        fast = simulate(trace, k, a, cap, min_res, policy=name, series=True).result
        ref = replay(trace, k, a, cap, min_res, policy_name=name, series=True)
        assert fast.to_json() == ref.to_json(), (k, a)


def test_age_is_todays_model_and_recommended_is_an_alias() -> None:
    trace = random_trace(8)
    rec = simulate(trace, 2, 2, policy="recommended").result
    target = simulate(trace, 2, 2, policy=evict.ALIASES["recommended"]).result
    assert (rec.promotions, rec.evicted_fraction) == (target.promotions, target.evicted_fraction)
    assert evict.resolve("recommended") is evict.resolve(evict.ALIASES["recommended"])
    assert EvictionPolicy().algorithm == "age"


def test_a_dry_run_close_leaves_the_state() -> None:
    for name in ALL:
        algo = evict.create(name, 8, 1)
        hot = np.zeros(8, dtype=bool)
        hot[:2] = True
        view = evict.CloseView(hot=hot, candidates=~hot, promoted=np.zeros(0, dtype=np.int64), limit=None)
        before = {k: v.copy() for k, v in vars(algo).items() if isinstance(v, np.ndarray)}
        dry, _ = algo.close(view, commit=False)
        assert all(np.array_equal(v, vars(algo)[k]) for k, v in before.items()), name
        real, _ = algo.close(view)
        assert np.array_equal(dry, real) and real.size, name


def test_only_candidates_are_ever_chosen_within_the_limit() -> None:
    rng = np.random.default_rng(3)
    for name in ALL:
        algo = evict.create(name, 64, 1)
        for _ in range(20):
            hot = rng.random(64) < 0.2
            cand = ~hot & (rng.random(64) < 0.7)  # some resident pages are unproven: never candidates
            chosen, n_cold = algo.close(evict.CloseView(hot, cand, np.zeros(0, dtype=np.int64), limit=5))
            assert cand[chosen].all() and chosen.size <= 5 and n_cold >= chosen.size, name
            assert np.array_equal(chosen, np.sort(chosen))


def brute_force_bound(trace: Trace, k: int, target: float) -> int:
    """Fewest promotions over every eviction schedule (each page evicted or not at each close)."""
    n, t_total = trace.n_pages, trace.n_ticks
    n_cycles = t_total // k
    acc = np.zeros((t_total, n), dtype=bool)
    acc[trace.ticks, trace.pages] = True
    best = None
    for bits in itertools.product([0, 1], repeat=n * n_cycles):
        sched = np.array(bits, dtype=bool).reshape(n_cycles, n)
        evicted = np.zeros(n, dtype=bool)
        prom = ev_sum = 0
        for t in range(t_total):
            back = evicted & acc[t]
            prom += int(back.sum())
            evicted &= ~acc[t]
            if (t + 1) % k == 0 and (t + 1) // k <= n_cycles:
                evicted |= sched[(t + 1) // k - 1]
            ev_sum += int(evicted.sum())
        if ev_sum >= target * n * t_total - 1e-9 and (best is None or prom < best):
            best = prom
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(4))
def test_bound_matches_every_schedule_on_small_traces(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, t_total, k = 3, 7, 2
    ticks, pages = np.nonzero(rng.random((t_total, n)) < 0.35)
    trace = Trace(ticks.astype(np.int64), pages.astype(np.int64), np.zeros(len(ticks), bool), n, t_total)
    prof = gaps(trace, k)
    max_save = prof.free + int(prof.cum[-1] if prof.cum.size else 0)
    for s in sorted({0, 1, max_save // 3, max_save // 2, max_save - 1, max_save}):
        target = s / (n * t_total)
        assert prof.promotions_at(target) == brute_force_bound(trace, k, target), s


def test_no_policy_beats_the_bound() -> None:
    trace = random_trace(9)
    for name in ALL:
        for a in (1, 2, 4):
            r = simulate(trace, 2, a, policy=name).result
            assert r.promotions >= bound_promotions(trace, 2, r.evicted_fraction), (name, a)


def test_options_are_checked_and_round_trip() -> None:
    assert evict.parse_options("rrd", "fast=2,hold=5") == {"fast": 2, "hold": 5}
    for bad in ("nope=1", "fast", "fast=x", "fast=300"):
        with pytest.raises(InvalidArgument, match="rrd"):
            evict.parse_options("rrd", bad)
    with pytest.raises(InvalidArgument, match="option"):
        evict.parse_options("age", "fast=1")
    with pytest.raises(InvalidArgument, match="unknown eviction policy 'lru'"):
        EvictionPolicy(algorithm="lru").validate()
    p = EvictionPolicy(algorithm="recommended", algorithm_options="fast=2").validate()
    assert policy_from_dict(policy_to_dict(p)) == p


def run_cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args))
    return res.exit_code, res.output


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    p = tmp_path / "t.csv.gz"
    t = random_trace(10)
    write_trace(p, t.ticks, t.pages, t.writes)
    return p


def test_simulate_policy_series_json(trace_file: Path) -> None:
    code, out = run_cli(
        "simulate",
        "--trace",
        str(trace_file),
        "--interval-ticks",
        "2",
        "--cold-after",
        "2",
        "--policy",
        "recommended",
        "--series",
        "--json",
    )
    assert code == 0, out
    got = json.loads(out)
    assert got["policy"] == "recommended" and len(got["series"]["evicted"]) == got["ticks"] == 60
    assert sum(got["series"]["promotions"]) == got["promotions"]
    assert np.mean(got["series"]["evicted"]) / got["pages"] == pytest.approx(got["evicted_fraction"])
    assert 0 <= got["bound_promotions"] <= got["bound_delayed_promotions"] <= got["promotions"]
    code, out = run_cli("simulate", "--trace", str(trace_file), "--json")
    assert "series" not in json.loads(out) and json.loads(out)["policy"] == "age"


def test_simulate_policy_errors_are_one_line(trace_file: Path) -> None:
    code, out = run_cli("simulate", "--trace", str(trace_file), "--policy", "lru")
    assert code != 0 and "recommended" in out and "Traceback" not in out  # the choices name every policy
    code, out = run_cli("simulate", "--trace", str(trace_file), "--policy", "rrd", "--policy-opt", "speed=3")
    assert code != 0 and "bad option 'speed=3'" in out and "Traceback" not in out
    code, out = run_cli("simulate", "--help")
    assert all(n in out for n in evict.NAMES)


@pytest.mark.parametrize("name", ALL)
def test_the_slo_back_off_works_on_top_of_every_policy(name: str) -> None:
    from tiermem.control.policies import apply_adjustment

    base = EvictionPolicy(cold_after=1, algorithm=name, algorithm_options="").validate()
    trace = random_trace(11, n_ticks=120)
    prom = []
    for level in range(3):
        p = apply_adjustment(base, level)
        assert (p.algorithm, p.cold_after) == (name, 2**level)  # the algorithm stays, its knob backs off
        prom.append(simulate(trace, 2, p.cold_after, policy=p.algorithm).result.promotions)
    assert prom[0] > prom[1] > prom[2], prom  # each level pays fewer promotions


@pytest.mark.parametrize("seed", range(3))
def test_age_1_meets_the_delayed_bound_exactly(seed: int) -> None:
    # Evicting every page after its first untouched cycle is the earliest the agent may evict,
    # so at its own saving no policy with foresight under the same rule pays fewer promotions.
    trace = random_trace(20 + seed)
    for k in (1, 2, 5):
        r = simulate(trace, k, 1).result
        late = gaps(trace, k, delay_cycles=1).promotions_at(r.evicted_fraction)
        assert late == r.promotions > 0
        assert gaps(trace, k).promotions_at(r.evicted_fraction) < late  # the plain bound may evict sooner


def test_the_agent_keeps_the_state_across_a_back_off_and_starts_fresh_on_another_algorithm(
    tmp_path: Path,
) -> None:
    from tiermem.agent.node import Agent
    from tiermem.config import AgentSettings
    from tiermem.model import CycleMode

    agent = Agent(AgentSettings(node_id="n1", data_dir=str(tmp_path), autonomous=False, fsync=False))
    try:
        agent.attach_sim("vm1", 64 * 4096, EvictionPolicy(interval_ms=1, cold_after=1, algorithm="rrd"))
        s = agent.sessions["vm1"]
        first = agent.run_cycle("vm1", CycleMode.EVICT, interval_ms=1)
        algo = s.algorithm()
        assert algo.name == "rrd" and first.pages_evicted == 64  # untouched pages, no history: 1 cycle
        agent.set_policy("vm1", s.policy.with_changes(cold_after=4))  # what the SLO back-off does
        agent.run_cycle("vm1", CycleMode.EVICT, interval_ms=1)
        assert s.algorithm() is algo and algo.cold_after == 4
        agent.set_policy("vm1", s.policy.with_changes(algorithm="age"))
        assert s.algorithm() is not algo and s.algorithm().name == "age"
    finally:
        agent.close()
