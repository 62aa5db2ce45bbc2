"""PayloadStore behaviour (validation, zero pages, verification, accounting) through the memory store."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

from tiermem.errors import IntegrityError, InvalidArgument, NotFound, StoreFull, StoreUnavailable
from tiermem.store.base import Codec, PageBlob
from tiermem.store.memory import MemoryPageStore

PS = 4096
TEXT = (b"cold page " * 500)[:PS]


def blobs(n: int, gen: int = 1, start: int = 0) -> list[PageBlob]:
    """Pages cycling through random, zero and compressible content."""
    out = []
    for i in range(start, start + n):
        data = os.urandom(PS) if i % 3 == 0 else bytes(PS) if i % 3 == 1 else TEXT
        out.append(PageBlob(i, gen, data))
    return out


@pytest.fixture
def store() -> MemoryPageStore:
    return MemoryPageStore("mem")


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
def test_round_trip(store: MemoryPageStore, compression: str) -> None:
    pages = blobs(30)
    entries = store.put_pages("vm1", pages, compression)
    assert [(e.page, e.generation) for e in entries] == [(p.page, p.generation) for p in pages]
    assert store.get_pages("vm1", entries) == [bytes(p.data) for p in pages]
    assert store.get_pages("vm1", entries[::-1]) == [bytes(p.data) for p in pages][::-1]


def test_zero_pages_never_reach_the_backend(store: MemoryPageStore) -> None:
    entries = store.put_pages("vm1", [PageBlob(i, 1, bytes(PS)) for i in range(10)])
    assert all(e.codec is Codec.ZERO and e.length == 0 and e.location == "" for e in entries)
    assert store.calls["put"] == 0
    assert store.get_pages("vm1", entries) == [bytes(PS)] * 10
    assert store.calls["get"] == 0
    store.delete_pages("vm1", entries)
    assert store.calls["delete"] == 0


def test_mixed_batch_sends_only_nonzero_pages(store: MemoryPageStore) -> None:
    entries = store.put_pages("vm1", blobs(9), "zstd")
    assert store.calls["put"] == 1
    assert store.usage("vm1").pages == 6
    assert store.usage("vm1").zero_pages == 3
    zero_entries = [e for e in entries if e.codec is Codec.ZERO]
    store.get_pages("vm1", zero_entries)
    assert store.calls["get"] == 0


def test_usage_accounting(store: MemoryPageStore) -> None:
    entries = store.put_pages("vm1", blobs(9), "zstd")
    store.put_pages("vm2", blobs(3), "none")
    u = store.usage("vm1")
    assert (u.pages, u.zero_pages) == (6, 3)
    assert u.stored_bytes == sum(e.length for e in entries)
    assert u.logical_bytes == 9 * PS
    assert store.usage().pages == 8 and store.usage().zero_pages == 4
    store.delete_pages("vm1", entries[:3])  # one random, one zero, one text
    u = store.usage("vm1")
    assert (u.pages, u.zero_pages) == (4, 2)
    assert u.stored_bytes == sum(e.length for e in entries[3:])


def test_delete_ignores_missing(store: MemoryPageStore) -> None:
    entries = store.put_pages("vm1", blobs(3))
    store.delete_pages("vm1", entries)
    store.delete_pages("vm1", entries)
    with pytest.raises(NotFound, match="page 0 generation 1"):
        store.get_pages("vm1", entries[:1])


def test_generations_are_distinct(store: MemoryPageStore) -> None:
    a = store.put_pages("vm1", [PageBlob(5, 1, TEXT)])
    b = store.put_pages("vm1", [PageBlob(5, 2, os.urandom(PS))])
    assert store.get_pages("vm1", a) == [TEXT]
    assert store.get_pages("vm1", b) != [TEXT]


def test_purge_counts_and_isolates(store: MemoryPageStore) -> None:
    store.put_pages("vm1", blobs(9))
    other = store.put_pages("vm10", blobs(4))
    assert store.purge_vm("vm1") == 9
    assert store.usage("vm1").pages == 0 and store.usage("vm1").zero_pages == 0
    assert len(store.get_pages("vm10", other)) == 4
    assert store.usage("vm10").pages == 3
    assert store.purge_vm("vm1") == 0


def test_vm_namespaces_are_isolated(store: MemoryPageStore) -> None:
    entries = store.put_pages("vm1", [PageBlob(1, 1, TEXT)])
    with pytest.raises(NotFound):
        store.get_pages("vm2", entries)


@pytest.mark.parametrize("vm_id", ["", "../x", "a/b", "-x", "x" * 65, "a b"])
def test_bad_vm_id(store: MemoryPageStore, vm_id: str) -> None:
    with pytest.raises(InvalidArgument, match="VM id"):
        store.put_pages(vm_id, blobs(1))
    with pytest.raises(InvalidArgument):
        store.purge_vm(vm_id)


def test_bad_pages_store_nothing(store: MemoryPageStore) -> None:
    good = PageBlob(1, 1, TEXT)
    with pytest.raises(InvalidArgument, match="4095 bytes"):
        store.put_pages("vm1", [good, PageBlob(2, 1, TEXT[:-1])])
    with pytest.raises(InvalidArgument, match="page -1"):
        store.put_pages("vm1", [good, PageBlob(-1, 1, TEXT)])
    with pytest.raises(InvalidArgument, match="generation"):
        store.put_pages("vm1", [good, PageBlob(3, 1 << 64, TEXT)])
    with pytest.raises(InvalidArgument, match="twice"):
        store.put_pages("vm1", [good, good])
    with pytest.raises(InvalidArgument, match="compression"):
        store.put_pages("vm1", [good], "brotli")
    assert store.calls["put"] == 0
    assert store.usage("vm1").pages == 0


@pytest.mark.parametrize("page_size", [0, 1000, 4097, 4 << 20])
def test_bad_page_size(page_size: int) -> None:
    with pytest.raises(InvalidArgument, match="page size"):
        MemoryPageStore(page_size=page_size)


def test_huge_pages() -> None:
    store = MemoryPageStore(page_size=2 << 20)
    data = TEXT * 512
    entries = store.put_pages("vm1", [PageBlob(0, 1, data)], "zstd")
    assert store.get_pages("vm1", entries) == [data]


def test_corrupted_payload_raises_and_returns_nothing(store: MemoryPageStore) -> None:
    pages = blobs(6)
    entries = store.put_pages("vm1", pages, "zstd")
    store.corrupt("vm1", 2, 1)
    with pytest.raises(IntegrityError):
        store.get_pages("vm1", entries)
    assert store.get_pages("vm1", entries[3:]) == [bytes(p.data) for p in pages[3:]]


@pytest.mark.parametrize(
    "change",
    [{"checksum": 1}, {"length": 17}, {"codec": Codec.LZ4}, {"length": PS + 1}, {"codec": 42}],
    ids=["checksum", "length", "codec", "too-long", "unknown-codec"],
)
def test_entry_that_disagrees_with_the_payload_raises(store: MemoryPageStore, change: dict[str, Any]) -> None:
    (e,) = store.put_pages("vm1", [PageBlob(0, 1, TEXT)], "zstd")
    bad = e._replace(**change)
    with pytest.raises(IntegrityError):
        store.get_pages("vm1", [bad])


def test_fault_injection_put(store: MemoryPageStore) -> None:
    store.fail_next_puts(2)
    for _ in range(2):
        with pytest.raises(StoreUnavailable):
            store.put_pages("vm1", blobs(3))
    assert store.usage("vm1").pages == 0 and store.usage("vm1").zero_pages == 0
    assert len(store.put_pages("vm1", blobs(3))) == 3


def test_fault_injection_full(store: MemoryPageStore) -> None:
    store.set_full()
    with pytest.raises(StoreFull):
        store.put_pages("vm1", blobs(3))
    store.set_full(False)
    store.put_pages("vm1", blobs(3))


def test_fault_injection_get(store: MemoryPageStore) -> None:
    entries = store.put_pages("vm1", blobs(3))
    store.fail_next_gets(1)
    with pytest.raises(StoreUnavailable):
        store.get_pages("vm1", entries)
    assert len(store.get_pages("vm1", entries)) == 3


def test_url_and_kind(store: MemoryPageStore) -> None:
    assert store.url == "memory://mem"
    assert store.kind == "memory"


def test_concurrent_threads(store: MemoryPageStore) -> None:
    errors: list[BaseException] = []

    def work(vm: str) -> None:
        try:
            for gen in range(1, 6):
                pages = blobs(20, gen)
                entries = store.put_pages(vm, pages, "lz4")
                assert store.get_pages(vm, entries) == [bytes(p.data) for p in pages]
                store.delete_pages(vm, entries)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(f"vm{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.usage().pages == 0 and store.usage().zero_pages == 0
