"""Every eviction algorithm on the real ``uffd`` backend with a process guest: cycles lose nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.agents import handoff_agent
from tests.helpers.guest import GuestProc
from tiermem import evict
from tiermem.agent.node import Agent
from tiermem.model import CycleMode, EvictionPolicy

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(180)]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with handoff_agent(tmp_path) as a:
        yield a


@pytest.mark.parametrize("name", ["recommended", *(n for n in evict.NAMES if n not in evict.ALIASES)])
def test_policy_cycles_while_the_guest_runs_lose_nothing(agent: Agent, name: str) -> None:
    vm = f"pol-{name}"
    guest = GuestProc(
        agent.settings.handoff_path(), vm, "16M", "--workload", "phases:0.1:period=3", "--seed", "9"
    )
    try:
        deadline = time.monotonic() + 10
        while vm not in agent.sessions:
            assert time.monotonic() < deadline, f"{vm} never attached"
            time.sleep(0.02)
        agent.set_policy(vm, EvictionPolicy(cold_after=2, prefetch_pages=0, algorithm=name))
        guest.cmd("touch 0-4095 w")
        s = agent.sessions[vm]
        evicted = 0
        for _ in range(8):
            rep = agent.run_cycle(vm, CycleMode.EVICT, interval_ms=100)
            assert not rep.error, rep.error
            evicted += rep.pages_evicted
            guest.cmd("run 10")
        assert s.algorithm().name == evict.resolve(name).name
        assert evicted > 1000 and s.counters.faults_served > 0  # it evicted, and evicted pages came back
        assert guest.cmd("verify")["mismatches"] == 0
        prog = agent.drain(vm)
        assert prog.done and agent.index.count(vm) == 0
        assert guest.cmd("verify")["mismatches"] == 0
    finally:
        guest.close()
