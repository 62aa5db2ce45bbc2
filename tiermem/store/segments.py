"""A log-structured segment engine, shared by the local directory and S3 stores.

Each put batch becomes one or more *records* in *segment* blobs under the VM's
own namespace, ``<vm>/seg/<id>``, plus tombstone blobs ``<vm>/del/<id>``
(formats in :mod:`tiermem.store.segfile`):

- on S3 every record is a new immutable object (objects cannot be appended);
- on local disk (``appendable`` backends) records are appended to the VM's
  *active* segment file until it reaches ``segment_bytes``; a put then costs
  one write and one fdatasync, like a plain pwrite. A restarted process never
  appends to an old file, so a torn append can only damage the end of a file
  that no one writes any more.

Each VM has an in-memory (page, generation) -> (segment, offset, length) map,
rebuilt on first use after a restart from the records' footers and the
tombstones.

Deletes drop map entries at once. A segment left with no live page is deleted;
one whose live bytes fall below ``compact_below`` of its payload bytes is
compacted (live pages rewritten into a new segment, the map repointed, then the
old segment deleted); otherwise the deleted entries are written to a tombstone
blob so a restart does not resurrect them. Tombstones that only name deleted
segments are removed. A lost tombstone or an interrupted compaction can only
leak space, never lose or misdirect a page: reads always go through the map by
(page, generation), so a StoredPage whose location went stale after compaction
still resolves, and every payload is verified by the codec anyway.

Reads group the batch by segment, coalesce neighbouring ranges (gaps up to
``max_gap``, spans up to ``max_span``) into one read each, and issue the reads
of different segments in parallel when the backend has ``workers`` > 1.

A segment whose index cannot be read completely at load (damage, or a torn
last append) keeps its unreadable part forever (never compacted or dropped,
only purged); pages there are read where their StoredPage says, and verified.

One process owns a VM's namespace at a time (the agent that serves the VM).
"""

from __future__ import annotations

import abc
import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import structlog

from tiermem.errors import IntegrityError, NotFound, TiermemError
from tiermem.store.base import StoredPage
from tiermem.store.payload import EncodedPage, PayloadStore
from tiermem.store.segfile import (
    HEAD_SIZE,
    ID_RE,
    TAIL_READ,
    Key,
    Loc,
    coalesce,
    decode_head,
    decode_index,
    decode_tombs,
    encode_record,
    encode_tombs,
    new_id,
    parse_location,
    seq_of,
)
from tiermem.store.segstate import Record, SegInfo, VmState
from tiermem.store.segstate import idle as _idle

__all__ = ["SegmentStore"]

log = structlog.get_logger(__name__)

_MAX_MOVES = 8
"""How many times one read follows pages that compaction moved while it ran."""

T = TypeVar("T")
R = TypeVar("R")


