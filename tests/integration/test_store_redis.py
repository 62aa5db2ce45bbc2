"""Redis store against real redis-server processes: ACL auth, TLS, outages, maxmemory, purge, key layout.

Destructive tests start their own RedisServer; the shared ``redis_srv`` is only read and written.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from redis.crc import key_slot

from tests.helpers.servers import RedisServer, free_port
from tiermem.errors import ConfigurationError, StoreFull, StoreUnavailable
from tiermem.store.base import PageBlob
from tiermem.store.redis_store import RedisPageStore
from tiermem.store.url import open_store

pytestmark = pytest.mark.redis

PS = 4096
TEXT = (b"redis page " * 400)[:PS]


def vm() -> str:
    return f"vm-{uuid.uuid4().hex[:10]}"


def redis(url: str) -> RedisPageStore:
    st = open_store(url)
    assert isinstance(st, RedisPageStore)
    return st


def test_keys_of_a_vm_share_one_cluster_slot(redis_srv: RedisServer) -> None:
    st = redis(redis_srv.url)
    v = vm()
    entries = st.put_pages(v, [PageBlob(i, g, os.urandom(PS)) for i in range(40) for g in (1, 2)])
    keys = [e.location for e in entries]
    assert all(k.startswith(f"tiermem:{{{v}}}:p:") for k in keys)
    slots = {key_slot(k.encode()) for k in [*keys, f"tiermem:{{{v}}}:usage"]}
    assert len(slots) == 1
    assert st.client.get(keys[0]) is not None  # binary values, stored as sent
    st.close()


def test_purge_scans_in_batches(redis_srv: RedisServer) -> None:
    st = redis(redis_srv.url)
    a, b = vm(), vm()
    st.put_pages(a, [PageBlob(i, 1, TEXT[i % 50 :] + TEXT[: i % 50]) for i in range(2500)], "zstd")
    eb = st.put_pages(b, [PageBlob(1, 1, TEXT)])
    assert st.purge_vm(a) == 2500
    assert list(st.client.scan_iter(match=f"tiermem:{{{a}}}:*")) == []
    assert st.get_pages(b, eb) == [TEXT]
    st.close()


def test_acl_user_and_password(tmp_path: Path) -> None:
    srv = RedisServer(
        tmp_path,
        extra_args=["--user", "default", "off", "--user", "tm", "on", ">s3cret-pw", "~tiermem:*", "+@all"],
    )
    srv.start()
    try:
        base = f"redis://tm:s3cret-pw@127.0.0.1:{srv.port}/0"
        st = redis(base)
        assert "s3cret-pw" not in st.url
        v = vm()
        entries = st.put_pages(v, [PageBlob(1, 1, TEXT)], "zstd")
        assert st.get_pages(v, entries) == [TEXT]
        st.close()

        bad = redis(f"redis://tm:wrong-pw@127.0.0.1:{srv.port}/0?retries=1")
        with pytest.raises(ConfigurationError) as info:
            bad.put_pages(v, [PageBlob(2, 1, TEXT)])
        assert "wrong-pw" not in str(info.value)
        bad.close()

        prefixed = redis(f"{base}?prefix=other")  # the ACL only allows keys under tiermem:*
        with pytest.raises(ConfigurationError, match="permission"):
            prefixed.put_pages(v, [PageBlob(2, 1, TEXT)])
        prefixed.close()
    finally:
        srv.stop()


def _tls_files(d: Path, name: str = "localhost", with_ip: bool = True) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tiermem test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name)]
                + ([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if with_ip else [])
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = d / "ca.pem", d / "server.pem", d / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


def test_tls(tmp_path: Path) -> None:
    ca, cert, key = _tls_files(tmp_path)
    port = free_port()
    srv = RedisServer(
        tmp_path,
        port=port,
        password="tls-pw",
        extra_args=[
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(ca),
            "--tls-auth-clients",
            "no",
        ],
    )
    srv.start()
    try:
        st = redis(f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_ca_certs={ca}")
        v = vm()
        entries = st.put_pages(v, [PageBlob(i, 1, TEXT) for i in range(3)], "lz4")
        assert st.get_pages(v, entries) == [TEXT] * 3
        st.close()

        # Without the CA the server's certificate is not trusted: a configuration problem, not data.
        (tmp_path / "other").mkdir()
        other_ca, _, _ = _tls_files(tmp_path / "other")
        untrusted = redis(f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_ca_certs={other_ca}&retries=1")
        with pytest.raises(StoreUnavailable, match="certificate"):
            untrusted.put_pages(v, [PageBlob(9, 1, TEXT)])
        untrusted.close()

        plain = redis(f"redis://:tls-pw@127.0.0.1:{port}/0?retries=1&timeout=1")
        with pytest.raises(StoreUnavailable):
            plain.put_pages(v, [PageBlob(9, 1, TEXT)])
        plain.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("word", ["on", "yes", "true", "1"])
def test_ssl_check_hostname_on_checks_the_hostname(tmp_path: Path, word: str) -> None:
    # issue 17 item 14: "on" used to turn hostname checking OFF (three option parsers disagreed)
    ca, cert, key = _tls_files(tmp_path, name="redis.other.example", with_ip=False)
    port = free_port()
    srv = RedisServer(
        tmp_path,
        port=port,
        password="tls-pw",
        extra_args=[
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(ca),
            "--tls-auth-clients",
            "no",
        ],
    )
    srv.start()
    try:
        wrong_name = redis(
            f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_check_hostname={word}"
            "&retries=1&timeout=2"
        )
        with pytest.raises(StoreUnavailable, match=r"hostname|match"):
            wrong_name.put_pages(vm(), [PageBlob(1, 1, TEXT)])
        wrong_name.close()
        # the same server with checking explicitly off: the trusted CA alone is enough
        off = redis(f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_ca_certs={ca}&ssl_check_hostname=off")
        v = vm()
        assert off.get_pages(v, off.put_pages(v, [PageBlob(1, 1, TEXT)])) == [TEXT]
        off.close()
    finally:
        srv.stop()


def test_killed_server_then_restart(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path).start()
    try:
        st = redis(f"{srv.url}?timeout=1&connect_timeout=0.5&retries=2")
        v = vm()
        pages = [PageBlob(i, 1, os.urandom(PS)) for i in range(50)]
        entries = st.put_pages(v, pages)
        srv.kill()
        with pytest.raises(StoreUnavailable, match="Connection"):
            st.put_pages(v, [PageBlob(100, 1, TEXT)])
        with pytest.raises(StoreUnavailable):
            st.get_pages(v, entries[:1])
        with pytest.raises(StoreUnavailable):
            st.usage(v)
        srv.start()  # same port, same data directory: the AOF (appendfsync always) is replayed
        assert st.get_pages(v, entries) == [bytes(p.data) for p in pages]
        more = st.put_pages(v, [PageBlob(100, 1, TEXT)])
        assert st.get_pages(v, more) == [TEXT]
        assert st.usage(v).pages == 51
        st.close()
    finally:
        srv.stop()


def test_stopped_server_is_unavailable_not_a_hang(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path).start()
    try:
        st = redis(f"{srv.url}?timeout=0.5&connect_timeout=0.5&retries=1")
        v = vm()
        entries = st.put_pages(v, [PageBlob(1, 1, TEXT)])
        assert srv.proc is not None
        os.kill(srv.proc.pid, 19)  # SIGSTOP: connections stay open, nothing answers
        try:
            with pytest.raises(StoreUnavailable, match="Timeout"):
                st.get_pages(v, entries)
        finally:
            os.kill(srv.proc.pid, 18)  # SIGCONT
        assert st.get_pages(v, entries) == [TEXT]
        st.close()
    finally:
        srv.stop()


def test_maxmemory_is_store_full_and_the_batch_is_all_or_nothing(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path, extra_args=["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"]).start()
    try:
        st = redis(srv.url)
        v = vm()
        stored = 0
        with pytest.raises(StoreFull, match="out of memory"):
            for batch in range(100):
                pages = [PageBlob(batch * 64 + i, 1, os.urandom(PS)) for i in range(64)]
                st.put_pages(v, pages)
                stored += 64
        assert stored > 0
        failed = [f"tiermem:{{{v}}}:p:{stored + i}:1" for i in range(64)]
        assert st.client.exists(*failed) == 0  # nothing of the refused batch was written
        assert st.usage(v).pages == stored
        assert st.purge_vm(v) == stored  # purge still works (UNLINK frees memory)
        st.close()
    finally:
        srv.stop()


def test_unreachable_port_is_unavailable() -> None:
    st = redis(f"redis://127.0.0.1:{free_port()}/0?retries=1&connect_timeout=0.5")
    with pytest.raises(StoreUnavailable) as info:
        st.put_pages(vm(), [PageBlob(1, 1, TEXT)])
    assert "127.0.0.1" in str(info.value)
    st.close()


def test_missing_database_is_a_configuration_error(redis_srv: RedisServer) -> None:
    st = redis(f"redis://127.0.0.1:{redis_srv.port}/99")
    with pytest.raises(ConfigurationError, match="database"):
        st.put_pages(vm(), [PageBlob(1, 1, TEXT)])
    st.close()
