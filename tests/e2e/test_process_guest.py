"""The process guest as a program: batch mode against a real fault server, its command line and protocol."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.uffd_harness import ROOT, GuestProc, MiniAgent
from tiermem.errors import InvalidArgument
from tiermem.guests.process import parse_pages
from tiermem.handoff.listener import HandoffAttach
from tiermem.kernel.uffd_base import RealBackend

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run_guest(*args: str, timeout: float = 60) -> tuple[int, list[dict[str, object]]]:
    p = subprocess.run(
        [sys.executable, "-m", "tiermem.guests.process", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=timeout,
    )
    return p.returncode, [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


@pytest.mark.uffd
def test_batch_mode_with_everything_evicted_up_front_verifies_clean(tmp_path: Path) -> None:
    backends: list[RealBackend] = []
    agent: MiniAgent

    def evict_all(a: HandoffAttach) -> None:
        be = a.make_backend()
        backends.append(be)
        agent.evict(be, np.flatnonzero(be.populated()))  # before the guest runs: every page is in the store
        agent.serve(be)

    agent = MiniAgent(tmp_path / "h.sock", on_attach=evict_all)
    try:
        rc, out = run_guest(
            "--socket",
            agent.path,
            "--vm-id",
            "vm-batch",
            "--memory",
            "16M",
            "--prefill",
            "--workload",
            "zipf:1.1:w=0.5",
            "--seed",
            "3",
            "--batches",
            "40",
        )
        assert rc == 0, out
        assert out[0]["ready"] is True and out[0]["pages"] == 4096
        assert out[-1]["done"] is True and out[-1]["mismatches"] == 0
        assert not agent.saved  # verification read every page back
        assert backends[0].stats["missing"] == 4096
        assert not agent.errors, agent.errors
    finally:
        agent.close()
        for be in backends:
            be.close()


@pytest.mark.uffd
def test_control_protocol_reports_errors_and_keeps_going(tmp_path: Path) -> None:
    agent = MiniAgent(tmp_path / "h.sock")
    guest = GuestProc(agent.path, "vm-proto", memory="1M", workload="hotset:0.25")
    be = agent.wait_attach().make_backend()
    agent.serve(be)
    try:
        assert guest.wait_ready()["pages"] == 256
        assert guest.proc.stdin is not None
        for bad in ("dance", "touch 999999", "touch 1-x", "touch 3 q", "run many"):
            guest.proc.stdin.write(bad + "\n")
            guest.proc.stdin.flush()
            r = guest._line()
            assert r["ok"] is False and r["error"], bad
        assert len(guest.cmd("hot")["hot"]) == 64
        r = guest.cmd("touch 0-9,20 w")
        assert r["pages"] == 11 and r["p50_us"] > 0
        assert guest.cmd("run 2")["batches"] == 2
        assert guest.cmd("verify")["mismatches"] == 0
        assert guest.cmd("ping")["attached"] is True
    finally:
        guest.close()
        be.close()
        agent.close()
    assert guest.proc.returncode == 0


def test_command_line_errors_are_json(tmp_path: Path) -> None:
    rc, out = run_guest("--socket", str(tmp_path / "none.sock"), "--vm-id", "vm-x", "--memory", "lots")
    assert rc == 2 and out[0]["ready"] is False and "memory" in str(out[0]["error"])
    rc, out = run_guest("--socket", str(tmp_path / "none.sock"), "--vm-id", "bad id!", "--memory", "1M")
    assert rc == 2 and "vm id" in str(out[0]["error"])


@pytest.mark.uffd
def test_no_agent_is_a_clear_error(tmp_path: Path) -> None:
    rc, out = run_guest(
        "--socket", str(tmp_path / "none.sock"), "--vm-id", "vm-alone", "--memory", "1M", "--timeout", "0.3"
    )
    assert rc == 2 and "no agent answered" in str(out[0]["error"])


def test_parse_pages() -> None:
    assert parse_pages("1,5,10-12", 20).tolist() == [1, 5, 10, 11, 12]
    assert parse_pages("", 5).tolist() == []
    for bad in ("20", "3-1", "-1", "a", "1-"):
        with pytest.raises(InvalidArgument):
            parse_pages(bad, 20)
