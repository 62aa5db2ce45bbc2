"""The fault-path invariants on the real ``uffd`` backend, run on the native fault thread and on the
pure-Python path (the reference), with pages in a local store and in a real redis-server (an ACL
user with a password): verify before install, never zeros on an outage (a deleted segment
directory; a killed Redis), removal only for the generation installed, events in kernel order,
nothing lost while cycles race the guest."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.capability import redis_reason, require
from tests.helpers.guest import GuestProc, pages_spec
from tests.helpers.servers import RedisServer
from tiermem import native
from tiermem.agent.attach import start_handoff
from tiermem.agent.node import Agent
from tiermem.config import AgentSettings
from tiermem.errors import FailedPrecondition
from tiermem.model import CycleMode, EventKind, EvictionPolicy
from tiermem.store.base import StoredPage
from tiermem.store.local import LocalPageStore
from tiermem.store.redis_store import RedisPageStore
from tiermem.store.segfile import parse_location

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(180)]

N = 1024


@pytest.fixture(params=["native", "python"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which fault path the agent serves with (the native one needs the built extension)."""
    if request.param == "native" and (native.mod is None or not hasattr(native.mod, "FaultPath")):
        pytest.skip(f"native extension unavailable: {native.reason}")
    if request.param == "python":
        monkeypatch.setattr(native, "mod", None)
    return str(request.param)


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
def store_kind(request: pytest.FixtureRequest, path: str) -> str:
    """Where the evicted pages live; the native path reads Redis only when built with hiredis."""
    if request.param == "redis" and path == "native" and not getattr(native.mod, "HAVE_REDIS", 0):
        pytest.skip("native extension built without hiredis (libhiredis-dev)")
    return str(request.param)


@pytest.fixture
def redis_srv(tmp_path: Path, store_kind: str) -> Iterator[RedisServer | None]:
    """A real redis-server where the agent logs in as an ACL user with a password (the default user has
    another one). Not ``--user default off``: Redis 7.0 then drops script writes when it replays the AOF."""
    if store_kind != "redis":
        yield None
        return
    require(redis_reason())
    srv = RedisServer(
        tmp_path / "redis",
        extra_args=["--requirepass", "not-this-one", "--user", "tm", "on", ">s3cr3t-pw", "~*", "&*", "+@all"],
    )
    srv.tmpdir.mkdir()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def agent(tmp_path: Path, path: str, redis_srv: RedisServer | None) -> Iterator[Agent]:
    url = (
        f"file://{tmp_path}/pages"
        if redis_srv is None
        else f"redis://tm:s3cr3t-pw@127.0.0.1:{redis_srv.port}/0"
    )
    s = AgentSettings(
        node_id="n1",
        data_dir=str(tmp_path / "agent"),
        autonomous=False,
        stores={"default": url},
        handoff_socket=str(tmp_path / "h" / "handoff.sock"),
    )
    a = Agent(s)
    stop = start_handoff(a)
    yield a
    if stop:
        stop()
    a.close()


@pytest.fixture
def guest(agent: Agent) -> Iterator[GuestProc]:
    g = GuestProc(agent.settings.handoff_path(), "vm1", f"{N * 4}K")
    deadline = time.monotonic() + 10
    while "vm1" not in agent.sessions:
        assert time.monotonic() < deadline, "vm1 never attached"
        time.sleep(0.02)
    agent.set_policy("vm1", EvictionPolicy(cold_after=1, prefetch_pages=0, store="default"))
    g.cmd(f"touch 0-{N - 1} w")
    yield g
    g.close()


def evict_all(agent: Agent) -> None:
    rep = agent.run_cycle("vm1", CycleMode.EVICT, interval_ms=20)
    assert rep.pages_evicted == N, rep.error


def served_natively(agent: Agent) -> int:
    fs = agent.faults["vm1"]
    return int(fs.native.stats()["served"]) if fs.native is not None else 0


