"""``tiermem serve``: every flag lands in its settings field; unset flags leave env/TOML values.

The server entry points are replaced by recorders here (this tier checks the
flag -> settings mapping); tests/integration/test_cli_live.py starts real ones.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from tiermem.cli.main import cli
from tiermem.config import AgentSettings, ControlPlaneSettings


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace run_control_plane / run_agent (and logging setup) with recorders."""
    seen: list[Any] = []
    cp = types.ModuleType("tiermem.control.server")
    cp.run_control_plane = seen.append  # type: ignore[attr-defined]
    ag = types.ModuleType("tiermem.agent.server")
    ag.run_agent = seen.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tiermem.control.server", cp)
    monkeypatch.setitem(sys.modules, "tiermem.agent.server", ag)
    monkeypatch.setattr("tiermem.logging.configure_logging", lambda **kw: None)
    # setenv first so that monkeypatch restores the variable --config sets during the test.
    monkeypatch.setenv("TIERMEM_CONFIG", "")
    monkeypatch.delenv("TIERMEM_CONFIG")
    return seen


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def test_controlplane_flags(captured: list[Any], tmp_path: Path) -> None:
    r = invoke(
        "serve",
        "controlplane",
        "--listen",
        "127.0.0.1:0",
        "--state",
        f"sqlite:///{tmp_path}/cp.db",
        "--token",
        "s3cret",
        "--tls-cert",
        "/c.pem",
        "--tls-key",
        "/k.pem",
        "--tls-ca",
        "/ca.pem",
        "--mtls",
        "--metrics",
        "127.0.0.1:9100",
        "--reflection",
        "--lease-ttl",
        "15s",
        "--max-concurrent-cycles",
        "8",
        "--node-evict-mbps",
        "100",
        "--store-write-mbps",
        "s3=50",
        "--jitter",
        "0.2",
        "--no-scheduler",
        "--agent-token",
        "atok",
        "--agent-tls-ca",
        "/aca.pem",
        "--replica-id",
        "r1",
        "--log-format",
        "console",
        "--advertise",
        "10.0.0.9:7000",
        "--known-store",
        "default",
        "--known-store",
        "fast",
    )
    assert r.exit_code == 0, r.output
    (s,) = captured
    assert isinstance(s, ControlPlaneSettings)
    assert (s.listen, s.state, s.token) == ("127.0.0.1:0", f"sqlite:///{tmp_path}/cp.db", "s3cret")
    assert (s.tls.cert_file, s.tls.key_file, s.tls.ca_file, s.tls.require_client_cert) == (
        "/c.pem",
        "/k.pem",
        "/ca.pem",
        True,
    )
    assert (s.metrics_listen, s.reflection, s.lease_ttl_ms, s.max_concurrent_cycles_per_node) == (
        "127.0.0.1:9100",
        True,
        15_000,
        8,
    )
    assert s.node_evict_mbps == 100 and s.store_write_mbps == {"s3": 50.0} and s.jitter == 0.2
    assert s.scheduler is False and s.agent_token == "atok" and s.agent_tls.ca_file == "/aca.pem"
    assert s.replica_id == "r1" and s.log_json is False
    assert s.advertise == "10.0.0.9:7000" and s.known_stores == ["default", "fast"]


def test_agent_flags(captured: list[Any], tmp_path: Path) -> None:
    r = invoke(
        "serve",
        "agent",
        "--node-id",
        "n7",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path),
        "--store",
        "fast=redis://127.0.0.1:1/0",
        "--store",
        "cold=file:///tmp/x",
        "--control-plane",
        "127.0.0.1:7000",
        "--handoff-socket",
        str(tmp_path / "h.sock"),
        "--heartbeat",
        "500ms",
        "--autonomous-after",
        "1m",
        "--no-fsync",
        "--control-plane-token",
        "cpt",
        "--cp-tls-ca",
        "/ca.pem",
        "--advertise",
        "10.0.0.7:7070",
    )
    assert r.exit_code == 0, r.output
    (s,) = captured
    assert isinstance(s, AgentSettings)
    assert (s.node_id, s.listen, s.data_dir, s.control_plane) == (
        "n7",
        "127.0.0.1:0",
        str(tmp_path),
        "127.0.0.1:7000",
    )
    assert s.stores == {"fast": "redis://127.0.0.1:1/0", "cold": "file:///tmp/x"}
    assert (s.heartbeat_ms, s.autonomous_after_ms, s.fsync) == (500, 60_000, False)
    assert s.handoff_path() == str(tmp_path / "h.sock")
    assert (s.control_plane_token, s.client_tls.ca_file, s.advertise) == ("cpt", "/ca.pem", "10.0.0.7:7070")


def test_unset_flags_keep_env_and_toml(captured: list[Any], tmp_path: Path) -> None:
    cfg = tmp_path / "tiermem.toml"
    cfg.write_text(
        'listen = "127.0.0.1:7444"\nstate = "sqlite:///from-toml.db"\njitter = 0.3\n[tls]\nca_file = "/toml-ca.pem"\n'
    )
    r = invoke(
        "serve",
        "controlplane",
        "--config",
        str(cfg),
        "--jitter",
        "0.05",
        "--tls-cert",
        "/flag.pem",
        env={"TIERMEM_CP_STATE": "sqlite:///from-env.db"},
    )
    assert r.exit_code == 0, r.output
    (s,) = captured
    assert s.listen == "127.0.0.1:7444"  # TOML, no flag
    assert s.state == "sqlite:///from-env.db"  # env beats TOML
    assert s.jitter == 0.05  # flag beats TOML
    assert (s.tls.cert_file, s.tls.ca_file) == ("/flag.pem", "/toml-ca.pem")  # nested fields merge


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["agent", "--store", "nourl"], "--store: invalid 'nourl': use NAME=VALUE"),
        (["agent", "--store", "bad name!=file:///x"], "invalid setting stores"),
        (["agent", "--heartbeat", "0s"], "--heartbeat: must be > 0"),
        (["agent", "--heartbeat", "soon"], "--heartbeat: invalid duration 'soon'"),
        (["controlplane", "--store-write-mbps", "s3=fast"], "--store-write-mbps: invalid value"),
        (["controlplane", "--jitter", "2"], "--jitter"),
        (["controlplane", "--config", "/nonexistent.toml"], "--config"),
        (["controlplane", "--log-format", "xml"], "--log-format"),
    ],
)
def test_serve_invalid_flags(captured: list[Any], args: list[str], needle: str) -> None:
    r = invoke("serve", *args)
    assert r.exit_code == 1, r.output
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("tiermem: error: ") and needle in line
    assert not captured
