"""Issue 17 item 8: state files are 0600 in 0700 directories, and an unprivileged user reads none of them.

Before this change ``index.db`` and the control-plane database were created 0644
and an unprivileged user read both. The attack is replayed as uid 65534 (nobody)
with ``setpriv``; it needs root to switch users and is skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tiermem.agent.node import Agent
from tiermem.config import AgentSettings
from tiermem.control.state_open import open_state
from tiermem.model import CycleMode, EvictionPolicy

PS = 4096


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _nobody_can_read(path: Path) -> bool:
    res = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(path)], capture_output=True
    )
    return res.returncode == 0


def _agent_state(tmp_path: Path) -> list[Path]:
    base = tmp_path / "world"
    base.mkdir(mode=0o755)
    base.chmod(0o755)  # reachable by anyone: only the tiermem modes stand between nobody and the files
    agent = Agent(
        AgentSettings(
            node_id="n1",
            data_dir=str(base / "agent"),
            autonomous=False,
            stores={"local": f"file://{base}/pages"},
        )
    )
    try:
        agent.attach_sim(
            "vm1",
            16 * PS,
            EvictionPolicy(interval_ms=20, cold_after=1, store="local"),
            workload="uniform",
            vcpus=0,
        )
        sim = agent.sessions["vm1"].backend
        for p in range(16):
            sim.io_write(p * PS, os.urandom(PS))
        assert agent.run_cycle("vm1", CycleMode.EVICT, 20).pages_evicted == 16
        space = agent.sessions["vm1"].space
        files = [base / "agent" / "index.db", base / "agent" / "page-keys.json"]
        wal = list((base / "agent").glob("index.db-*"))  # -wal, -shm: exist while the agent runs
        assert wal and all(_mode(p) == 0o600 for p in wal), [oct(_mode(p)) for p in wal]
        files += list((base / "pages" / space / "seg").iterdir())
        dirs = [base / "agent", base / "pages", base / "pages" / space, base / "pages" / space / "seg"]
    finally:
        agent.close()
    return [p for p in files + dirs if p.exists()]


def test_agent_state_is_private(tmp_path: Path) -> None:
    paths = _agent_state(tmp_path)
    for p in paths:
        want = 0o700 if p.is_dir() else 0o600
        assert _mode(p) == want, f"{p} is {oct(_mode(p))}"


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv to act as nobody"
)
def test_nobody_reads_no_state() -> None:
    # pytest's tmp_path sits under a 0700 directory nobody cannot traverse: that would prove nothing
    top = Path(tempfile.mkdtemp(prefix="tiermem-modes-", dir="/tmp"))
    try:
        top.chmod(0o755)
        probe = top / "probe"
        probe.write_text("x")
        probe.chmod(0o644)
        assert _nobody_can_read(probe), "the harness must be able to see a leak"
        _nobody_reads_none_of(top)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _nobody_reads_none_of(top: Path) -> None:
    files = [p for p in _agent_state(top) if p.is_file()]
    assert files and not [p for p in files if _nobody_can_read(p)]
    control = top / "world" / "cp" / "control.db"
    st = open_state(f"sqlite:///{control}")

    async def touch() -> None:
        await st.open()
        await st.close()

    import asyncio

    asyncio.run(touch())
    assert _mode(control) == 0o600 and _mode(control.parent) == 0o700
    assert not _nobody_can_read(control)


def test_an_old_world_readable_index_is_tightened(tmp_path: Path) -> None:
    d = tmp_path / "agent"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    (d / "index.db").touch(mode=0o644)
    os.chmod(d / "index.db", 0o644)
    Agent(AgentSettings(node_id="n1", data_dir=str(d), autonomous=False)).close()
    assert _mode(d) == 0o700 and _mode(d / "index.db") == 0o600
