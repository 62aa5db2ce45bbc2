"""The agent is SIGKILLed in the middle of an eviction (real uffd backend, process guest) and restarted.

The agent runs as its own process (``tiermem serve agent``) and evicts a 16 MiB
process guest to Redis through the fault proxy, slowed so that the eviction
takes seconds. It is killed once the first batch has been punched, while the
next is on the wire. Before the restart the test checks the durable state the dead
agent left behind: every page punched out of the guest's memfd (a hole, found
with SEEK_HOLE on the guest's own memfd) has a durable index entry whose payload
reads back from Redis and verifies. Then the agent restarts, the VMM reattaches
on its own, every page faults back with the right contents, and a drain empties
the store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.faults.common import check_payloads, open_direct, record, space_in
from tests.faults.conftest import redis_url
from tests.faults.toxic_proxy import ToxicProxy
from tests.helpers.guest import GuestProc
from tests.helpers.servers import RedisServer, free_port, wait_port
from tests.helpers.wait import wait_until
from tiermem.agent.index import PageIndex
from tiermem.kernel.uffd_ioctl import data_extents
from tiermem.rpc.channel import sync_channel
from tiermem.v1 import agent_pb2, agent_pb2_grpc, types_pb2

pytestmark = [pytest.mark.uffd, pytest.mark.redis, pytest.mark.timeout(150)]

PS = 4096
PAGES = 4096


def _agent(tmp: Path, store_url: str, port: int) -> subprocess.Popen[bytes]:
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
            f"default={store_url}",
            "--handoff-socket",
            str(tmp / "h" / "handoff.sock"),
            "--log-format",
            "console",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "agent.log", "ab"),
    )


def _guest_holes(pid: int, vm_id: str) -> set[int]:
    """Pages punched out of (or never written to) the guest's memfd, read through /proc/<pid>/fd."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
        if link.startswith(f"/memfd:tiermem-{vm_id} "):
            f = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
            try:
                data = data_extents(f, 0, PAGES * PS)
            finally:
                os.close(f)
            present = {p for a, b in data for p in range(a // PS, b // PS)}
            return set(range(PAGES)) - present
    raise AssertionError(f"no memfd of {vm_id} in process {pid}")


def test_agent_sigkill_mid_eviction_then_restart(
    tmp_path: Path, redis_own: RedisServer, redis_proxy: ToxicProxy
) -> None:
    port = free_port()
    url = redis_url(redis_proxy.port, timeout=10)
    agent = _agent(tmp_path, url, port)
    guest = None
    try:
        wait_port(port, 30, agent)
        stub = agent_pb2_grpc.NodeAgentStub(sync_channel(f"127.0.0.1:{port}"))
        guest = GuestProc(str(tmp_path / "h" / "handoff.sock"), "pg", "16M", timeout=30)
        guest.cmd(f"touch 0-{PAGES - 1} w")  # every page holds data: none is a zero page
        guest.cmd("touch 0-99 w")
        redis_proxy.latency(0.01)  # each 4 MiB batch now takes most of a second on the wire
        pol = types_pb2.EvictionPolicy(interval_ms=100, cold_after=1, prefetch_pages=4)
        errors: list[grpc.RpcError] = []

        def order() -> None:
            try:
                stub.RunCycle(
                    agent_pb2.RunCycleRequest(vm_id="pg", mode=types_pb2.CYCLE_MODE_EVICT, policy=pol),
                    timeout=60,
                )
            except grpc.RpcError as e:
                errors.append(e)

        t = threading.Thread(target=order, daemon=True)
        t.start()
        # the first batch is acknowledged, indexed and punched (holes in the guest's memfd); the next is on the wire
        wait_until(lambda: _guest_holes(guest.proc.pid, "pg"), 30, "the first batch to be punched", step=0.01)
        time.sleep(0.05)
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        t.join(10)
        assert errors and errors[0].code() is grpc.StatusCode.UNAVAILABLE

        # --- the dead agent's durable state: no hole without an entry and a readable payload ---------------
        holes = _guest_holes(guest.proc.pid, "pg")
        index = PageIndex(tmp_path / "agent" / "index.db")
        entries = {p: e for p in range(PAGES) if (e := index.get("pg", p)) is not None}
        space = space_in(index, "n1", "pg")
        index.close()
        unbacked = sorted(holes - set(entries))
        assert unbacked == [], f"pages punched without a durable entry: {unbacked[:20]}"
        direct = open_direct(redis_url(redis_own.port), "default", tmp_path / "agent")
        assert check_payloads(direct, space, [e.stored for e in entries.values()]) == 0
        orphans = direct.usage(space).pages - len(entries)
        direct.close()
        assert 0 < len(holes) < PAGES, "the kill must land inside the eviction"

        # --- restart: the VMM reattaches and every page comes back ---------------------------------------
        redis_proxy.clear()
        agent = _agent(tmp_path, url, port)
        wait_port(port, 30, agent)

        def reattached() -> bool:
            vms = stub.ListVms(agent_pb2.ListVmsRequest(), timeout=5).vms
            return any(v.vm_id == "pg" and v.evicted_pages == len(entries) for v in vms)

        wait_until(reattached, 30, "the VMM to reattach with its evicted pages")
        ans = guest.cmd("verify", timeout=120)
        assert ans["mismatches"] == 0, ans
        progress = list(stub.Drain(agent_pb2.DrainRequest(vm_id="pg"), timeout=60))
        assert progress and progress[-1].done
        vms = stub.ListVms(agent_pb2.ListVmsRequest(), timeout=5).vms
        assert [v.evicted_pages for v in vms if v.vm_id == "pg"] == [0]
        ans2 = guest.cmd("verify", timeout=60)
        assert ans2["mismatches"] == 0
        record(
            "agent SIGKILLed mid-eviction, restarted (uffd, redis)",
            pages_verified=ans["pages"] + ans2["pages"],
            pages_lost=ans["mismatches"] + ans2["mismatches"],
            punched_at_kill=len(holes),
            indexed_not_punched=len(entries) - len(holes),
            orphan_payloads=max(orphans, 0),
        )
    finally:
        if guest is not None:
            guest.close()
        agent.kill()
        agent.wait(10)
