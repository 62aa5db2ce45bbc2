"""The node agent on the real kernel backends with process guests: detection, eviction, faults, restart.

Every test runs once per mode: ``uffd`` (RWP emulated by the VMM) and ``rwp`` (the kernel's RWP, Linux
7.3+; ``make test-rwp`` runs those in a 7.3 VM). The agent builds the backend the guest registered for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.agents import handoff_agent
from tests.helpers.guest import GuestProc, pages_spec
from tests.helpers.servers import RedisServer, free_port, wait_port
from tests.helpers.timing import scaled
from tests.helpers.wait import wait_until
from tiermem.agent.attach import start_handoff
from tiermem.agent.node import Agent
from tiermem.config import AgentSettings
from tiermem.kernel import uapi
from tiermem.model import CycleMode, EvictionPolicy

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(180)]

PS = 4096


@pytest.fixture(params=["uffd", pytest.param("rwp", marks=pytest.mark.rwp)])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with handoff_agent(tmp_path) as a:
        yield a


def test_detection_is_exact_and_evicted_pages_fault_back(agent: Agent, mode: str) -> None:
    guest = GuestProc(agent.settings.handoff_path(), "pg1", "16M", mode=mode)
    try:
        wait_until(lambda: "pg1" in agent.sessions, scaled(10), "pg1 to attach")
        assert guest.mode == mode and agent.sessions["pg1"].backend.name == mode
        n = 4096
        agent.set_policy("pg1", EvictionPolicy(cold_after=1, prefetch_pages=0))
        guest.cmd(f"touch 0-{n - 1} w")  # populate: first touches are MISSING faults, zero-filled
        s = agent.sessions["pg1"]
        eng = agent.engines["pg1"]
        b = s.backend
        hot = sorted(np.random.default_rng(3).choice(n, n // 10, replace=False).tolist())
        with s.cycle_lock:
            eng.begin()  # the VMM zaps every PTE; first touches are now MINOR faults
            guest.cmd(f"touch {pages_spec(hot)} r")
            scan = b.pagemap_scan(
                b.base,
                b.base + b.size,
                category_mask=uapi.PAGE_IS_ACCESSED,
                return_mask=uapi.PAGE_IS_ACCESSED,
            )
            seen = np.flatnonzero(scan.page_mask(b.base, b.base + b.size, PS)).tolist()
            rep = eng.finish(CycleMode.EVICT)
        tp = len(set(seen) & set(hot))
        assert tp / len(seen) == 1.0 and tp / len(hot) == 1.0  # precision and recall
        assert rep.pages_hot == len(hot)
        assert rep.pages_evicted == n - len(hot)
        assert agent.index.count("pg1") == n - len(hot)
        st = agent.store("default").usage(agent.sessions["pg1"].space)
        assert st.pages == n - len(hot)  # every page was written: none is a zero page
        # the guest touches evicted pages: each is a real MISSING fault served from the local store
        cold = [p for p in range(0, n, 7) if p not in set(hot)]
        guest.cmd(f"touch {pages_spec(cold)} w")
        assert s.counters.faults_served >= 1
        assert guest.cmd("verify")["mismatches"] == 0
        assert agent.index.count("pg1") == n - len(hot) - s.counters.pages_restored
    finally:
        guest.close()


@pytest.mark.parametrize(
    ("mode", "store"),
    [("uffd", "local"), pytest.param("rwp", "redis", marks=[pytest.mark.rwp, pytest.mark.redis])],
    ids=["uffd-local", "rwp-redis"],
)
def test_cycles_while_the_guest_runs_lose_nothing(
    tmp_path: Path, mode: str, store: str, request: pytest.FixtureRequest
) -> None:
    # rwp evicts to a real redis-server (the host's binary, over 9p in the kernel-VM tier); the local
    # store on rwp is the detection test's
    stores = {"default": request.getfixturevalue("redis_srv").url} if store == "redis" else {}
    s = AgentSettings(
        node_id="n1",
        data_dir=str(tmp_path / "agent"),
        autonomous=False,
        stores=stores,
        handoff_socket=str(tmp_path / "h" / "handoff.sock"),
    )
    agent = Agent(s)
    stop = start_handoff(agent)
    guest = GuestProc(
        agent.settings.handoff_path(), "pg2", "16M", "--workload", "hotset:0.1", "--seed", "5", mode=mode
    )
    try:
        wait_until(lambda: "pg2" in agent.sessions, scaled(10), "pg2 to attach")
        assert agent.sessions["pg2"].backend.name == mode
        agent.set_policy("pg2", EvictionPolicy(cold_after=1, prefetch_pages=4))
        guest.cmd("touch 0-4095 w")
        evicted = 0
        for _ in range(4):
            rep = agent.run_cycle("pg2", CycleMode.EVICT, interval_ms=150)
            evicted += rep.pages_evicted
            guest.cmd("run 20")
        assert evicted > 3000
        assert guest.cmd("verify")["mismatches"] == 0
        prog = agent.drain("pg2")
        assert prog.done and agent.index.count("pg2") == 0
        assert agent.store("default").usage(agent.sessions["pg2"].space).pages == 0
        assert guest.cmd("verify")["mismatches"] == 0
        assert agent.store("default").kind == ("redis" if store == "redis" else "file")
    finally:
        guest.close()
        if stop:
            stop()
        agent.close()


def _agent_proc(tmp: Path, redis_url: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TIERMEM_AGENT_AUTONOMOUS": "false"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tiermem",
            "serve",
            "agent",
            "--node-id",
            "n1",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp / "agent"),
            "--store",
            f"default={redis_url}",
            "--handoff-socket",
            str(tmp / "h" / "handoff.sock"),
            "--log-format",
            "console",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "agent.log", "ab"),
    )


@pytest.mark.redis
def test_agent_sigkill_and_restart_serves_every_page(tmp_path: Path) -> None:
    """Evict to Redis, SIGKILL the agent, start it again: the VMM reattaches and every page comes back.

    uffd mode only: two agent processes starting under TCG make this the tier's slowest test by far,
    and the rwp reattach is covered by test_uffd_backend's restart test."""
    mode = "uffd"
    from tiermem.rpc.channel import sync_channel
    from tiermem.v1 import agent_pb2, agent_pb2_grpc, types_pb2

    (tmp_path / "redis").mkdir()
    redis = RedisServer(tmp_path / "redis").start()
    port = free_port()
    agent = _agent_proc(tmp_path, redis.url, port)
    guest = None
    try:
        wait_port(port, scaled(30), agent)
        stub = agent_pb2_grpc.NodeAgentStub(sync_channel(f"127.0.0.1:{port}"))
        guest = GuestProc(str(tmp_path / "h" / "handoff.sock"), "pg3", "16M", mode=mode)
        assert guest.mode == mode
        guest.cmd("touch 0-4095 w")
        guest.cmd("touch 0-99 w")
        pol = types_pb2.EvictionPolicy(interval_ms=100, cold_after=1, prefetch_pages=2)
        rep = stub.RunCycle(
            agent_pb2.RunCycleRequest(vm_id="pg3", mode=types_pb2.CYCLE_MODE_EVICT, policy=pol),
            timeout=scaled(30),
        )
        assert rep.pages_evicted == 4096
        agent.send_signal(signal.SIGKILL)
        agent.wait(scaled(10))
        # the agent is dead: its pages live in Redis and in the durable index only
        agent = _agent_proc(tmp_path, redis.url, port)
        wait_port(port, scaled(30), agent)
        deadline = time.monotonic() + scaled(20)
        while True:  # the VMM reconnects on its own and re-sends its fds
            vms = stub.ListVms(agent_pb2.ListVmsRequest(), timeout=scaled(5)).vms
            if any(v.vm_id == "pg3" and v.evicted_pages == 4096 for v in vms):
                break
            assert time.monotonic() < deadline, f"VMM did not reattach: {vms}"
            time.sleep(0.1)
        ans = guest.cmd("verify", timeout=120)  # reads every page: all 4096 fault back through the new agent
        assert ans["mismatches"] == 0
        vms = stub.ListVms(agent_pb2.ListVmsRequest(), timeout=scaled(5)).vms
        assert [v.evicted_pages for v in vms if v.vm_id == "pg3"] == [0]
    finally:
        if guest is not None:
            guest.close()
        agent.kill()
        agent.wait(10)
        redis.stop()