class SegmentStore(PayloadStore):
    """A PayloadStore over segment blobs; subclasses provide blob I/O."""

    appendable = False
    """True if the backend appends records to an active segment (``_blob_append``)."""

    def __init__(
        self,
        name: str = "default",
        page_size: int = 4096,
        *,
        segment_bytes: int = 4 << 20,
        compact_below: float = 0.5,
        max_gap: int = 64 << 10,
        max_span: int = 8 << 20,
        workers: int = 1,
    ) -> None:
        super().__init__(name, page_size)
        self.segment_bytes = segment_bytes
        self.compact_below = compact_below
        self.max_gap = max_gap
        self.max_span = max_span
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._vms_lock = threading.Lock()
        self._vms: dict[str, VmState] = {}

    # -- blob hooks -------------------------------------------------------------------

    @abc.abstractmethod
    def _blob_put(self, vm_id: str, kind: str, name: str, data: bytes) -> None:
        """Durably write a whole new blob (``kind`` is ``seg`` or ``del``)."""

    def _blob_append(self, vm_id: str, name: str, offset: int, data: bytes, create: bool) -> None:
        """Durably write ``data`` at ``offset`` of segment ``name`` (a new file if ``create``)."""
        raise NotImplementedError

    @abc.abstractmethod
    def _blob_read(self, vm_id: str, kind: str, name: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a blob; NotFound if it is gone, IntegrityError if short."""

    @abc.abstractmethod
    def _blob_get(self, vm_id: str, kind: str, name: str) -> bytes:
        """A whole blob; NotFound if it is gone."""

    @abc.abstractmethod
    def _blob_delete(self, vm_id: str, kind: str, names: Sequence[str]) -> None:
        """Delete blobs; missing ones are ignored."""

    @abc.abstractmethod
    def _blob_list(self, vm_id: str, kind: str) -> list[tuple[str, int]]:
        """``(name, size)`` of every blob of ``kind`` for the VM."""

    @abc.abstractmethod
    def _blob_vms(self) -> list[str]:
        """VM ids that have a namespace in this store."""

    @abc.abstractmethod
    def _blob_purge(self, vm_id: str) -> None:
        """Delete the VM's whole namespace."""

    # -- helpers ------------------------------------------------------------------------

    def _parallel(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if len(items) <= 1 or self._workers <= 1:
            return [fn(it) for it in items]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix=f"store-{self.name}")
            pool = self._pool
        return list(pool.map(fn, items))

    def close(self) -> None:
        """Stop the I/O threads."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _vm(self, vm_id: str) -> VmState:
        st = self._vms.get(vm_id)  # lock-free hit (a dict read is atomic): the fault path's case
        if st is not None and st.loaded:
            return st
        with self._vms_lock:
            st = self._vms.get(vm_id)
            if st is None:
                st = self._vms[vm_id] = VmState()
        if not st.loaded:
            with st.load_lock:
                if not st.loaded:
                    self._load(vm_id, st)
                    st.loaded = True
        return st

    @staticmethod
    def _location(seg: str, offset: int, length: int) -> str:
        return f"seg/{seg}@{offset}+{length}"

    # -- load ---------------------------------------------------------------------------

    def _record_index(self, vm_id: str, name: str, base: int, end: int) -> list[tuple[Key, Loc]]:
        """The entries of the record at ``[base, end)`` of segment ``name``."""
        body = end - base - HEAD_SIZE
        tail = self._blob_read(vm_id, "seg", name, max(base + HEAD_SIZE, end - TAIL_READ), end)
        got = decode_index(tail, body, base)
        if isinstance(got, tuple):
            tail = self._blob_read(vm_id, "seg", name, base + HEAD_SIZE + got[0], end)
            got = decode_index(tail, body, base)
            assert isinstance(got, list)
        return [(k, loc._replace(seg=name)) for k, loc in got]

    def _segment_index(self, vm_id: str, name: str, size: int) -> tuple[list[tuple[Key, Loc]], int | None]:
        """All readable entries of a segment, and the offset where reading failed (if it did)."""
        out: list[tuple[Key, Loc]] = []
        pos = 0
        try:
            if not self.appendable:  # one record per blob: one read of its tail
                return self._record_index(vm_id, name, 0, size), None
            while pos < size:
                end = pos + HEAD_SIZE + decode_head(self._blob_read(vm_id, "seg", name, pos, pos + HEAD_SIZE))
                if end > size:
                    raise IntegrityError(f"record at {pos} ends past the end of the file")
                out += self._record_index(vm_id, name, pos, end)
                pos = end
        except (IntegrityError, NotFound) as e:
            log.error(
                "segment index unreadable from here on; its pages are served by location only",
                store=self.url,
                vm=vm_id,
                segment=name,
                offset=pos,
                error=str(e),
            )
            return out, pos
        return out, None

    def _load(self, vm_id: str, st: VmState) -> None:
        """Rebuild the VM's map from record footers and tombstones."""
        segs = sorted(n for n in self._blob_list(vm_id, "seg") if ID_RE.match(n[0]))
        tombs = sorted(n for n, _ in self._blob_list(vm_id, "del") if ID_RE.match(n))
        indexes = self._parallel(lambda it: self._segment_index(vm_id, *it), segs)
        tomb_data = self._parallel(lambda n: self._blob_get_or_none(vm_id, "del", n), tombs)
        with st.lock:
            for (name, _), (entries, bad_from) in zip(segs, indexes, strict=True):
                seg = st.segs[name] = SegInfo(
                    name, sum(loc.length for _, loc in entries), [k for k, _ in entries]
                )
                seg.unindexed_from = bad_from
                seg.busy = bad_from is not None
                for key, loc in entries:
                    old = st.map.get(key)
                    # Newer original write wins; on a tie the later segment (a compacted copy).
                    if old is None or (loc.seq, loc.seg) >= (old.seq, old.seg):
                        st.link(key, loc, seg)
            for name, data in zip(tombs, tomb_data, strict=True):
                try:
                    dead = decode_tombs(data) if data is not None else []
                except IntegrityError as e:
                    log.warning(
                        "bad tombstone blob ignored", store=self.url, vm=vm_id, blob=name, error=str(e)
                    )
                    dead = []
                st.tombs[name] = {seg for seg, _ in dead}
                for seg_name, key in dead:
                    cur = st.map.get(key)
                    if cur is not None and cur.seg == seg_name:
                        st.unlink(key)
            empty = [s.name for s in st.segs.values() if s.live == 0 and not s.busy]
            for n in empty:
                st.segs[n].busy = True
        self._drop_segments(vm_id, st, empty)
        self._gc_tombs(vm_id, st)

    def _blob_get_or_none(self, vm_id: str, kind: str, name: str) -> bytes | None:
        try:
            return self._blob_get(vm_id, kind, name)
        except NotFound:
            return None

    # -- writing records ------------------------------------------------------------------

    def _write_records(
        self, vm_id: str, st: VmState, records: Sequence[Record]
    ) -> list[tuple[str, list[int]]]:
        """Durably write records, all or nothing; returns (segment, absolute offsets) per record.

        Each returned record counts as *pending* in its segment until the caller has
        linked its pages and calls :meth:`VmState.linked`: a segment with pending records is
        never dropped or compacted, so bytes on their way into the map cannot vanish.
        """
        encoded = [encode_record(r) for r in records]
        if not self.appendable:
            names = [new_id() for _ in encoded]
            try:
                self._parallel(
                    lambda i: self._blob_put(vm_id, "seg", names[i], encoded[i][0]), range(len(names))
                )
            except TiermemError:
                if len(names) > 1:  # remove the ones that did land
                    with contextlib.suppress(TiermemError):
                        self._blob_delete(vm_id, "seg", names)
                raise
            with st.lock:
                for n in names:
                    st.segs[n] = SegInfo(n, pending=1)
            return [(n, offs) for n, (_, offs) in zip(names, encoded, strict=True)]
        out: list[tuple[str, list[int]]] = []
        sealed: list[str] = []
        with st.append_lock:
            try:
                for blob, offs in encoded:
                    with st.lock:
                        create = st.active is None or (
                            st.active_size > 0 and st.active_size + len(blob) > self.segment_bytes
                        )
                        if create:
                            if st.active is not None:
                                sealed.append(st.active)
                            st.active, st.active_size = new_id(), 0
                            st.segs[st.active] = SegInfo(st.active)
                        name, base = st.active, st.active_size
                        assert name is not None
                        st.segs[name].pending += 1
                    try:
                        self._blob_append(vm_id, name, base, blob, create)
                    except TiermemError:
                        with st.lock:
                            st.segs[name].pending -= 1
                        raise
                    st.active_size = base + len(blob)
                    out.append((name, [base + o for o in offs]))
            except TiermemError:
                with st.lock:  # a failed append may have left part of a record: never append after it
                    if st.active is not None:
                        sealed.append(st.active)
                    st.active = None
                    for n, _ in out:  # records that landed before the failure are not pages anyone holds
                        st.linked(n)
                if out:
                    self._write_tombs(
                        vm_id,
                        st,
                        [(n, key) for (n, _), r in zip(out, records, strict=False) for key, *_ in r],
                    )
                raise
            finally:
                self._retire_sealed(vm_id, st, sealed)
        return out

    def _retire_sealed(self, vm_id: str, st: VmState, names: Sequence[str]) -> None:
        """Drop sealed segments that hold no live page (no later delete would ever touch them)."""
        with st.lock:
            dead = [n for n in names if (s := st.segs.get(n)) is not None and s.live == 0 and _idle(s)]
            for n in dead:
                st.segs[n].busy = True
        self._drop_segments(vm_id, st, dead)

    def _put_payloads(self, vm_id: str, items: Sequence[EncodedPage]) -> list[str]:
        st = self._vm(vm_id)
        seq = seq_of(new_id())  # the write time of every page in this batch
        records: list[Record] = [[]]
        size = 0
        for page, gen, c, checksum, payload in items:
            if records[-1] and size + len(payload) > self.segment_bytes:
                records.append([])
                size = 0
            records[-1].append(((page, gen), int(c), checksum, seq, payload))
            size += len(payload)
        written = self._write_records(vm_id, st, records)
        emptied: list[str] = []
        out: list[str] = []
        new_loc = tuple.__new__
        with st.lock:
            for record, (name, offsets) in zip(records, written, strict=True):
                seg = st.segs.setdefault(name, SegInfo(name))
                seg.keys.extend(r[0] for r in record)
                seg.payload_bytes += sum(len(r[4]) for r in record)
                for (key, codec, checksum, _, payload), off in zip(record, offsets, strict=True):
                    length = len(payload)
                    old = st.map.get(key)
                    st.link(key, new_loc(Loc, (name, off, length, codec, checksum, seq)), seg)
                    if old is not None:
                        prev = st.segs.get(old.seg)
                        if prev is not None and prev.live == 0 and _idle(prev) and prev.name != st.active:
                            prev.busy = True  # a re-put superseded its last live page
                            emptied.append(prev.name)
                    out.append(f"seg/{name}@{off}+{length}")
                seg.pending -= 1
        self._drop_segments(vm_id, st, emptied)
        return out

    # -- get ---------------------------------------------------------------------------

    def _get_payloads(self, vm_id: str, entries: Sequence[StoredPage]) -> list[bytes]:
        st = self._vm(vm_id)
        locs = self._resolve(vm_id, st, entries)
        for _ in range(_MAX_MOVES):
            try:
                return self._read_locs(vm_id, locs)
            except NotFound:
                # A segment vanished under us: compaction moved its pages (maybe more than
                # once). Retry only while the map changed, so a page that is really gone fails.
                again = self._resolve(vm_id, st, entries)
                if again == locs:
                    raise
                locs = again
        return self._read_locs(vm_id, locs)

    def _resolve(self, vm_id: str, st: VmState, entries: Sequence[StoredPage]) -> list[Loc]:
        out: list[Loc] = []
        with st.lock:
            for e in entries:
                loc = st.map.get((e.page, e.generation))
                if loc is None:
                    # Not in the map. If the entry points where the index could not be read at
                    # load, read where it says: the codec verifies whatever comes back. Anywhere
                    # else, the page was deleted (or never stored).
                    parsed = parse_location(e.location)
                    seg = st.segs.get(parsed[0]) if parsed is not None else None
                    if parsed is None or (
                        seg is not None and (seg.unindexed_from is None or parsed[1] < seg.unindexed_from)
                    ):
                        raise NotFound(
                            f"VM {vm_id} page {e.page} generation {e.generation} is not in {self.url}"
                        )
                    loc = Loc(parsed[0], parsed[1], parsed[2], int(e.codec), e.checksum, 0)
                out.append(loc)
        return out

    def _read_locs(self, vm_id: str, locs: Sequence[Loc]) -> list[bytes]:
        if len(locs) == 1:  # the common fault: one page, one ranged read
            loc = locs[0]
            return [self._blob_read(vm_id, "seg", loc.seg, loc.offset, loc.offset + loc.length)]
        ranges = coalesce(locs, self.max_gap, self.max_span)
        blobs = self._parallel(lambda r: self._blob_read(vm_id, "seg", r[0], r[1], r[2]), ranges)
        out: list[bytes] = [b""] * len(locs)
        for (_, start, _, members), blob in zip(ranges, blobs, strict=True):
            for i in members:
                off = locs[i].offset - start
                out[i] = blob[off : off + locs[i].length] if len(members) > 1 else blob
        return out

    # -- delete, compaction, tombstones -----------------------------------------------------

    def _delete_payloads(self, vm_id: str, entries: Sequence[StoredPage]) -> None:
        st = self._vm(vm_id)
        touched: dict[str, list[Key]] = {}
        dead: list[str] = []
        compact: list[str] = []
        tombs: list[tuple[str, Key]] = []
        with st.lock:
            for e in entries:
                key = (e.page, e.generation)
                loc = st.unlink(key)
                if loc is not None:
                    touched.setdefault(loc.seg, []).append(key)
            for name, keys in touched.items():
                seg = st.segs.get(name)
                if seg is None:
                    continue
                if not _idle(seg) or name == st.active:  # the active segment is still being appended to
                    tombs += [(name, k) for k in keys]
                elif seg.live == 0:
                    seg.busy = True
                    dead.append(name)
                elif seg.live_bytes < self.compact_below * seg.payload_bytes:
                    seg.busy = True
                    compact.append(name)
                else:
                    tombs += [(name, k) for k in keys]
        errors: list[TiermemError] = []
        for name in self._drop_segments(vm_id, st, dead):
            tombs += [(name, k) for k in touched[name]]
        for name in compact:
            try:
                gone = self._compact(vm_id, st, name)
            except TiermemError as e:
                errors.append(e)
                gone = False
            if not gone:  # the old segment stays (for now): its deletes must survive a restart
                tombs += [(name, k) for k in touched[name]]
        if tombs:
            self._write_tombs(vm_id, st, tombs)
        if dead or compact:
            self._gc_tombs(vm_id, st)
        if errors:
            raise errors[0]

    def _drop_segments(self, vm_id: str, st: VmState, names: Sequence[str]) -> list[str]:
        """Delete segments marked busy; returns the names that could not be deleted."""
        if not names:
            return []
        try:
            self._blob_delete(vm_id, "seg", names)
        except TiermemError as e:
            log.warning("could not delete dead segments", store=self.url, vm=vm_id, error=str(e))
            with st.lock:
                for n in names:
                    if n in st.segs:
                        st.segs[n].busy = False
            return list(names)
        with st.lock:
            for n in names:
                st.segs.pop(n, None)
        return []

    def _compact(self, vm_id: str, st: VmState, name: str) -> bool:
        """Rewrite the live pages of segment ``name`` into a new record, then delete the segment.

        Returns whether the old segment is gone; raises if the copy could not be made.
        """
        with st.lock:
            seg = st.segs[name]
            live = [(k, loc) for k in seg.keys if (loc := st.map.get(k)) is not None and loc.seg == name]
        try:
            if live:
                start = min(loc.offset for _, loc in live)
                end = max(loc.offset + loc.length for _, loc in live)
                blob = self._blob_read(vm_id, "seg", name, start, end)
                record = [
                    (
                        k,
                        loc.codec,
                        loc.checksum,
                        loc.seq,
                        blob[loc.offset - start : loc.offset - start + loc.length],
                    )
                    for k, loc in live
                ]
                ((new, offsets),) = self._write_records(vm_id, st, [record])
                orphans: list[tuple[str, Key]] = []
                with st.lock:
                    nseg = st.segs.setdefault(new, SegInfo(new))
                    for (k, loc), off in zip(live, offsets, strict=True):
                        nseg.keys.append(k)
                        nseg.payload_bytes += loc.length
                        if st.map.get(k) == loc:
                            st.link(k, loc._replace(seg=new, offset=off), nseg)
                        else:  # deleted or re-put while we copied: the copy is dead
                            orphans.append((new, k))
                    nseg.pending -= 1
                if orphans:
                    self._write_tombs(vm_id, st, orphans)
                log.debug("segment compacted", store=self.url, vm=vm_id, old=name, new=new, pages=len(live))
        except TiermemError:
            with st.lock:
                seg.busy = False
            raise
        return not self._drop_segments(vm_id, st, [name])

    def _write_tombs(self, vm_id: str, st: VmState, entries: Sequence[tuple[str, Key]]) -> None:
        name = new_id()
        try:
            self._blob_put(vm_id, "del", name, encode_tombs(entries))
        except TiermemError as e:
            # Only space is at stake: a restart would see these pages as live until a purge.
            log.warning(
                "could not write tombstones", store=self.url, vm=vm_id, pages=len(entries), error=str(e)
            )
            return
        with st.lock:
            st.tombs[name] = {seg for seg, _ in entries}

    def _gc_tombs(self, vm_id: str, st: VmState) -> None:
        with st.lock:
            stale = [n for n, segs in st.tombs.items() if not any(s in st.segs for s in segs)]
        if not stale:
            return
        try:
            self._blob_delete(vm_id, "del", stale)
        except TiermemError as e:
            log.warning("could not delete stale tombstones", store=self.url, vm=vm_id, error=str(e))
            return
        with st.lock:
            for n in stale:
                st.tombs.pop(n, None)

    # -- purge and usage -------------------------------------------------------------------

    def _purge(self, vm_id: str) -> int:
        st = self._vm(vm_id)
        with st.append_lock, st.lock:
            pages = len(st.map)
        self._blob_purge(vm_id)
        with self._vms_lock:
            self._vms.pop(vm_id, None)
        return pages

    def _payload_usage(self, vm_id: str | None) -> tuple[int, int]:
        vms: Iterable[str] = [vm_id] if vm_id is not None else self._blob_vms()
        pages = stored = 0
        for v in vms:
            st = self._vm(v)
            with st.lock:
                pages += len(st.map)
                stored += st.live_bytes
        return pages, stored

    def segments(self, vm_id: str) -> dict[str, tuple[int, int, int]]:
        """``segment id -> (live pages, live bytes, payload bytes)`` for one VM (diagnostics, tests)."""
        st = self._vm(vm_id)
        with st.lock:
            return {n: (s.live, s.live_bytes, s.payload_bytes) for n, s in st.segs.items()}
