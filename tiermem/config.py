"""Typed settings, one model per service: a TOML file, then environment, then flags.

Environment variables use a prefix per service and ``__`` for nesting, e.g.
``TIERMEM_AGENT_LISTEN=0.0.0.0:7070`` or ``TIERMEM_AGENT_TLS__CERT_FILE=/etc/tiermem/agent.pem``.
Flags given to ``tiermem serve`` override both. The README lists every field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tiermem.errors import ConfigurationError

LogLevel = Literal["debug", "info", "warning", "error"]

__all__ = ["AgentSettings", "ClientSettings", "ControlPlaneSettings", "TlsSettings", "load_settings"]


class TlsSettings(BaseModel):
    """TLS for a gRPC server or client. Empty cert_file means plaintext."""

    cert_file: str = ""
    """PEM certificate chain of this side."""
    key_file: str = ""
    """PEM private key of this side."""
    ca_file: str = ""
    """PEM CA bundle used to verify the peer."""
    require_client_cert: bool = False
    """Server only: require and verify client certificates (mTLS)."""
    server_name: str = ""
    """Client only: override the name checked in the server certificate."""

    @property
    def enabled(self) -> bool:
        """True when this side speaks TLS."""
        return bool(self.cert_file or self.ca_file)


class _Base(BaseSettings):
    model_config = SettingsConfigDict(env_nested_delimiter="__", extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # flags (init) > environment > TOML file named by TIERMEM_CONFIG
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = os.environ.get("TIERMEM_CONFIG")
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


class AgentSettings(_Base):
    """The node agent."""

    model_config = SettingsConfigDict(env_prefix="TIERMEM_AGENT_", env_nested_delimiter="__", extra="forbid")

    node_id: str = Field(default_factory=lambda: os.uname().nodename.split(".")[0] or "node")
    """This node's id in the control plane registry."""
    listen: str = "127.0.0.1:7070"
    """gRPC listen address (host:port; port 0 picks a free one)."""
    advertise: str = ""
    """Address the control plane uses to reach this agent (default: listen)."""
    data_dir: str = "/var/lib/tiermem/agent"
    """Durable state: the evicted-page index and the default local store."""
    stores: dict[str, str] = Field(default_factory=dict)
    """Page stores by name -> URL. ``default`` is ``file://<data_dir>/pages`` unless given."""
    handoff_socket: str = ""
    """Unix socket where VMMs hand off their uffd and memfd (default: <data_dir>/handoff.sock)."""
    restore_socket_dir: str = ""
    """Directory of the per-VM Firecracker restore sockets (default: <data_dir>/restore)."""
    restore_prefault_pages_per_s: float = 0.0
    """Default background prefault rate of a snapshot restore once the guest runs (0: on demand only)."""
    handshake_timeout_s: float = Field(default=5.0, gt=0, le=300)
    """Overall deadline of a handoff handshake, seconds: a peer that has not completed it by then
    (however slowly it keeps sending) is disconnected."""
    capacity_bytes: int = Field(default=0, ge=0)
    """Guest memory this node declares to the control plane (0: the host's physical memory)."""
    trace_dir: str = ""
    """Directory from which sim VMs (admin only) may replay ``trace:`` workloads; empty: traces refused."""
    tenant_manual_cycles: int = Field(default=2, ge=1, le=1024)
    """RunCycle calls one tenant token (if this agent accepts any) may have running at once."""
    tenant_manual_max_interval_ms: int = Field(default=300_000, ge=1)
    """Longest detection window of a RunCycle called with a tenant token, ms."""
    trace_max_bytes: int = Field(default=256 * 1024**2, ge=1)
    """Largest trace a sim VM may replay, in bytes, both as stored and once decompressed."""
    control_plane: str = ""
    """Control plane address; empty runs the agent autonomously."""
    heartbeat_ms: int = 2000
    """Heartbeat period towards the control plane, milliseconds."""
    autonomous: bool = True
    """Run cycles from local policies when no control plane drives this node (false: only on request)."""
    autonomous_after_ms: int = 10_000
    """Run cycles from local policies when the control plane has been unreachable this long."""
    fsync: bool = True
    """fsync the index and local store before punching pages."""
    native_faults: bool = True
    """Serve common faults (MISSING, local store) on the native fault thread when the extension is built."""
    page_key_file: str = ""
    """Keyring of the page MAC (tiermem.store.pagemac). Empty: <data_dir>/page-keys.json, created 0600 at
    first start (a key per agent). Point every node at one mounted secret for a key per fleet."""
    max_concurrent_cycles: int = Field(default=256, ge=1, le=4096)
    """Cycles, drains and verifications served at once (threads: each cycle holds one for its whole detection
    window, mostly asleep); more wait for a thread. Other RPCs have their own threads and never wait on these."""
    token: str = ""
    """Bearer token the agent requires from callers (empty: no token auth)."""
    control_plane_token: str = ""
    """Bearer token the agent presents to the control plane."""
    tls: TlsSettings = Field(default_factory=TlsSettings)
    """Server TLS."""
    client_tls: TlsSettings = Field(default_factory=TlsSettings)
    """TLS used when calling the control plane."""
    metrics_listen: str = ""
    """Prometheus endpoint host:port (empty: off)."""
    metrics_tls: TlsSettings = Field(default_factory=TlsSettings)
    """TLS of the Prometheus endpoint, separate from the gRPC server's (empty: plain HTTP, for a scrape on
    a pod-local port; ``require_client_cert`` demands a client certificate signed by ``ca_file``)."""
    reflection: bool = False
    """Serve gRPC reflection."""
    reflection_without_token: bool = False
    """Serve reflection without a token too (grpcurl's discovery; health needs no token in any case)."""
    log_json: bool = True
    """Structured JSON logs (false: console format)."""
    log_level: LogLevel = "info"
    """Least severe log level written: debug, info, warning or error."""

    @field_validator("stores")
    @classmethod
    def _check_stores(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not name or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"invalid store name {name!r}")
        return v

    def store_urls(self) -> dict[str, str]:
        """Stores by name, with the default filled in."""
        urls = dict(self.stores)
        urls.setdefault("default", f"file://{Path(self.data_dir).resolve() / 'pages'}")
        return urls

    def handoff_path(self) -> str:
        """The handoff socket path."""
        return self.handoff_socket or str(Path(self.data_dir) / "handoff.sock")

    def restore_dir(self) -> str:
        """Directory of the per-VM Firecracker restore sockets."""
        return self.restore_socket_dir or str(Path(self.data_dir) / "restore")

    def page_key_path(self) -> str:
        """The page MAC keyring file."""
        return self.page_key_file or str(Path(self.data_dir) / "page-keys.json")


