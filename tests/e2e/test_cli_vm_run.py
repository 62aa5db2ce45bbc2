"""``tiermem vm run``: a KVM guest from the command line, alone and under an agent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiermem.agent.attach import start_handoff
from tiermem.agent.node import Agent
from tiermem.config import AgentSettings

pytestmark = [pytest.mark.kvm, pytest.mark.uffd, pytest.mark.timeout(120)]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiermem", "vm", "run", "--json", *args],
        capture_output=True,
        text=True,
        timeout=100,
    )


def test_vm_run_alone_verifies_every_page() -> None:
    p = _run("--memory", "64M", "--duration", "1s", "--workload", "zipf:1.1", "--vm-id", "solo")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["vm_id"] == "solo" and s["mode"] == "plain"
    assert s["accesses"] > 0 and s["pages_checked"] == 64 * 256 and s["mismatches"] == 0


def test_vm_run_under_an_agent_hands_its_memory_over(tmp_path: Path) -> None:
    agent = Agent(
        AgentSettings(
            node_id="n1",
            data_dir=str(tmp_path / "a"),
            autonomous=False,
            handoff_socket=str(tmp_path / "h" / "sock"),
        )
    )
    stop = start_handoff(agent)
    try:
        seen: list[int] = []
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tiermem",
                "vm",
                "run",
                "--json",
                "--memory",
                "64M",
                "--duration",
                "2s",
                "--workload",
                "hotset:0.2",
                "--vm-id",
                "kv1",
                "--agent",
                agent.settings.handoff_path(),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            s = agent.sessions.get("kv1")
            if s is not None:
                seen.append(s.counters.zero_fills)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        summary = json.loads(out)
        assert summary["mode"] == "uffd" and summary["mismatches"] == 0
        assert seen and max(seen) > 0  # first touches were MISSING faults served by the agent
        deadline = time.monotonic() + 5
        while "kv1" in agent.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "kv1" not in agent.sessions  # a clean exit with nothing evicted ends the session
    finally:
        if stop:
            stop()
        agent.close()


def test_vm_run_bad_memory_is_one_line() -> None:
    p = _run("--memory", "lots")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1


def test_vm_run_over_an_earlier_vmms_pages_needs_fresh(tmp_path: Path) -> None:
    # issue 17 item 1 from the CLI: a plain `vm run` under an id whose evicted pages belong to an earlier
    # VMM is refused with one line naming the ways out; --fresh starts a new incarnation
    from tests.helpers.guest import GuestProc
    from tiermem.model import CycleMode, EvictionPolicy, VmState

    agent = Agent(
        AgentSettings(
            node_id="n1",
            data_dir=str(tmp_path / "a"),
            autonomous=False,
            handoff_socket=str(tmp_path / "h" / "sock"),
        )
    )
    stop = start_handoff(agent)
    path = agent.settings.handoff_path()
    try:
        old = GuestProc(path, "kv2", "4M")
        agent.set_policy("kv2", EvictionPolicy(cold_after=1, prefetch_pages=0))
        old.cmd("touch 0-1023 w")
        assert agent.run_cycle("kv2", CycleMode.EVICT, 100).pages_evicted == 1024
        old.proc.kill()
        old.proc.wait(10)
        old.close()
        deadline = time.monotonic() + 10
        while agent.sessions["kv2"].state is not VmState.DISCONNECTED and time.monotonic() < deadline:
            time.sleep(0.05)
        old_inc = agent.sessions["kv2"].incarnation

        p = _run("--memory", "4M", "--duration", "1s", "--vm-id", "kv2", "--agent", path)
        assert p.returncode == 3, p.stderr  # EXIT_PRECONDITION
        assert len(p.stderr.strip().splitlines()) == 1 and "reattach with the secret" in p.stderr
        assert agent.index.count("kv2") == 1024  # nothing of the old VM was touched

        p = _run(
            "--memory",
            "4M",
            "--duration",
            "1s",
            "--workload",
            "hotset:0.2",
            "--vm-id",
            "kv2",
            "--agent",
            path,
            "--fresh",
        )
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["mismatches"] == 0  # its own memory, not the old VM's
        assert agent.sessions.get("kv2") is None or agent.sessions["kv2"].incarnation != old_inc
    finally:
        if stop:
            stop()
        agent.close()