def check_path(agent: Agent, path: str) -> None:
    """The path under test is the one that served."""
    fs = agent.faults["vm1"]
    assert (fs.native is not None) == (path == "native")


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def segment_file(agent: Agent, st: StoredPage) -> tuple[Path, int, int]:
    store = agent.store("default")
    assert isinstance(store, LocalPageStore)
    loc = parse_location(st.location)
    assert loc is not None
    return Path(store.segment_dir(agent.sessions["vm1"].space)) / loc[0], loc[1], loc[2]


@contextlib.contextmanager
def corrupted(agent: Agent, st: StoredPage) -> Iterator[None]:
    """One bit of the page's stored payload flipped (same length), restored on exit."""
    store = agent.store("default")
    if isinstance(store, RedisPageStore):
        key = store.key(agent.sessions["vm1"].space, st.page, st.generation)
        good = store.client.get(key)
        assert isinstance(good, bytes) and len(good) == st.length
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x40
        store.client.set(key, bytes(bad))
        try:
            yield
        finally:
            store.client.set(key, good)
        return
    seg, off, length = segment_file(agent, st)
    at = off + length // 2
    fd = os.open(seg, os.O_RDWR)
    try:
        old = os.pread(fd, 1, at)
        os.pwrite(fd, bytes([old[0] ^ 0x40]), at)
        try:
            yield
        finally:
            os.pwrite(fd, old, at)
    finally:
        os.close(fd)


@contextlib.contextmanager
def outage(agent: Agent, redis_srv: RedisServer | None) -> Iterator[None]:
    """Every payload unreadable: the segment directory gone (NotFound, as after losing the disk), or
    Redis killed (SIGKILL; it restarts on the same port from its fsynced AOF)."""
    if redis_srv is not None:
        redis_srv.kill()
        try:
            yield
        finally:
            redis_srv.start()
        return
    store = agent.store("default")
    assert isinstance(store, LocalPageStore)
    seg_dir = Path(store.segment_dir(agent.sessions["vm1"].space))
    away = seg_dir.with_name("seg-away")
    seg_dir.rename(away)
    try:
        yield
    finally:
        away.rename(seg_dir)


def test_evicted_pages_fault_back_with_their_contents(
    agent: Agent, guest: GuestProc, path: str, redis_srv: RedisServer | None
) -> None:
    check_path(agent, path)
    evict_all(agent)
    order = np.random.default_rng(5).permutation(N)
    guest.cmd(f"touch {','.join(str(int(p)) for p in order)} r")
    assert guest.cmd("verify")["mismatches"] == 0
    s = agent.sessions["vm1"]
    wait_until(lambda: s.counters.faults_served == N, "every fault to be counted")
    wait_until(lambda: agent.index.count("vm1") == 0, "every entry to be dropped")
    assert len(s.fault_latency.samples()) >= N
    if path == "native":
        nf = agent.faults["vm1"].native
        assert nf is not None
        st = nf.stats()
        # The common case never reached Python; only a Redis GET past the thread's 0.5 s timeout (a
        # loaded host) may hand a fault over, and it is counted as such.
        late = st["fallbacks"]["store"] if redis_srv is not None else 0
        assert st["served"] + late == N and st["served"] >= N // 2, st
    agent.index.flush()
    assert agent.index.count("vm1") == 0


def test_corrupt_payload_is_never_installed_and_the_fault_waits(
    agent: Agent, guest: GuestProc, path: str
) -> None:
    evict_all(agent)
    victim = 77
    entry = agent.index.get("vm1", victim)
    assert entry is not None
    with corrupted(agent, entry.stored):
        t, out = in_background(lambda: guest.cmd(f"touch {victim} r"))
        t.join(1.5)
        assert t.is_alive(), "the vCPU must wait: a corrupt payload is never installed"
        assert agent.index.get("vm1", victim) == entry  # still evicted, still indexed
        wait_until(
            lambda: any(e.kind is EventKind.INTEGRITY_ERROR for e in agent.events.history("vm1")),
            "the integrity event",
        )
        nf = agent.faults["vm1"].native
        if path == "native":
            assert nf is not None and nf.stats()["fallbacks"]["verify"] >= 1  # refused natively too
    t.join(30)
    assert not t.is_alive() and out, "the fault did not resume after the payload was repaired"
    assert guest.cmd("verify")["mismatches"] == 0