class ControlPlaneSettings(_Base):
    """The control plane."""

    model_config = SettingsConfigDict(env_prefix="TIERMEM_CP_", env_nested_delimiter="__", extra="forbid")

    listen: str = "127.0.0.1:7000"
    """gRPC listen address."""
    state: str = "sqlite:///var/lib/tiermem/control.db"
    """State store: ``sqlite:///path`` (embedded) or ``redis://host:port/db`` (shared, with leader election)."""
    replica_id: str = Field(default_factory=lambda: f"{os.uname().nodename}-{os.getpid()}")
    """This replica's id in leader election."""
    advertise: str = ""
    """Address other replicas and agents are told to reach this replica at (empty: the listen address)."""
    known_stores: list[str] = Field(default_factory=list)
    """Store names a policy may name (empty: ``default`` plus every store in ``store_write_mbps``);
    must match the agents' ``STORES`` names, so a typo is refused at ``policy set`` time."""
    lease_ttl_ms: int = 10_000
    """Node lease: a node that misses heartbeats this long is marked down."""
    leader_lease_ms: int = 5000
    """Leader lease among replicas (Redis state only)."""
    max_concurrent_cycles_per_node: int = 64
    """Default per-node limit on concurrent cycles. A cycle holds its slot for its whole detection window (the
    policy interval), so this bounds how many VMs per node can keep their interval; eviction bandwidth has its
    own limits (node_evict_mbps, store_write_mbps)."""
    node_evict_mbps: float = 0.0
    """Default per-node eviction bandwidth, MB/s (0: unlimited)."""
    store_write_mbps: dict[str, float] = Field(default_factory=dict)
    """Per-store write bandwidth limits, MB/s."""
    jitter: float = 0.1
    """Fraction of each interval used to spread cycle start times."""
    tenant_manual_cycles: int = Field(default=2, ge=1, le=1024)
    """Manual cycles (TriggerCycle) one tenant token may have running or waiting at once."""
    tenant_manual_cycles_per_node: int = Field(default=8, ge=1, le=4096)
    """Manual cycles of all tenants together on one node; they never use the scheduled slots."""
    tenant_manual_max_interval_ms: int = Field(default=300_000, ge=1)
    """Longest detection window of a tenant's manual cycle, ms."""
    scheduler: bool = True
    """Run the scheduler (false: registry and manual cycles only)."""
    token: str = ""
    """Bearer token required from callers (empty: no token auth)."""
    agent_token: str = ""
    """Bearer token presented to agents."""
    tls: TlsSettings = Field(default_factory=TlsSettings)
    """Server TLS."""
    agent_tls: TlsSettings = Field(default_factory=TlsSettings)
    """TLS used when calling agents."""
    metrics_listen: str = ""
    """Prometheus endpoint host:port (empty: off)."""
    metrics_tls: TlsSettings = Field(default_factory=TlsSettings)
    """TLS of the Prometheus endpoint, separate from the gRPC server's (empty: plain HTTP, for a scrape on
    a pod-local port; ``require_client_cert`` demands a client certificate signed by ``ca_file``)."""
    reflection: bool = False
    """Serve gRPC reflection."""
    reflection_without_token: bool = False
    """Serve reflection without a token too (grpcurl's discovery; health needs no token in any case)."""
    log_json: bool = True
    """Structured JSON logs."""
    log_level: LogLevel = "info"
    """Least severe log level written: debug, info, warning or error."""


class ClientSettings(_Base):
    """The CLI's connection to the control plane."""

    model_config = SettingsConfigDict(env_prefix="TIERMEM_", env_nested_delimiter="__", extra="ignore")

    server: str = "127.0.0.1:7000"
    """Control plane address."""
    token: str = ""
    """Bearer token."""
    tls: TlsSettings = Field(default_factory=TlsSettings)
    """Client TLS (ca_file to verify the server; cert/key for mTLS)."""
    timeout_s: float = 30.0
    """Default deadline per call, seconds."""


def load_settings(cls: type[_Base], **overrides: Any) -> Any:
    """Build settings from file/env plus non-None ``overrides``; errors become ConfigurationError."""
    from pydantic import ValidationError

    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ConfigurationError(f"invalid setting {loc}: {first['msg']}") from None
