"""A gRPC health probe for container healthchecks: exit 0 when the service is SERVING.

Usage::

    python -m tiermem.rpc.health_probe --addr HOST:PORT [--service NAME] [--tls-ca FILE]
        [--tls-cert FILE --tls-key FILE] [--server-name NAME] [--timeout 3]
    python -m tiermem.rpc.health_probe --settings controlplane|agent

``--settings`` reads the service's own settings (environment and ``TIERMEM_CONFIG``,
exactly as ``tiermem serve`` does) and probes its listen address on loopback with
its TLS: the server's CA verifies the server, and under mTLS the server's own
certificate is presented as the client certificate (issue it with both the
serverAuth and clientAuth usages). That keeps one HEALTHCHECK line valid for any
configuration. Health checks need no bearer token.

Exit codes: 0 SERVING, 1 anything else (NOT_SERVING, unknown service, unreachable,
TLS failure, deadline), 2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tiermem.config import AgentSettings, ControlPlaneSettings, TlsSettings, load_settings
from tiermem.errors import ConfigurationError
from tiermem.rpc.channel import sync_channel

__all__ = ["ProbeTarget", "check", "loopback_address", "main", "target_from_settings"]

_WILDCARDS = {"", "0.0.0.0", "::", "[::]", "*"}


class ProbeTarget:
    """Where and how to probe."""

    def __init__(
        self, addr: str, tls: TlsSettings | None = None, service: str = "", use_tls: bool = False
    ) -> None:
        self.addr = addr
        self.tls = tls or TlsSettings()
        self.service = service
        self.use_tls = use_tls or self.tls.enabled
        """TLS even without a CA file (the system roots verify the server)."""


def loopback_address(listen: str) -> str:
    """The address to reach a server listening on ``listen`` from the same host."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigurationError(f"listen address {listen!r} is not host:port")
    if int(port) == 0:
        raise ConfigurationError(f"cannot probe {listen!r}: port 0 is picked at start")
    if host in _WILDCARDS:
        host = "127.0.0.1"
    return f"{host}:{port}"


def _san_name(cert_file: str) -> str:
    """A DNS name of the certificate when it has no loopback IP SAN ("" if unknown)."""
    try:
        import ipaddress

        from cryptography import x509
    except ImportError:  # the runtime image may not ship cryptography: then set tls.server_name
        return ""
    try:
        with open(cert_file, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return ""
    if ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress):
        return ""
    dns = san.get_values_for_type(x509.DNSName)
    return "localhost" if "localhost" in dns else (dns[0] if dns else "")


def target_from_settings(kind: str) -> ProbeTarget:
    """The probe target of the ``agent`` or ``controlplane`` service, from its settings."""
    if kind == "agent":
        s: AgentSettings | ControlPlaneSettings = load_settings(AgentSettings)
    elif kind in ("controlplane", "control-plane", "cp"):
        s = load_settings(ControlPlaneSettings)
    else:
        raise ConfigurationError(f"unknown service {kind!r} (agent or controlplane)")
    server = s.tls
    tls = TlsSettings()
    if server.cert_file:
        tls = TlsSettings(
            ca_file=server.ca_file,
            cert_file=server.cert_file if server.require_client_cert else "",
            key_file=server.key_file if server.require_client_cert else "",
            server_name=server.server_name or _san_name(server.cert_file),
        )
    return ProbeTarget(loopback_address(s.listen), tls, use_tls=bool(server.cert_file))


def check(target: ProbeTarget, timeout: float = 3.0) -> str:
    """The health status name of ``target`` (``SERVING``, ``NOT_SERVING``, ...). Raises grpc.RpcError."""
    if target.use_tls and not target.tls.enabled:
        creds = grpc.ssl_channel_credentials()  # system roots
        opts = [("grpc.ssl_target_name_override", target.tls.server_name)] if target.tls.server_name else []
        ch = grpc.secure_channel(target.addr, creds, options=opts)
    else:
        ch = sync_channel(target.addr, target.tls)
    with ch:
        stub = health_pb2_grpc.HealthStub(ch)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=target.service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the probe; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m tiermem.rpc.health_probe", description=__doc__.split("\n")[0])
    p.add_argument("--addr", help="server address host:port")
    p.add_argument(
        "--settings", choices=["agent", "controlplane"], help="probe this service using its settings"
    )
    p.add_argument("--service", default="", help="service name to check ('' = the whole server)")
    p.add_argument("--tls-ca", default="", help="CA bundle to verify the server (enables TLS)")
    p.add_argument("--tls-cert", default="", help="client certificate (mTLS)")
    p.add_argument("--tls-key", default="", help="client key (mTLS)")
    p.add_argument("--server-name", default="", help="name expected in the server certificate")
    p.add_argument("--timeout", type=float, default=3.0, help="deadline in seconds (default 3)")
    a = p.parse_args(argv)
    try:
        if a.settings:
            target = target_from_settings(a.settings)
            if a.addr:
                target.addr = a.addr
        elif a.addr:
            target = ProbeTarget(a.addr)
        else:
            p.error("one of --addr or --settings is required")
        if a.tls_ca or a.tls_cert or a.tls_key:
            target.tls = TlsSettings(ca_file=a.tls_ca, cert_file=a.tls_cert, key_file=a.tls_key)
            target.use_tls = True
        if a.server_name:
            target.tls = target.tls.model_copy(update={"server_name": a.server_name})
        target.service = a.service
        if a.timeout <= 0:
            raise ConfigurationError("--timeout must be positive")
    except ConfigurationError as e:
        print(f"health_probe: {e}", file=sys.stderr)
        return 2
    try:
        status = check(target, a.timeout)
    except grpc.RpcError as e:
        code = e.code().name if hasattr(e, "code") else "UNKNOWN"
        details = e.details() if hasattr(e, "details") else str(e)
        print(f"{target.addr}: {code}: {details}", file=sys.stderr)
        return 1
    except ConfigurationError as e:
        print(f"health_probe: {e}", file=sys.stderr)
        return 2
    print(f"{target.addr}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
