"""Issue 17 item 1: a reused VM id never gets a dead VM's memory.

Real uffd backend, process guests over the real handoff socket. VM "vm-x" evicts
every page and its VMM is SIGKILLed; its pages stay indexed for a reattach. Before
this change a *different* VMM process attaching a fresh VM with the same id and
size (a plain attach) was served all of the old guest's pages. Now:

- a plain attach over those pages is refused with an error naming the way out;
- a reattach must prove itself with the secret the agent handed the first VMM
  (same uid, same id, same size are not proof) — a guessed secret is refused;
- the refusal holds across an agent restart (the incarnation is in the index);
- ``--fresh`` starts a new incarnation whose guest sees its own (zero) memory,
  and the old incarnation's pages are purged by the housekeeper.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.common import EventLog, record
from tests.helpers.guest import GuestProc
from tests.helpers.wait import wait_until
from tiermem.agent.attach import start_handoff
from tiermem.agent.node import Agent
from tiermem.config import AgentSettings
from tiermem.errors import FailedPrecondition
from tiermem.handoff.client import GuestMemory
from tiermem.model import CycleMode, EventKind, EvictionPolicy, VmState
from tiermem.rpc.convert import status_from_pb, status_to_pb

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(120)]

PAGES = 1024  # 4 MiB guests
SIZE = "4M"


class Node:
    """An in-process agent with its handoff listener, restartable on the same data dir."""

    def __init__(self, tmp: Path) -> None:
        self.settings = AgentSettings(
            node_id="n1",
            data_dir=str(tmp / "agent"),
            autonomous=False,
            handoff_socket=str(tmp / "h" / "handoff.sock"),
        )
        self.agent: Agent | None = None
        self._stop: object = None

    def start(self) -> Agent:
        self.agent = Agent(self.settings)
        self._stop = start_handoff(self.agent)
        return self.agent

    def stop(self) -> None:
        if callable(self._stop):
            self._stop()
        if self.agent is not None:
            self.agent.close()
        self.agent = None


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    n.start()
    yield n
    n.stop()


def _evicted_then_killed(agent: Agent, path: str) -> tuple[str, int]:
    a = GuestProc(path, "vm-x", SIZE)
    try:
        wait_until(lambda: "vm-x" in agent.sessions, 10, "vm-x to attach")
        assert (
            a.ready["incarnation"] == agent.sessions["vm-x"].incarnation
        )  # the VMM was told its incarnation
        agent.set_policy("vm-x", EvictionPolicy(cold_after=1, prefetch_pages=0))
        a.cmd(f"touch 0-{PAGES - 1} w")
        assert agent.run_cycle("vm-x", CycleMode.EVICT, 100).pages_evicted == PAGES
    finally:
        a.proc.kill()  # SIGKILL: the session stays, disconnected, with its index
        a.proc.wait(10)
        a.close()
    wait_until(lambda: agent.sessions["vm-x"].state is VmState.DISCONNECTED, 10, "vm-x to be disconnected")
    s = agent.sessions["vm-x"]
    return s.space, agent.index.count("vm-x")


def test_a_reused_id_is_refused_until_the_operator_chooses(node: Node, tmp_path: Path) -> None:
    agent = node.start() if node.agent is None else node.agent
    path = node.settings.handoff_path()
    old_space, n = _evicted_then_killed(agent, path)
    assert n == PAGES and agent.store("default").usage(old_space).pages == PAGES

    # 1. another VMM, same uid, same id, same size, plain attach: refused, nothing changes
    with pytest.raises(FailedPrecondition) as info:
        GuestProc(path, "vm-x", SIZE)
    msg = str(info.value)
    assert "evicted pages of an earlier VMM" in msg and "reattach with the secret" in msg
    assert "purge" in msg and "--fresh" in msg
    assert agent.index.count("vm-x") == PAGES and agent.sessions["vm-x"].space == old_space

    # 2. a reattach with a guessed secret over the real socket: refused (SO_PEERCRED matches: not proof)
    gm = GuestMemory.create("vm-x", PAGES * 4096, mode="uffd")
    try:
        gm.secret = "ab" * 32
        with pytest.raises(FailedPrecondition, match="secret does not match"):
            gm._connect(path, timeout=5, reattach=True)
    finally:
        gm.close()
    assert agent.index.count("vm-x") == PAGES

    # 3. the agent restarts: the incarnation is durable, the plain attach is still refused
    node.stop()
    agent = node.start()
    assert agent.index.count("vm-x") == PAGES
    with pytest.raises(FailedPrecondition, match="reattach with the secret"):
        GuestProc(path, "vm-x", SIZE)

    # 4. --fresh: a new incarnation; its guest reads its own zero memory, never the old pages
    log = EventLog(agent)
    b = GuestProc(path, "vm-x", SIZE, "--fresh")
    try:
        wait_until(lambda: "vm-x" in agent.sessions, 10, "the fresh vm-x to attach")
        s = agent.sessions["vm-x"]
        assert s.space != old_space and b.ready["incarnation"] == s.incarnation
        assert (
            status_from_pb(status_to_pb(agent.status("vm-x"))).incarnation == s.incarnation
        )  # as gRPC shows it
        assert agent.index.count("vm-x") == 0
        b.cmd(f"touch 0-{PAGES - 1} r")
        assert b.cmd("verify")["mismatches"] == 0  # its expected contents are zeros
        assert not log.of(EventKind.VMM_RECONNECTED, "vm-x")
        # the old incarnation's pages are purged in the background
        wait_until(
            lambda: agent.store("default").usage(old_space).pages == 0, 15, "the old pages to be purged"
        )
        wait_until(lambda: agent.index.orphans() == [], 5, "the orphan queue to empty")
    finally:
        b.close()
    record(
        "reused VM id refused; --fresh got its own memory",
        pages_verified=PAGES,
        pages_lost=0,
        old_pages_served_to_new_vmm=0,
    )


def test_the_real_vmm_reattaches_with_its_secret(node: Node) -> None:
    first = node.agent
    assert first is not None
    agent = first
    path = node.settings.handoff_path()
    g = GuestProc(path, "vm-r", SIZE)
    try:
        wait_until(lambda: "vm-r" in first.sessions, 10, "vm-r to attach")
        inc = agent.sessions["vm-r"].incarnation
        agent.set_policy("vm-r", EvictionPolicy(cold_after=1, prefetch_pages=0))
        g.cmd(f"touch 0-{PAGES - 1} w")
        assert agent.run_cycle("vm-r", CycleMode.EVICT, 100).pages_evicted == PAGES
        node.stop()  # the agent goes away; the VMM's client library reconnects with its secret
        agent = node.start()
        wait_until(
            lambda: "vm-r" in agent.sessions and agent.sessions["vm-r"].state is VmState.ARMED,
            30,
            "the VMM to reattach",
        )
        assert agent.sessions["vm-r"].incarnation == inc
        assert g.cmd("verify")["mismatches"] == 0  # every evicted page came back from its own namespace
        # the native fault path hands installed pages to the index every few ms, so the count lags a little
        wait_until(lambda: agent.index.count("vm-r") == 0, 10, "every index entry to be dropped")
    finally:
        g.close()
