"""The compose stack as local processes: each service's command, environment and healthcheck, on loopback.

No container engine runs here, so the test does what the engine would do with
deploy/docker-compose.yml, minus the isolation:

* redis runs the compose ``command`` (the ACL-writing shell script) and its
  CMD-SHELL healthcheck decides when it is up;
* S3 is the harness's SeaweedFS ``weed mini`` (the same server as the compose image);
* the control plane and the agents run ``tiermem <compose command>`` with the
  compose environment (as interpolated from .env), rewritten to loopback: service
  host names become 127.0.0.1 with free ports, data directories become temporary
  ones, and ``TIERMEM_CONFIG`` names the config file the image ships;
* each is healthy when its compose healthcheck command (``python -m
  tiermem.rpc.health_probe --settings ...``) exits 0.

Then the credentials are checked in use: the agents registered with the control
plane using their node token, which an admin token can list.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.servers import S3Server, free_port, wait_port
from tests.unit.test_deploy_compose import TIERMEM_SERVICES, load_compose, service_env

ROOT = Path(__file__).resolve().parents[2]
METRICS_DOC = ROOT / "docs" / "metrics.md"


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str]
    healthcheck: list[str]
    ports: dict[str, int] = field(default_factory=dict)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _healthy(p: Proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            raise AssertionError(f"{p.name} exited with {p.proc.returncode}:\n{p.tail()}")
        r = subprocess.run(p.healthcheck, env=p.env, capture_output=True, text=True, timeout=20)
        if r.returncode == 0:
            return
        last = r.stdout + r.stderr
        time.sleep(0.5)
    raise AssertionError(f"{p.name} not healthy after {timeout}s: {last}\n{p.tail()}")


def _probe_cmd(test: list[str]) -> list[str]:
    assert test[0] == "CMD" and test[1] == "python", test
    return [sys.executable, *test[2:]]


_HOSTPORT = re.compile(r"\b(redis|s3|controlplane|agent-[\w-]+):(\d+)\b")


@dataclass
class Stack:
    tmp: Path
    compose: dict[str, Any]
    s3: S3Server
    hosts: dict[tuple[str, int], int] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)

    def rewrite(self, name: str, env: dict[str, str]) -> dict[str, str]:
        """The compose environment of ``name`` with every address moved to loopback."""
        out: dict[str, str] = {}
        svc_dir = self.tmp / name
        svc_dir.mkdir(exist_ok=True)
        for k, v in env.items():
            if re.fullmatch(r"0\.0\.0\.0:\d+", v):
                port = free_port()
                self.hosts[(name, int(v.split(":")[1]))] = port
                v = f"127.0.0.1:{port}"
            elif k.endswith("_DATA_DIR"):
                v = str(svc_dir / "data")
            elif k.endswith("_HANDOFF_SOCKET"):
                v = str(svc_dir / "handoff.sock")
            v = v.replace("http://s3:8333", self.s3.endpoint)
            v = _HOSTPORT.sub(lambda m: f"127.0.0.1:{self.hosts.get((m.group(1), int(m.group(2))), 0)}", v)
            out[k] = v
        # the harness's S3 server has its own keys; everything else stays as compose has it
        if "AWS_ACCESS_KEY_ID" in out:
            out.update(self.s3.env())
        return out

    def base_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith(("TIERMEM_", "AWS_", "REDIS"))}

    def start_redis(self) -> None:
        svc = self.compose["services"]["redis"]
        port = free_port()
        self.hosts[("redis", 6379)] = port
        d = self.tmp / "redis"
        d.mkdir()
        # where compose's command listens, moved to loopback and a free port
        env = {**self.base_env(), **service_env(svc), "REDIS_BIND": "127.0.0.1", "REDIS_PORT": str(port)}
        cmd = list(svc["command"])
        assert cmd[:2] == ["sh", "-c"], cmd
        cmd[2] = cmd[2].replace("/tmp/users.acl", str(d / "users.acl"))
        cmd += ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--protected-mode", "no"]
        log = d / "log"
        proc = subprocess.Popen(cmd, cwd=d, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        wait_port(port, 20, proc)
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        check = ["sh", "-c", test[1].replace("redis-cli", f"redis-cli -p {port}")]
        p = Proc("redis", proc, log, env, check)
        self.procs["redis"] = p
        _healthy(p, 20)

    def start_tiermem(self, name: str) -> Proc:
        svc = self.compose["services"][name]
        kind = TIERMEM_SERVICES[name]
        env = {**self.base_env(), **self.rewrite(name, service_env(svc))}
        env["TIERMEM_CONFIG"] = str(ROOT / "services" / kind / "config.toml")  # the image's ENV
        log = self.tmp / name / "log"
        cmd = [sys.executable, "-m", "tiermem", *svc["command"]]
        proc = subprocess.Popen(
            cmd, cwd=self.tmp / name, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
        )
        p = Proc(name, proc, log, env, _probe_cmd(svc["healthcheck"]["test"]))
        self.procs[name] = p
        _healthy(p)
        return p

    def stop(self) -> None:
        for p in reversed(list(self.procs.values())):
            p.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Stack]:
    s3_srv: S3Server = request.getfixturevalue("s3_srv")
    compose = load_compose()
    with contextlib.suppress(Exception):  # the compose bucket, as weed mini creates it from S3_BUCKET
        s3_srv.client().create_bucket(Bucket=service_env(compose["services"]["s3"])["S3_BUCKET"])
    st = Stack(tmp_path_factory.mktemp("compose"), compose, s3_srv)
    try:
        st.start_redis()
        st.start_tiermem("controlplane")
        for name in ("agent-1", "agent-2", "agent-uffd"):
            st.start_tiermem(name)
        yield st
    finally:
        st.stop()


@pytest.mark.redis
@pytest.mark.s3
def test_every_service_becomes_healthy_through_its_healthcheck(stack: Stack) -> None:
    assert set(stack.procs) == {"redis", "controlplane", "agent-1", "agent-2", "agent-uffd"}
    for p in stack.procs.values():
        assert p.proc.poll() is None, f"{p.name} died:\n{p.tail()}"


@pytest.mark.redis
@pytest.mark.s3
def test_agents_registered_with_their_node_token(stack: Stack) -> None:
    from tiermem.rpc.channel import auth_metadata, sync_channel
    from tiermem.v1 import control_pb2, control_pb2_grpc

    cp = stack.procs["controlplane"]
    addr = cp.env["TIERMEM_CP_LISTEN"]
    admin = service_env(stack.compose["services"]["cli"])["TIERMEM_TOKEN"]
    deadline, nodes = time.monotonic() + 20, set()
    with sync_channel(addr) as ch:
        stub = control_pb2_grpc.ControlPlaneStub(ch)
        while time.monotonic() < deadline:
            resp = stub.ListNodes(control_pb2.ListNodesRequest(), metadata=auth_metadata(admin), timeout=5)
            nodes = {n.node_id for n in resp.nodes}
            if {"agent-1", "agent-2", "agent-uffd"} <= nodes:
                break
            time.sleep(0.5)
    assert {"agent-1", "agent-2", "agent-uffd"} <= nodes, "\n".join(p.tail() for p in stack.procs.values())


def _families(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    # prometheus_client adds a "<name>_created" gauge family next to counters and histograms
    return {
        m.group(1)
        for m in re.finditer(r"^# TYPE (tiermem_\w+) ", text, re.M)
        if not m.group(1).endswith("_created")
    }


@pytest.mark.redis
@pytest.mark.s3
def test_metrics_endpoints_serve_only_documented_series(stack: Stack) -> None:
    documented = set(re.findall(r"`(tiermem_[a-z0-9_]+)`", METRICS_DOC.read_text()))
    for name in ("controlplane", "agent-1"):
        port = stack.hosts[(name, 9100)]
        fams = _families(f"http://127.0.0.1:{port}/metrics")
        assert fams, f"{name} exposes no tiermem_ series"
        undocumented = {f for f in fams if f not in documented and f.removesuffix("_total") not in documented}
        assert not undocumented, f"{name}: series missing from docs/metrics.md: {sorted(undocumented)}"


@pytest.mark.redis
@pytest.mark.s3
def test_healthcheck_fails_once_the_service_is_gone(stack: Stack) -> None:
    p = stack.procs["agent-2"]
    p.stop()
    r = subprocess.run(p.healthcheck, env=p.env, capture_output=True, text=True, timeout=20)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "UNAVAILABLE" in r.stderr, shlex.join(p.healthcheck) + r.stderr
