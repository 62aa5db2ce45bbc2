"""A VMM dies (SIGKILL) while the agent is serving its faults: the agent stays healthy for the other VMs.

Real uffd backend, two process guests on one in-process agent. VM A's pages live
in Redis behind the fault proxy, made slow so that A's faults are in flight (a
GET on the wire) when A is killed; VM B uses the local store. After the kill the
agent must mark A disconnected, finish (or drop) A's in-flight faults without an
error escaping, keep serving B's faults and cycles with every page intact, and
release everything of A on detach (store payloads, fds, threads).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.common import EventLog, open_fds, record
from tests.faults.conftest import AgentFactory, redis_url
from tests.faults.toxic_proxy import ToxicProxy
from tests.helpers.guest import GuestProc
from tests.helpers.servers import RedisServer
from tests.helpers.wait import wait_until
from tiermem.agent.attach import start_handoff
from tiermem.agent.node import Agent
from tiermem.model import CycleMode, EventKind, EvictionPolicy, VmState

pytestmark = [pytest.mark.uffd, pytest.mark.redis, pytest.mark.timeout(120)]

PAGES = 2048  # 8 MiB guests


@pytest.fixture
def agent(make_agent: AgentFactory, redis_proxy: ToxicProxy) -> Iterator[Agent]:
    a = make_agent({"slow": redis_url(redis_proxy.port, timeout=5)})
    stop = start_handoff(a)
    yield a
    if stop:
        stop()


def _memfd_fds(vm_id: str) -> list[str]:
    return [t for t in open_fds().values() if t.startswith(f"/memfd:tiermem-{vm_id} ")]


def _threads(vm_id: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.endswith(vm_id) or f"-{vm_id}_" in t.name]


def test_vmm_dies_while_faults_are_in_flight(
    agent: Agent, redis_own: RedisServer, redis_proxy: ToxicProxy
) -> None:
    log = EventLog(agent)
    path = agent.settings.handoff_path()
    a = GuestProc(path, "vm-a", "8M")
    b = GuestProc(path, "vm-b", "8M", "--workload", "hotset:0.2", "--seed", "4")
    try:
        wait_until(lambda: {"vm-a", "vm-b"} <= set(agent.sessions), 10, "both VMs to attach")
        agent.set_policy("vm-a", EvictionPolicy(cold_after=1, prefetch_pages=0, store="slow"))
        agent.set_policy("vm-b", EvictionPolicy(cold_after=1, prefetch_pages=2))
        for g in (a, b):
            g.cmd(f"touch 0-{PAGES - 1} w")
        assert agent.run_cycle("vm-a", CycleMode.EVICT, 100).pages_evicted == PAGES
        assert agent.run_cycle("vm-b", CycleMode.EVICT, 100).pages_evicted == PAGES
        assert len(_memfd_fds("vm-a")) >= 1

        # A reads its evicted pages one by one; each fault waits ~0.6 s on the slow link.
        redis_proxy.latency(0.3)
        up = redis_proxy.stats.bytes_up
        assert a.proc.stdin is not None
        a.proc.stdin.write(f"touch 0-{PAGES - 1} r\n")
        a.proc.stdin.flush()
        wait_until(lambda: redis_proxy.stats.bytes_up > up, 10, "a fault of A to be on the wire")
        time.sleep(0.1)
        a.proc.kill()  # SIGKILL: the VMM dies with a fault in flight
        a.proc.wait(10)
        wait_until(
            lambda: agent.sessions["vm-a"].state is VmState.DISCONNECTED, 10, "A to be marked disconnected"
        )
        wait_until(lambda: log.of(EventKind.VMM_DISCONNECTED, "vm-a"), 5, "A's disconnection to be reported")

        # B is served throughout: faults, a cycle, and every page verified, while A's fault finishes into the void.
        t0 = time.monotonic()
        b.cmd(f"touch 0-{PAGES - 1} w")
        rep = agent.run_cycle("vm-b", CycleMode.EVICT, 100)
        assert rep.error == "" and rep.pages_evicted > 0
        b.cmd("run 20")
        assert b.cmd("verify")["mismatches"] == 0
        b_seconds = time.monotonic() - t0
        redis_proxy.latency(0)

        # A's fault server stopped; nothing escaped; the agent answers for every VM.
        wait_until(lambda: "vm-a" not in agent.faults, 10, "A's fault server to stop")
        assert (
            len(log.of(EventKind.VMM_DISCONNECTED, "vm-a")) == 1
        )  # the uffd reader and the socket both saw it
        statuses = {s.vm_id: s for s in agent.list_status()}
        assert statuses["vm-a"].state is VmState.DISCONNECTED
        assert statuses["vm-b"].state is VmState.ARMED
        a_left = agent.index.count("vm-a")
        assert a_left > 0
        a_space = agent.sessions["vm-a"].space
        assert agent.store("slow").usage(a_space).pages > 0

        # Cleanup of the dead VM: its pages are purged, its fds and threads go; B is untouched.
        assert agent.detach("vm-a", purge=True) >= a_left
        assert agent.store("slow").usage(a_space).pages == 0
        wait_until(lambda: not _memfd_fds("vm-a"), 5, "A's memfd to be closed")
        wait_until(lambda: not _threads("vm-a"), 5, "A's threads to exit")
        assert agent.index.record("vm-a") is None
        b.cmd("run 10")
        ans = b.cmd("verify")
        assert ans["mismatches"] == 0
        record(
            "VMM SIGKILLed with faults in flight (uffd)",
            pages_verified=ans["pages"],
            pages_lost=ans["mismatches"],
            dead_vm_pages_purged=a_left,
            other_vm_served_s=round(b_seconds, 2),
        )
    finally:
        for g in (a, b):
            g.close()


def test_a_dead_vmm_memory_is_released_without_an_operator(agent: Agent, tmp_path: Path) -> None:
    a = GuestProc(agent.settings.handoff_path(), "vm-a", "8M")
    try:
        wait_until(lambda: "vm-a" in agent.sessions, 10, "the VM to attach")
        agent.set_policy("vm-a", EvictionPolicy(cold_after=1))
        a.cmd(f"touch 0-{PAGES - 1} w")
        assert agent.run_cycle("vm-a", CycleMode.EVICT, 50).pages_evicted > 0
        assert _memfd_fds("vm-a")
        a.proc.kill()
        a.proc.wait(10)
        wait_until(
            lambda: agent.sessions["vm-a"].state is VmState.DISCONNECTED, 10, "A to be marked disconnected"
        )
        wait_until(lambda: not _memfd_fds("vm-a"), 3, "the dead guest's memfd to be released")
    finally:
        a.close()
