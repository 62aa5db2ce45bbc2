"""The durable evicted-page index: what survives a reopen, generation-checked removal, lock independence."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tiermem.agent.index import PageIndex, VmRecord
from tiermem.errors import FailedPrecondition
from tiermem.store.base import Codec, StoredPage


def _sp(page: int, gen: int, checksum: int = 2**64 - 1) -> StoredPage:
    return StoredPage(page, gen, Codec.RAW, checksum, 4096, f"seg-1:{page * 4096}:4096")


@pytest.fixture
def index(tmp_path: Path) -> PageIndex:
    idx = PageIndex(tmp_path / "index.db")
    idx.add_vm(VmRecord("vm-1", "sim", 64, meta={"labels": {"a": "b"}}))
    return idx


def test_entries_survive_a_reopen_with_full_u64_checksums(index: PageIndex, tmp_path: Path) -> None:
    index.put_many("vm-1", "default", [_sp(3, 1), _sp(9, 1, checksum=7)])
    index.close()  # no flush of anything pending needed: put_many is durable by itself
    again = PageIndex(tmp_path / "index.db")
    e = again.get("vm-1", 3)
    assert e is not None and e.store == "default" and e.stored == _sp(3, 1)
    assert again.evicted_pages("vm-1") == [3, 9] and bool(again.evicted_bitmap("vm-1")[9])
    assert again.record("vm-1") == VmRecord("vm-1", "sim", 64, meta={"labels": {"a": "b"}})


def test_remove_only_drops_the_generation_that_was_installed(index: PageIndex, tmp_path: Path) -> None:
    index.put_many("vm-1", "default", [_sp(3, 1), _sp(4, 1)])
    index.put_many("vm-1", "default", [_sp(3, 2)])  # page 3 evicted again before its installer got here
    dropped = index.remove("vm-1", [(3, 1), (4, 1)])
    assert [e.stored.page for e in dropped] == [4]
    assert index.get("vm-1", 3) == index.entries("vm-1", [3])[0] and index.get("vm-1", 4) is None
    index.flush()
    index.close()
    again = PageIndex(tmp_path / "index.db")
    assert again.evicted_pages("vm-1") == [3] and again.get("vm-1", 3).stored.generation == 2  # type: ignore[union-attr]


def test_unflushed_removals_only_leave_stale_entries(index: PageIndex, tmp_path: Path) -> None:
    # removals lag by design (invariant 2): a crash before the flush leaves an entry for a present page,
    # which a later drain resolves (EEXIST) - never a missing entry for an evicted one
    index.put_many("vm-1", "default", [_sp(5, 1)])
    index.remove("vm-1", [(5, 1)])
    assert index.get("vm-1", 5) is None
    crashed = PageIndex(tmp_path / "index.db")  # another connection sees the durable state, as after a crash
    assert crashed.get("vm-1", 5) is not None
    index.flush()
    assert PageIndex(tmp_path / "index.db").get("vm-1", 5) is None


def test_generations_are_durable_and_never_reused(index: PageIndex, tmp_path: Path) -> None:
    first = index.next_generations("vm-1", 10)
    assert index.next_generations("vm-1", 1) == first + 10
    index.close()
    assert PageIndex(tmp_path / "index.db").next_generations("vm-1", 1) == first + 11


def test_reattach_with_another_size_is_refused_while_pages_are_evicted(index: PageIndex) -> None:
    index.put_many("vm-1", "default", [_sp(1, 1)])
    with pytest.raises(FailedPrecondition, match="cannot reattach with 128"):
        index.add_vm(VmRecord("vm-1", "sim", 128))
    assert index.get("vm-1", 1) is not None
    index.remove_vm("vm-1")
    assert index.get("vm-1", 1) is None and index.record("vm-1") is None
    index.add_vm(VmRecord("vm-1", "sim", 128))  # empty now: any size


def test_a_fault_removal_never_waits_for_a_commit(index: PageIndex) -> None:
    index.put_many("vm-1", "default", [_sp(7, 1)])
    out: list[int] = []
    with index._lock:  # what an eviction batch's commit (with fsync) holds
        t = threading.Thread(target=lambda: out.append(len(index.remove("vm-1", [(7, 1)]))), daemon=True)
        t.start()
        t.join(5)
        assert out == [1], "remove blocked behind the database lock"
    index.flush()
