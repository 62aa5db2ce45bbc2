"""Store selection from a URL: one form per backend, one clear error for a bad URL, no leaked passwords.

Opening a Redis or S3 store does not connect, so these tests need no server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tiermem.errors import ConfigurationError, InvalidArgument
from tiermem.store.local import LocalPageStore
from tiermem.store.memory import MemoryPageStore
from tiermem.store.redis_store import RedisPageStore
from tiermem.store.s3_store import S3PageStore
from tiermem.store.url import open_store, redact_url


def test_file_url(tmp_path: Path) -> None:
    st = open_store(f"file://{tmp_path}/pages", name="local")
    try:
        assert isinstance(st, LocalPageStore)
        assert st.kind == "file" and st.name == "local" and st.fsync is True
        assert st.root == tmp_path / "pages" and st.root.is_dir()
        assert st.url == f"file://{tmp_path}/pages"
    finally:
        st.close()


@pytest.mark.parametrize("query,fsync", [("?fsync=0", False), ("?fsync=false", False), ("?fsync=1", True)])
def test_file_url_fsync(tmp_path: Path, query: str, fsync: bool) -> None:
    st = open_store(f"file://{tmp_path}{query}")
    try:
        assert isinstance(st, LocalPageStore) and st.fsync is fsync
    finally:
        st.close()


def test_file_url_option_override(tmp_path: Path) -> None:
    st = open_store(f"file://{tmp_path}", fsync=False)
    try:
        assert isinstance(st, LocalPageStore) and st.fsync is False and st.url.endswith("?fsync=0")
    finally:
        st.close()


def test_file_url_segment_size(tmp_path: Path) -> None:
    st = open_store(f"file://{tmp_path}?segment_mib=8")
    try:
        assert isinstance(st, LocalPageStore) and st.segment_bytes == 8 << 20
    finally:
        st.close()


def test_memory_url() -> None:
    st = open_store("memory://", name="sim", page_size=8192)
    assert isinstance(st, MemoryPageStore) and st.name == "sim" and st.page_size == 8192


def test_redis_url_options() -> None:
    st = open_store(
        "redis://tm:s3cr%40t@10.1.2.3:6380/2?timeout=1.5&connect_timeout=0.5&retries=5&prefix=tmx"
    )
    assert isinstance(st, RedisPageStore)
    kw = st.client.connection_pool.connection_kwargs
    assert (kw["host"], kw["port"], kw["db"]) == ("10.1.2.3", 6380, 2)
    assert (kw["username"], kw["password"]) == ("tm", "s3cr@t")
    assert (kw["socket_timeout"], kw["socket_connect_timeout"]) == (1.5, 0.5)
    assert kw["retry"].get_retries() == 5
    assert st.key("vm1", 7, 3) == "tmx:{vm1}:p:7:3"
    assert (
        "s3cr" not in st.url
        and st.url == "redis://tm:***@10.1.2.3:6380/2?timeout=1.5&connect_timeout=0.5&retries=5&prefix=tmx"
    )
    st.close()


def test_rediss_url_tls_options(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    st = open_store(f"rediss://:pw@cache.example:6380/0?ssl_ca_certs={ca}&ssl_cert_reqs=required")
    assert isinstance(st, RedisPageStore)
    kw = st.client.connection_pool.connection_kwargs
    assert (
        kw["ssl_ca_certs"] == str(ca)
        and kw["ssl_cert_reqs"] == "required"
        and kw["ssl_check_hostname"] is True
    )
    assert kw["password"] == "pw" and ":pw@" not in st.url
    assert st.client.connection_pool.connection_class.__name__ == "SSLConnection"
    st.close()


def test_s3_url_options() -> None:
    st = open_store(
        "s3://pages-bucket/fleet/a?endpoint=http://127.0.0.1:8333&region=eu-west-1&segment_mib=2&compact_below=0.3"
    )
    assert isinstance(st, S3PageStore)
    assert (st.bucket, st.prefix, st.region, st.endpoint) == (
        "pages-bucket",
        "fleet/a",
        "eu-west-1",
        "http://127.0.0.1:8333",
    )
    assert st.segment_bytes == 2 << 20 and st.compact_below == 0.3
    cfg = st.client.meta.config
    assert cfg.retries == {"mode": "standard", "total_max_attempts": 5}  # 4 retries after the first try
    assert cfg.s3 == {"addressing_style": "path"}
    assert st.client.meta.endpoint_url == "http://127.0.0.1:8333"
    assert st.url == "s3://pages-bucket/fleet/a?endpoint=http://127.0.0.1:8333&region=eu-west-1"
    st.close()


@pytest.mark.parametrize(
    "url,message",
    [
        ("", "empty store URL"),
        ("ftp://host/x", "unsupported store URL ftp://host/x ('ftp')"),
        ("/var/lib/tiermem", "(no scheme)"),
        ("file://relative/path", "names host 'relative'"),
        ("file:///", "needs an absolute directory"),
        ("file:///tmp/x?fsync=maybe", "fsync must be a boolean"),
        ("file:///tmp/x?sync=1", "unknown file store option 'sync'"),
        ("file:///tmp/x?segment_mib=0", "outside 1..1024"),
        ("file:///tmp/x?segment_mib=big", "segment_mib='big' is not a number"),
        ("memory://x/y", "takes no path"),
        ("redis://", "has no host"),
        ("redis://host:notaport/0", "invalid port"),
        ("redis://host:6379/zero", "database number"),
        ("redis://host/0?timeout=abc", "timeout='abc'"),
        ("redis://host/0?timeout=-1", "outside"),
        ("redis://host/0?bogus=1", "unknown Redis store option 'bogus'"),
        ("redis://host/0?ssl_ca_certs=/x", "need a rediss:// URL"),
        ("rediss://host/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
        ("redis://host/0?prefix=a*b", "prefix"),
        ("s3:///prefix", "names no bucket"),
        ("s3://Bad_Bucket!/x", "invalid S3 bucket name"),
        ("s3://bucket/x?endpoint=ftp://h", "not an http(s)://host"),
        ("s3://bucket/x?segment_mib=0", "outside 1..64"),
        ("s3://bucket/x?segment_mb=4", "unknown S3 store option 'segment_mb'"),
        ("s3://key:secret@bucket/x", "carry no credentials"),
    ],
)
def test_invalid_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        open_store(url)
    text = str(info.value)
    assert message in text
    assert "\n" not in text
    assert "secret" not in text


def test_errors_never_echo_a_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        open_store("redis://user:hunter2@host:6379/x")
    assert "hunter2" not in str(info.value) and "user:***@host" in str(info.value)


def test_bad_page_size_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="page size"):
        open_store("memory://", page_size=1234)


@pytest.mark.parametrize(
    "url,safe",
    [
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://:pw@host/0", "rediss://:***@host/0"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("s3://b/p?endpoint=http://h:1&token=abc", "s3://b/p?endpoint=http://h:1&token=***"),
        ("file:///var/lib/tiermem", "file:///var/lib/tiermem"),
    ],
)
def test_redact_url(url: str, safe: str) -> None:
    assert redact_url(url) == safe


# --- issue 17 item 14: one strict parser ------------------------------------------------------------


@pytest.mark.parametrize(
    "word,expected",
    [
        ("on", True),
        ("ON", True),
        ("yes", True),
        ("1", True),
        ("true", True),
        ("off", False),
        ("no", False),
        ("0", False),
        ("False", False),
    ],
)
def test_ssl_check_hostname_booleans_mean_what_they_say(word: str, expected: bool) -> None:
    # ssl_check_hostname=on used to turn hostname checking OFF (three parsers disagreed)
    st = open_store(f"rediss://host/0?ssl_check_hostname={word}&ssl_cert_reqs=required")
    try:
        assert isinstance(st, RedisPageStore)
        assert st.client.connection_pool.connection_kwargs["ssl_check_hostname"] is expected
    finally:
        st.close()


@pytest.mark.parametrize(
    "url,message",
    [
        ("rediss://host/0?ssl_check_hostname=maybe", "ssl_check_hostname must be a boolean"),
        ("rediss://host/0?ssl_check_hostname=", "ssl_check_hostname must be a boolean"),
        ("rediss://host/0?ssl_check_hostname=1&ssl_check_hostname=0", "given twice"),
        ("rediss://host/0?ssl_cert_reqs=none&ssl_check_hostname=1", "needs certificate checking"),
        ("redis://host/0?retries=2.5", "retries='2.5' is not an integer"),
        ("redis://host/0?timeout=nan", "not a finite number"),
        ("redis://host/0?durability=maybe", "durability must be one of required, none"),
        ("s3://bucket/x?workers=1.5", "workers='1.5' is not an integer"),
        ("s3://bucket/x?timeout=inf", "not a finite number"),
        ("s3://bucket/x?region=a&region=b", "given twice"),
        ("file:///tmp/x?fsync=1&fsync=0", "given twice"),
    ],
)
def test_strict_options(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        open_store(url)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_tls_defaults_check_hostnames() -> None:
    st = open_store("rediss://host/0")
    try:
        assert isinstance(st, RedisPageStore)
        kw = st.client.connection_pool.connection_kwargs
        assert kw["ssl_cert_reqs"] == "required" and kw["ssl_check_hostname"] is True
        assert st.durable is True
    finally:
        st.close()


def test_redis_endpoint_for_the_native_fault_path() -> None:
    """The native thread's own connection gets exactly the URL's endpoint and credentials; TLS has none
    (only redis-py speaks it), and the password never shows in the endpoint's repr."""

    st = RedisPageStore.from_url(
        "redis://tm:p%40ss@10.1.2.3:6380/2?timeout=0.25&connect_timeout=1.5&prefix=x"
    )
    ep = st.endpoint()
    assert ep is not None
    assert (ep.host, ep.port, ep.unix_path, ep.username, ep.password, ep.db) == (
        "10.1.2.3",
        6380,
        None,
        "tm",
        "p@ss",
        2,
    )
    assert (ep.timeout_s, ep.connect_timeout_s) == (0.25, 1.5)
    assert "p@ss" not in repr(ep)
    assert st.key(f"n~vm~{'0' * 16}", 7, 9) == st.key_prefix(f"n~vm~{'0' * 16}") + "7:9"
    assert RedisPageStore.from_url("rediss://h:6379/0").endpoint() is None
