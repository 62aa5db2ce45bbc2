"""Firecracker snapshot restores: import, one restore socket per VM, lazy serving, prefault, purge.

Firecracker's handshake carries no VM id, so each restorable VM gets a handoff
socket of its own (``<restore_dir>/<vm_id>.sock``): the user gives Firecracker that
path as the UFFD ``backend_path``, and the socket tells the agent which snapshot
the process restores. The agent's shared handoff socket refuses Firecracker.

A restore is a MISSING-only session (``tracking`` False: ``RunCycle`` answers
FAILED_PRECONDITION) whose faults the ordinary fault server serves from the
snapshot's index entries (prefetch included), ``UFFDIO_ZEROPAGE`` for zero pages.
The entries are never consumed, so the snapshot can be restored again once the
Firecracker process exits. A monitor thread per restore waits for the first page
served, then optionally prefaults the rest in the background at a bounded rate,
and feeds the restore metrics.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from urllib.parse import parse_qsl, urlsplit

import structlog

from tiermem.agent.attach import refuse_firecracker
from tiermem.agent.index import VmRecord
from tiermem.agent.node import Agent
from tiermem.agent.restore_state import RestoreState
from tiermem.agent.session import VmSession
from tiermem.agent.snapshot import SnapshotInfo, import_snapshot, open_source, snapshot_meta, snapshot_space
from tiermem.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, TiermemError
from tiermem.handoff.listener import HandoffAttach, HandoffListener
from tiermem.model import Backend, EventKind, validate_id

__all__ = ["PREFAULT_TICK_S", "RestoreService"]

log = structlog.get_logger("tiermem.agent.restore")

PREFAULT_TICK_S = 0.05
"""The prefault installs one batch per tick: the rate is kept within a tick's batch."""
MAX_PREFAULT_BATCH = 256


