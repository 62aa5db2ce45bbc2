"""The native fault thread's index mirror stays in step with the PageIndex: entries appear after the
durable commit, go only for the generation installed, and pages moved to other stores are forgotten."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tiermem import native
from tiermem.agent.index import PageIndex, VmRecord
from tiermem.agent.native_faults import NativeMirror
from tiermem.store.base import Codec, StoredPage
from tiermem.store.local import LocalPageStore

pytestmark = pytest.mark.skipif(
    native.mod is None or not hasattr(native.mod, "FaultPath"), reason=f"native extension: {native.reason}"
)


class _Session:
    """What NativeMirror reads of a session: the VM id and the store lookup."""

    def __init__(self, stores: dict[str, Any]) -> None:
        self.vm_id = "vm1"
        self.space = "vm1"
        self.stores = stores.__getitem__


def _sp(
    page: int, gen: int, loc: str = "seg/" + "ab" * 11 + "@4096+100", codec: Codec = Codec.LZ4
) -> StoredPage:
    return StoredPage(
        page, gen, codec, 0x1234, 0 if codec is Codec.ZERO else 100, "" if codec is Codec.ZERO else loc
    )


@pytest.fixture
def mirrored(tmp_path: Path) -> Any:
    local = LocalPageStore(tmp_path / "pages", fsync=False)
    idx = PageIndex(":memory:", fsync=False)
    idx.add_vm(VmRecord("vm1", "uffd", 64))
    assert native.mod is not None
    fp = native.mod.FaultPath(0, 0x10000000, 4096, 64)  # never started: the mirror only
    mirror = NativeMirror(fp, _Session({"local": local, "remote": object()}), local.keyring.keys())  # type: ignore[arg-type]
    idx.put_many("vm1", "local", [_sp(1, 5)])  # before the mirror: loaded when it attaches
    idx.attach_mirror("vm1", mirror)
    yield idx, fp
    local.close()


def test_entries_follow_the_index(mirrored: Any) -> None:
    idx, fp = mirrored
    assert fp.generation(1) == 5
    idx.put_many("vm1", "local", [_sp(2, 6), _sp(3, 7, codec=Codec.ZERO)])
    assert (fp.generation(2), fp.generation(3)) == (6, 7)
    assert fp.generation(4) is None


def test_removal_only_for_the_generation_installed(mirrored: Any) -> None:
    idx, fp = mirrored
    idx.put_many("vm1", "local", [_sp(1, 9)])  # evicted again: generation 9 replaces 5
    assert idx.remove("vm1", [(1, 5)]) == [] and fp.generation(1) == 9  # a stale removal keeps it
    assert fp.remove(1, 5) is False and fp.generation(1) == 9
    assert len(idx.remove("vm1", [(1, 9)])) == 1
    assert fp.generation(1) is None


def test_a_page_moved_to_another_store_is_forgotten(mirrored: Any) -> None:
    idx, fp = mirrored
    idx.put_many("vm1", "remote", [_sp(1, 8)])  # not a local store: the native thread must not serve it
    assert fp.generation(1) is None
    idx.put_many("vm1", "local", [_sp(2, 3, loc="not-a-location")])  # unparseable: forgotten too
    assert fp.generation(2) is None


def test_bad_entries_are_refused_and_removing_the_vm_clears_it(mirrored: Any) -> None:
    idx, fp = mirrored
    with pytest.raises(ValueError, match="bad entry"):
        fp.put_many([(64, 1, 0, 0, 0, "x", 0, 1)])  # page out of range
    with pytest.raises(ValueError, match="bad entry"):
        fp.put_many([(1, 1, 9, 0, 0, "x", 0, 1)])  # unknown codec
    with pytest.raises(ValueError, match="bad entry"):
        fp.put_many([(1, 1, 0, 0, 0, "x", 0, 8192)])  # longer than a page
    idx.remove_vm("vm1")
    assert fp.generation(1) is None


def test_the_native_page_mac_is_the_python_one(tmp_path: Path) -> None:
    """The C thread verifies pages with the construction of tiermem.store.pagemac, byte for byte."""
    import os

    from tiermem.store.pagemac import PageKeyring, page_mac

    assert native.mod is not None
    ring = PageKeyring.ephemeral()
    fp = native.mod.FaultPath(0, 0x10000000, 4096, 64)
    space = "node-1~vm-7~3f2a"
    fp.set_mac(space, ring.keys())
    for page, gen in ((0, 1), (63, 2**40 + 5), (17, 2**63 - 1)):
        raw = os.urandom(4096)
        assert (
            fp.mac(page, gen, raw)
            == page_mac(ring.keys()[0], space, page, gen, raw)
            == ring.mac(space, page, gen, raw)
        )
    with pytest.raises(ValueError, match="32 bytes"):
        fp.set_mac(space, [b"short"])
    with pytest.raises(ValueError, match="255"):
        fp.set_mac("x" * 256, ring.keys())


def test_a_stopped_session_detaches_only_its_own_mirror(mirrored: Any) -> None:
    """A reattached VM's new fault thread keeps its mirror when the old session's thread stops late."""
    idx, _ = mirrored
    assert native.mod is not None
    new_fp = native.mod.FaultPath(0, 0x10000000, 4096, 64)

    class _Rec:
        def __init__(self, fp: Any) -> None:
            self.fp = fp

        def put(self, store: str, entries: Any) -> None:
            self.fp.put_many([(e.page, e.generation, 0, 0, -1, "", 0, 0) for e in entries])
            self.puts = [e.page for e in entries]

        def remove(self, page: int, generation: int) -> None:
            self.fp.remove(page, generation)

        def clear(self) -> None:
            self.fp.clear()

    old_mirror = idx._mirrors["vm1"]
    new_mirror = _Rec(new_fp)
    idx.attach_mirror("vm1", new_mirror)
    idx.detach_mirror("vm1", old_mirror)  # the old session stopping after the new one attached
    idx.put_many("vm1", "local", [_sp(9, 1)])
    assert new_mirror.puts == [9]  # still updated
