"""``tiermem simulate``'s model, checked against numbers computed by hand."""

from __future__ import annotations

import pytest

from tiermem.errors import InvalidArgument
from tiermem.model import EvictionCap
from tiermem.sim.replay import replay
from tiermem.sim.trace import parse_trace

# N = 4 pages, T = 6 ticks; with K = 2 cycles close at the end of ticks 1, 3 and 5.
TRACE = b"tick,page,op\n0,0,r\n0,1,w\n1,0,r\n2,2,r\n4,1,r\n5,3,w\n"


def test_uncapped_run_matches_the_hand_computation() -> None:
    # cycle 1 (ticks 0-1): hot {0,1}; ages 2,3 -> 1; evict {2,3}      evicted at tick ends: t0 0, t1 2
    # cycle 2 (ticks 2-3): page 2 promoted (1); hot {2}; 0,1 -> age 1; evict {0,1}   t2 1, t3 3
    # cycle 3 (ticks 4-5): pages 1 (2) and 3 (3) promoted; hot {1,3}; 2 -> 1; evict {2}   t4 2, t5 2
    r = replay(parse_trace(TRACE), interval_ticks=2, cold_after=1)
    assert (r.pages, r.ticks, r.cycles) == (4, 6, 3)
    assert r.promotions == 3
    assert r.promotions_per_tick == pytest.approx(0.5)
    assert r.evicted_fraction == pytest.approx(10 / 24)


def test_cap_evicts_oldest_first_then_lowest_page() -> None:
    # cycle 1: cold {2,3} (age 1 each), cap 1 -> lowest page 2          t0 0, t1 1
    # cycle 2: page 2 promoted (1); ages 0:1 1:1 3:2 -> evict 3 (oldest)  t2 0, t3 1
    # cycle 3: tick 4 hits resident 1; page 3 promoted (2); ages 0:2 2:1 -> evict 0   t4 1, t5 1
    r = replay(parse_trace(TRACE), interval_ticks=2, cold_after=1, max_evict=EvictionCap(pages=1))
    assert r.promotions == 2
    assert r.cycles == 3
    assert r.evicted_fraction == pytest.approx(4 / 24)


def test_cold_after_two_waits_two_cycles() -> None:
    # cycle 1: ages 2,3 -> 1 (not cold); cycle 2: tick 2 touches 2; ages 0,1 -> 1, 3 -> 2: evict {3}
    # cycle 3: tick 4 touches 1, tick 5 promotes 3; ages 0 -> 2, 2 -> 1: evict {0}
    # evicted at tick ends: 0 0 0 1 1 1 (3 promoted at tick 5, then 0 evicted)
    r = replay(parse_trace(TRACE), interval_ticks=2, cold_after=2)
    assert r.promotions == 1
    assert r.evicted_fraction == pytest.approx(3 / 24)


def test_interval_must_be_positive() -> None:
    with pytest.raises(InvalidArgument):
        replay(parse_trace(TRACE), interval_ticks=0, cold_after=1)
