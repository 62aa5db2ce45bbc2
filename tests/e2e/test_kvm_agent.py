"""KVM guests under the real node agent: the uffd backend, local and Redis stores, two guests at once.

The agent runs in this process (handoff listener + cycle engine + fault server);
each KvmVm hands its guest RAM over exactly as a production VMM would
(GuestMemory: memfd + MAP_SHARED mapping + uffd MISSING|MINOR, SCM_RIGHTS) and
serves the agent's zap requests. Guests are prefilled (every page written once
through the memfd, like a restored memory image) so every cold page holds data.
"""

from __future__ import annotations

import functools
import operator
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.servers import RedisServer
from tests.helpers.wait import wait_until
from tiermem.agent.attach import start_handoff
from tiermem.agent.node import Agent
from tiermem.config import AgentSettings
from tiermem.guests.kvm import KvmVm
from tiermem.model import CycleMode, EvictionPolicy

pytestmark = [pytest.mark.kvm, pytest.mark.uffd, pytest.mark.timeout(120)]

MiB = 1 << 20
HOT = 0.1


def _agent(tmp_path: Path, stores: dict[str, str] | None = None) -> tuple[Agent, object]:
    s = AgentSettings(
        node_id="kvm-node",
        data_dir=str(tmp_path / "agent"),
        autonomous=False,
        fsync=False,
        handoff_socket=str(tmp_path / "h" / "handoff.sock"),
        stores=stores or {},
    )
    a = Agent(s)
    return a, start_handoff(a)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a, stop = _agent(tmp_path)
    yield a
    if callable(stop):
        stop()
    a.close()


def _cycles_while_running(agent: Agent, vms: list[KvmVm], n: int, interval_ms: int) -> list[int]:
    """``n`` evict cycles per VM while every guest runs its workload; returns pages evicted per VM."""
    runners = [threading.Thread(target=vm.run, args=(600.0,), kwargs={"verify": False}) for vm in vms]
    for t in runners:
        t.start()
    evicted = [0] * len(vms)
    try:
        time.sleep(0.3)  # the hot set is resident before the first detection interval
        for _ in range(n):
            for i, vm in enumerate(vms):
                rep = agent.run_cycle(vm.vm_id, CycleMode.EVICT, interval_ms=interval_ms)
                assert not rep.error, rep.error
                evicted[i] += rep.pages_evicted
    finally:
        for vm in vms:
            vm.stop()
        for t in runners:
            t.join(30)
    return evicted


def _run_scenario(agent: Agent, vm_id: str, memory: int, store: str = "default") -> None:
    with KvmVm(vm_id, memory, vcpus=1, workload_spec=f"hotset:{HOT}:w=0.3", seed=5) as vm:
        vm.start(agent.settings.handoff_path())
        wait_until(lambda: vm_id in agent.sessions, 10, f"{vm_id} to attach")
        assert vm.mode == "uffd"
        vm.prefill()
        # No prefetch while cycling: a hot page the guest did not reach within one detection window (this
        # PVM host is slow under load) is evicted and faults back, and prefetch would bring up to that many
        # cold neighbours back with it - correct, but not what this assertion counts.
        agent.set_policy(vm_id, EvictionPolicy(cold_after=3, prefetch_pages=0, store=store))
        hot = vm.workload.hot_pages()
        assert hot is not None
        cold = np.setdiff1d(np.arange(vm.n_pages), hot)
        resident_before = vm.resident_bytes()

        _cycles_while_running(agent, [vm], 3, interval_ms=1500)

        evicted = agent.index.evicted_pages(vm_id)
        evicted_cold = np.intersect1d(evicted, cold)
        assert len(evicted_cold) >= 0.8 * len(cold), (len(evicted_cold), len(cold))
        assert vm.resident_bytes() <= resident_before - 0.8 * len(cold) * 4096
        assert agent.store(store).usage(agent.sessions[vm_id].space).pages >= len(evicted_cold)
        assert vm.summary().zaps_served >= 3  # the agent's zaps ran in this VMM

        # The guest touches a random sample of evicted pages: every fault is served from the store.
        counters = agent.sessions[vm_id].counters
        served = counters.faults_served
        sample = np.random.default_rng(1).choice(evicted_cold, 300, replace=False)
        got = vm.touch(sample)  # reads: the guest sees the counters the VMM expects
        assert got == int(vm.expected.counts[sample].sum()) & 0xFFFF_FFFF
        vm.touch(sample[:100], write=True)
        assert counters.faults_served > served
        # all back in the guest (the agent drops an index entry right after the page is installed)
        wait_until(
            lambda: not np.intersect1d(agent.index.evicted_pages(vm_id), sample).size,
            10,
            "the sample to be resident",
        )
        assert counters.store_errors == 0 and counters.integrity_errors == 0

        # prefetch keeps the full verification (every evicted page faults back) quick
        agent.set_policy(vm_id, EvictionPolicy(cold_after=3, prefetch_pages=256, store=store))
        checked, bad = vm.verify()  # every page through the guest mapping; evicted ones fault back
        assert (checked, bad) == (vm.n_pages, 0)
        assert agent.index.count(vm_id) == 0
        agent.detach(vm_id)


def test_kvm_guest_cold_pages_go_to_the_local_store_and_come_back(agent: Agent) -> None:
    _run_scenario(agent, "kvm-local", 256 * MiB)


@pytest.mark.redis
def test_kvm_guest_against_redis(tmp_path: Path) -> None:
    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis").start()
    a, stop = _agent(tmp_path, {"redis": redis.url})
    try:
        _run_scenario(a, "kvm-redis", 256 * MiB, store="redis")
        assert a.store("redis").usage().pages == 0  # nothing left in any namespace
    finally:
        if callable(stop):
            stop()
        a.close()
        redis.stop()


def test_two_kvm_guests_under_one_agent(agent: Agent) -> None:
    with (
        KvmVm("kvm-g1", 32 * MiB, vcpus=1, workload_spec=f"hotset:{HOT}:w=0.5", seed=1) as a,
        KvmVm("kvm-g2", 32 * MiB, vcpus=1, workload_spec=f"hotset:{HOT}:w=0.5", seed=2) as b,
    ):
        for vm in (a, b):
            vm.start(agent.settings.handoff_path())
            wait_until(
                functools.partial(operator.contains, agent.sessions, vm.vm_id), 10, f"{vm.vm_id} to attach"
            )
            vm.prefill()
            agent.set_policy(vm.vm_id, EvictionPolicy(cold_after=1, prefetch_pages=8))
        # Only guest one runs and gets evicted; guest two is idle and never cycled.
        before_b = np.empty(b.memory_bytes, dtype=np.uint8)
        b.machine.read_ram(0, before_b)
        evicted = _cycles_while_running(agent, [a], 2, interval_ms=800)
        assert evicted[0] > 0.5 * a.n_pages
        assert agent.index.count("kvm-g2") == 0
        after_b = np.empty_like(before_b)
        b.machine.read_ram(0, after_b)
        assert np.array_equal(before_b, after_b)
        # Now evict guest two as well and bring both back: each gets its own pages.
        _cycles_while_running(agent, [a, b], 1, interval_ms=600)
        assert agent.index.count("kvm-g2") > 0
        b.touch(np.flatnonzero(b.expected.counts)[::3], write=True)
        assert a.verify() == (a.n_pages, 0)
        assert b.verify() == (b.n_pages, 0)
