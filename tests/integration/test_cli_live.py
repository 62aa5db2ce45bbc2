"""The ``tiermem`` CLI against a real control plane and a real node agent (sim backend).

Both servers run in this process on an asyncio loop in a background thread,
on loopback ports, with SQLite state and a local-directory page store; the
CLI talks to them over gRPC exactly as an operator's would. Servers started
by ``tiermem serve`` and the unreachable-server path run as subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result

from tests.helpers.certs import issue_cert
from tests.helpers.servers import free_port
from tests.helpers.wait import wait_until
from tiermem.api import NodeInfo
from tiermem.cli.main import cli
from tiermem.config import AgentSettings, ControlPlaneSettings
from tiermem.model import CycleReport, DrainProgress, Event, EvictionPolicy, VmStatus

T = TypeVar("T")
NODE = "cli-node"
MEM = "8MiB"  # 2048 pages: cycles take milliseconds


class Stack:
    """A control plane and one agent serving on a private asyncio loop."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cli-stack", daemon=True)
        self.thread.start()
        self.cp: Any = None
        self.agent: Any = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start_control_plane(self) -> str:
        from tiermem.control.server import serve_control_plane

        settings = ControlPlaneSettings(
            listen="127.0.0.1:0", state=f"sqlite:///{self.tmp}/cp.db", scheduler=False, lease_ttl_ms=5000
        )
        self.cp = self.run(serve_control_plane(settings))
        return str(self.cp.address)

    def start_agent(self) -> None:
        from tiermem.agent.server import serve_agent

        settings = AgentSettings(
            node_id=NODE,
            listen="127.0.0.1:0",
            data_dir=str(self.tmp / "agent"),
            control_plane=self.cp.address,
            heartbeat_ms=200,
        )
        self.agent = self.run(serve_agent(settings))

    def stop(self) -> None:
        if self.agent is not None:
            self.run(self.agent.stop())
        if self.cp is not None:
            self.run(self.cp.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("cli-stack")
    with server_logs_to(tmp / "servers.log"):
        s = Stack(tmp)
        try:
            s.start_control_plane()
            yield s
        finally:
            s.stop()


@contextlib.contextmanager
def server_logs_to(path: Path) -> Iterator[None]:
    """Send the in-process servers' logs to a file: CliRunner captures sys.stdout, and log lines
    printed there by the server threads would corrupt the CLI's JSON output."""
    import logging

    import structlog

    from tiermem.logging import configure_logging

    old_config = structlog.get_config()
    root = logging.getLogger()
    old_level = root.level
    with open(path, "a") as log:
        configure_logging(json=True, stream=log)
        try:
            yield
        finally:
            for h in list(root.handlers):
                if h.get_name() == "tiermem":
                    root.removeHandler(h)
            root.setLevel(old_level)
            structlog.configure(**old_config)


@pytest.fixture(scope="module")
def agent(stack: Stack) -> Stack:
    """The stack with its agent started and registered as NODE."""
    stack.start_agent()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        nodes = json.loads(ok(tm(stack, "node", "list", "--json")).stdout)
        if any(n["node_id"] == NODE and n["up"] for n in nodes):
            return stack
        time.sleep(0.1)
    raise AssertionError(f"agent {NODE} never registered with the control plane")


def tm(stack: Stack, *args: str) -> Result:
    """Run ``tiermem ARGS`` against the stack's control plane."""
    env = {"TIERMEM_SERVER": stack.cp.address, "TIERMEM_TOKEN": None, "TIERMEM_CONFIG": None}
    return CliRunner().invoke(cli, list(args), env=env)


def ok(r: Result) -> Result:
    assert r.exit_code == 0, (r.exit_code, r.output)
    return r


def js(r: Result) -> Any:
    return json.loads(ok(r).stdout)


def one_line_error(r: Result, code: int) -> str:
    assert r.exit_code == code, (r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiermem: error: "), r.stderr
    return lines[0]


def names(cls: Any) -> set[str]:
    return {f.name for f in fields(cls)}


def register(stack: Stack, vm_id: str, *extra: str) -> dict[str, Any]:
    doc: dict[str, Any] = js(
        tm(stack, "vm", "register", vm_id, "--node", NODE, "--memory", MEM, "--attach", "--json", *extra)
    )
    return doc


def tiermem_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tiermem.cli", *args]


# --- control plane only ------------------------------------------------------------------------------


def test_policy_crud_on_selector_and_fleet(stack: Stack) -> None:
    doc = js(tm(stack, "policy", "set", "--fleet", "--interval", "45s", "--prefetch", "4", "--json"))
    assert doc["scope"] == {"kind": "fleet", "value": ""}
    assert doc["policy"]["interval_ms"] == 45_000 and doc["policy"]["prefetch_pages"] == 4
    v1 = doc["policy"]["version"]
    doc = js(
        tm(
            stack,
            "policy",
            "set",
            "--selector",
            "team=cli,tier=web",
            "--max-evict",
            "20%",
            "--slo",
            "0.2%/min",
            "--compression",
            "lz4",
            "--json",
        )
    )
    assert doc["scope"] == {"kind": "selector", "value": "team=cli,tier=web"}
    assert doc["policy"]["max_evict"]["fraction"] == pytest.approx(0.2)
    assert doc["policy"]["slo_promotion_rate"] == pytest.approx(0.002)
    assert doc["policy"]["compression"] == "lz4" and doc["policy"]["version"] > v1
    # A partial update keeps the other fields.
    doc = js(tm(stack, "policy", "set", "--selector", "tier=web,team=cli", "--cold-after", "4", "--json"))
    assert doc["policy"]["compression"] == "lz4" and doc["policy"]["cold_after"] == 4
    listed = js(tm(stack, "policy", "list", "--json"))
    assert all(set(e) == {"scope", "policy", "updated_ms"} for e in listed)
    assert all(set(e["policy"]) == names(EvictionPolicy) for e in listed)
    scopes = {(e["scope"]["kind"], e["scope"]["value"]) for e in listed}
    assert {("fleet", ""), ("selector", "team=cli,tier=web")} <= scopes
    out = ok(tm(stack, "policy", "list")).stdout
    assert "selector/team=cli,tier=web" in out and "lz4" in out
    ok(tm(stack, "policy", "unset", "--selector", "team=cli,tier=web"))
    ok(tm(stack, "policy", "unset", "--fleet"))
    assert js(tm(stack, "policy", "list", "--json")) == []
    assert "no policy" in one_line_error(tm(stack, "policy", "unset", "--fleet"), 1)


def test_server_side_validation_is_one_line(stack: Stack) -> None:
    assert "unknown store 'nope'" in one_line_error(
        tm(stack, "policy", "set", "--fleet", "--store", "nope"), 1
    )
    assert "vm-missing" in one_line_error(tm(stack, "vm", "show", "vm-missing"), 1)
    assert "vm-missing" in one_line_error(tm(stack, "policy", "get", "vm-missing"), 1)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["policy", "set", "x", "--interval", "abc"], "--interval: invalid duration 'abc'"),
        (["policy", "set", "x", "--max-evict", "20"], "--max-evict: eviction cap '20' needs a unit"),
        (
            ["vm", "register", "x", "--node", "n", "--memory", "12345"],
            "--memory: must be a positive multiple",
        ),
        (["vm", "list", "--selector", "novalue"], "--selector: invalid selector term"),
        (["cycle", "run", "bad id"], "VM: invalid VM id"),
        (["events", "--vm", "a/b"], "--vm: invalid VM id"),
    ],
)
def test_invalid_input_exit_1(stack: Stack, args: list[str], needle: str) -> None:
    assert needle in one_line_error(tm(stack, *args), 1)


