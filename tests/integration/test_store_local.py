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
    a, b = rand(40), rand(40, 40)
    ea, eb = st.put_pages("vm1", a), st.put_pages("vm1", b)
    segs = {seg_path(root, "vm1", e).name for e in ea + eb}
    assert len(segs) == 1  # both batches appended to the VM's active segment file
    assert [p.name for p in (root / "vm1" / "seg").iterdir()] == list(segs)
    zero = st.put_pages("vm1", [PageBlob(500, 1, bytes(PS))])
    st.delete_pages("vm1", ea[:30])  # the active file is never compacted: a tombstone
    assert len(list((root / "vm1" / "del").iterdir())) == 1
    st.close()

    again = LocalPageStore(root)  # a restarted agent, holding the same index entries
    assert again.usage("vm1").pages == 50
    assert again.get_pages("vm1", ea[30:] + eb + zero) == [*data(a[30:] + b), bytes(PS)]
    with pytest.raises(NotFound):
        again.get_pages("vm1", [ea[0]])
    more = rand(5, 100)
    em = again.put_pages("vm1", more)  # a new process appends to a new file
    assert seg_path(root, "vm1", em[0]).name not in segs
    again.delete_pages("vm1", ea[30:] + eb[:5])  # the old file is now below half live: compacted
    assert not seg_path(root, "vm1", ea[0]).exists()
    assert list((root / "vm1" / "del").iterdir()) == []  # its tombstone went with it
    assert again.get_pages("vm1", eb[5:] + em) == data(
        b[5:] + more
    )  # moved pages resolve by (page, generation)
    again.close()

    third = LocalPageStore(root)
    assert third.usage("vm1").pages == 40
    assert third.get_pages("vm1", eb[5:] + em) == data(b[5:] + more)
    third.close()


def test_full_segments_roll_over_and_dead_ones_go(tmp_path: Path) -> None:
    st = LocalPageStore(tmp_path, segment_bytes=40 * PS)
    a, b, c = rand(40), rand(40, 40), rand(40, 80)
    ea, eb, ec = (st.put_pages("vm1", x) for x in (a, b, c))
    files = [seg_path(tmp_path, "vm1", e[0]) for e in (ea, eb, ec)]
    assert len(set(files)) == 3  # each batch filled a segment
    st.delete_pages("vm1", eb)  # sealed and dead: deleted
    assert not files[1].exists()
    st.delete_pages("vm1", ea[:35])  # sealed and mostly dead: its live pages are rewritten
    assert not files[0].exists() and files[2].exists()
    assert st.get_pages("vm1", ea[35:] + ec) == data(a[35:] + c)
    assert len(list((tmp_path / "vm1" / "seg").iterdir())) == 2  # C, and the file that took A's survivors
    st.close()


def test_torn_append_is_ignored_at_restart(tmp_path: Path) -> None:
    st = LocalPageStore(tmp_path)
    pages = rand(8)
    entries = st.put_pages("vm1", pages)
    st.close()
    path = seg_path(tmp_path, "vm1", entries[0])
    with open(path, "ab") as f:  # what a crash in the middle of the next append leaves
        f.write(b"TMREC001" + (10**6).to_bytes(4, "little") + bytes(4) + os.urandom(3000))
    again = LocalPageStore(tmp_path)
    assert again.usage("vm1").pages == 8
    assert again.get_pages("vm1", entries) == data(pages)
    again.put_pages("vm1", rand(2, 8))  # appends go to a new file, never after the torn record
    assert len(list((tmp_path / "vm1" / "seg").iterdir())) == 2
    again.close()


def test_damaged_index_falls_back_to_locations(tmp_path: Path) -> None:
    st = LocalPageStore(tmp_path)
    first, second = rand(5), rand(5, 5)
    e1, e2 = st.put_pages("vm1", first), st.put_pages("vm1", second)
    st.close()
    path = seg_path(tmp_path, "vm1", e1[0])
    with open(path, "r+b") as f:  # break the first record's head: the file cannot be walked
        f.write(b"XXXXXXXX")
    again = LocalPageStore(tmp_path)
    assert again.usage("vm1").pages == 0
    assert again.get_pages("vm1", e1 + e2) == data(first + second)  # every payload still verified
    again.delete_pages("vm1", e1)
    assert path.exists()  # a damaged segment is never compacted or dropped
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
    calls: list[str] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    def fdatasync(fd: int) -> None:
        calls.append("fdatasync")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    st = LocalPageStore(tmp_path / "a")
    st.put_pages("vm1", rand(3))  # a new file: its data, its directory, and the new directories' parents
    assert calls[-2:] == ["fdatasync", "fsync"] and len(calls) == 4
    calls.clear()
    st.put_pages("vm1", rand(3, 3))  # an append to the same file: only its data
    assert calls == ["fdatasync"]
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
    os.truncate(seg_path(tmp_path, "vm1", entries[0]), 6 * PS)  # pages 0-4 and part of 5 remain
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
    entries = st.put_pages("vm1", pages)  # ten segments, the last one active
    assert len(st.segments("vm1")) == 10
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
    assert len(segs) < 10  # sealed segments were compacted into fewer
    assert sum(live for live, _, _ in segs.values()) == len(keep)
    assert st.get_pages("vm1", keep) == [bytes(pages[e.page].data) for e in keep]
    st.close()


def test_concurrent_puts_and_deletes_lose_nothing(tmp_path: Path) -> None:
    # Small segments: files fill, seal, die and get compacted while other threads append.
    st = LocalPageStore(tmp_path, fsync=False, segment_bytes=12 * PS)
    kept: dict[int, tuple[StoredPage, bytes]] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for round_ in range(30):
                pages = rand(5, start=t * 10_000 + round_ * 5)
                entries = st.put_pages("vm1", pages)
                st.delete_pages("vm1", entries[:3])  # most of what is written dies at once
                with lock:
                    for e, p in zip(entries[3:], pages[3:], strict=True):
                        kept[e.page] = (e, bytes(p.data))
                if round_ % 3 == 0:
                    with lock:
                        victims = [kept.pop(k)[0] for k in list(kept)[:2]]
                    st.delete_pages("vm1", victims)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    entries = [e for e, _ in kept.values()]
    assert st.get_pages("vm1", entries) == [d for _, d in kept.values()]
    assert st.usage("vm1").pages == len(kept)
    st.close()
    again = LocalPageStore(tmp_path)
    assert again.usage("vm1").pages == len(kept)
    assert again.get_pages("vm1", entries) == [d for _, d in kept.values()]
    again.close()
