"""The compose stack on a real Docker engine: the README's deployment commands, then the operator's flow.

Images are built by ``scripts/images.py`` (``make images``: a locally bootstrapped Debian base, no
registry), the stack starts with ``docker-compose -f docker-compose.yml -f docker-compose.loopback.yml
up -d --wait`` (real Redis and SeaweedFS containers; every service on the host network bound to
127.0.0.1), and everything else goes through the CLI container: node list, VM registration, policies on
the Redis and the S3 store. Real process guests on the host hand their userfaultfd to the containerised
agent through the bind-mounted handoff socket; cycles evict their cold pages and the guests read every
page back with 0 mismatches. ``events --follow`` runs from the start and must still be connected, and
still deliver, after more than 5 idle minutes (the tier's other steps run meanwhile). Both services'
/metrics are scraped. Teardown removes containers and volumes (and stops an engine started here).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.engine import ROOT, Compose, EngineUnavailable, docker_engine
from tests.helpers.guest import GuestProc

pytestmark = [pytest.mark.deploy, pytest.mark.slow, pytest.mark.timeout(1500)]

# The follow must outlive gRPC's default server ping policy (it used to die after ~2.5 idle minutes).
FOLLOW_IDLE_S = float(os.environ.get("TIERMEM_DEPLOY_FOLLOW_S", "310"))
GUEST_MEMORY = "16M"
GUEST_PAGES = 4096


class Follower:
    """``tiermem events --follow --json --vm VM`` in the CLI container, read on a thread."""

    def __init__(self, compose: Compose, vm: str) -> None:
        self.compose = compose
        self.name = f"{compose.project}-follow"
        self.proc = subprocess.Popen(
            compose.argv(
                "run",
                "--rm",
                "-T",
                "--no-deps",
                "--name",
                self.name,
                "cli",
                "events",
                "--follow",
                "--json",
                "--vm",
                vm,
            ),
            cwd=ROOT / "deploy",
            env=compose.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.started = time.monotonic()
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def next_event(self, timeout: float) -> dict[str, Any]:
        """The next event object (AssertionError when none arrives in time)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no event in {timeout:.0f} s") from None
            if line.strip().startswith("{"):
                return dict(json.loads(line))

    def drain(self) -> int:
        """Drop what has arrived so far (the replayed history); the highest seq seen."""
        top = 0
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return top
            if line.strip().startswith("{"):
                top = max(top, int(json.loads(line).get("seq", 0)))

    def stop(self) -> str:
        """Stop it (the container, then compose); its stderr."""
        subprocess.run(
            ["docker", "rm", "-f", self.name], env=self.compose.env, capture_output=True, timeout=60
        )
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.stderr.read() if self.proc.stderr else ""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Compose]:
    if not Path("/dev/userfaultfd").exists() and os.geteuid() != 0:
        pytest.skip("the handoff flow needs userfaultfd on this host")
    try:
        engine = docker_engine()
        env = engine.__enter__()
    except EngineUnavailable as e:
        pytest.skip(f"no Docker engine: {e}")
    try:
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "scripts/images.py"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert r.returncode == 0, f"make images failed: {r.stderr[-3000:]}"
        print(f"\nimages built in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        handoff = tmp_path_factory.mktemp("handoff")
        compose = Compose(env, handoff)
        try:
            t0 = time.monotonic()
            r = compose.run("up", "-d", "--wait", "--wait-timeout", "240", timeout=300, check=False)
            assert r.returncode == 0, f"compose up failed: {r.stderr[-2000:]}\n{compose.logs()}"
            print(f"stack healthy in {time.monotonic() - t0:.0f} s", file=sys.stderr)
            yield compose
        finally:
            compose.run("down", "-v", "--remove-orphans", "--timeout", "20", timeout=180, check=False)
    finally:
        engine.__exit__(None, None, None)


@pytest.fixture(scope="module")
def follower(stack: Compose) -> Iterator[Follower]:
    # A VM with no events of its own: the stream stays idle (keepalive pings only) until the last test.
    stack.cli("vm", "register", "idle-vm", "--node", "agent-1", "--memory", "16MiB")
    f = Follower(stack, "idle-vm")
    yield f
    f.stop()


def test_no_network_but_host(stack: Compose) -> None:
    out = subprocess.run(
        ["docker", "network", "ls", "--format", "{{.Name}} {{.Driver}}"],
        env=stack.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    drivers = {line.split()[1] for line in out if line.strip()}
    assert drivers <= {"host", "null"}, f"a network other than host/none exists: {out}"


def test_node_list_shows_every_agent(stack: Compose, follower: Follower) -> None:
    deadline = time.monotonic() + 60
    while True:
        nodes = stack.cli_json("node", "list")
        assert isinstance(nodes, list)
        up = {n["node_id"] for n in nodes if n["up"]}
        if up >= {"agent-1", "agent-2", "agent-uffd"} or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert up >= {"agent-1", "agent-2", "agent-uffd"}, nodes
    uffd = next(n for n in nodes if n["node_id"] == "agent-uffd")
    assert "uffd" in uffd["backends"]


def test_unknown_store_refused(stack: Compose) -> None:
    stack.cli("vm", "register", "typo-vm", "--node", "agent-2", "--memory", "16MiB")
    r = stack.cli("policy", "set", "typo-vm", "--store", "nosuch")
    assert "unknown store 'nosuch'" in r.stderr and "redis" in r.stderr and "s3" in r.stderr, r.stderr


@pytest.mark.parametrize("store", ["redis", "s3"])
def test_process_guest_handoff_cycles_zero_mismatches(stack: Compose, follower: Follower, store: str) -> None:
    vm = f"pg-{store}"
    st = stack.cli_json(
        "vm", "register", vm, "--node", "agent-uffd", "--memory", "16MiB", "--backend", "uffd"
    )
    assert isinstance(st, dict) and st["vm_id"] == vm
    pol = stack.cli_json(
        "policy",
        "set",
        vm,
        "--store",
        store,
        "--interval",
        "1s",
        "--cold-after",
        "1",
        "--max-evict",
        "none",
        "--prefetch",
        "0",
    )
    assert isinstance(pol, dict)
    sock = str(stack.handoff_dir / "handoff.sock")
    guest = GuestProc(sock, vm, GUEST_MEMORY, "--prefill", timeout=60)
    try:
        # the agent in the container sees the guest's real pid: pid: host, as the DaemonSet's hostPID
        assert guest.ready["pid"] == guest.proc.pid
        hot = "0-63"
        evicted = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            guest.cmd(f"touch {hot} r")
            # the scheduler runs cycles too (interval 1 s); a manual one may find a cycle running
            stack.cli("cycle", "run", vm, timeout=120)
            status = stack.cli_json("vm", "show", vm)
            assert isinstance(status, dict)
            evicted = int(status.get("evicted_pages", 0) or 0)
            if evicted >= GUEST_PAGES // 2:
                break
            time.sleep(1)
        assert evicted >= GUEST_PAGES // 2, f"{vm}: only {evicted} pages evicted to {store}: {status}"
        # every page read back: the evicted ones fault in from the store, through the containerised agent
        guest.cmd(f"touch 0-{GUEST_PAGES - 1} r", timeout=300)
        v = guest.cmd("verify", timeout=300)
        assert v["mismatches"] == 0, v
        assert v["pages"] == GUEST_PAGES
    finally:
        guest.close()


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body: bytes = r.read()
    return body.decode()


def test_metrics_scraped_from_both_services(stack: Compose) -> None:
    cp = _scrape(stack.ports["TIERMEM_METRICS_PORT"])
    assert "tiermem_cp_" in cp
    agent = _scrape(stack.ports["TIERMEM_AGENTU_METRICS_PORT"])
    assert "tiermem_agent_" in agent
    # process metrics of the agent itself
    assert "process_resident_memory_bytes" in agent and "process_cpu_seconds_total" in agent


def test_events_follow_survives_idle(stack: Compose, follower: Follower) -> None:
    """Last: the follow has been idle since the start; wait out the rest of FOLLOW_IDLE_S, then deliver."""
    remaining = FOLLOW_IDLE_S - (time.monotonic() - follower.started)
    if remaining > 0:
        time.sleep(remaining)
    assert follower.proc.poll() is None, (
        f"events --follow exited ({follower.proc.returncode}): {follower.stop()}"
    )
    idle = time.monotonic() - follower.started
    seen = follower.drain()
    # an order for a VM that no agent holds: a cycle_failed event for idle-vm
    stack.cli("cycle", "run", "idle-vm", timeout=120)
    ev = follower.next_event(60)
    assert ev.get("vm_id") == "idle-vm" and int(ev.get("seq", 0)) > seen, ev
    print(f"events --follow delivered after {idle:.0f} s connected", file=sys.stderr)
