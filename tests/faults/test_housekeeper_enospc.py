"""Issue 17 item 7: a full disk does not kill the housekeeper.

The agent's data dir (index and local page store) lives on a real 8 MiB tmpfs.
Pages are evicted, the disk is filled to ENOSPC, and the guest faults its pages
back: the housekeeper's durable index removal fails with a real "database or
disk is full". Before this change that one exception ended the housekeeper
thread for good, dropped the queued removals and left store garbage forever.
Now the failure is logged and counted, the removals stay queued, and once space
returns the next pass writes them and deletes the restored pages' payloads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.common import fill, record, sim_of
from tests.helpers.wait import wait_until
from tiermem.agent.index import PageIndex
from tiermem.agent.node import Agent
from tiermem.config import AgentSettings
from tiermem.model import CycleMode, EvictionPolicy

pytestmark = pytest.mark.timeout(120)

PS = 4096
PAGES = 256


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (a real ENOSPC)")
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill_disk(path: Path) -> Path:
    filler = path / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\xff" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    with contextlib.suppress(OSError), open(filler, "ab") as f:  # the last partial block too
        while True:
            f.write(b"\xff" * 512)
            f.flush()
    return filler


def _errors(agent: Agent) -> float:
    total = 0.0
    for metric in agent.metrics.housekeeper_errors.collect():
        total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


def test_housekeeper_survives_enospc_and_collects_garbage_after(tiny_disk: Path) -> None:
    agent = Agent(
        AgentSettings(
            node_id="n1",
            data_dir=str(tiny_disk / "agent"),
            autonomous=False,
            handoff_socket=str(tiny_disk / "h.sock"),
        )
    )
    try:
        agent.attach_sim(
            "vm1",
            PAGES * PS,
            EvictionPolicy(interval_ms=20, cold_after=1, prefetch_pages=0),
            workload="uniform",
            vcpus=0,
        )
        sim, guest = sim_of(agent, "vm1")
        fill(guest)
        assert agent.run_cycle("vm1", CycleMode.EVICT, 20).pages_evicted == PAGES
        space = agent.sessions["vm1"].space
        st = agent.store("default")
        assert st.usage(space).pages == PAGES
        agent.index._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the next commit must allocate disk

        filler = _fill_disk(tiny_disk)
        for p in range(PAGES):  # every page faults back; removals are queued for the housekeeper
            sim.access(p)
        assert agent.index.count("vm1") == 0
        wait_until(lambda: _errors(agent) >= 2, 20, "the housekeeper to hit ENOSPC (and retry)")
        assert agent.index.pending_removals() == PAGES, "queued removals were dropped"
        assert agent._housekeeper.is_alive()
        assert st.usage(space).pages == PAGES  # nothing deleted before the index removal is durable

        filler.unlink()  # space returns: the next pass (backoff at most 30 s, here seconds) catches up
        wait_until(lambda: agent.index.pending_removals() == 0, 60, "the queued removals to be written")
        wait_until(lambda: st.usage(space).pages == 0, 30, "the restored pages' payloads to be deleted")
        checked, lost = guest.verify()
        assert lost == 0
    finally:
        agent.close()
    index = PageIndex(tiny_disk / "agent" / "index.db")
    try:
        assert index.evicted_pages("vm1") == []  # durable: no stale entry after a restart
    finally:
        index.close()
    record("housekeeper through a real ENOSPC", pages_verified=checked, pages_lost=lost)
