"""The native fault path of one VM: the C fault thread (``tiermem._native.FaultPath``) and its Python half.

The thread serves MISSING faults on pages evicted to a local store or a plain (non-TLS)
Redis store without the GIL (read the message, look up the mirror, pread or GET, decode,
verify the page MAC,
UFFDIO_COPY with DONTWAKE, drop the mirror entry of that generation, wake) and hands
every other message to the backend's Python reader, in kernel order
(``csrc/faults.c`` says exactly which). This module:

- keeps the thread's mirror of the index (:class:`NativeMirror`, an
  :class:`~tiermem.agent.index.IndexMirror`: entries of local-store and Redis pages, written after
  the durable commit; entries of other stores make it forget the page);
- drains what the thread served into the Python side every few milliseconds:
  the index entry of the generation installed is dropped (its durable removal is
  queued, as on the Python path), the payload retired, counters, metrics and the
  latency window updated, the backend's bookkeeping told;
- turns native serving off while the policy prefetches neighbours (the Python path
  fetches them in one round trip).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import structlog

from tiermem import native
from tiermem.agent.metrics import FaultKind
from tiermem.agent.session import VmSession
from tiermem.errors import TiermemError
from tiermem.kernel.uffd_base import RealBackend
from tiermem.store.base import Codec, PageStore, StoredPage
from tiermem.store.local import LocalPageStore
from tiermem.store.redis_store import RedisPageStore
from tiermem.store.segfile import parse_location

__all__ = ["DRAIN_INTERVAL_S", "REDIS_TIMEOUT_CAP_S", "NativeFaults", "NativeMirror", "servable"]

log = structlog.get_logger("tiermem.agent.native_faults")

DRAIN_INTERVAL_S = 0.005
"""How often served faults reach the Python side (index, counters): the lag of its bookkeeping."""
REDIS_TIMEOUT_CAP_S = 0.5
"""The fault thread's Redis timeouts are the store's, capped at this: while it waits on a hung Redis it
reads no other message of the VM, so it gives up early and hands the fault to Python (which waits
with the store's own timeouts and retries)."""


def servable(store: PageStore | None) -> bool:
    """Whether the fault thread can read this store's pages: a local store, or Redis without TLS (when
    the extension was built with hiredis)."""
    if isinstance(store, LocalPageStore):
        return True
    return (
        isinstance(store, RedisPageStore)
        and bool(getattr(native.mod, "HAVE_REDIS", 0))
        and store.endpoint() is not None
    )


class NativeMirror:
    """The fault thread's copy of a VM's index entries, for pages in local and Redis stores."""

    def __init__(self, fp: Any, session: VmSession, keys: list[bytes]) -> None:
        self.fp = fp
        self.session = session
        self.keys = keys
        """The page MAC keys the thread verifies with (current first)."""
        self._dirs: dict[str, tuple[int, bool] | None] = {}

    def _source(self, st: PageStore) -> int:
        if isinstance(st, LocalPageStore):
            return int(self.fp.add_dir(st.segment_dir(self.session.space)))
        assert isinstance(st, RedisPageStore)
        ep = st.endpoint()
        assert ep is not None
        return int(
            self.fp.add_redis(
                st.key_prefix(self.session.space),
                ep.host,
                ep.port,
                ep.unix_path,
                ep.username,
                ep.password,
                ep.db,
                max(1, round(min(ep.timeout_s, REDIS_TIMEOUT_CAP_S) * 1000)),
                max(1, round(min(ep.connect_timeout_s, REDIS_TIMEOUT_CAP_S) * 1000)),
            )
        )

    def _dir(self, store: str) -> tuple[int, bool] | None:
        """The thread's id of the store's source for this VM (a segment directory or a Redis connection)
        and whether it is Redis; None if it cannot serve it."""
        if store not in self._dirs:
            try:
                st: PageStore | None = self.session.stores(store)
            except TiermemError:
                st = None
            self._dirs[store] = None
            ok = isinstance(st, LocalPageStore | RedisPageStore) and servable(st)
            # the thread verifies with one keyring: a store keyed otherwise stays with Python
            if ok and isinstance(st, LocalPageStore | RedisPageStore) and st.keyring.keys() == self.keys:
                self._dirs[store] = (self._source(st), isinstance(st, RedisPageStore))
        return self._dirs[store]

    def put(self, store: str, entries: Sequence[StoredPage]) -> None:
        """Mirror entries just made durable; pages of stores it cannot read are forgotten."""
        src = self._dir(store)
        d, is_redis = src if src is not None else (None, False)
        rows = []
        for e in entries:
            zero = e.codec == Codec.ZERO
            # a Redis key is derived from (page, generation): the location is never trusted (invariant 5)
            loc = None if d is None or zero else ("", 0, e.length) if is_redis else parse_location(e.location)
            if d is None or (loc is None and not zero):
                rows.append((e.page, e.generation, 0, 0, -1, "", 0, 0))  # forget any older entry
            else:
                seg, off, length = loc or ("", 0, 0)
                rows.append((e.page, e.generation, int(e.codec), e.checksum, d, seg, off, length))
        self.fp.put_many(rows)

    def remove(self, page: int, generation: int) -> None:
        self.fp.remove(page, generation)

    def clear(self) -> None:
        self.fp.clear()


class NativeFaults:
    """The native fault thread of one VM and the Python thread that drains what it served."""

    def __init__(self, session: VmSession, fp: Any, keys: list[bytes]) -> None:
        self.session = session
        self.fp = fp
        fp.set_mac(session.space, keys)
        self.mirror = NativeMirror(fp, session, keys)
        self._stop = threading.Event()
        self._drainer: threading.Thread | None = None
        m = session.metrics
        self._m_missing = m.faults.labels(session.vm_id, FaultKind.MISSING.value)
        self._m_restored = m.pages_restored.labels(session.vm_id)

    @classmethod
    def create(cls, session: VmSession) -> NativeFaults | None:
        """The native path for this VM, or None where it does not apply (no extension, the sim, a
        snapshot restore, a policy store the thread cannot read: S3, Redis over TLS; the thread
        verifies with that store's page MAC keys)."""
        b = session.backend
        if native.mod is None or not hasattr(native.mod, "FaultPath") or not isinstance(b, RealBackend):
            return None
        if session.restore is not None:
            return None  # a snapshot restore keeps its index entries: its own bookkeeping, in Python
        try:
            st = session.stores(session.policy.store)
        except TiermemError:
            return None
        if not servable(st) or not isinstance(st, LocalPageStore | RedisPageStore):
            return None
        fp = native.mod.FaultPath(b.uffd_fd, b.base, b.page_size, b.n_pages)
        return cls(session, fp, st.keyring.keys())

    def start(self) -> None:
        """Mirror the index, let the thread read the uffd, start draining."""
        b = self.session.backend
        assert isinstance(b, RealBackend)
        self.fp.enabled = self.session.policy.prefetch_pages <= 0
        self.session.index.attach_mirror(self.session.vm_id, self.mirror)
        b.attach_native(self.fp)
        self._drainer = threading.Thread(
            target=self._drain_loop, name=f"native-{self.session.vm_id}", daemon=True
        )
        self._drainer.start()

    def stop(self) -> None:
        """Stop the thread (idempotent; the backend's close stops it too) and drain what it served."""
        self._stop.set()
        self.fp.stop()
        if self._drainer is not None and self._drainer is not threading.current_thread():
            self._drainer.join(timeout=5)
        self.session.index.detach_mirror(self.session.vm_id, self.mirror)
        self.drain()

    def stats(self) -> dict[str, Any]:
        """The thread's counters (served, handed to Python, fallbacks by reason)."""
        out: dict[str, Any] = self.fp.stats()
        return out

    def _drain_loop(self) -> None:
        while not self._stop.wait(DRAIN_INTERVAL_S):
            try:
                self.fp.enabled = self.session.policy.prefetch_pages <= 0
                self.drain()
            except Exception:  # the loop must survive: without it the Python side stops learning
                log.exception("native fault drain failed", vm=self.session.vm_id)

    def drain(self) -> int:
        """Apply what the thread served to the Python side; returns the faults applied."""
        served = self.fp.drain()
        if not served:
            return 0
        s = self.session
        copied = [(p, g) for p, g, _, c in served if c]
        if copied:
            pages = [p for p, _ in copied]
            if s.tracking:  # the eviction algorithm's view of promotions (cleared at each close)
                with s.promoted_lock:
                    s.promoted.extend(pages)
            # The entry of the generation installed only (a re-evicted page keeps its new one);
            # the durable delete is queued, as on the Python path.
            restored = s.index.remove(s.vm_id, copied)
            with s.retired_lock:
                s.retired.extend(restored)
            b = s.backend
            if isinstance(b, RealBackend):
                b.installed_natively(pages)
            s.counters.faults_served += len(copied)
            s.counters.pages_restored += len(restored)
            s.counters.promotions.append((time.monotonic(), len(copied)))
            self._m_missing.inc(len(copied))
            self._m_restored.inc(len(restored))
        for _, _, ns, c in served:
            if c:
                s.metrics.fault_seconds.observe(ns / 1e9)
                s.fault_latency.add(ns / 1e3)
        return len(served)
