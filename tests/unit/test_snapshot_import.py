"""Importing a snapshot memory file into a store: what is stored, and that a failure leaves nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tiermem.agent.index import PageIndex
from tiermem.agent.snapshot import (
    FileSource,
    S3Source,
    import_snapshot,
    open_source,
    snapshot_meta,
    snapshot_space,
)
from tiermem.errors import AlreadyExists, InvalidArgument, NotFound, StoreUnavailable
from tiermem.store.base import Codec
from tiermem.store.local import LocalPageStore

PS = 4096


@pytest.fixture
def index(tmp_path: Path) -> Iterator[PageIndex]:
    ix = PageIndex(tmp_path / "index.db", fsync=False)
    yield ix
    ix.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalPageStore]:
    st = LocalPageStore(str(tmp_path / "pages"), name="default", fsync=False)
    yield st
    st.close()


def write_file(path: Path, pages: int, zero: list[int], seed: int = 1) -> bytes:
    data = np.random.default_rng(seed).integers(1, 256, pages * PS, dtype=np.uint8)
    for p in zero:
        data[p * PS : (p + 1) * PS] = 0
    path.write_bytes(data.tobytes())
    return data.tobytes()


def test_every_nonzero_page_is_stored_verified_and_zero_pages_nowhere(
    tmp_path: Path, index: PageIndex, store: LocalPageStore
) -> None:
    raw = write_file(tmp_path / "mem", 2500, zero=[0, 7, 1024, 2499])  # more than two 1024-page chunks
    seen: list[tuple[int, int]] = []
    info = import_snapshot(
        index,
        store,
        "vm-a",
        node_id="n1",
        source=FileSource(str(tmp_path / "mem")),
        progress=lambda d, t: seen.append((d, t)),
    )
    assert (info.pages, info.zero_pages) == (2500, 4) and seen[-1] == (2500, 2500) and len(seen) == 3
    assert index.count("vm-a") == 2496 and index.get("vm-a", 7) is None
    entries = [e for e in index.entries("vm-a", range(2500)) if e is not None]
    assert all(e.store == "default" and e.stored.codec != Codec.ZERO for e in entries)
    rec = index.record("vm-a")
    assert rec is not None
    space = snapshot_space("n1", rec)  # its own incarnation: a namespace no other VM writes to
    assert space.startswith("n1~vm-a~") and store.usage("vm-a").pages == 0
    got = store.get_pages(space, [e.stored for e in entries])
    assert b"".join(got) == b"".join(raw[e.stored.page * PS : (e.stored.page + 1) * PS] for e in entries)
    assert info.stored_bytes == sum(e.stored.length for e in entries)
    snap = snapshot_meta(index.record("vm-a"))
    assert snap is not None and snap["pages"] == 2500 and snap["store"] == "default"
    with pytest.raises(AlreadyExists):
        import_snapshot(index, store, "vm-a", node_id="n1", source=FileSource(str(tmp_path / "mem")))


class Failing:
    """A source whose third read fails (a disk error, a broken S3 connection)."""

    description = "failing"

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def size(self) -> int:
        return len(self.raw)

    def chunks(self, chunk_bytes: int) -> Iterator[bytes]:
        for i, off in enumerate(range(0, len(self.raw), chunk_bytes)):
            if i == 2:
                raise StoreUnavailable("read failed")
            yield self.raw[off : off + chunk_bytes]


def test_a_failed_import_leaves_no_pages_and_no_restorable_vm(
    tmp_path: Path, index: PageIndex, store: LocalPageStore
) -> None:
    raw = write_file(tmp_path / "mem", 3000, zero=[])
    with pytest.raises(StoreUnavailable):
        import_snapshot(index, store, "vm-b", node_id="n1", source=Failing(raw))
    assert index.record("vm-b") is None and index.count("vm-b") == 0
    assert store.usage().pages == 0  # the 2048 pages written before the failure were purged
    info = import_snapshot(
        index, store, "vm-b", node_id="n1", source=FileSource(str(tmp_path / "mem"))
    )  # and it can be retried
    assert info.pages == 3000


def test_bad_sources_are_clear_errors(tmp_path: Path, index: PageIndex, store: LocalPageStore) -> None:
    (tmp_path / "odd").write_bytes(b"x" * (PS + 1))
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="absolute"):
        FileSource("relative/mem")
    with pytest.raises(NotFound, match="cannot read"):
        FileSource(str(tmp_path / "missing"))
    with pytest.raises(InvalidArgument, match="regular file"):
        FileSource(str(tmp_path))
    for name in ("odd", "empty"):
        with pytest.raises(InvalidArgument, match="multiple of 4096"):
            import_snapshot(index, store, "vm-c", node_id="n1", source=FileSource(str(tmp_path / name)))
    assert index.record("vm-c") is None
    with pytest.raises(InvalidArgument, match="exactly one"):
        open_source("", "")
    with pytest.raises(InvalidArgument, match="exactly one"):
        open_source("/a", "s3://b/k")
    for url in (
        "s3://bucket",
        "s3://bucket/",
        "http://bucket/key",
        "s3://u:p@bucket/key",
        "s3://b/k?color=red",
    ):
        with pytest.raises(InvalidArgument):
            S3Source(url, client=object())
    with pytest.raises(InvalidArgument, match="vm id"):
        import_snapshot(index, store, "../etc", node_id="n1", source=FileSource(str(tmp_path / "odd")))
