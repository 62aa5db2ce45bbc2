"""The durable evicted-page index: for every evicted page, where it lives and how to verify it.

Invariant 1 of the brief: an entry is durable (SQLite commit, ``synchronous=FULL``
when fsync is on) *before* the page is punched, so a restarted agent can always
find every evicted page. Invariant 2: an entry is removed only after the page is
back in guest memory; removals are therefore allowed to lag (they are flushed in
batches off the fault path), because a stale entry for a page that is present is
harmless: a drain's UFFDIO_COPY gets EEXIST and the entry is dropped then.

Lookups on the fault path hit an in-memory mirror (a dict per VM plus a numpy
bitmap for vectorised "is evicted" queries by the cycle engine). A VM served by
the native fault thread also has an :class:`IndexMirror` (its C-side table): it is
written here after the durable commit and dropped with the same generation check,
so it never holds an entry the durable index does not.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tiermem.errors import FailedPrecondition
from tiermem.fsmodes import private_file
from tiermem.store.base import Codec, StoredPage

__all__ = ["IndexEntry", "IndexMirror", "PageIndex", "VmRecord"]


@dataclass(frozen=True)
class IndexEntry:
    """One evicted page: the store that holds it and the store's entry."""

    store: str
    stored: StoredPage


@dataclass
class VmRecord:
    """What the agent must remember about a VM across restarts."""

    vm_id: str
    backend: str
    n_pages: int
    page_size: int = 4096
    meta: dict[str, Any] = field(default_factory=dict)
    """Labels, policy, workload: JSON-serialisable."""


class IndexMirror(Protocol):
    """A second in-memory copy of one VM's entries (the native fault path's table)."""

    def put(self, store: str, entries: Sequence[StoredPage]) -> None:
        """Entries just made durable (replacing older generations of the same pages)."""

    def remove(self, page: int, generation: int) -> None:
        """Drop the page's entry if it holds ``generation``."""

    def clear(self) -> None:
        """Drop everything."""


class _VmIndex:
    def __init__(self, n_pages: int) -> None:
        self.entries: dict[int, IndexEntry] = {}
        self.bitmap = np.zeros(n_pages, dtype=bool)
        self.next_gen = 1


