"""Issue 17 item 3: a forged page never reaches a guest, even when it has the old checksum.

The attacker holds store write access (the Redis password, the bucket's keys, the
store directory), not the agent's page key. xxh3-64 is not a MAC: with its public
default secret two 8-byte lanes of a page can be changed so that the hash stays
the same (:func:`xxh3_twin`), and before this change such a payload was installed.
Every stored page now carries a keyed BLAKE2b tag over (namespace, page,
generation, raw page), so the forged twin, a page replayed from another VM or
incarnation, and a payload moved to another page are all refused.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest
import redis
import xxhash

from tests.faults.common import EventLog, record
from tests.faults.conftest import AgentFactory, redis_url
from tests.helpers.servers import RedisServer, S3Server
from tests.helpers.wait import wait_until
from tiermem.errors import ConfigurationError, IntegrityError
from tiermem.model import CycleMode, EventKind, EvictionPolicy
from tiermem.sim.kernel import SimKernel
from tiermem.store.base import Codec, PageBlob
from tiermem.store.local import LocalPageStore
from tiermem.store.pagemac import DOMAIN, PageKeyring, page_mac
from tiermem.store.payload import PayloadStore
from tiermem.store.redis_store import RedisPageStore
from tiermem.store.s3_store import S3PageStore
from tiermem.store.segfile import parse_location
from tiermem.store.space import store_space
from tiermem.store.url import open_store

pytestmark = pytest.mark.timeout(90)

PS = 4096
# XXH3's default secret is public (xxhash.h, XXH3_kSecret); its first 16 bytes key lanes 0 of stripes 0 and 1.
_K = bytes.fromhex("b8fe6c3923a44bbe7c01812cf721ad1c")
_S0, _S1 = struct.unpack("<QQ", _K)


def crafted_page(fill: bytes = b"G") -> bytes:
    """A page whose lane 0 of stripes 0 and 1 has a zero multiply term under XXH3, so it has twins."""
    p = bytearray(fill * PS)
    struct.pack_into("<Q", p, 0, ((0x1000 ^ (_S0 >> 32)) << 32) | (_S0 & 0xFFFFFFFF))
    struct.pack_into("<Q", p, 64, ((0x2000 ^ (_S1 >> 32)) << 32) | (_S1 & 0xFFFFFFFF))
    return bytes(p)


def xxh3_twin(page: bytes, k: int = 0x5EED) -> bytes:
    """A different page with the same xxh3-64: move ``k`` between the high halves of the two lanes."""
    p = bytearray(page)
    a, b = struct.unpack_from("<Q", p, 0)[0], struct.unpack_from("<Q", p, 64)[0]
    ha, hb = (a >> 32) + k, (b >> 32) - k  # the lanes' sum is unchanged and both multiply terms stay 0
    struct.pack_into("<Q", p, 0, ((ha & 0xFFFFFFFF) << 32) | (a & 0xFFFFFFFF))
    struct.pack_into("<Q", p, 64, ((hb & 0xFFFFFFFF) << 32) | (b & 0xFFFFFFFF))
    return bytes(p)


def test_the_twin_really_collides_under_xxh3() -> None:
    # the premise of the attack: without it the tests below would prove nothing
    orig = crafted_page()
    twin = xxh3_twin(orig)
    assert twin != orig and xxhash.xxh3_64_intdigest(twin) == xxhash.xxh3_64_intdigest(orig)


# --- the store surface: a forged payload written into each real backend -------------------------------
def _overwrite_local(st: LocalPageStore, space: str, location: str, payload: bytes) -> None:
    loc = parse_location(location)
    assert loc is not None
    seg, off, length = loc
    assert length == len(payload)
    fd = os.open(Path(st.root) / space / "seg" / seg, os.O_RDWR)
    try:
        os.pwrite(fd, payload, off)
    finally:
        os.close(fd)


def _store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> PayloadStore:
    if kind == "file":
        st = open_store(f"file://{tmp_path}/pages")
    elif kind == "redis":
        srv: RedisServer = request.getfixturevalue("redis_own")
        st = open_store(redis_url(srv.port))
    else:
        s3: S3Server = request.getfixturevalue("s3_srv")
        st = open_store(s3.url(f"forge-{os.urandom(4).hex()}") + "&segment_mib=1")
    assert isinstance(st, PayloadStore)
    return st


def _forge(
    st: PayloadStore,
    space: str,
    location: str,
    page: int,
    gen: int,
    payload: bytes,
    request: pytest.FixtureRequest,
) -> None:
    if isinstance(st, LocalPageStore):
        _overwrite_local(st, space, location, payload)
    elif isinstance(st, RedisPageStore):
        srv: RedisServer = request.getfixturevalue("redis_own")
        redis.Redis(host="127.0.0.1", port=srv.port).set(st.key(space, page, gen), payload)
    else:
        assert isinstance(st, S3PageStore)
        s3: S3Server = request.getfixturevalue("s3_srv")
        loc = parse_location(location)
        assert loc is not None
        seg, off, length = loc
        c = s3.client()
        key = f"{st.prefix}/{space}/seg/{seg}"
        body = bytearray(c.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
        body[off : off + length] = payload
        c.put_object(Bucket=s3.bucket, Key=key, Body=bytes(body))


@pytest.mark.parametrize(
    "kind",
    [
        "file",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("s3", marks=pytest.mark.s3),
    ],
)
def test_a_forged_twin_written_into_the_store_is_refused(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    st = _store(kind, tmp_path, request)
    try:
        space = store_space("n1", "vm1", "00c0ffee00c0ffee")
        orig = crafted_page()
        (e,) = st.put_pages(space, [PageBlob(5, 1, orig)])
        assert e.codec is Codec.RAW and st.get_pages(space, [e]) == [orig]
        _forge(st, space, e.location, 5, 1, xxh3_twin(orig), request)
        with pytest.raises(IntegrityError, match="MAC mismatch"):
            st.get_pages(space, [e])
        with pytest.raises(IntegrityError):  # the batch path too
            st.get_pages(space, [e, e._replace()])
    finally:
        st.close()


@pytest.mark.redis
def test_a_page_replayed_from_another_namespace_or_slot_is_refused(redis_own: RedisServer) -> None:
    st = open_store(redis_url(redis_own.port))
    assert isinstance(st, RedisPageStore)
    r = redis.Redis(host="127.0.0.1", port=redis_own.port)
    try:
        a = store_space("n1", "vm1", "1111111111111111")
        b = store_space("n1", "vm1", "2222222222222222")  # a later incarnation of the same id
        secret_page, victim_page = os.urandom(PS), os.urandom(PS)
        (ea,) = st.put_pages(a, [PageBlob(3, 1, secret_page)])
        (eb,) = st.put_pages(b, [PageBlob(3, 1, victim_page)])
        (eb7,) = st.put_pages(b, [PageBlob(7, 2, victim_page)])
        # replay the other incarnation's page into b's key: same page, same generation, valid for a
        r.set(st.key(b, 3, 1), r.get(st.key(a, 3, 1)) or b"")
        with pytest.raises(IntegrityError):
            st.get_pages(b, [eb._replace(checksum=ea.checksum)])  # even with a's tag copied as well
        with pytest.raises(IntegrityError):
            st.get_pages(b, [eb])
        # move page 7's payload and tag to page 3's slot
        r.set(st.key(b, 3, 1), r.get(st.key(b, 7, 2)) or b"")
        with pytest.raises(IntegrityError):
            st.get_pages(b, [eb._replace(checksum=eb7.checksum)])
        assert st.get_pages(b, [eb7]) == [victim_page]
    finally:
        st.close()


# --- through a running agent: the forged twin is never installed into the guest ----------------------
def test_agent_never_installs_a_forged_twin(make_agent: AgentFactory, tmp_path: Path) -> None:
    agent = make_agent({"store": f"file://{tmp_path}/pages"})
    log = EventLog(agent)
    agent.attach_sim(
        "vm1",
        32 * PS,
        EvictionPolicy(interval_ms=20, cold_after=1, prefetch_pages=0, store="store"),
        workload="uniform",
        vcpus=0,
    )
    s = agent.sessions["vm1"]
    sim = s.backend
    assert isinstance(sim, SimKernel)
    orig = crafted_page()
    for p in range(32):
        sim.io_write(p * PS, orig if p == 9 else os.urandom(PS))
    assert agent.run_cycle("vm1", CycleMode.EVICT, 20).pages_evicted == 32
    entry = agent.index.get("vm1", 9)
    assert entry is not None and entry.stored.codec is Codec.RAW
    st = agent.store("store")
    assert isinstance(st, LocalPageStore)
    _overwrite_local(st, s.space, entry.stored.location, xxh3_twin(orig))

    t = threading.Thread(target=sim.access, args=(9,), daemon=True)
    t.start()
    t.join(1.5)
    assert t.is_alive(), "the vCPU must wait: the forged twin must not be installed"
    assert not sim.populated()[9]
    wait_until(lambda: log.of(EventKind.INTEGRITY_ERROR, "vm1"), 10, "an integrity_error event")
    assert agent.metrics.store_errors.labels("store", "get", "IntegrityError")._value.get() >= 1

    _overwrite_local(st, s.space, entry.stored.location, orig)  # the operator restores the real page
    t.join(20)
    assert not t.is_alive()
    assert sim.io_read(9 * PS, PS) == orig
    record("forged xxh3 twin refused (file store)", pages_verified=1, pages_lost=0, installed_forged=0)


# --- the key: per agent, 0600, kept across restarts, rotatable ---------------------------------------
def test_agent_key_is_private_and_survives_a_restart(make_agent: AgentFactory, tmp_path: Path) -> None:
    a = make_agent({"store": f"file://{tmp_path}/pages"})
    key_file = a.data_dir / "page-keys.json"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert a.data_dir.stat().st_mode & 0o777 == 0o700
    first = key_file.read_bytes()
    again = PageKeyring.load(key_file, create=True)
    assert key_file.read_bytes() == first and again.current == 1  # loaded, not regenerated
    b = make_agent({"store": f"file://{tmp_path}/pages"}, node_id="n2")
    assert (b.data_dir / "page-keys.json").read_bytes() != first  # a key per agent by default


def test_a_broken_key_file_is_a_clear_error_that_echoes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "keys.json"
    bad.write_text('{"current": 1, "keys": {"1": "topsecretnothex"}}')
    with pytest.raises(ConfigurationError) as info:
        PageKeyring.load(bad)
    assert "topsecret" not in str(info.value) and "not a valid keyring" in str(info.value)
    with pytest.raises(ConfigurationError, match="does not exist"):
        PageKeyring.load(tmp_path / "missing.json")


def test_rotation_keeps_old_pages_readable_and_dropping_the_key_fails_closed() -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    st = open_store("memory://")
    assert isinstance(st, PayloadStore)
    st.keyring = PageKeyring({1: old_key}, 1)
    page = os.urandom(PS)
    (e_old,) = st.put_pages("vm1", [PageBlob(1, 1, page)])
    st.keyring = PageKeyring({1: old_key, 2: new_key}, 2)  # rotated: new pages use key 2
    (e_new,) = st.put_pages("vm1", [PageBlob(2, 2, page)])
    assert st.get_pages("vm1", [e_old, e_new]) == [page, page]
    st.keyring = PageKeyring({2: new_key}, 2)  # key 1 dropped too early
    with pytest.raises(IntegrityError):
        st.get_pages("vm1", [e_old])


def test_the_mac_construction_is_the_documented_one() -> None:
    # what a C fault path must reproduce (tiermem/store/pagemac.py): keep in sync with the docstring
    import hashlib

    key, raw = bytes(range(32)), bytes([7]) * PS
    space = "n1~vm1~0123456789abcdef"
    msg = DOMAIN + bytes([len(space)]) + space.encode() + struct.pack("<QQ", 5, 9) + raw
    want = int.from_bytes(hashlib.blake2b(msg, key=key, digest_size=16).digest()[:8], "little")
    assert page_mac(key, space, 5, 9, raw) == want
    assert (
        page_mac(key, space, 5, 10, raw) != want
        and page_mac(key, "n1~vm1~0123456789abcdee", 5, 9, raw) != want
    )
