"""The lost write (issue 16) on the real kernel: the node agent on ``RwpBackend`` with a process guest.

The guest pre-writes every page with ``pwrite`` (``--prefill``: in the memfd's page cache, not
mapped in its guest mapping), then writes every page while the agent's cycle evicts. On a 7.3
kernel such pages cannot be RWP-protected; before the fix the cycle evicted them and writes that
landed between the read-out and the punch were lost. Needs a kernel with UFFD_FEATURE_RWP: marked
``rwp`` for the kernel-VM tier, skipped elsewhere with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.agents import handoff_agent
from tests.helpers.guest import GuestProc
from tiermem.agent.node import Agent
from tiermem.kernel import uapi
from tiermem.model import CycleMode, CycleReport, EvictionPolicy

pytestmark = [pytest.mark.uffd, pytest.mark.rwp, pytest.mark.timeout(600)]

N = 1024  # 4 MiB: TCG runs the guest 20-25x slower than the host


def _skip_reason() -> str | None:
    try:
        from tiermem.kernel.probe import uffd_api_features

        features, _ = uffd_api_features()
    except OSError as e:
        return f"no userfaultfd here: {e}"
    if not features & uapi.UFFD_FEATURE_RWP:
        return "this kernel lacks UFFD_FEATURE_RWP (mainline since Linux 7.3); the kernel-VM tier runs this"
    return None


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    if why := _skip_reason():
        pytest.skip(why)
    with handoff_agent(tmp_path) as a:
        yield a


def cycle_with_writes_during_eviction(agent: Agent, guest: GuestProc, pages: str) -> CycleReport:
    """One evicting cycle; the first eviction read-out makes the guest write ``pages`` (and waits for
    it), so every write lands between a read-out and its punch. Only pages that cannot fault
    (unmapped, cached) may be written there: a protected page being evicted blocks until its punch."""
    s = agent.sessions["pg1"]
    b = s.backend
    real_read = b.io_read
    fired: list[dict[str, object]] = []

    def read_then_guest_writes(offset: int, length: int) -> bytes:
        data = real_read(offset, length)
        if not fired:
            fired.append(guest.cmd(f"touch {pages} w", timeout=300))
        return data

    b.io_read = read_then_guest_writes  # type: ignore[method-assign]
    try:
        rep = agent.engines["pg1"].run(CycleMode.EVICT, 0.0)
    finally:
        b.io_read = real_read  # type: ignore[method-assign]
    if not fired:  # nothing was evicted: the writes still happen, after the cycle
        guest.cmd(f"touch {pages} w", timeout=300)
    return rep


def test_prefilled_pages_written_during_eviction_lose_nothing(agent: Agent) -> None:
    guest = GuestProc(
        agent.settings.handoff_path(), "pg1", f"{N * 4}K", "--mode", "rwp", "--prefill", timeout=120
    )
    try:
        deadline = time.monotonic() + 120
        while "pg1" not in agent.sessions:
            assert time.monotonic() < deadline, "pg1 never attached"
            time.sleep(0.05)
        assert agent.sessions["pg1"].backend.name == "rwp"
        agent.set_policy("pg1", EvictionPolicy(cold_after=1, prefetch_pages=0))
        half = N // 2
        guest.cmd(
            f"touch 0-{half - 1} w", timeout=300
        )  # mapped (MINOR faults, CONTINUE); the rest stays unmapped
        rep = cycle_with_writes_during_eviction(agent, guest, f"{half}-{N - 1}")
        assert rep.error == ""
        assert guest.cmd("verify", timeout=300)["mismatches"] == 0  # before the fix: 512 lost writes
        assert rep.pages_scanned == N  # every page is resident (prefilled)
        assert rep.pages_evicted == half  # only the mapped, protected, untouched half
        assert rep.pages_unproven == half  # the pwrite-only half: reported, kept
        # Every page is mapped now: the next cycle proves and evicts all of them.
        rep2 = agent.engines["pg1"].run(CycleMode.EVICT, 0.0)
        assert rep2.pages_unproven == 0 and rep2.pages_evicted == N
        assert guest.cmd("verify", timeout=300)["mismatches"] == 0
    finally:
        guest.close()