class PageIndex:
    """SQLite-backed index of evicted pages, with an in-memory mirror."""

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            private_file(self.path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'OFF'}")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS vms (
                vm_id TEXT PRIMARY KEY, backend TEXT NOT NULL, n_pages INTEGER NOT NULL,
                page_size INTEGER NOT NULL, meta TEXT NOT NULL DEFAULT '{}', next_gen INTEGER NOT NULL DEFAULT 1);
            CREATE TABLE IF NOT EXISTS pages (
                vm_id TEXT NOT NULL, page INTEGER NOT NULL, store TEXT NOT NULL, generation INTEGER NOT NULL,
                codec INTEGER NOT NULL, checksum INTEGER NOT NULL, length INTEGER NOT NULL, location TEXT NOT NULL,
                PRIMARY KEY (vm_id, page)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS orphans (
                store TEXT NOT NULL, space TEXT NOT NULL, PRIMARY KEY (store, space)) WITHOUT ROWID;
            """
        )
        # Two locks, always taken in this order: ``_lock`` serialises SQLite (a commit with
        # synchronous=FULL waits for fsync), ``_mem`` guards the in-memory mirror and the removal
        # queue. A fault's ``remove`` takes only ``_mem``, so it never waits behind an eviction
        # batch's durable commit.
        self._lock = threading.RLock()
        self._mem = threading.Lock()
        self._vms: dict[str, _VmIndex] = {}
        self._records: dict[str, VmRecord] = {}
        self._pending_removals: list[tuple[str, int, int]] = []
        self._mirrors: dict[str, IndexMirror] = {}
        self._load()

    # --- VMs --------------------------------------------------------------------------------
    def _load(self) -> None:
        for vm_id, backend, n_pages, page_size, meta, next_gen in self._db.execute(
            "SELECT vm_id, backend, n_pages, page_size, meta, next_gen FROM vms"
        ):
            self._records[vm_id] = VmRecord(vm_id, backend, n_pages, page_size, json.loads(meta))
            vi = self._vms[vm_id] = _VmIndex(n_pages)
            vi.next_gen = next_gen
        for vm_id, page, store, gen, codec, csum, length, loc in self._db.execute(
            "SELECT vm_id, page, store, generation, codec, checksum, length, location FROM pages"
        ):
            known = self._vms.get(vm_id)
            if known is None or page >= len(known.bitmap):
                continue  # an entry for an unknown VM cannot be served; kept on disk for operators
            known.entries[page] = IndexEntry(
                store, StoredPage(page, gen, Codec(codec), _signed_to_u64(csum), length, loc)
            )
            known.bitmap[page] = True
            known.next_gen = max(known.next_gen, gen + 1)

    def add_vm(self, rec: VmRecord) -> None:
        """Register (or update) a VM; keeps existing entries when the size matches."""
        with self._lock:
            old = self._records.get(rec.vm_id)
            if old is not None and old.n_pages != rec.n_pages and self._vms[rec.vm_id].entries:
                raise FailedPrecondition(
                    f"VM {rec.vm_id} has evicted pages for {old.n_pages} pages; it cannot reattach with {rec.n_pages}"
                )
            self._db.execute(
                "INSERT INTO vms (vm_id, backend, n_pages, page_size, meta) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(vm_id) DO UPDATE SET backend=excluded.backend, n_pages=excluded.n_pages, "
                "page_size=excluded.page_size, meta=excluded.meta",
                (rec.vm_id, rec.backend, rec.n_pages, rec.page_size, json.dumps(rec.meta)),
            )
            with self._mem:
                self._records[rec.vm_id] = rec
                if rec.vm_id not in self._vms:
                    self._vms[rec.vm_id] = _VmIndex(rec.n_pages)

    def remove_vm(self, vm_id: str) -> None:
        """Forget a VM and every entry it has (after drain or purge)."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM pages WHERE vm_id = ?", (vm_id,))
            self._db.execute("DELETE FROM vms WHERE vm_id = ?", (vm_id,))
            self._db.execute("COMMIT")
            with self._mem:
                self._vms.pop(vm_id, None)
                self._records.pop(vm_id, None)
                mirror = self._mirrors.pop(vm_id, None)
                if mirror is not None:
                    mirror.clear()
                self._pending_removals = [r for r in self._pending_removals if r[0] != vm_id]

    def vm_records(self) -> list[VmRecord]:
        """Every VM the index knows (for reattach after a restart)."""
        with self._mem:
            return list(self._records.values())

    def record(self, vm_id: str) -> VmRecord | None:
        """The record of one VM."""
        return self._records.get(vm_id)

    # --- entries -----------------------------------------------------------------------------
    def next_generations(self, vm_id: str, count: int) -> int:
        """Reserve ``count`` generation numbers; returns the first. Durable, so never reused."""
        with self._lock:  # held across the UPDATE: a later reservation never persists before an earlier one
            with self._mem:
                vi = self._vms[vm_id]
                first = vi.next_gen
                vi.next_gen += count
            self._db.execute("UPDATE vms SET next_gen = ? WHERE vm_id = ?", (vi.next_gen, vm_id))
            return first

    def put_many(self, vm_id: str, store: str, entries: Sequence[StoredPage]) -> None:
        """Durably record evicted pages; returns after the commit (before any punch)."""
        rows = [
            (
                vm_id,
                e.page,
                store,
                e.generation,
                int(e.codec),
                _u64_to_signed(e.checksum),
                e.length,
                e.location,
            )
            for e in entries
        ]
        with self._lock:
            vi = self._vms[vm_id]
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT OR REPLACE INTO pages (vm_id, page, store, generation, codec, checksum, length, location) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            with self._mem:
                for e in entries:
                    vi.entries[e.page] = IndexEntry(store, e)
                    vi.bitmap[e.page] = True
                mirror = self._mirrors.get(vm_id)
                if mirror is not None:  # after the commit: durable before the native path sees it
                    mirror.put(store, entries)

    def get(self, vm_id: str, page: int) -> IndexEntry | None:
        """The entry of an evicted page, or None."""
        vi = self._vms.get(vm_id)
        return None if vi is None else vi.entries.get(page)

    def remove(
        self, vm_id: str, restored: Iterable[tuple[int, int]], *, flush: bool = False
    ) -> list[IndexEntry]:
        """Drop the entries of pages that are back in guest memory; returns the dropped entries.

        ``restored`` holds ``(page, generation)`` pairs: the generation that was
        installed. An entry of another generation is kept — the page was evicted
        again after that install (before the installer got here), and its only
        copy is the new one. The in-memory mirror changes at once; the durable
        delete is queued and written by :meth:`flush` (or now with ``flush=True``).
        """
        dropped: list[IndexEntry] = []
        with self._mem:
            vi = self._vms.get(vm_id)
            if vi is None:
                return dropped
            mirror = self._mirrors.get(vm_id)
            for p, gen in restored:
                e = vi.entries.get(p)
                if e is None or e.stored.generation != gen:
                    continue
                del vi.entries[p]
                vi.bitmap[p] = False
                dropped.append(e)
                self._pending_removals.append((vm_id, p, gen))
                if mirror is not None:
                    mirror.remove(p, gen)
        if flush:
            self.flush()
        return dropped

    def detach_mirror(self, vm_id: str, mirror: IndexMirror) -> None:
        """Stop updating ``mirror`` (if it is still the VM's: a reattached session may have its own)."""
        with self._mem:
            if self._mirrors.get(vm_id) is mirror:
                del self._mirrors[vm_id]

    def attach_mirror(self, vm_id: str, mirror: IndexMirror) -> None:
        """Keep ``mirror`` in step with the VM's entries (loaded with the current ones now)."""
        with self._mem:
            vi = self._vms[vm_id]
            by_store: dict[str, list[StoredPage]] = {}
            for e in vi.entries.values():
                by_store.setdefault(e.store, []).append(e.stored)
            for store, entries in by_store.items():
                mirror.put(store, entries)
            self._mirrors[vm_id] = mirror

    def flush(self) -> None:
        """Write queued removals."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        with self._mem:
            rows, self._pending_removals = self._pending_removals, []
        if not rows:
            return
        try:
            self._db.execute("BEGIN")
            # only delete the generation that was restored: a page re-evicted since has a newer row
            self._db.executemany("DELETE FROM pages WHERE vm_id = ? AND page = ? AND generation = ?", rows)
            self._db.execute("COMMIT")
        except BaseException:
            # ENOSPC, EIO...: the removals are put back (never dropped) and written by a later flush
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            with self._mem:
                self._pending_removals[:0] = rows
            raise

    def pending_removals(self) -> int:
        """Removals queued and not yet durable."""
        with self._mem:
            return len(self._pending_removals)

    # --- orphaned namespaces ---------------------------------------------------------------------
    def add_orphans(self, spaces: Iterable[tuple[str, str]]) -> None:
        """Durably queue ``(store, space)`` namespaces whose pages no VM can use any more, for purging."""
        with self._lock:
            self._db.executemany("INSERT OR IGNORE INTO orphans (store, space) VALUES (?, ?)", list(spaces))

    def orphans(self) -> list[tuple[str, str]]:
        """Queued ``(store, space)`` namespaces still to purge."""
        with self._lock:
            return [
                (a, b) for a, b in self._db.execute("SELECT store, space FROM orphans ORDER BY store, space")
            ]

    def drop_orphan(self, store: str, space: str) -> None:
        """A namespace was purged."""
        with self._lock:
            self._db.execute("DELETE FROM orphans WHERE store = ? AND space = ?", (store, space))

    def evicted_bitmap(self, vm_id: str) -> np.ndarray:
        """Bool per page: evicted (read-only view; copy before mutating)."""
        return self._vms[vm_id].bitmap

    def evicted_pages(self, vm_id: str) -> list[int]:
        """Evicted page numbers, ascending."""
        with self._mem:
            vi = self._vms.get(vm_id)
            return sorted(vi.entries) if vi else []

    def count(self, vm_id: str) -> int:
        """Number of evicted pages of a VM."""
        vi = self._vms.get(vm_id)
        return len(vi.entries) if vi else 0

    def entries(self, vm_id: str, pages: Iterable[int]) -> list[IndexEntry | None]:
        """Entries for several pages (None where not evicted)."""
        vi = self._vms.get(vm_id)
        if vi is None:
            return [None for _ in pages]
        return [vi.entries.get(p) for p in pages]

    def close(self) -> None:
        """Flush and close the database."""
        with self._lock:
            self._flush_locked()
            self._db.close()


def _u64_to_signed(v: int) -> int:
    # SQLite integers are signed 64-bit; xxh3-64 checksums use the full unsigned range.
    return v - (1 << 64) if v >= (1 << 63) else v


def _signed_to_u64(v: int) -> int:
    return v + (1 << 64) if v < 0 else v
