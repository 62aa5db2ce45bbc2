"""TLS and mTLS on a real grpc.aio server (tiermem.rpc.server.start_server) with certificates made here."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tiermem.config import TlsSettings
from tiermem.errors import ConfigurationError
from tiermem.rpc import health_probe
from tiermem.rpc.channel import aio_channel
from tiermem.rpc.security import channel_credentials, server_credentials
from tiermem.rpc.server import ServerOptions, StartedServer, start_server

# ---------------------------------------------------------------- certificates


@dataclass
class Issued:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(d: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    c, k = d / f"{stem}.pem", d / f"{stem}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Issued(c, k)


class CA:
    """A throwaway certificate authority."""

    def __init__(self, d: Path, name: str) -> None:
        self.dir = d
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )
        self.pem = _write(d, name, self.cert, self.key).cert

    def issue(
        self,
        stem: str,
        dns: list[str],
        ips: list[str] = (),  # type: ignore[assignment]
        server: bool = True,
        client: bool = False,
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
            [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        )
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(stem))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return _write(self.dir, stem, b.sign(self.key, hashes.SHA256()), key)


@dataclass
class Pki:
    ca: CA
    other_ca: CA
    server: Issued  # SAN: tiermem-cp.test only (no loopback IP)
    client: Issued
    rogue_client: Issued  # signed by other_ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = CA(d, "tiermem-test-ca"), CA(d, "other-ca")
    return Pki(
        ca=ca,
        other_ca=other,
        server=ca.issue("server", ["tiermem-cp.test"], server=True, client=True),
        client=ca.issue("client", ["cli.test"], server=False, client=True),
        rogue_client=other.issue("rogue", ["cli.test"], server=False, client=True),
    )


# ---------------------------------------------------------------- helpers

SERVER_NAME = "tiermem-cp.test"


async def _serve(tls: TlsSettings) -> StartedServer:
    return await start_server(
        lambda s: None, ["tiermem.test.Nothing"], ServerOptions(listen="127.0.0.1:0", tls=tls)
    )


async def _check(port: int, tls: TlsSettings) -> str:
    async with aio_channel(f"127.0.0.1:{port}", tls) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


async def _fails(port: int, tls: TlsSettings) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await _check(port, tls)
    return ei.value.code()


# ---------------------------------------------------------------- TLS


async def test_tls_right_ca_and_name_succeeds(pki: Pki) -> None:
    srv = await _serve(TlsSettings(cert_file=str(pki.server.cert), key_file=str(pki.server.key)))
    try:
        ok = TlsSettings(ca_file=str(pki.ca.pem), server_name=SERVER_NAME)
        assert await _check(srv.port, ok) == "SERVING"
    finally:
        await srv.stop(0)


async def test_tls_wrong_ca_fails(pki: Pki) -> None:
    srv = await _serve(TlsSettings(cert_file=str(pki.server.cert), key_file=str(pki.server.key)))
    try:
        bad = TlsSettings(ca_file=str(pki.other_ca.pem), server_name=SERVER_NAME)
        assert await _fails(srv.port, bad) == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(0)


async def test_tls_wrong_server_name_fails(pki: Pki) -> None:
    srv = await _serve(TlsSettings(cert_file=str(pki.server.cert), key_file=str(pki.server.key)))
    try:
        # 127.0.0.1 is not in the certificate, and neither is this name
        assert await _fails(srv.port, TlsSettings(ca_file=str(pki.ca.pem))) == grpc.StatusCode.UNAVAILABLE
        wrong = TlsSettings(ca_file=str(pki.ca.pem), server_name="someone-else.test")
        assert await _fails(srv.port, wrong) == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(0)


async def test_plaintext_client_cannot_talk_to_tls_server(pki: Pki) -> None:
    srv = await _serve(TlsSettings(cert_file=str(pki.server.cert), key_file=str(pki.server.key)))
    try:
        assert await _fails(srv.port, TlsSettings()) == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(0)


# ---------------------------------------------------------------- mTLS


def _mtls_server(pki: Pki) -> TlsSettings:
    return TlsSettings(
        cert_file=str(pki.server.cert),
        key_file=str(pki.server.key),
        ca_file=str(pki.ca.pem),
        require_client_cert=True,
    )


async def test_mtls_client_cert_from_ca_succeeds(pki: Pki) -> None:
    srv = await _serve(_mtls_server(pki))
    try:
        tls = TlsSettings(
            ca_file=str(pki.ca.pem),
            cert_file=str(pki.client.cert),
            key_file=str(pki.client.key),
            server_name=SERVER_NAME,
        )
        assert await _check(srv.port, tls) == "SERVING"
    finally:
        await srv.stop(0)


async def test_mtls_without_client_cert_fails(pki: Pki) -> None:
    srv = await _serve(_mtls_server(pki))
    try:
        tls = TlsSettings(ca_file=str(pki.ca.pem), server_name=SERVER_NAME)
        assert await _fails(srv.port, tls) == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(0)


async def test_mtls_client_cert_from_other_ca_fails(pki: Pki) -> None:
    srv = await _serve(_mtls_server(pki))
    try:
        tls = TlsSettings(
            ca_file=str(pki.ca.pem),
            cert_file=str(pki.rogue_client.cert),
            key_file=str(pki.rogue_client.key),
            server_name=SERVER_NAME,
        )
        assert await _fails(srv.port, tls) == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(0)


# ---------------------------------------------------------------- the health probe used by healthchecks


async def test_health_probe_cli_with_tls(pki: Pki) -> None:
    import asyncio

    srv = await _serve(_mtls_server(pki))
    try:
        addr = f"127.0.0.1:{srv.port}"
        good = [
            "--addr",
            addr,
            "--tls-ca",
            str(pki.ca.pem),
            "--tls-cert",
            str(pki.client.cert),
            "--tls-key",
            str(pki.client.key),
            "--server-name",
            SERVER_NAME,
        ]
        # the probe is a blocking client: run it off the loop that serves
        assert await asyncio.to_thread(health_probe.main, good) == 0
        no_cert = [
            "--addr",
            addr,
            "--tls-ca",
            str(pki.ca.pem),
            "--server-name",
            SERVER_NAME,
            "--timeout",
            "2",
        ]
        assert await asyncio.to_thread(health_probe.main, no_cert) == 1
    finally:
        await srv.stop(0)


async def test_health_probe_settings_mode_uses_server_tls(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``--settings controlplane`` probes with the server's own CA/cert, as the Dockerfile HEALTHCHECK does."""
    import asyncio

    from tests.helpers.servers import free_port

    port = free_port()
    tls = _mtls_server(pki)
    srv = await start_server(lambda s: None, [], ServerOptions(listen=f"0.0.0.0:{port}", tls=tls))
    try:
        monkeypatch.setenv("TIERMEM_CP_LISTEN", f"0.0.0.0:{port}")
        monkeypatch.setenv("TIERMEM_CP_STATE", f"sqlite:///{tmp_path}/cp.db")
        monkeypatch.setenv("TIERMEM_CP_TLS__CERT_FILE", str(pki.server.cert))
        monkeypatch.setenv("TIERMEM_CP_TLS__KEY_FILE", str(pki.server.key))
        monkeypatch.setenv("TIERMEM_CP_TLS__CA_FILE", str(pki.ca.pem))
        monkeypatch.setenv("TIERMEM_CP_TLS__REQUIRE_CLIENT_CERT", "true")
        target = health_probe.target_from_settings("controlplane")
        assert target.addr == f"127.0.0.1:{port}"
        assert target.tls.server_name == SERVER_NAME  # read from the certificate's SAN
        assert await asyncio.to_thread(health_probe.main, ["--settings", "controlplane"]) == 0
        await srv.health.enter_graceful_shutdown()
        assert await asyncio.to_thread(health_probe.main, ["--settings", "controlplane"]) == 1
    finally:
        await srv.stop(0)


# ---------------------------------------------------------------- configuration errors


def test_tls_config_errors_are_clear(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cert_file"):
        server_credentials(TlsSettings(ca_file=str(pki.ca.pem), require_client_cert=True))
    with pytest.raises(ConfigurationError, match="key_file"):
        server_credentials(TlsSettings(cert_file=str(pki.server.cert)))
    with pytest.raises(ConfigurationError, match=r"needs tls\.ca_file"):
        server_credentials(
            TlsSettings(
                cert_file=str(pki.server.cert), key_file=str(pki.server.key), require_client_cert=True
            )
        )
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigurationError, match="not a PEM"):
        channel_credentials(TlsSettings(ca_file=str(junk)))
    with pytest.raises(ConfigurationError, match="cannot read"):
        channel_credentials(TlsSettings(ca_file=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigurationError, match="both"):
        channel_credentials(TlsSettings(ca_file=str(pki.ca.pem), cert_file=str(pki.client.cert)))
    assert server_credentials(TlsSettings()) is None
    assert channel_credentials(TlsSettings()) is None
