"""Local directory store on the real filesystem: restart, locking, crash leftovers, fsync, full disk, concurrency."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tiermem.errors import ConfigurationError, IntegrityError, NotFound
from tiermem.store.base import PageBlob, StoredPage
from tiermem.store.local import LocalPageStore
from tiermem.store.segfile import parse_location

PS = 4096
TEXT = (b"local page " * 400)[:PS]


def rand(n: int, start: int = 0, gen: int = 1) -> list[PageBlob]:
    return [PageBlob(i, gen, os.urandom(PS)) for i in range(start, start + n)]


def data(pages: list[PageBlob]) -> list[bytes]:
    return [bytes(p.data) for p in pages]


def seg_path(root: Path, vm: str, e: StoredPage) -> Path:
    loc = parse_location(e.location)
    assert loc is not None
    return root / vm / "seg" / loc[0]


def test_layout_and_reopen(tmp_path: Path) -> None:
    root = tmp_path / "pages"
    st = LocalPageStore(root)
    a, b, c = rand(40), rand(40, 40), rand(40, 80)
    ea, eb, ec = (st.put_pages("vm1", x) for x in (a, b, c))
    zero = st.put_pages("vm1", [PageBlob(500, 1, bytes(PS))])
    assert sorted(p.name for p in (root / "vm1" / "seg").iterdir()) == sorted(
        seg_path(root, "vm1", e[0]).name for e in (ea, eb, ec)
    )
    st.delete_pages("vm1", ea[:30])  # compacted
    st.delete_pages("vm1", eb)  # dead: deleted
    st.delete_pages("vm1", ec[:5])  # tombstoned
    assert not seg_path(root, "vm1", ea[0]).exists() and not seg_path(root, "vm1", eb[0]).exists()
    assert len(list((root / "vm1" / "del").iterdir())) == 1
    st.close()

    again = LocalPageStore(root)  # a restarted agent, holding the same index entries
    assert again.usage("vm1").pages == 45
    assert again.get_pages("vm1", ea[30:] + ec[5:] + zero) == [*data(a[30:] + c[5:]), bytes(PS)]
    for gone in (ea[0], eb[0], ec[0]):
        with pytest.raises(NotFound):
            again.get_pages("vm1", [gone])
    again.close()


def test_one_owner_per_root(tmp_path: Path) -> None:
    st = LocalPageStore(tmp_path)
    with pytest.raises(ConfigurationError, match="already open"):
        LocalPageStore(tmp_path)
    st.close()
    LocalPageStore(tmp_path).close()


def test_crash_leftovers_are_removed_at_open(tmp_path: Path) -> None:
    st = LocalPageStore(tmp_path)
    entries = st.put_pages("vm1", [PageBlob(1, 1, TEXT)])
    st.close()
    tmp = tmp_path / "vm1" / "seg" / "18eb000000000000aaaaaa.tmp"
    tmp.write_bytes(b"half a segment")
    purge = tmp_path / ".purge-vm2-0000"
    (purge / "seg").mkdir(parents=True)
    st = LocalPageStore(tmp_path)
    assert not tmp.exists() and not purge.exists()
    assert st.get_pages("vm1", entries) == [TEXT]
    st.close()


def test_fsync_before_put_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    st = LocalPageStore(tmp_path / "a")
    st.put_pages("vm1", rand(3))  # creates the VM directories too
    first = len(calls)
    st.put_pages("vm1", rand(3, 3))
    assert len(calls) - first == 2  # the segment file, then its directory
    assert first > 2  # plus the new directories' parents
    st.close()
    calls.clear()
    nosync = LocalPageStore(tmp_path / "b", fsync=False)
    entries = nosync.put_pages("vm1", [PageBlob(1, 1, TEXT)])
    assert calls == [] and nosync.get_pages("vm1", entries) == [TEXT]
    nosync.close()


def test_root_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigurationError, match="cannot use"):
        LocalPageStore(f)


def test_truncated_segment_is_an_integrity_error(tmp_path: Path) -> None:
    st = LocalPageStore(tmp_path)
    entries = st.put_pages("vm1", rand(10))
    os.truncate(seg_path(tmp_path, "vm1", entries[0]), 5 * PS)
    with pytest.raises(IntegrityError, match="truncated"):
        st.get_pages("vm1", entries[7:8])
    assert len(st.get_pages("vm1", entries[:5])) == 5
    st.close()


def test_full_disk_is_store_full_and_leaves_nothing(tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes the kernel refuse the write with EFBIG, as a full disk would with ENOSPC.
    script = textwrap.dedent(f"""
        import os, resource, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from tiermem.errors import StoreFull
        from tiermem.store.base import PageBlob
        from tiermem.store.local import LocalPageStore
        st = LocalPageStore({str(tmp_path)!r})
        st.put_pages("vm1", [PageBlob(0, 1, os.urandom(4096))])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            st.put_pages("vm1", [PageBlob(i, 1, os.urandom(4096)) for i in range(1, 100)])
        except StoreFull as e:
            print("StoreFull", st.usage("vm1").pages, e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("StoreFull 1 "), out.stderr
    assert list((tmp_path / "vm1" / "seg").glob("*.tmp")) == []
    assert len(list((tmp_path / "vm1" / "seg").iterdir())) == 1


def test_readers_never_fail_while_compaction_moves_pages(tmp_path: Path) -> None:
    st = LocalPageStore(tmp_path, fsync=False, segment_bytes=64 * PS)
    pages = rand(640)
    entries = st.put_pages("vm1", pages)  # ten segments
    keep = entries[::8]
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                assert st.get_pages("vm1", keep) == [bytes(pages[e.page].data) for e in keep]
                for e in keep[::9]:
                    assert st.get_pages("vm1", [e]) == [bytes(pages[e.page].data)]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    doomed = [e for e in entries if e not in keep]
    for i in range(0, len(doomed), 20):  # every segment falls below half live, and is compacted
        st.delete_pages("vm1", doomed[i : i + 20])
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert st.usage("vm1").pages == len(keep)
    segs = st.segments("vm1")
    assert all(live_bytes >= payload / 2 for _, live_bytes, payload in segs.values())  # compacted below half
    assert sum(live for live, _, _ in segs.values()) == len(keep)
    assert st.get_pages("vm1", keep) == [bytes(pages[e.page].data) for e in keep]
    st.close()
