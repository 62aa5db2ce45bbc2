"""The real-kernel backends (``uffd``, and ``rwp`` where the kernel has RWP) with a process guest.

Driven by a small harness (tests/helpers/uffd_harness.py), not the agent, through
the same KernelBackend calls the agent makes. Every test runs once per mode: the
guest is told its mode, and the backend the attach builds must match it. The rwp
runs need Linux 7.3+ (``make test-rwp`` runs them in a 7.3 VM).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.timing import scaled
from tests.helpers.uffd_harness import GuestProc, MiniAgent, pages_arg
from tests.helpers.wait import wait_until
from tiermem.kernel import uapi
from tiermem.kernel.rwp import RwpBackend
from tiermem.kernel.uffd import UffdBackend
from tiermem.kernel.uffd_base import RealBackend

pytestmark = pytest.mark.uffd

ASYNC = uapi.UFFD_FEATURE_RWP_ASYNC
BACKEND_CLASS = {"uffd": UffdBackend, "rwp": RwpBackend}


@pytest.fixture(params=["uffd", pytest.param("rwp", marks=pytest.mark.rwp)])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[MiniAgent]:
    a = MiniAgent(tmp_path / "run" / "handoff.sock")
    yield a
    a.close()
    assert not a.errors, a.errors


def start(agent: MiniAgent, vm_id: str, mode: str, **kw: object) -> tuple[GuestProc, RealBackend]:
    guest = GuestProc(agent.path, vm_id, mode=mode, **kw)  # type: ignore[arg-type]
    attach = agent.wait_attach()
    assert attach.vm_id == vm_id and attach.mode == mode
    be = attach.make_backend()
    assert type(be) is BACKEND_CLASS[mode]
    agent.serve(be)
    ready = guest.wait_ready()
    assert ready["mode"] == mode
    if mode == "rwp" and kw.get("prefill", True):
        # On a real RWP kernel a pwrite-filled page is cached but not mapped, and UFFDIO_RWPROTECT cannot
        # protect it (issue 16): rwp mode co-registers MINOR, so the first touch of each such page faults
        # MINOR and CONTINUE maps it. Map the loaded image so, as a booted guest would have; the lost-write
        # regression test covers pages left unmapped.
        guest.cmd(f"touch 0-{be.n_pages - 1} r")
        assert sorted(agent.minor_faults) == list(range(be.n_pages))
    return guest, be


def hot_set(be: RealBackend) -> set[int]:
    end = be.base + be.size
    r = be.pagemap_scan(be.base, end, category_mask=uapi.PAGE_IS_ACCESSED, return_mask=uapi.PAGE_IS_ACCESSED)
    return set(np.flatnonzero(r.page_mask(be.base, end, be.page_size)).tolist())


def test_detection_finds_exactly_the_hot_set_and_eviction_loses_nothing(agent: MiniAgent, mode: str) -> None:
    # 16 MiB on rwp: every page of the loaded image takes one MINOR fault through this harness first,
    # and the kernel-VM tier runs under TCG
    guest, be = start(
        agent, "vm-detect", mode, memory="64M" if mode == "uffd" else "16M", workload="hotset:0.1"
    )
    try:
        n = be.n_pages
        known_hot = set(guest.cmd("hot")["hot"])
        assert len(known_hot) == round(0.1 * n)
        # never protected yet: every populated page counts as accessed
        assert be.populated().all()
        assert len(hot_set(be)) == n

        # cycle 1: protect, the guest runs its workload, freeze, scan
        be.rwprotect(be.base, be.size, protect=True)
        touched = set(guest.cmd("run 3")["touched"])
        be.set_mode(disable=ASYNC)
        hot = hot_set(be)
        assert touched == known_hot
        tp = len(hot & touched)
        precision, recall = tp / len(hot), tp / len(touched)
        assert (precision, recall) == (1.0, 1.0)
        assert not [e for e in agent.events if e.event == uapi.UFFD_EVENT_REMOVE]  # zap echoes are swallowed
        if mode == "uffd":  # RWP emulated: the VMM zaps, first touches are MINOR faults
            assert be.stats["zap_echoes"] >= 1 and be.stats["minor"] == len(touched)
        else:  # the kernel tracks in async mode: no fault at all for a protected, mapped page's access
            assert be.stats["minor"] == n and be.stats["rwp"] == 0  # the n are start()'s mapping of the image

        # evict every cold page (read, keep, punch, wake), then resume
        cold = np.flatnonzero(be.populated() & ~np.isin(np.arange(n), list(hot)))
        assert len(cold) == n - len(hot)
        agent.evict(be, cold)
        be.set_mode(enable=ASYNC)
        assert not be.populated()[cold].any()
        assert be.populated()[list(hot)].all()

        # the guest touches evicted pages: MISSING faults served by COPY from the saved bytes
        some = cold[::7][:500]
        r = guest.cmd(f"touch {pages_arg(some)} w")
        assert r["pages"] == len(some)
        assert be.stats["missing"] >= len(some)
        guest.cmd("run 5")
        v = guest.cmd("verify")  # reads every page: the rest fault back too
        assert v["mismatches"] == 0, v["first"]
        assert not agent.saved  # every evicted page came back
        assert be.stats["missing"] >= len(cold)
        print(
            f"\nfault round trip seen by the guest: p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us; "
            f"agent-side service p50 {np.percentile(agent.service_us, 50):.0f} us"
        )

        # cycle 2 with an explicit set: protect resets the accessed bits
        be.rwprotect(be.base, be.size, protect=True)
        chosen = np.arange(100, 400, 3)
        guest.cmd(f"touch {pages_arg(chosen)} r")
        assert hot_set(be) == set(chosen.tolist())
    finally:
        guest.close()
        be.close()


def test_sync_mode_surfaces_rwp_faults_and_eviction_wins_the_race(agent: MiniAgent, mode: str) -> None:
    guest, be = start(agent, "vm-sync", mode, memory="16M")
    try:
        be.rwprotect(be.base, be.size, protect=True)
        be.set_mode(disable=ASYNC)
        agent.hold_rwp = True
        assert guest.proc.stdin is not None

        # a write to a protected page blocks and is surfaced as an RWP (|WRITE) fault
        guest.proc.stdin.write("touch 10 w\n")
        guest.proc.stdin.flush()
        wait_until(lambda: 10 in agent.rwp_faults, scaled(20))
        assert be.stats["rwp"] == 1
        be.rwprotect(be.addr(10), be.page_size, protect=False)  # resolve: CONTINUE + wake
        assert guest._line()["ok"]
        assert hot_set(be) == {10}

        # a vCPU blocked on a page being evicted: punch + wake, it retries, MISSING, COPY back
        guest.proc.stdin.write("touch 20 w\n")
        guest.proc.stdin.flush()
        wait_until(lambda: 20 in agent.rwp_faults, scaled(20))
        agent.evict(be, np.array([20]))
        assert guest._line()["ok"]
        assert 20 not in agent.saved

        # resuming async resolves every parked fault
        guest.proc.stdin.write("touch 30 r\n")
        guest.proc.stdin.flush()
        wait_until(lambda: 30 in agent.rwp_faults, scaled(20))
        be.set_mode(enable=ASYNC)
        assert guest._line()["ok"]
        agent.hold_rwp = False
        assert guest.cmd("verify")["mismatches"] == 0
    finally:
        guest.close()
        be.close()


def test_balloon_remove_is_surfaced_and_reads_zero(agent: MiniAgent, mode: str) -> None:
    guest, be = start(agent, "vm-balloon", mode, memory="16M")
    try:
        agent.evict(be, np.array([12, 13]))  # evicted pages inside the ballooned range
        guest.cmd("balloon 10-19")
        # the madvise returns once the backend has read the event; the harness handles it just after
        wait_until(
            lambda: len([e for e in agent.events if e.event == uapi.UFFD_EVENT_REMOVE]) == 10, scaled(20)
        )
        removes = [e for e in agent.events if e.event == uapi.UFFD_EVENT_REMOVE]
        assert [(be.page_of(e.start), be.page_of(e.end)) for e in removes] == [
            (p, p + 1) for p in range(10, 20)
        ]
        assert (
            12 not in agent.saved and 13 not in agent.saved
        )  # the harness dropped them, as the agent should
        assert not be.populated()[10:20].any()
        assert be.populated()[20:].all()
        assert guest.cmd("verify")["mismatches"] == 0  # ballooned pages fault MISSING and read zero
    finally:
        guest.close()
        be.close()


def test_vmm_exit_closes_the_backend(agent: MiniAgent, mode: str) -> None:
    guest, be = start(agent, "vm-exit", mode, memory="16M")
    guest.proc.kill()
    guest.proc.wait()
    wait_until(lambda: be.closed, scaled(20))
    assert be.read_messages(0.1) == []
    with pytest.raises(OSError) as ei:
        be.rwprotect(be.base, be.size, protect=True)
    assert ei.value.errno == errno.ESRCH
    be.close()


def test_agent_restart_reattach_serves_pages_evicted_before(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "handoff.sock"
    first = MiniAgent(path)
    guest = GuestProc(str(path), "vm-restart", memory="16M", mode=mode)
    be = first.wait_attach().make_backend()
    first.serve(be)
    guest.wait_ready()
    try:
        evicted = np.arange(0, 256)
        first.evict(be, evicted)
        saved = dict(first.saved)
        be.close()  # the agent "dies": its uffd copy and connection go
        first.close()

        second = MiniAgent(path)  # a new agent on the same socket
        try:
            second.saved.update(saved)  # what a restarted agent reloads from its durable index
            again = second.wait_attach()
            assert again.vm_id == "vm-restart" and again.reattach
            be = again.make_backend()
            second.serve(be)
            wait_until(lambda: guest.cmd("ping")["attached"], scaled(20))
            guest.cmd(f"touch {pages_arg(evicted[:50])} w")
            assert guest.cmd("verify")["mismatches"] == 0
            assert not second.saved
        finally:
            guest.close()
            second.close()
            assert not second.errors, second.errors
    finally:
        guest.close()
        be.close()