def test_unreachable_server_exit_2() -> None:
    port = free_port()  # nothing listens there
    proc = subprocess.run(
        tiermem_cmd("vm", "list", "--server", f"127.0.0.1:{port}", "--timeout", "5s"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"tiermem: error: control plane at 127.0.0.1:{port} is unreachable: ")
    assert "Traceback" not in proc.stderr


def test_token_auth(stack: Stack, tmp_path: Path) -> None:
    """A control plane that requires a token: none or a wrong one is exit 1; --token or TIERMEM_TOKEN works."""
    from tiermem.control.server import serve_control_plane

    settings = ControlPlaneSettings(
        listen="127.0.0.1:0", state=f"sqlite:///{tmp_path}/auth.db", scheduler=False, token="cli-s3cret"
    )
    cp = stack.run(serve_control_plane(settings))
    try:
        base = {"TIERMEM_SERVER": cp.address, "TIERMEM_CONFIG": None}
        r = CliRunner().invoke(cli, ["node", "list"], env={**base, "TIERMEM_TOKEN": None})
        assert "unauthenticated" in one_line_error(r, 1)
        r = CliRunner().invoke(cli, ["node", "list", "--token", "wrong"], env={**base, "TIERMEM_TOKEN": None})
        assert "unauthenticated" in one_line_error(r, 1)
        r = CliRunner().invoke(
            cli, ["node", "list", "--json", "--token", "cli-s3cret"], env={**base, "TIERMEM_TOKEN": None}
        )
        assert json.loads(ok(r).stdout) == []
        r = CliRunner().invoke(cli, ["node", "list", "--json"], env={**base, "TIERMEM_TOKEN": "cli-s3cret"})
        assert json.loads(ok(r).stdout) == []
    finally:
        stack.run(cp.stop())


def test_mtls_options(stack: Stack, tmp_path: Path) -> None:
    """--tls-ca/--tls-cert/--tls-key reach a control plane that requires client certificates."""
    from tiermem.config import TlsSettings
    from tiermem.control.server import serve_control_plane

    ca_pem, _, ca = issue_cert(tmp_path, "ca", None)
    srv_pem, srv_key, _ = issue_cert(tmp_path, "server", ca, san_ip="127.0.0.1")
    cli_pem, cli_key, _ = issue_cert(tmp_path, "client", ca)
    tls = TlsSettings(
        cert_file=str(srv_pem), key_file=str(srv_key), ca_file=str(ca_pem), require_client_cert=True
    )
    settings = ControlPlaneSettings(
        listen="127.0.0.1:0", state=f"sqlite:///{tmp_path}/tls.db", scheduler=False, tls=tls
    )
    cp = stack.run(serve_control_plane(settings))
    try:
        env = {"TIERMEM_SERVER": cp.address, "TIERMEM_CONFIG": None, "TIERMEM_TOKEN": None}
        good = ["--tls-ca", str(ca_pem), "--tls-cert", str(cli_pem), "--tls-key", str(cli_key)]
        r = CliRunner().invoke(cli, ["node", "list", "--json", *good], env=env)
        assert json.loads(ok(r).stdout) == []
        # Without a client certificate the handshake fails: the server cannot be used (exit 2).
        r = CliRunner().invoke(cli, ["node", "list", "--timeout", "5s", "--tls-ca", str(ca_pem)], env=env)
        assert f"control plane at {cp.address} is unreachable" in one_line_error(r, 2)
        # Plaintext against a TLS server fails the same way.
        r = CliRunner().invoke(cli, ["node", "list", "--timeout", "5s"], env=env)
        one_line_error(r, 2)
    finally:
        stack.run(cp.stop())


def test_events_json_lines(stack: Stack) -> None:
    ok(tm(stack, "policy", "set", "--fleet", "--cold-after", "5"))
    docs = [json.loads(x) for x in ok(tm(stack, "events", "--json")).stdout.splitlines()]
    assert docs and all(set(d) == names(Event) for d in docs)
    changed = [d for d in docs if d["kind"] == "policy_changed"]
    assert changed and changed[-1]["attributes"]["scope"] == "fleet"
    seqs = [d["seq"] for d in docs]
    assert seqs == sorted(seqs)
    after = js_lines(tm(stack, "events", "--json", "--after", str(seqs[-2])))
    assert [d["seq"] for d in after] == seqs[-1:]
    ok(tm(stack, "policy", "unset", "--fleet"))


def js_lines(r: Result) -> list[Any]:
    return [json.loads(x) for x in ok(r).stdout.splitlines()]


def test_serve_controlplane_subprocess(tmp_path: Path) -> None:
    """``tiermem serve controlplane`` serves until SIGTERM; the CLI talks to it; it exits 0."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERMEM_")}
    proc = subprocess.Popen(
        tiermem_cmd(
            "serve",
            "controlplane",
            "--listen",
            f"127.0.0.1:{port}",
            "--state",
            f"sqlite:///{tmp_path}/cp.db",
            "--log-format",
            "console",
            "--no-scheduler",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"listening on 127.0.0.1:{port}" in line, (
            line,
            proc.stderr.read() if proc.poll() is not None and proc.stderr is not None else "",
        )
        out = subprocess.run(
            tiermem_cmd(
                "policy", "set", "--fleet", "--cold-after", "7", "--json", "--server", f"127.0.0.1:{port}"
            ),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["policy"]["cold_after"] == 7
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The state survived: a second server on the same SQLite file still has the policy.
    assert (tmp_path / "cp.db").exists()


def test_serve_rejects_bad_flag_before_starting(tmp_path: Path) -> None:
    proc = subprocess.run(
        tiermem_cmd("serve", "agent", "--data-dir", str(tmp_path), "--store", "x"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "tiermem: error: --store: invalid 'x': use NAME=VALUE"


# --- with a real agent on the sim backend ---------------------------------------------------------------


def test_node_list(agent: Stack) -> None:
    nodes = js(tm(agent, "node", "list", "--json"))
    (n,) = [n for n in nodes if n["node_id"] == NODE]
    assert set(n) == names(NodeInfo)
    assert n["up"] is True and n["address"] == agent.agent.address
    assert NODE in ok(tm(agent, "node", "list")).stdout


def test_vm_lifecycle(agent: Stack) -> None:
    doc = register(agent, "cli-vm1", "--label", "tier=web", "--label", "team=cli", "--workload", "hotset:0.1")
    assert set(doc) == names(VmStatus)
    assert doc["vm_id"] == "cli-vm1" and doc["node_id"] == NODE and doc["total_pages"] == 2048
    assert doc["labels"] == {"tier": "web", "team": "cli"}

    listed = js(tm(agent, "vm", "list", "--selector", "team=cli", "--json"))
    assert [v["vm_id"] for v in listed] == ["cli-vm1"]
    assert all(set(v) == names(VmStatus) for v in listed)
    assert js(tm(agent, "vm", "list", "--node", "other-node", "--json")) == []
    assert "cli-vm1" in ok(tm(agent, "vm", "list")).stdout

    # Policy: a VM entry, read back with its source.
    ok(tm(agent, "policy", "set", "cli-vm1", "--cold-after", "1", "--interval", "200ms"))
    eff = js(tm(agent, "policy", "get", "cli-vm1", "--json"))
    assert set(eff) == {"vm_id", "policy", "source", "adjusted"}
    assert eff["source"] == {"kind": "vm", "value": "cli-vm1"}
    assert eff["policy"]["cold_after"] == 1 and eff["policy"]["interval_ms"] == 200
    assert "vm/cli-vm1" in ok(tm(agent, "policy", "get", "cli-vm1")).stdout

    # A dry run detects and evicts nothing; a real cycle evicts the cold pages.
    dry = js(tm(agent, "cycle", "run", "cli-vm1", "--dry-run", "--interval", "100ms", "--json"))
    assert set(dry) == names(CycleReport)
    assert dry["mode"] == "detect" and dry["pages_evicted"] == 0 and dry["pages_scanned"] > 0
    rep = js(tm(agent, "cycle", "run", "cli-vm1", "--interval", "100ms", "--json"))
    assert rep["mode"] == "evict" and rep["pages_evicted"] > 0 and rep["error"] == ""
    out = ok(tm(agent, "cycle", "run", "cli-vm1", "--interval", "100ms")).stdout
    assert "phases (ms)" in out and "scan" in out

    wait_until(
        lambda: js(tm(agent, "vm", "show", "cli-vm1", "--json"))["evicted_pages"] > 0, 15, "evicted pages"
    )
    show = js(tm(agent, "vm", "show", "cli-vm1", "--json"))
    assert set(show) == names(VmStatus) | {"last_cycles"}
    assert show["resident_pages"] + show["evicted_pages"] == show["total_pages"]
    assert [c["cycle"] for c in show["last_cycles"]] == sorted(
        (c["cycle"] for c in show["last_cycles"]), reverse=True
    )
    text = ok(tm(agent, "vm", "show", "cli-vm1")).stdout
    assert "working set" in text and "store usage" in text and "last" in text

    hist = js(tm(agent, "cycle", "history", "cli-vm1", "--limit", "2", "--json"))
    assert len(hist) == 2 and all(set(h) == names(CycleReport) for h in hist)
    assert "cli-vm1" in ok(tm(agent, "cycle", "history", "cli-vm1")).stdout

    kinds = {e["kind"] for e in js_lines(tm(agent, "events", "--vm", "cli-vm1", "--json"))}
    assert "cycle_completed" in kinds

    # Drain brings every page back.
    steps = js_lines(tm(agent, "vm", "drain", "cli-vm1", "--json"))
    assert steps and all(set(s) == names(DrainProgress) for s in steps)
    assert steps[-1]["done"] is True and steps[-1]["pages_restored"] == steps[-1]["pages_total"] > 0
    # The control plane's VM status comes from the agent's heartbeats (every 200 ms here).
    wait_until(
        lambda: js(tm(agent, "vm", "show", "cli-vm1", "--json"))["evicted_pages"] == 0, 15, "no evicted pages"
    )

    gone = js(tm(agent, "vm", "deregister", "cli-vm1", "--json"))
    assert gone == {"vm_id": "cli-vm1", "purged": False, "pages_purged": 0}
    assert "cli-vm1" in one_line_error(tm(agent, "vm", "show", "cli-vm1"), 1)


def test_drain_progress_bar_and_purge(agent: Stack) -> None:
    register(agent, "cli-vm2", "--workload", "idle")
    ok(tm(agent, "policy", "set", "cli-vm2", "--cold-after", "1"))
    assert js(tm(agent, "cycle", "run", "cli-vm2", "--interval", "100ms", "--json"))["pages_evicted"] > 0
    out = ok(tm(agent, "vm", "drain", "cli-vm2")).stdout
    assert "drained" in out and "pages restored" in out
    assert js(tm(agent, "cycle", "run", "cli-vm2", "--interval", "100ms", "--json"))["pages_evicted"] > 0
    assert "--yes" in one_line_error(tm(agent, "vm", "deregister", "cli-vm2", "--purge"), 1)
    doc = js(tm(agent, "vm", "deregister", "cli-vm2", "--purge", "--yes", "--json"))
    assert doc["purged"] is True and doc["pages_purged"] >= 0


def test_paused_policy_is_a_precondition_failure(agent: Stack) -> None:
    register(agent, "cli-vm3", "--workload", "idle")
    ok(tm(agent, "policy", "set", "cli-vm3", "--pause"))
    line = one_line_error(tm(agent, "cycle", "run", "cli-vm3", "--interval", "100ms"), 3)
    assert "paused" in line
    # A dry run is still allowed while paused, and --resume lifts the pause.
    assert (
        js(tm(agent, "cycle", "run", "cli-vm3", "--dry-run", "--interval", "100ms", "--json"))["mode"]
        == "detect"
    )
    ok(tm(agent, "policy", "set", "cli-vm3", "--resume"))
    assert js(tm(agent, "cycle", "run", "cli-vm3", "--interval", "100ms", "--json"))["mode"] == "evict"
    ok(tm(agent, "vm", "deregister", "cli-vm3", "--purge", "--yes"))


def test_policy_set_eviction_algorithm_reaches_the_agent(agent: Stack) -> None:
    register(agent, "cli-vm4", "--workload", "hotset:0.1")
    doc = js(
        tm(agent, "policy", "set", "cli-vm4", "--policy", "recommended", "--policy-opt", "fast=2", "--json")
    )
    assert (doc["policy"]["algorithm"], doc["policy"]["algorithm_options"]) == ("recommended", "fast=2")
    rep = js(tm(agent, "cycle", "run", "cli-vm4", "--interval", "100ms", "--json"))
    assert rep["policy_version"] == doc["policy"]["version"] and not rep["error"]
    s = agent.agent.agent.sessions["cli-vm4"]
    assert (s.policy.algorithm, s.algorithm().name, s.algorithm().opts["fast"]) == ("recommended", "rrd", 2)
    assert "recommended (fast=2)" in ok(tm(agent, "policy", "get", "cli-vm4")).stdout
    # another algorithm resets the options; bad names and options are one-line errors (exit 1 / 2)
    doc = js(tm(agent, "policy", "set", "cli-vm4", "--policy", "age", "--json"))
    assert (doc["policy"]["algorithm"], doc["policy"]["algorithm_options"]) == ("age", "")
    assert "bad option 'fast=1'" in one_line_error(
        tm(agent, "policy", "set", "cli-vm4", "--policy", "age", "--policy-opt", "fast=1"), 1
    )
    assert "needs --policy" in one_line_error(
        tm(agent, "policy", "set", "cli-vm4", "--policy-opt", "fast=1"), 1
    )
    ok(tm(agent, "vm", "deregister", "cli-vm4", "--purge", "--yes"))


def test_events_follow_stops_cleanly_on_ctrl_c(stack: Stack) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TIERMEM_")},
        "TIERMEM_SERVER": stack.cp.address,
    }
    proc = subprocess.Popen(
        tiermem_cmd("events", "--follow", "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    out = proc.stdout

    def pump() -> None:
        for x in out:
            lines.put(x)

    threading.Thread(target=pump, daemon=True).start()
    try:
        ok(tm(stack, "policy", "set", "--fleet", "--cold-after", "9"))
        # The change arrives on the open stream (after any buffered events replayed first).
        deadline = time.monotonic() + 20
        while True:
            ev = json.loads(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            assert set(ev) == names(Event)
            if ev["kind"] == "policy_changed" and ev["attributes"].get("scope") == "fleet":
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
        assert "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ok(tm(stack, "policy", "unset", "--fleet"))


def test_serve_agent_subprocess_registers(stack: Stack, tmp_path: Path) -> None:
    """``tiermem serve agent --control-plane ...`` registers its node, then stops cleanly on SIGTERM."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERMEM_")}
    proc = subprocess.Popen(
        tiermem_cmd(
            "serve",
            "agent",
            "--node-id",
            "cli-sub-node",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp_path / "agent"),
            "--control-plane",
            stack.cp.address,
            "--heartbeat",
            "200ms",
            "--log-format",
            "console",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"listening on 127.0.0.1:{port}" in line, line

        def registered() -> bool:
            nodes = js(tm(stack, "node", "list", "--json"))
            return any(n["node_id"] == "cli-sub-node" and n["up"] for n in nodes)

        wait_until(registered, 15, "the agent to register with the control plane")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_closed_pipe_ends_quietly(stack: Stack) -> None:
    """``tiermem events --follow --json | head -1``: when the reader goes away the CLI exits 0, silently."""
    ok(tm(stack, "policy", "set", "--fleet", "--cold-after", "3"))  # at least one buffered event
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TIERMEM_")},
        "TIERMEM_SERVER": stack.cp.address,
    }
    proc = subprocess.Popen(
        tiermem_cmd("events", "--follow", "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["seq"] >= 1
        proc.stdout.close()  # the reader is gone
        for n in range(4, 12):  # new events make the CLI write into the closed pipe
            ok(tm(stack, "policy", "set", "--fleet", "--cold-after", str(n)))
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        assert proc.wait(20) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        ok(tm(stack, "policy", "unset", "--fleet"))