def test_store_outage_never_installs_zeros(
    agent: Agent, guest: GuestProc, path: str, redis_srv: RedisServer | None
) -> None:
    evict_all(agent)
    with outage(agent, redis_srv):
        t, out = in_background(lambda: guest.cmd("touch 5 r"))
        t.join(1.5)
        assert t.is_alive(), "the vCPU must wait out the outage, never get zeros"
        assert agent.index.get("vm1", 5) is not None
        nf = agent.faults["vm1"].native
        if path == "native" and redis_srv is not None:
            assert nf is not None and nf.stats()["fallbacks"]["store"] >= 1  # handed to Python, not zeros
    t.join(30)
    assert not t.is_alive() and out
    if path == "native":
        # after the outage the thread serves again (a Redis source reconnects after its back-off)
        before = served_natively(agent)
        time.sleep(0.6)
        guest.cmd(f"touch {pages_spec(list(range(200, 264)))} r")
        wait_until(lambda: served_natively(agent) >= before + 64, "the native thread to serve again")
    assert guest.cmd("verify")["mismatches"] == 0  # the page holds its contents, not zeros


def test_remove_events_before_later_faults_keep_shared_memory_evicted_pages(
    agent: Agent, guest: GuestProc, path: str
) -> None:
    """Events go to Python in kernel order, ahead of the faults that follow them. On a shmem memfd a
    REMOVE event is ambiguous (MADV_DONTNEED keeps the page cache), so the agent keeps the evicted
    pages' entries and their faults restore the last contents (the guest's model, which expects the
    ballooned pages to read zeroes, differs on exactly those pages); the pages around them too."""
    evict_all(agent)
    gone = list(range(100, 164))
    guest.cmd(f"balloon {pages_spec(gone)}")  # MADV_REMOVE: REMOVE events, handled before the faults below
    assert all(agent.index.get("vm1", p) is not None for p in gone)
    guest.cmd(f"touch {pages_spec(list(range(90, 180)))} r")
    res = guest.cmd("verify")
    assert res["mismatches"] == len(gone)
    assert all(
        f["page"] in gone and f["valid"] and f["expected"] == 0 and f["counter"] == 1 for f in res["first"]
    )
    wait_until(
        lambda: all(agent.index.get("vm1", p) is None for p in range(90, 180)), "the restored entries to go"
    )


def test_only_the_generation_installed_loses_its_entry(agent: Agent, guest: GuestProc, path: str) -> None:
    """A page faulted back and evicted again before the fault's bookkeeping ran keeps its new entry."""
    evict_all(agent)
    guest.cmd("touch 3 w")  # back, and written: the next eviction stores a new generation
    first = agent.index.get("vm1", 3)
    for _ in range(3):  # a promoted page is age 0: cold_after=1 evicts it on the second cycle
        if agent.run_cycle("vm1", CycleMode.EVICT, interval_ms=20).pages_evicted:
            break
    second = agent.index.get("vm1", 3)
    assert second is not None and (first is None or second.stored.generation > first.stored.generation)
    s = agent.sessions["vm1"]
    # A stale removal of the old generation (what a lagging drain or a second installer does) is a no-op.
    if first is not None:
        s.index.remove("vm1", [(3, first.stored.generation)])
    assert agent.index.get("vm1", 3) == second
    guest.cmd("touch 3 r")
    assert guest.cmd("verify")["mismatches"] == 0
    wait_until(lambda: agent.index.get("vm1", 3) is None, "the installed generation's entry to go")


