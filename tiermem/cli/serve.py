"""``tiermem serve``: run the control plane or a node agent in the foreground.

Every flag maps onto one field of ``ControlPlaneSettings`` / ``AgentSettings``
(tiermem/config.py). A flag that is not given leaves the value from the
environment (``TIERMEM_CP_*``, ``TIERMEM_AGENT_*``) or the TOML file named by
``--config`` / ``TIERMEM_CONFIG``; flags win over both.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from tiermem.cli.options import DURATION
from tiermem.config import AgentSettings, ControlPlaneSettings, load_settings
from tiermem.errors import InvalidArgument

__all__ = ["agent_overrides", "controlplane_overrides", "serve"]

F = TypeVar("F", bound=Callable[..., Any])


def _pairs(flag: str, items: tuple[str, ...], convert: Callable[[str], Any] = str) -> dict[str, Any] | None:
    """``NAME=VALUE`` items as a dict (None when the flag was not given)."""
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise InvalidArgument(f"{flag}: invalid {item!r}: use NAME=VALUE")
        try:
            out[name.strip()] = convert(value.strip())
        except ValueError:
            raise InvalidArgument(f"{flag}: invalid value in {item!r}") from None
    return out


def _tls(cert: str | None, key: str | None, ca: str | None, mtls: bool | None) -> dict[str, Any] | None:
    tls = {"cert_file": cert, "key_file": key, "ca_file": ca, "require_client_cert": mtls}
    given = {k: v for k, v in tls.items() if v is not None}
    return given or None


def _common_server_options(f: F) -> F:
    opts = [
        click.option(
            "--config",
            "config_file",
            type=click.Path(exists=True, dir_okay=False),
            metavar="FILE",
            help="TOML settings file (sets TIERMEM_CONFIG; flags and env win over it).",
        ),
        click.option("--listen", metavar="HOST:PORT", help="gRPC listen address (port 0 picks a free one)."),
        click.option(
            "--token", metavar="TOKEN", help="Bearer token required from callers (prefer the env var)."
        ),
        click.option("--tls-cert", metavar="FILE", help="Server certificate (PEM): enables TLS."),
        click.option("--tls-key", metavar="FILE", help="Server private key (PEM)."),
        click.option("--tls-ca", metavar="FILE", help="CA bundle that verifies client certificates."),
        click.option("--mtls/--no-mtls", default=None, help="Require client certificates (needs --tls-ca)."),
        click.option(
            "--metrics", "metrics_listen", metavar="HOST:PORT", help="Prometheus endpoint (off by default)."
        ),
        click.option("--reflection/--no-reflection", default=None, help="Serve gRPC reflection."),
        click.option(
            "--log-format",
            type=click.Choice(["json", "console"]),
            default=None,
            help="Log format [default json].",
        ),
        click.option(
            "--log-level",
            type=click.Choice(["debug", "info", "warning", "error"]),
            default=None,
            help="Least severe level logged [default info].",
        ),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _use_config(config_file: str | None) -> None:
    if config_file:
        os.environ["TIERMEM_CONFIG"] = os.path.abspath(config_file)


def _log_json(log_format: str | None) -> bool | None:
    return None if log_format is None else log_format == "json"


@click.group()
def serve() -> None:
    """Run a tiermem server in the foreground (Ctrl-C or SIGTERM stops it)."""


def _positive(flag: str, value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise InvalidArgument(f"{flag}: must be > 0")
    return value


def controlplane_overrides(**flags: Any) -> dict[str, Any]:
    """The ControlPlaneSettings fields set by ``tiermem serve controlplane`` flags (unset flags omitted)."""
    out: dict[str, Any] = {
        "listen": flags.get("listen"),
        "state": flags.get("state"),
        "replica_id": flags.get("replica_id"),
        "advertise": flags.get("advertise"),
        "known_stores": list(flags["known_stores"]) if flags.get("known_stores") else None,
        "lease_ttl_ms": _positive("--lease-ttl", flags.get("lease_ttl")),
        "max_concurrent_cycles_per_node": flags.get("max_concurrent_cycles"),
        "node_evict_mbps": flags.get("node_evict_mbps"),
        "store_write_mbps": _pairs("--store-write-mbps", flags.get("store_write_mbps") or (), float),
        "jitter": flags.get("jitter"),
        "scheduler": flags.get("scheduler"),
        "token": flags.get("token"),
        "agent_token": flags.get("agent_token"),
        "tls": _tls(flags.get("tls_cert"), flags.get("tls_key"), flags.get("tls_ca"), flags.get("mtls")),
        "agent_tls": _tls(
            flags.get("agent_tls_cert"), flags.get("agent_tls_key"), flags.get("agent_tls_ca"), None
        ),
        "metrics_listen": flags.get("metrics_listen"),
        "reflection": flags.get("reflection"),
        "log_json": _log_json(flags.get("log_format")),
        "log_level": flags.get("log_level"),
    }
    return {k: v for k, v in out.items() if v is not None}


@serve.command("controlplane")
@_common_server_options
@click.option(
    "--state", metavar="URL", help="sqlite:///path/control.db (embedded) or redis://host:port/db (shared)."
)
@click.option("--replica-id", metavar="ID", help="This replica's id in leader election (Redis state).")
@click.option(
    "--advertise", metavar="HOST:PORT", help="Address other replicas name for this one (default: --listen)."
)
@click.option(
    "--known-store",
    "known_stores",
    multiple=True,
    metavar="NAME",
    help="A store name policies may use (repeatable; default: 'default' + --store-write-mbps names).",
)
@click.option(
    "--lease-ttl",
    type=DURATION,
    metavar="DURATION",
    help="Node lease: missed heartbeats this long mark a node down.",
)
@click.option(
    "--max-concurrent-cycles", type=click.IntRange(1, 10_000), help="Default per-node concurrent cycles."
)
@click.option(
    "--node-evict-mbps",
    type=click.FloatRange(0),
    help="Default per-node eviction bandwidth, MB/s (0: unlimited).",
)
@click.option(
    "--store-write-mbps", multiple=True, metavar="NAME=MBPS", help="Per-store write bandwidth (repeatable)."
)
@click.option(
    "--jitter", type=click.FloatRange(0, 1), help="Fraction of each interval used to spread cycle starts."
)
@click.option(
    "--scheduler/--no-scheduler", default=None, help="Run the scheduler (off: registry and manual cycles)."
)
@click.option("--agent-token", metavar="TOKEN", help="Bearer token presented to agents.")
@click.option("--agent-tls-ca", metavar="FILE", help="CA bundle that verifies agent certificates.")
@click.option("--agent-tls-cert", metavar="FILE", help="Client certificate presented to agents (mTLS).")
@click.option("--agent-tls-key", metavar="FILE", help="Client key presented to agents (mTLS).")
def serve_controlplane(config_file: str | None, **flags: Any) -> None:
    """Run the control plane: registry, policies, scheduler, cycle history and events."""
    _use_config(config_file)
    settings: ControlPlaneSettings = load_settings(ControlPlaneSettings, **controlplane_overrides(**flags))
    from tiermem.control.server import run_control_plane
    from tiermem.logging import configure_logging

    configure_logging(json=settings.log_json, level=settings.log_level)
    run_control_plane(settings)


def agent_overrides(**flags: Any) -> dict[str, Any]:
    """The AgentSettings fields set by ``tiermem serve agent`` flags (unset flags omitted)."""
    out: dict[str, Any] = {
        "node_id": flags.get("node_id"),
        "listen": flags.get("listen"),
        "advertise": flags.get("advertise"),
        "data_dir": flags.get("data_dir"),
        "stores": _pairs("--store", flags.get("stores") or ()),
        "handoff_socket": flags.get("handoff_socket"),
        "restore_socket_dir": flags.get("restore_socket_dir"),
        "restore_prefault_pages_per_s": flags.get("restore_prefault"),
        "control_plane": flags.get("control_plane"),
        "heartbeat_ms": _positive("--heartbeat", flags.get("heartbeat")),
        "autonomous_after_ms": _positive("--autonomous-after", flags.get("autonomous_after")),
        "fsync": flags.get("fsync"),
        "token": flags.get("token"),
        "control_plane_token": flags.get("control_plane_token"),
        "tls": _tls(flags.get("tls_cert"), flags.get("tls_key"), flags.get("tls_ca"), flags.get("mtls")),
        "client_tls": _tls(flags.get("cp_tls_cert"), flags.get("cp_tls_key"), flags.get("cp_tls_ca"), None),
        "metrics_listen": flags.get("metrics_listen"),
        "reflection": flags.get("reflection"),
        "log_json": _log_json(flags.get("log_format")),
        "log_level": flags.get("log_level"),
    }
    return {k: v for k, v in out.items() if v is not None}


@serve.command("agent")
@_common_server_options
@click.option("--node-id", metavar="ID", help="This node's id [default: the host name].")
@click.option("--advertise", metavar="HOST:PORT", help="Address the control plane uses to reach this agent.")
@click.option("--data-dir", metavar="DIR", help="Durable state: page index and the default local store.")
@click.option(
    "--store",
    "stores",
    multiple=True,
    metavar="NAME=URL",
    help="A page store (repeatable): file:///dir, redis://host:port/db, s3://bucket/prefix?...",
)
@click.option("--handoff-socket", metavar="PATH", help="Unix socket where VMMs hand off uffd + memfd.")
@click.option(
    "--restore-socket-dir", metavar="DIR", help="Directory of the per-VM Firecracker restore sockets."
)
@click.option(
    "--restore-prefault",
    type=click.FloatRange(0),
    metavar="PAGES_PER_S",
    help="Default background prefault rate of snapshot restores (0: on demand only).",
)
@click.option("--control-plane", metavar="HOST:PORT", help="Control plane address (empty: autonomous).")
@click.option("--heartbeat", type=DURATION, metavar="DURATION", help="Heartbeat period, e.g. 2s.")
@click.option(
    "--autonomous-after",
    type=DURATION,
    metavar="DURATION",
    help="Run local policies once the control plane is unreachable this long.",
)
@click.option(
    "--fsync/--no-fsync", default=None, help="fsync the index and local store before punching pages."
)
@click.option("--control-plane-token", metavar="TOKEN", help="Bearer token presented to the control plane.")
@click.option("--cp-tls-ca", metavar="FILE", help="CA bundle that verifies the control plane.")
@click.option("--cp-tls-cert", metavar="FILE", help="Client certificate presented to the control plane.")
@click.option("--cp-tls-key", metavar="FILE", help="Client key presented to the control plane.")
def serve_agent(config_file: str | None, **flags: Any) -> None:
    """Run a node agent: per-VM tracking, eviction, fault serving and the VMM handoff socket."""
    _use_config(config_file)
    settings: AgentSettings = load_settings(AgentSettings, **agent_overrides(**flags))
    from tiermem.agent.server import run_agent
    from tiermem.logging import configure_logging

    configure_logging(json=settings.log_json, level=settings.log_level)
    run_agent(settings)
