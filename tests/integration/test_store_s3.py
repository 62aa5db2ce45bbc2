"""S3 store against a real S3 API server (SeaweedFS, or moto's server with TIERMEM_TEST_S3=moto).

Segments, ranged and coalesced reads, compaction, restart, purge in batches, and error translation.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.servers import S3Server, free_port
from tiermem.errors import ConfigurationError, IntegrityError, NotFound, StoreUnavailable
from tiermem.store import s3_store
from tiermem.store.base import PageBlob, StoredPage
from tiermem.store.s3_store import S3PageStore
from tiermem.store.segfile import HEAD_SIZE, parse_location
from tiermem.store.url import open_store

pytestmark = pytest.mark.s3

PS = 4096
H = HEAD_SIZE  # payloads start after the record head


def vm() -> str:
    return f"vm-{uuid.uuid4().hex[:10]}"


def rand(n: int, start: int = 0, gen: int = 1) -> list[PageBlob]:
    return [PageBlob(i, gen, os.urandom(PS)) for i in range(start, start + n)]


def data(pages: list[PageBlob]) -> list[bytes]:
    return [bytes(p.data) for p in pages]


class Env:
    """A fresh prefix in the shared server, with raw access."""

    def __init__(self, srv: S3Server) -> None:
        self.srv = srv
        self.prefix = f"s3t-{uuid.uuid4().hex[:8]}"
        self.client = srv.client()

    def open(self, **opts: Any) -> S3PageStore:
        st = open_store(self.srv.url(self.prefix), **opts)
        assert isinstance(st, S3PageStore)
        return st

    def keys(self, vm_id: str, kind: str = "") -> list[str]:
        prefix = f"{self.prefix}/{vm_id}/{kind + '/' if kind else ''}"
        resp = self.client.list_objects_v2(Bucket=self.srv.bucket, Prefix=prefix)
        return sorted(o["Key"][len(prefix) :] for o in resp.get("Contents", []))

    def seg_key(self, vm_id: str, e: StoredPage) -> str:
        loc = parse_location(e.location)
        assert loc is not None
        return f"{self.prefix}/{vm_id}/seg/{loc[0]}"


@pytest.fixture
def env(s3_srv: S3Server) -> Env:
    return Env(s3_srv)


@pytest.fixture
def store(env: Env) -> Iterator[S3PageStore]:
    st = env.open()
    yield st
    st.close()


def count_gets(st: S3PageStore) -> list[str]:
    """Record the Range header of every GetObject the store sends."""
    ranges: list[str] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        ranges.append(params.get("headers", {}).get("Range", ""))

    st.client.meta.events.register("before-call.s3.GetObject", hook)
    return ranges


def test_a_batch_is_one_segment_and_a_single_read_is_one_ranged_get(env: Env, store: S3PageStore) -> None:
    v = vm()
    pages = rand(100)
    entries = store.put_pages(v, pages)
    assert len(env.keys(v, "seg")) == 1
    gets = count_gets(store)
    assert store.get_pages(v, [entries[42]]) == [bytes(pages[42].data)]
    assert gets == [f"bytes={H + 42 * PS}-{H + 43 * PS - 1}"]


def test_batched_reads_coalesce_neighbouring_ranges(env: Env, store: S3PageStore) -> None:
    v = vm()
    a, b = rand(200), rand(10, start=200)
    ea = store.put_pages(v, a)
    eb = store.put_pages(v, b)
    gets = count_gets(store)
    assert store.get_pages(v, ea) == data(a)
    assert len(gets) == 1  # 200 pages, one GET
    gets.clear()
    pick = ea[10:20] + ea[22:30:2]  # small gaps are read through
    assert store.get_pages(v, pick) == [bytes(a[e.page].data) for e in pick]
    assert gets == [f"bytes={H + 10 * PS}-{H + 29 * PS - 1}"]
    gets.clear()
    assert store.get_pages(v, [ea[0], ea[199]]) == [bytes(a[0].data), bytes(a[199].data)]
    assert len(gets) == 2  # 800 KiB apart: not worth one GET
    gets.clear()
    assert store.get_pages(v, [eb[3], ea[5], eb[4]]) == [bytes(b[3].data), bytes(a[5].data), bytes(b[4].data)]
    assert len(gets) == 2  # two segments, fetched in parallel


def test_large_batches_split_into_segments(env: Env) -> None:
    st = env.open(segment_mib=1)
    v = vm()
    pages = rand(600)  # 2.4 MiB of incompressible pages
    entries = st.put_pages(v, pages)
    assert len(env.keys(v, "seg")) == 3
    assert st.get_pages(v, entries) == data(pages)
    st.close()


def test_compaction_keeps_live_pages_readable_and_deletes_dead_segments(env: Env, store: S3PageStore) -> None:
    v = vm()
    a, b, c = rand(40), rand(40, 40), rand(40, 80)
    ea, eb, ec = (store.put_pages(v, x) for x in (a, b, c))
    seg_a, seg_b, seg_c = (parse_location(e[0].location)[0] for e in (ea, eb, ec))  # type: ignore[index]
    assert env.keys(v, "seg") == sorted([seg_a, seg_b, seg_c])

    store.delete_pages(v, ea[:30])  # 25% live: compacted into a new segment
    store.delete_pages(v, eb)  # nothing live: deleted
    store.delete_pages(v, ec[:5])  # 87% live: kept, with a tombstone
    segs = env.keys(v, "seg")
    assert seg_a not in segs and seg_b not in segs and seg_c in segs and len(segs) == 2
    assert len(env.keys(v, "del")) == 1
    # the entries of A's survivors still name the old segment: they resolve by (page, generation)
    assert store.get_pages(v, ea[30:]) == data(a[30:])
    assert store.get_pages(v, ec[5:]) == data(c[5:])
    u = store.usage(v)
    assert u.pages == 45 and u.stored_bytes == 45 * PS

    # A new process rebuilds the same map from footers and tombstones.
    again = env.open()
    assert again.usage(v).pages == 45
    assert again.get_pages(v, ea[30:] + ec[5:]) == data(a[30:] + c[5:])
    with pytest.raises(NotFound):
        again.get_pages(v, ec[:1])
    with pytest.raises(NotFound):
        again.get_pages(v, ea[:1])
    again.delete_pages(v, ea[30:] + ec[5:])
    assert env.keys(v) == []  # dead segments and their tombstones are gone
    again.close()


def test_interrupted_compaction_is_repaired_at_restart(
    env: Env, store: S3PageStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = vm()
    pages = rand(20)
    entries = store.put_pages(v, pages)
    real_delete = store._blob_delete

    def failing_delete(vm_id: str, kind: str, names: Any) -> None:
        raise StoreUnavailable("injected: the old segment could not be deleted")

    monkeypatch.setattr(store, "_blob_delete", failing_delete)
    store.delete_pages(v, entries[:15])  # compaction writes the copy, then fails to delete the original
    monkeypatch.setattr(store, "_blob_delete", real_delete)
    assert len(env.keys(v, "seg")) == 2
    assert store.get_pages(v, entries[15:]) == data(pages[15:])

    again = env.open()  # the original now holds no live page (its pages are deleted or newer in the copy)
    assert again.usage(v).pages == 5
    assert again.get_pages(v, entries[15:]) == data(pages[15:])
    assert len(env.keys(v, "seg")) == 1
    again.close()


def test_restart_with_an_index_bigger_than_one_tail_read(env: Env, store: S3PageStore) -> None:
    v = vm()
    text = (b"compressible " * 400)[:PS]
    pages = [PageBlob(i, 1, text[i % 13 :] + text[: i % 13]) for i in range(2000)]
    entries = store.put_pages(v, pages, "zstd")  # 2000 x 44-byte index entries > 64 KiB
    again = env.open()
    assert again.usage(v).pages == 2000
    assert again.get_pages(v, entries[::97]) == data(pages[::97])
    again.close()


def test_unreadable_footer_falls_back_to_locations(env: Env, store: S3PageStore) -> None:
    v = vm()
    pages = rand(10)
    entries = store.put_pages(v, pages)
    key = env.seg_key(v, entries[0])
    blob = env.client.get_object(Bucket=env.srv.bucket, Key=key)["Body"].read()
    env.client.put_object(Bucket=env.srv.bucket, Key=key, Body=blob[:-1] + bytes([blob[-1] ^ 1]))
    again = env.open()
    assert again.usage(v).pages == 0  # the index cannot be trusted...
    assert again.get_pages(v, entries) == data(pages)  # ...but each payload is still verified and served
    again.close()


def test_truncated_segment_is_an_integrity_error(env: Env, store: S3PageStore) -> None:
    v = vm()
    entries = store.put_pages(v, rand(10))
    key = env.seg_key(v, entries[0])
    env.client.put_object(Bucket=env.srv.bucket, Key=key, Body=b"x" * 100)
    with pytest.raises(IntegrityError):
        store.get_pages(v, entries[5:6])


def test_purge_deletes_in_batches(env: Env, store: S3PageStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3_store, "_DELETE_BATCH", 7)
    v, other = vm(), vm()
    for i in range(20):
        store.put_pages(v, rand(2, start=2 * i))
    keep = store.put_pages(other, rand(3))
    assert len(env.keys(v)) == 20
    assert store.purge_vm(v) == 40
    assert env.keys(v) == []
    assert len(env.keys(other)) == 1
    assert len(store.get_pages(other, keep)) == 3


def test_missing_bucket_is_a_configuration_error(env: Env) -> None:
    st = open_store(
        f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x?endpoint={env.srv.endpoint}&region={env.srv.region}"
    )
    with pytest.raises(ConfigurationError, match="NoSuchBucket"):
        st.put_pages(vm(), rand(1))
    st.close()


def test_bad_credentials_are_a_configuration_error(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    if env.srv.kind == "moto":
        pytest.skip("moto's server accepts any credentials")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    st = env.open()
    with pytest.raises(ConfigurationError) as info:
        st.put_pages(vm(), rand(1))
    assert "not-the-secret" not in str(info.value)
    st.close()


def test_unreachable_endpoint_is_unavailable() -> None:
    st = open_store(
        f"s3://bucket/x?endpoint=http://127.0.0.1:{free_port()}&region=us-east-1&retries=1&connect_timeout=0.5"
    )
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1"):
        st.put_pages(vm(), rand(1))
    st.close()