def test_cycles_while_the_guest_runs_lose_nothing(agent: Agent, guest: GuestProc, path: str) -> None:
    """Races: evictions while the guest writes and faults, several rounds."""
    for _ in range(4):
        rep = agent.run_cycle("vm1", CycleMode.EVICT, interval_ms=20)
        assert rep.error is None or rep.error == "", rep.error
        guest.cmd(f"touch {pages_spec(list(range(0, N, 3)))} w")
        guest.cmd(f"touch {pages_spec(list(range(1, N, 5)))} r")
    assert guest.cmd("verify")["mismatches"] == 0
    if path == "native":
        assert served_natively(agent) > 0


def test_session_close_racing_a_dropped_connection_while_the_guest_faults(
    agent: Agent, guest: GuestProc, path: str
) -> None:
    """The crash of the e2e run (a segfault in the native thread's stop): the VMM's connection drops
    (mark_disconnected, on the handoff thread) while the agent closes the session and the fault
    path stops, the guest faulting pages back all along. Every closer returns; the thread is gone."""
    evict_all(agent)
    s = agent.sessions["vm1"]
    fs = agent.faults["vm1"]

    def touch_all() -> None:
        with contextlib.suppress(FailedPrecondition):  # the guest is killed below, mid-touch
            guest.cmd(f"touch 0-{N - 1} r", timeout=30)

    t = threading.Thread(target=touch_all, daemon=True)
    t.start()
    wait_until(lambda: agent.index.count("vm1") < N, "the guest to fault pages back")
    go = threading.Barrier(3)
    errors: list[BaseException] = []

    def closer(fn: Callable[[], None]) -> None:
        go.wait()
        try:
            fn()
        except BaseException as e:  # reported below: a closer must never raise
            errors.append(e)

    closers = [
        threading.Thread(target=closer, args=(fn,), daemon=True)
        for fn in (lambda: agent.mark_disconnected("vm1"), s.backend.close, fs.stop)
    ]
    for c in closers:
        c.start()
    for c in closers:
        c.join(20)
    assert not any(c.is_alive() for c in closers), "a closer hung"
    assert not errors, errors
    assert s.backend.closed
    if fs.native is not None:
        assert not fs.native.fp.running
        fs.native.fp.stop()  # idempotent after the race
    guest.proc.kill()  # its faults are no longer served: end the touch
    guest.proc.wait(10)
    t.join(10)


@pytest.fixture
def redis_only(store_kind: str) -> None:
    """Skip before any other fixture starts an agent: the scenario is Redis's own."""
    if store_kind != "redis":
        pytest.skip("a Redis scenario")


def test_a_hung_redis_never_installs_zeros(
    redis_only: None, agent: Agent, guest: GuestProc, path: str, redis_srv: RedisServer | None
) -> None:
    """Redis stopped (SIGSTOP: connections stay open, nothing answers): the native thread times out,
    hands the fault to Python, and the vCPU waits; once Redis continues, the page comes back whole."""
    assert redis_srv is not None and redis_srv.proc is not None
    evict_all(agent)
    guest.cmd("touch 1 r")  # the native thread's connection is open before Redis hangs
    os.kill(redis_srv.proc.pid, signal.SIGSTOP)
    try:
        t, out = in_background(lambda: guest.cmd("touch 9 r"))
        t.join(2.0)  # past the native thread's 0.5 s Redis timeout
        assert t.is_alive(), "the vCPU must wait for a hung Redis, never get zeros"
        assert agent.index.get("vm1", 9) is not None
        nf = agent.faults["vm1"].native
        if path == "native":
            assert nf is not None and nf.stats()["fallbacks"]["store"] >= 1  # gave up, handed to Python
    finally:
        os.kill(redis_srv.proc.pid, signal.SIGCONT)
    t.join(30)
    assert not t.is_alive() and out
    assert guest.cmd("verify")["mismatches"] == 0
