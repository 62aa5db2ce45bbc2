"""The control plane is SIGKILLed while it schedules cycles, then restarted on the same state.

The control plane runs as its own process (``tiermem serve controlplane``, SQLite
state); a real sim agent runs in-process (grpc.aio on a loop thread) so the test
can see every cycle order it receives. Three VMs run zipf guests (faults on
evicted pages all the time) with a 400 ms interval. The control plane is killed
while an order is in flight. Then:

* the agent keeps serving faults, and after ``autonomous_after`` runs cycles
  from each VM's last policy on its own;
* the restarted control plane (same port, same database) takes over: the agent
  leaves autonomous mode, sends its autonomous reports, and the scheduler orders
  cycles again without ordering duplicates: no order id is executed twice, order
  slots only move forward, two orders for one VM never overlap, and the
  cycle numbers in the control plane's reports are unique;
* every page of every guest verifies.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.common import LoopThread, record
from tests.helpers.servers import free_port, wait_port
from tests.helpers.wait import wait_until
from tiermem.agent.node import Agent
from tiermem.agent.server import RunningAgent, serve_agent
from tiermem.api import PolicyScope, VmSpec
from tiermem.config import AgentSettings
from tiermem.model import CycleMode, CycleReport, EvictionPolicy
from tiermem.rpc.clients import ControlPlaneClient
from tiermem.sim.workloads import SimGuest

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
VMS = ("cp-a", "cp-b", "cp-c")
INTERVAL_MS = 400


@dataclass
class Order:
    vm_id: str
    order_id: str
    start: float
    end: float = 0.0
    executed: bool = True
    error: str = ""


class OrderLog:
    """Wraps ``Agent.run_cycle`` (what the NodeAgent servicer calls) to record every order received."""

    def __init__(self, agent: Agent) -> None:
        self.orders: list[Order] = []
        self.inflight = 0
        self._lock = threading.Lock()
        orig = agent.run_cycle

        def run_cycle(
            vm_id: str,
            mode: CycleMode,
            interval_ms: int = 0,
            policy: EvictionPolicy | None = None,
            order_id: str = "",
        ) -> CycleReport:
            s = agent.sessions.get(vm_id)
            o = Order(vm_id, order_id, time.monotonic(), executed=not (s and order_id in s.recent_reports))
            with self._lock:
                self.orders.append(o)
                self.inflight += 1
            try:
                rep = orig(vm_id, mode, interval_ms, policy, order_id)
                o.error = rep.error
                return rep
            finally:
                o.end = time.monotonic()
                with self._lock:
                    self.inflight -= 1

        agent.run_cycle = run_cycle  # type: ignore[method-assign]

    def executed(self, vm_id: str, after: float = 0.0) -> list[Order]:
        with self._lock:
            return [
                o for o in self.orders if o.vm_id == vm_id and o.executed and o.order_id and o.start >= after
            ]


def _cp(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tiermem",
            "serve",
            "controlplane",
            "--listen",
            f"127.0.0.1:{port}",
            "--state",
            f"sqlite:///{tmp}/cp.db",
            "--jitter",
            "0",
            "--lease-ttl",
            "30s",
            "--log-format",
            "console",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "cp.log", "ab"),
        env={**os.environ},
    )


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def test_control_plane_killed_while_scheduling(tmp_path: Path, loop: LoopThread) -> None:
    port = free_port()
    cp = _cp(tmp_path, port)
    running: RunningAgent | None = None
    stop = threading.Event()
    steppers: list[threading.Thread] = []
    try:
        wait_port(port, 30, cp)
        settings = AgentSettings(
            node_id="n1",
            listen="127.0.0.1:0",
            data_dir=str(tmp_path / "agent"),
            control_plane=f"127.0.0.1:{port}",
            heartbeat_ms=200,
            autonomous_after_ms=1000,
            fsync=False,
            stores={"default": "memory://"},
        )
        running = loop.run(serve_agent(settings))
        agent = running.agent
        orders = OrderLog(agent)
        client = ControlPlaneClient(f"127.0.0.1:{port}", timeout_s=10)
        wait_until(
            lambda: any(n.node_id == "n1" and n.up for n in client.list_nodes()), 20, "the node to register"
        )
        for vm in VMS:
            client.register_vm(VmSpec(vm, "n1", 4 * MiB, workload="zipf:1.0"), attach=True)
            client.set_policy(PolicyScope.for_vm(vm), EvictionPolicy(interval_ms=INTERVAL_MS, cold_after=1))
        client.close()

        def step(guest: SimGuest) -> None:
            while not stop.is_set():
                guest.step(1)
                time.sleep(0.01)

        for vm in VMS:
            g = agent.sessions[vm].guest
            assert isinstance(g, SimGuest)
            steppers.append(threading.Thread(target=step, args=(g,), daemon=True))
            steppers[-1].start()

        wait_until(
            lambda: all(len(orders.executed(vm)) >= 2 for vm in VMS), 30, "two scheduled cycles per VM"
        )
        wait_until(lambda: orders.inflight > 0, 10, "an order in flight")
        cp.send_signal(signal.SIGKILL)  # mid-scheduling: an order is running on the agent
        cp.wait(10)
        killed_at = time.monotonic()
        faults_at_kill = sum(agent.sessions[vm].counters.faults_served for vm in VMS)

        # --- alone: faults keep being served, then autonomous cycles from the last policies --------------
        wait_until(agent.autonomous.is_set, 10, "the agent to fall back to autonomous cycles")
        assert not orders.executed(VMS[0], after=killed_at + 0.5)

        def autonomous_cycles(vm: str) -> int:
            return agent.sessions[vm].counters.cycles - len(orders.executed(vm))

        wait_until(lambda: all(autonomous_cycles(vm) >= 2 for vm in VMS), 20, "two autonomous cycles per VM")
        faults_alone = sum(agent.sessions[vm].counters.faults_served for vm in VMS) - faults_at_kill
        assert faults_alone > 0, "no fault was served while the control plane was down"

        # --- the control plane comes back on the same state ----------------------------------------------
        cp = _cp(tmp_path, port)
        wait_port(port, 30, cp)
        back_at = time.monotonic()
        wait_until(lambda: not agent.autonomous.is_set(), 20, "the agent to leave autonomous mode")
        wait_until(
            lambda: all(len(orders.executed(vm, after=back_at)) >= 2 for vm in VMS),
            30,
            "two scheduled cycles per VM after the restart",
        )
        auto_then = {vm: autonomous_cycles(vm) for vm in VMS}
        n_then = {vm: len(orders.executed(vm)) for vm in VMS}
        wait_until(lambda: all(len(orders.executed(vm)) >= n_then[vm] + 2 for vm in VMS), 30, "more cycles")
        stop.set()
        for t in steppers:
            t.join(10)

        # --- no duplicate orders -----------------------------------------------------------------------
        ids = [o.order_id for o in orders.orders if o.executed]
        assert len(ids) == len(set(ids)), "an order id was executed twice"
        for vm in VMS:
            ex = orders.executed(vm)
            slots = [int(o.order_id.rsplit("@", 1)[1]) for o in ex]
            assert slots == sorted(slots) and len(set(slots)) == len(slots), (vm, slots)
            for a, b in itertools.pairwise(ex):
                assert b.start >= a.end, f"two orders for {vm} overlapped: {a} {b}"
            assert autonomous_cycles(vm) == auto_then[vm], (
                "autonomous cycles went on after the control plane was back"
            )
        with ControlPlaneClient(f"127.0.0.1:{port}", timeout_s=10) as c2:
            missing: dict[str, int] = {}
            for vm in VMS:
                reps = [r.cycle for r in c2.list_cycle_reports(vm, limit=1000) if r.cycle]
                assert len(reps) == len(set(reps)), f"duplicate cycle reports for {vm}: {sorted(reps)}"
                # every cycle reached the control plane but the one in flight when it died
                missing[vm] = agent.sessions[vm].counters.cycles - len(set(reps))
                assert 0 <= missing[vm] <= 1, (vm, missing[vm], sorted(reps))

        checked = lost = 0
        for vm in VMS:
            n, bad, ok = agent.verify(vm)
            assert ok
            checked, lost = checked + n, lost + bad
        assert lost == 0
        record(
            "control plane SIGKILLed while scheduling, restarted",
            pages_verified=checked,
            pages_lost=lost,
            orders=len(ids),
            autonomous_cycles=sum(auto_then.values()),
            faults_while_down=faults_alone,
            down_s=round(back_at - killed_at, 1),
            reports_lost_in_flight=sum(missing.values()),
        )
    finally:
        stop.set()
        if running is not None:
            loop.run(running.stop())
        if cp.poll() is None:
            cp.kill()
        cp.wait(10)


def test_a_repeated_order_is_never_run_twice(tmp_path: Path) -> None:
    """A scheduler that re-sends an order (a restart, a retry) while or after it runs gets no second cycle."""
    agent = Agent(
        AgentSettings(
            node_id="n1",
            data_dir=str(tmp_path / "a"),
            stores={"default": "memory://"},
            autonomous=False,
            fsync=False,
        )
    )
    try:
        agent.attach_sim(
            "vm", 64 * 4096, EvictionPolicy(interval_ms=300, cold_after=1), workload="idle", vcpus=0
        )
        outcomes: list[object] = []

        def order() -> None:
            try:
                outcomes.append(agent.run_cycle("vm", CycleMode.EVICT, 300, order_id="vm@1000"))
            except Exception as e:  # a concurrent duplicate may be refused; it must not run
                outcomes.append(e)

        ts = [threading.Thread(target=order) for _ in range(3)]
        for t in ts:
            t.start()
            time.sleep(0.05)
        for t in ts:
            t.join(10)
        after = agent.run_cycle(
            "vm", CycleMode.EVICT, 300, order_id="vm@1000"
        )  # once more, after it finished
        assert agent.sessions["vm"].counters.cycles == 1
        reports = [o for o in outcomes if isinstance(o, CycleReport)]
        assert reports and all(r.cycle == 1 for r in reports) and after.cycle == 1
    finally:
        agent.close()
