"""One interface suite, run against every page store: memory, local directory, real Redis, real S3.

Each test checks the backend's raw state too (Redis SCAN, S3 list_objects, the
directory tree), and corrupts payloads directly in the backend. VM ids are
unique per test because the Redis and S3 servers are shared by the session.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.servers import RedisServer, S3Server
from tiermem.errors import IntegrityError, NotFound
from tiermem.store.base import Codec, PageBlob, PageStore, StoredPage
from tiermem.store.local import LocalPageStore
from tiermem.store.memory import MemoryPageStore
from tiermem.store.segfile import parse_location
from tiermem.store.url import open_store

PS = 4096
TEXT = (b"a highly compressible guest page " * 200)[:PS]


@dataclass
class Backend:
    """A store plus direct access to what its backend holds."""

    store: PageStore
    raw: Callable[[str], list[str]]
    """Names of everything the backend holds for a VM."""
    corrupt: Callable[[str, StoredPage], None]
    """Flip one byte of a stored payload, behind the store's back."""


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x20
    return bytes(b)


def _memory() -> Backend:
    st = MemoryPageStore()

    def raw(vm: str) -> list[str]:
        return [f"{p}:{g}" for p, g in st._data.get(vm, {})]

    return Backend(st, raw, lambda vm, e: st.corrupt(vm, e.page, e.generation, e.length // 2))


def _local(root: Path) -> Backend:
    st = LocalPageStore(root)

    def raw(vm: str) -> list[str]:
        d = root / vm
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) if d.exists() else []

    def corrupt(vm: str, e: StoredPage) -> None:
        loc = parse_location(e.location)
        assert loc is not None
        path = root / vm / "seg" / loc[0]
        with open(path, "r+b") as f:
            f.seek(loc[1] + e.length // 2)
            byte = f.read(1)
            f.seek(loc[1] + e.length // 2)
            f.write(bytes([byte[0] ^ 0x20]))

    return Backend(st, raw, corrupt)


def _redis(srv: RedisServer) -> Backend:
    st = open_store(srv.url)
    client = st.client  # type: ignore[attr-defined]

    def raw(vm: str) -> list[str]:
        return sorted(k.decode() for k in client.scan_iter(match=f"tiermem:{{{vm}}}:*", count=1000))

    def corrupt(vm: str, e: StoredPage) -> None:
        value = client.get(e.location)
        client.set(e.location, _flip(value, e.length // 2))

    return Backend(st, raw, corrupt)


def _s3(srv: S3Server) -> Backend:
    prefix = f"suite-{uuid.uuid4().hex[:8]}"
    st = open_store(srv.url(prefix))
    client = srv.client()

    def raw(vm: str) -> list[str]:
        resp = client.list_objects_v2(Bucket=srv.bucket, Prefix=f"{prefix}/{vm}/")
        return sorted(o["Key"] for o in resp.get("Contents", []))

    def corrupt(vm: str, e: StoredPage) -> None:
        loc = parse_location(e.location)
        assert loc is not None
        key = f"{prefix}/{vm}/seg/{loc[0]}"
        data = client.get_object(Bucket=srv.bucket, Key=key)["Body"].read()
        client.put_object(Bucket=srv.bucket, Key=key, Body=_flip(data, loc[1] + e.length // 2))

    return Backend(st, raw, corrupt)


@pytest.fixture(
    params=[
        "memory",
        "file",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("s3", marks=pytest.mark.s3),
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    kind = request.param
    if kind == "memory":
        b = _memory()
    elif kind == "file":
        b = _local(tmp_path / "pages")
    elif kind == "redis":
        b = _redis(request.getfixturevalue("redis_srv"))
    else:
        b = _s3(request.getfixturevalue("s3_srv"))
    yield b
    b.store.close()


def vm() -> str:
    return f"vm-{uuid.uuid4().hex[:10]}"


def mixed(n: int, gen: int = 1) -> list[PageBlob]:
    """Random, zero and compressible pages in turn."""
    return [
        PageBlob(
            i,
            gen,
            os.urandom(PS) if i % 3 == 0 else bytes(PS) if i % 3 == 1 else TEXT[i % 7 :] + TEXT[: i % 7],
        )
        for i in range(n)
    ]


def data(pages: list[PageBlob]) -> list[bytes]:
    return [bytes(p.data) for p in pages]


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("n", [1, 300])
def test_round_trip(backend: Backend, compression: str, n: int) -> None:
    v = vm()
    pages = mixed(n) if n > 1 else [PageBlob(7, 3, TEXT)]
    entries = backend.store.put_pages(v, pages, compression)
    assert [(e.page, e.generation) for e in entries] == [(p.page, p.generation) for p in pages]
    if compression != "none" and n > 1:
        assert {e.codec for e in entries} == {
            Codec.RAW,
            Codec.ZERO,
            Codec.ZSTD if compression == "zstd" else Codec.LZ4,
        }
    assert backend.store.get_pages(v, entries) == data(pages)
    # any subset, in any order
    pick = entries[::-7]
    assert backend.store.get_pages(v, pick) == [bytes(pages[e.page].data) if n > 1 else TEXT for e in pick]


def test_single_page_gets(backend: Backend) -> None:
    v = vm()
    pages = mixed(12)
    entries = backend.store.put_pages(v, pages, "zstd")
    for e, p in zip(entries, pages, strict=True):
        assert backend.store.get_pages(v, [e]) == [bytes(p.data)]


def test_zero_pages_never_reach_the_backend(backend: Backend) -> None:
    v = vm()
    entries = backend.store.put_pages(v, [PageBlob(i, 1, bytes(PS)) for i in range(50)], "zstd")
    assert {e.codec for e in entries} == {Codec.ZERO}
    assert backend.raw(v) == []
    assert backend.store.get_pages(v, entries) == [bytes(PS)] * 50
    u = backend.store.usage(v)
    assert (u.pages, u.zero_pages, u.stored_bytes, u.logical_bytes) == (0, 50, 0, 50 * PS)


def test_delete_and_usage(backend: Backend) -> None:
    v = vm()
    pages = mixed(90)
    entries = backend.store.put_pages(v, pages, "zstd")
    u = backend.store.usage(v)
    assert (u.pages, u.zero_pages) == (60, 30)
    assert u.stored_bytes == sum(e.length for e in entries)
    assert u.logical_bytes == 90 * PS
    backend.store.delete_pages(v, entries[:45])
    # Missing stored pages are ignored. (Zero pages are a per-process tally, so only
    # stored entries are deleted twice here.)
    backend.store.delete_pages(v, [e for e in entries[:45] if e.codec is not Codec.ZERO])
    u = backend.store.usage(v)
    assert (u.pages, u.zero_pages) == (30, 15)
    assert u.stored_bytes == sum(e.length for e in entries[45:])
    assert backend.store.get_pages(v, entries[45:]) == data(pages[45:])
    for e in (entries[0], entries[2]):  # a random and a compressed page, both deleted
        with pytest.raises(NotFound):
            backend.store.get_pages(v, [e])


def test_new_generation_of_a_page(backend: Backend) -> None:
    v = vm()
    old = backend.store.put_pages(v, [PageBlob(1, 1, TEXT)], "lz4")
    backend.store.delete_pages(v, old)
    new_data = os.urandom(PS)
    new = backend.store.put_pages(v, [PageBlob(1, 2, new_data)], "lz4")
    assert backend.store.get_pages(v, new) == [new_data]
    assert backend.store.usage(v).pages == 1


def test_overwrite_same_generation_counts_once(backend: Backend) -> None:
    v = vm()
    pages = mixed(9)
    backend.store.put_pages(v, pages, "zstd")
    again = backend.store.put_pages(v, pages, "zstd")  # a retried batch
    assert backend.store.get_pages(v, again) == data(pages)
    u = backend.store.usage(v)
    assert u.pages == 6 and u.stored_bytes == sum(e.length for e in again)


def test_purge_removes_that_vm_only(backend: Backend) -> None:
    base = vm()
    a, b = base, base + "0"  # b's namespace starts with a's id
    pa, pb = mixed(40), mixed(20)
    ea = backend.store.put_pages(a, pa, "zstd")
    eb = backend.store.put_pages(b, pb, "zstd")
    backend.store.delete_pages(a, ea[:5])  # leave tombstones in segment stores
    before_b = backend.raw(b)
    assert backend.raw(a)
    assert backend.store.purge_vm(a) == 35
    assert backend.raw(a) == []
    assert backend.raw(b) == before_b
    assert backend.store.get_pages(b, eb) == data(pb)
    assert backend.store.usage(a).pages == 0
    with pytest.raises(NotFound):
        backend.store.get_pages(a, [e for e in ea if e.codec is not Codec.ZERO][-1:])
    assert backend.store.purge_vm(a) == 0


def test_usage_of_the_whole_store(backend: Backend) -> None:
    a, b = vm(), vm()
    backend.store.put_pages(a, mixed(6), "none")
    backend.store.put_pages(b, mixed(3), "none")
    total = backend.store.usage()
    assert total.pages >= 6 and total.stored_bytes >= 6 * PS


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_corrupted_payload_is_detected(backend: Backend, compression: str) -> None:
    v = vm()
    pages = mixed(30)
    entries = backend.store.put_pages(v, pages, compression)
    victim = entries[5] if compression == "zstd" else entries[3]  # a compressed page; a raw page
    assert victim.codec is (Codec.ZSTD if compression == "zstd" else Codec.RAW)
    backend.corrupt(v, victim)
    with pytest.raises(IntegrityError):
        backend.store.get_pages(v, [victim])
    with pytest.raises(IntegrityError):
        backend.store.get_pages(v, entries)
    others = [e for e in entries if e is not victim]
    assert backend.store.get_pages(v, others) == [bytes(pages[e.page].data) for e in others]


def test_missing_page_is_not_found(backend: Backend) -> None:
    v = vm()
    backend.store.put_pages(v, [PageBlob(1, 1, TEXT)], "none")
    ghost = StoredPage(2, 1, Codec.RAW, 0, PS, "")
    with pytest.raises(NotFound, match="page 2"):
        backend.store.get_pages(v, [ghost])


def test_another_vm_is_never_served(backend: Backend) -> None:
    a, b = vm(), vm()
    entries = backend.store.put_pages(a, [PageBlob(1, 1, TEXT)], "zstd")
    with pytest.raises(NotFound):
        backend.store.get_pages(b, entries)


def test_concurrent_threads(backend: Backend) -> None:
    errors: list[BaseException] = []
    shared = vm()

    def work(i: int) -> None:
        try:
            own = vm()
            for gen in range(1, 4):
                for v, base in ((own, 0), (shared, 1000 * i)):
                    pages = [PageBlob(base + p.page, gen, p.data) for p in mixed(24, gen)]
                    entries = backend.store.put_pages(v, pages, "lz4")
                    assert backend.store.get_pages(v, entries) == data(pages)
                    backend.store.delete_pages(v, entries[::2])
                    assert backend.store.get_pages(v, entries[1::2]) == data(pages[1::2])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert backend.store.usage(shared).pages == 4 * 3 * 8  # 16 non-zero per batch, half deleted