class RestoreService:
    """The snapshots this agent can restore, and their restore sockets."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.dir = agent.settings.restore_dir()
        self._listeners: dict[str, HandoffListener] = {}
        self._importing: set[str] = set()
        self._lock = threading.Lock()
        self._monitors: dict[str, threading.Thread] = {}

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> RestoreService:
        """Open the restore socket of every VM with a complete snapshot in the index."""
        for rec in self.agent.index.vm_records():
            if "snapshot" in rec.meta and snapshot_meta(rec) is None:
                self._drop_partial(rec, str(rec.meta["snapshot"].get("store", "default")))
            elif snapshot_meta(rec) is not None:
                try:
                    self._open(rec.vm_id)
                except TiermemError as e:  # one bad path must not keep the agent down
                    log.error("restore socket not opened", vm=rec.vm_id, error=str(e))
        return self

    def _drop_partial(self, rec: VmRecord, store: str) -> None:
        # An import the previous agent process never finished (it crashed): never restorable.
        log.warning("dropping an unfinished snapshot import of a previous run", vm=rec.vm_id, store=store)
        with contextlib.suppress(TiermemError, OSError):
            self.agent.store(store).purge_vm(snapshot_space(self.agent.node_id, rec))
        self.agent.index.remove_vm(rec.vm_id)

    def close(self) -> None:
        """Stop every restore socket (the snapshots stay in their stores)."""
        with self._lock:
            listeners, self._listeners = dict(self._listeners), {}
        for lst in listeners.values():
            lst.stop()

    def socket_path(self, vm_id: str) -> str:
        """Where Firecracker connects to restore ``vm_id``."""
        return os.path.join(self.dir, f"{validate_id(vm_id, 'vm id')}.sock")

    def _open(self, vm_id: str) -> str:
        path = self.socket_path(vm_id)
        with self._lock:
            if vm_id in self._listeners:
                return path
            lst = HandoffListener(
                path, lambda att: self._on_attach(vm_id, path, att), firecracker_vm_id=lambda _pid: vm_id
            )
            self._listeners[vm_id] = lst.start()
        return path

    def _close_socket(self, vm_id: str) -> None:
        with self._lock:
            lst = self._listeners.pop(vm_id, None)
        if lst is not None:
            lst.stop()

    # --- import -------------------------------------------------------------------------------------
    def import_snapshot(
        self,
        vm_id: str,
        *,
        mem_file: str = "",
        mem_object: str = "",
        store: str = "",
        compression: str = "none",
        prefault_pages_per_s: float | None = None,
        prefetch_pages: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> SnapshotInfo:
        """Import a memory file for ``vm_id``, record it restorable, open its restore socket."""
        validate_id(vm_id, "vm id")
        rate = (
            self.agent.settings.restore_prefault_pages_per_s
            if prefault_pages_per_s is None
            else prefault_pages_per_s
        )
        if compression not in ("none", "zstd", "lz4"):
            raise InvalidArgument(f"compression must be none, zstd or lz4, got {compression!r}")
        if mem_object:
            self._check_endpoint(mem_object)
        source = open_source(mem_file, mem_object)
        page_store = self.agent.store(store or "default")
        with self._lock:
            if vm_id in self._importing or vm_id in self.agent.sessions:
                raise AlreadyExists(f"VM {vm_id} is attached or being imported on node {self.agent.node_id}")
            self._importing.add(vm_id)
        try:
            info = import_snapshot(
                self.agent.index,
                page_store,
                vm_id,
                source,
                node_id=self.agent.node_id,
                compression=compression,
                prefault_pages_per_s=rate,
                prefetch_pages=prefetch_pages,
                progress=progress,
            )
            try:
                path = self._open(vm_id)
            except BaseException:
                rec = self.agent.index.record(vm_id)
                with contextlib.suppress(TiermemError, OSError):
                    if rec is not None:
                        page_store.purge_vm(snapshot_space(self.agent.node_id, rec))
                self.agent.index.remove_vm(vm_id)
                raise
        finally:
            with self._lock:
                self._importing.discard(vm_id)
        self.agent.events.publish(
            EventKind.SNAPSHOT_IMPORTED,
            f"snapshot of {info.pages} pages imported from {info.source}",
            vm_id,
            pages=info.pages,
            zero_pages=info.zero_pages,
            stored_bytes=info.stored_bytes,
            store=info.store,
            socket=path,
        )
        return SnapshotInfo(
            info.vm_id, info.pages, info.zero_pages, info.stored_bytes, info.store, info.source, path
        )

    def _check_endpoint(self, mem_object: str) -> None:
        """An S3 object is read only from the endpoint of a configured S3 store: the agent signs the
        request with its own credentials, so a caller must not point it at any server it likes."""
        want = dict(parse_qsl(urlsplit(mem_object).query)).get("endpoint") or None
        allowed = {
            dict(parse_qsl(urlsplit(url).query)).get("endpoint") or None
            for url in self.agent.store_urls.values()
            if url.startswith("s3://")
        }
        if want not in allowed:
            shown = ", ".join(sorted(str(a or "AWS (no endpoint)") for a in allowed)) or "none"
            raise InvalidArgument(
                f"mem object endpoint {want or 'AWS (no endpoint)'} is not the endpoint of a "
                f"configured S3 store (configured: {shown})"
            )

    # --- a Firecracker process connects ------------------------------------------------------------
    def _on_attach(self, vm_id: str, path: str, att: HandoffAttach) -> None:
        if att.mode != "firecracker":
            raise FailedPrecondition(
                f"{path} restores VM {vm_id}'s snapshot for Firecracker; other VMMs hand "
                f"off on the agent's socket {self.agent.settings.handoff_path()}"
            )
        snap = snapshot_meta(self.agent.index.record(vm_id))
        if snap is None:
            refuse_firecracker(self.agent, att, path, f"VM {vm_id} has no complete snapshot on this node")
        backend = att.make_backend()
        try:
            want = int(snap["pages"])
            if backend.n_pages != want:
                refuse_firecracker(
                    self.agent,
                    att,
                    path,
                    f"the regions cover {backend.n_pages} pages of the "
                    f"snapshot file; VM {vm_id}'s imported file has {want}",
                )
            rate = float(snap.get("prefault_pages_per_s", 0.0))
            state = RestoreState(backend.n_pages, prefault_pages_per_s=rate)
            try:
                session = self.agent.attach_backend(
                    vm_id, Backend.UFFD, backend, tracking=False, restore=state
                )
            except AlreadyExists:
                refuse_firecracker(self.agent, att, path, f"VM {vm_id} is being restored by another process")
        except BaseException:
            backend.close()
            raise
        att.connection.on_close = lambda: self._finished(session)
        self.agent.events.publish(
            EventKind.RESTORE_STARTED,
            f"Firecracker pid {att.peer_pid} restores {vm_id}",
            vm_id,
            pid=att.peer_pid,
            prefault_pages_per_s=rate,
        )
        log.info("restore started", vm=vm_id, pid=att.peer_pid, pages=backend.n_pages, prefault=rate)
        t = threading.Thread(target=self._monitor, args=(session,), name=f"restore-{vm_id}", daemon=True)
        self._monitors[vm_id] = t
        t.start()

    def _finished(self, s: VmSession) -> None:
        """The Firecracker process went away: end the session, keep the snapshot for the next restore."""
        self.agent.end_session(s)
        t = self._monitors.pop(s.vm_id, None)
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        assert s.restore is not None
        summary = s.restore.summary()
        self.agent.events.publish(
            EventKind.RESTORE_FINISHED,
            f"restore of {s.vm_id} ended",
            s.vm_id,
            **{k: v for k, v in summary.items() if v is not None},
        )
        log.info("restore ended", vm=s.vm_id, **summary)

    # --- monitor: first fault, prefault, metrics ---------------------------------------------------------
    def _monitor(self, s: VmSession) -> None:
        r = s.restore
        assert r is not None
        m = self.agent.metrics
        pages = {how: m.restore_pages.labels(s.vm_id, how) for how in ("on_demand", "prefaulted", "zero")}
        read = m.restore_bytes_read.labels(s.vm_id)
        sent = {"on_demand": 0, "prefaulted": 0, "zero": 0, "bytes": 0}

        def push() -> None:
            with r.lock:
                now = {
                    "on_demand": r.on_demand,
                    "prefaulted": r.prefaulted,
                    "zero": r.zero_pages,
                    "bytes": r.bytes_read,
                }
            for k, v in now.items():
                if v > sent[k]:
                    (read if k == "bytes" else pages[k]).inc(v - sent[k])
                    sent[k] = v

        while not r.resumed.wait(0.1):
            if s.closing.is_set():
                return
        if r.first_fault_s is not None:
            m.restore_first_fault_seconds.observe(r.first_fault_s)
        try:
            if r.prefault_pages_per_s > 0:
                self._prefault(s, r, push)
            while not s.closing.wait(0.5):
                push()
        finally:
            push()

    def _prefault(self, s: VmSession, r: RestoreState, push: Callable[[], None]) -> None:
        """Install the pages not touched yet, in file order, at about ``prefault_pages_per_s``."""
        batch = max(1, min(MAX_PREFAULT_BATCH, int(r.prefault_pages_per_s * PREFAULT_TICK_S)))
        page = 0
        t0 = time.monotonic()
        sent = 0
        while page < r.n_pages and not s.closing.is_set():
            fs = self.agent.faults.get(s.vm_id)
            if fs is None:
                return
            with r.lock:
                todo = [p for p in range(page, min(page + batch * 4, r.n_pages)) if not r.done[p]][:batch]
            if not todo:
                page = min(page + batch * 4, r.n_pages)
                continue
            try:
                sent += fs.prefault(todo)
            except (OSError, TiermemError) as e:
                log.error("prefault stopped", vm=s.vm_id, error=str(e))
                return
            page = todo[-1] + 1
            push()
            ahead = sent / r.prefault_pages_per_s - (time.monotonic() - t0)  # bounded rate
            if ahead > 0 and s.closing.wait(ahead):
                return
        log.info("prefault done", vm=s.vm_id, pages=sent, seconds=round(time.monotonic() - t0, 3))

    # --- detach / purge ----------------------------------------------------------------------------------
    def is_snapshot(self, vm_id: str) -> bool:
        """True if ``vm_id`` holds an imported snapshot on this node."""
        rec = self.agent.index.record(vm_id)
        return rec is not None and "snapshot" in rec.meta

    def detach(self, vm_id: str, purge: bool) -> int:
        """Detach a VM; for a snapshot: refused unless ``purge`` (which deletes it) and no restore runs."""
        validate_id(vm_id, "vm id")
        if not self.is_snapshot(vm_id):
            return self.agent.detach(vm_id, purge)
        n = self.agent.index.count(vm_id)
        if not purge:
            raise FailedPrecondition(
                f"VM {vm_id} holds an imported snapshot ({n} stored pages) that Firecracker can "
                "restore again: detach with purge to delete it"
            )
        s = self.agent.sessions.get(vm_id)
        if s is not None and not s.backend.closed:
            raise FailedPrecondition(
                f"Firecracker is restoring VM {vm_id}: stop it before purging the snapshot"
            )
        self._close_socket(vm_id)
        if s is not None:
            self.agent.end_session(s)
        rec = self.agent.index.record(vm_id)
        if rec is None:
            raise NotFound(f"VM {vm_id} is not known to node {self.agent.node_id}")
        store = str(rec.meta["snapshot"].get("store", "default"))
        purged = 0
        try:
            purged = self.agent.store(store).purge_vm(snapshot_space(self.agent.node_id, rec))
        except NotFound:
            log.warning("snapshot store no longer configured; index entries dropped", vm=vm_id, store=store)
        self.agent.index.remove_vm(vm_id)
        self.agent.events.publish(EventKind.VM_DETACHED, f"snapshot of {vm_id} purged ({n} pages)", vm_id)
        return max(purged, n)
