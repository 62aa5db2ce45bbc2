"""The node agent's domain object: every VM session on this host, its stores, index and events.

Nothing here knows about gRPC: ``service.py`` is a thin servicer over this class,
and ``server.py`` wires both together with the control-plane link and the
handoff listener. Blocking operations (cycles, drains) run on the caller's
thread; the servicer calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import sys
import threading
from collections.abc import Callable

import structlog

from tiermem.agent.cycle import CycleEngine
from tiermem.agent.faults import FaultServer
from tiermem.agent.index import IndexEntry, PageIndex, VmRecord
from tiermem.agent.metrics import AgentMetrics
from tiermem.agent.restore_state import RestoreState
from tiermem.agent.session import VmSession
from tiermem.config import AgentSettings
from tiermem.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tiermem.events import EventBus
from tiermem.fsmodes import private_dir
from tiermem.kernel.backend import KernelBackend
from tiermem.kernel.registry import local_vm_factory
from tiermem.model import (
    PAGE_SIZE,
    Backend,
    CycleMode,
    CycleReport,
    DrainProgress,
    EventKind,
    EvictionPolicy,
    VmState,
    VmStatus,
    policy_from_dict,
    policy_to_dict,
    validate_id,
)
from tiermem.store.base import PageStore
from tiermem.store.pagemac import PageKeyring
from tiermem.store.payload import PayloadStore
from tiermem.store.space import store_space
from tiermem.store.url import open_store

__all__ = ["Agent"]

log = structlog.get_logger(__name__)

MAX_SIM_BYTES = 64 * 1024**3
DRAIN_BATCH = 256
HOUSEKEEP_INTERVAL = 0.5
HOUSEKEEP_MAX_BACKOFF = 30.0


def _host_memory() -> int:
    """The host's physical memory in bytes (the default capacity)."""
    try:
        return max(int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")), PAGE_SIZE)
    except (OSError, ValueError):
        return MAX_SIM_BYTES


class Agent:
    """All VM sessions of one host."""

    def __init__(self, settings: AgentSettings, metrics: AgentMetrics | None = None) -> None:
        # A fault hops between threads (uffd reader -> worker -> the vCPU's wake-up). With CPython's
        # default 5 ms switch interval a busy thread (a cycle, another VM's faults) can hold the GIL
        # that long before the hop completes; 0.5 ms keeps fault service in the 100 µs range.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self.settings = settings
        self.node_id = validate_id(settings.node_id, "node id")
        self.capacity_bytes = settings.capacity_bytes or _host_memory()
        """Guest memory this node declares (never 0, so it never registers as unlimited)."""
        self.data_dir = private_dir(settings.data_dir)
        self.index = PageIndex(self.data_dir / "index.db", fsync=settings.fsync)
        self.keyring = PageKeyring.load(settings.page_key_path(), create=not settings.page_key_file)
        self.events = EventBus(self.node_id)
        self.metrics = metrics or AgentMetrics()
        self.metrics.watch_vms(self._gauge_snapshot)
        self.store_urls = settings.store_urls()
        self._stores: dict[str, PageStore] = {}
        self._stores_lock = threading.Lock()
        self.sessions: dict[str, VmSession] = {}
        self.engines: dict[str, CycleEngine] = {}
        self.faults: dict[str, FaultServer] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.autonomous = threading.Event()
        """Set while the agent runs cycles from local policies (no reachable control plane)."""
        if not settings.control_plane and settings.autonomous:
            self.autonomous.set()
        self._auto_threads: dict[str, threading.Thread] = {}
        self._auto_reports: list[CycleReport] = []
        self._auto_reports_lock = threading.Lock()
        self._housekeeper = threading.Thread(target=self._housekeep_loop, name="housekeeper", daemon=True)
        self._housekeeper.start()
        self._drop_orphaned_sim_vms()

    # --- stores ---------------------------------------------------------------------------------
    def store(self, name: str) -> PageStore:
        """The page store called ``name`` (opened on first use)."""
        with self._stores_lock:
            st = self._stores.get(name)
            if st is None:
                url = self.store_urls.get(name)
                if url is None:
                    raise NotFound(
                        f"unknown store {name!r}; configured: {', '.join(sorted(self.store_urls))}"
                    )
                st = open_store(url, name=name, page_size=PAGE_SIZE)
                if isinstance(st, PayloadStore):
                    st.keyring = self.keyring  # pages written by this agent verify after its restart
                self._stores[name] = st
            return st

    def known_stores(self) -> set[str]:
        """Configured store names."""
        return set(self.store_urls)

    # --- attach ---------------------------------------------------------------------------------------
    def attach_sim(
        self,
        vm_id: str,
        memory_bytes: int,
        policy: EvictionPolicy,
        labels: dict[str, str] | None = None,
        workload: str = "",
        synthetic: bool = False,
        vcpus: int = 1,
        seed: int = 0,
    ) -> VmStatus:
        """Create a simulated VM (guest memory in this process) and arm it."""
        validate_id(vm_id, "vm id")
        limit = min(MAX_SIM_BYTES, self.capacity_bytes)
        if memory_bytes <= 0 or memory_bytes % PAGE_SIZE or memory_bytes > limit:
            raise InvalidArgument(
                f"memory_bytes must be a positive multiple of {PAGE_SIZE} up to {limit} "
                f"(node {self.node_id}'s capacity or the sim limit)"
            )
        if vcpus < 0 or vcpus > 64:
            raise InvalidArgument("vcpus must be between 0 and 64")
        policy.validate(self.known_stores())
        create = local_vm_factory(Backend.SIM.value)
        with self._lock:
            if vm_id in self.sessions:
                raise AlreadyExists(f"VM {vm_id} is already attached")
            if self.index.count(vm_id):  # a VMM's pages waiting for its reattach (sim records go at start)
                raise FailedPrecondition(
                    f"VM {vm_id} has evicted pages waiting for its VMM to reattach: "
                    "purge them first (detach with purge)"
                )
            try:
                # traces only from the configured directory, with its byte cap (admin-only facility)
                backend, guest = create(
                    memory_bytes // PAGE_SIZE,
                    synthetic=synthetic,
                    workload=workload,
                    vcpus=vcpus,
                    seed=seed,
                    trace_dir=self.settings.trace_dir,
                    trace_max_bytes=self.settings.trace_max_bytes,
                )
            except MemoryError:
                raise FailedPrecondition(
                    f"not enough memory on node {self.node_id} for a {memory_bytes >> 20} MiB sim VM with real "
                    "contents; use synthetic contents or a smaller VM"
                ) from None
            self._retire_incarnation(vm_id)  # a sim VM of an earlier run is gone with its process
            s = self._new_session(
                vm_id,
                Backend.SIM,
                backend,
                policy,
                labels or {},
                meta={"workload": workload, "synthetic": synthetic},
            )
            s.guest = guest
            if guest is not None and vcpus > 0:
                guest.start()
            return s.status()

    def attach_backend(
        self,
        vm_id: str,
        kind: Backend,
        backend: KernelBackend,
        policy: EvictionPolicy | None = None,
        labels: dict[str, str] | None = None,
        tracking: bool = True,
        secret: str = "",
        fresh: bool = False,
        restore: RestoreState | None = None,
    ) -> VmSession:
        """Attach a VM whose armed backend arrived through the handoff socket (uffd/rwp).

        A VM's identity is its id plus an incarnation. Evicted pages of an earlier
        VMM are served only to a VMM that proves it is that VMM with the reattach
        ``secret`` this agent gave it (the same id and size are not proof: fleets
        reuse both). A plain attach over such pages is refused; ``fresh`` (an
        operator's decision) starts a new incarnation and queues the old pages for
        purging. The session's ``reattach_secret`` is the secret to hand this VMM.

        ``restore``: a Firecracker process restores the imported snapshot of ``vm_id`` (its own
        restore socket named it): the session serves the snapshot's incarnation, whose pages
        were imported, never an earlier VMM's memory.
        """
        validate_id(vm_id, "vm id")
        with self._lock:
            old = self.sessions.get(vm_id)
            if old is not None and old.state is not VmState.DISCONNECTED and not old.backend.closed:
                raise AlreadyExists(f"VM {vm_id} is already attached")
            rec = self.index.record(vm_id)
            if restore is not None:
                inc = rec.meta.get("incarnation") if rec is not None else None
                if rec is None or "snapshot" not in rec.meta or not isinstance(inc, str) or not inc:
                    raise FailedPrecondition(f"VM {vm_id} has no imported snapshot on node {self.node_id}")
                if old is not None:
                    self._close_session(old, drop_index=False)
                saved = rec.meta.get("policy")
                policy = policy or (policy_from_dict(saved) if isinstance(saved, dict) else EvictionPolicy())
                keep = {k: v for k, v in rec.meta.items() if k != "labels"}
                return self._new_session(
                    vm_id,
                    kind,
                    backend,
                    policy,
                    labels or {},
                    meta=keep,
                    tracking=tracking,
                    incarnation=inc,
                    restore=restore,
                )
            pages = self.index.count(vm_id) if rec is not None else 0
            proven = rec is not None and bool(secret) and _secret_matches(rec, secret)
            if pages and not proven and not fresh:
                why = "the reattach secret does not match" if secret else "this is a plain attach"
                raise FailedPrecondition(
                    f"VM {vm_id} has {pages} evicted pages of an earlier VMM and {why}: reattach with the secret "
                    "the agent gave that VMM, or purge them (detach with purge), or attach with --fresh to start "
                    "a new incarnation (the old pages are then purged)"
                )
            if old is not None:
                self._close_session(old, drop_index=False)
            if proven and rec is not None:
                incarnation = str(rec.meta["incarnation"])
            else:
                if rec is not None and pages:
                    log.warning(
                        "fresh incarnation; the old pages are queued for purging", vm=vm_id, pages=pages
                    )
                self._retire_incarnation(vm_id)
                rec = None
                incarnation = ""
            if policy is None:
                saved = rec.meta.get("policy") if rec else None
                policy = policy_from_dict(saved) if isinstance(saved, dict) else EvictionPolicy()
            keep = {k: v for k, v in rec.meta.items() if k not in ("labels",)} if rec else {}
            s = self._new_session(
                vm_id,
                kind,
                backend,
                policy,
                labels or {},
                meta=keep,
                tracking=tracking,
                incarnation=incarnation,
                secret=secret if proven else "",
            )
            if proven and pages:
                self.events.publish(
                    EventKind.VMM_RECONNECTED, f"VM {vm_id} reattached with {pages} evicted pages", vm_id
                )
            return s

    def _retire_incarnation(self, vm_id: str) -> None:
        """Forget a VM's incarnation; its stored pages (if any) are queued for the housekeeper to purge."""
        rec = self.index.record(vm_id)
        if rec is None:
            return
        if self.index.count(vm_id) or rec.meta.get("incarnation"):
            space = _space_of(self.node_id, rec)
            used = {e.store for e in self.index.entries(vm_id, self.index.evicted_pages(vm_id)) if e}
            saved = rec.meta.get("policy")
            if isinstance(saved, dict) and isinstance(saved.get("store"), str):
                used.add(saved["store"])
            self.index.add_orphans([(name, space) for name in sorted(used | {"default"})])
        self.index.remove_vm(vm_id)

    def _new_session(
        self,
        vm_id: str,
        kind: Backend,
        backend: KernelBackend,
        policy: EvictionPolicy,
        labels: dict[str, str],
        meta: dict[str, object],
        tracking: bool = True,
        incarnation: str = "",
        secret: str = "",
        restore: RestoreState | None = None,
    ) -> VmSession:
        if not incarnation:  # a new incarnation: 64 random bits, fleet-unique without coordination
            incarnation = secrets.token_hex(8)
            secret = secrets.token_hex(32)
            meta = {**meta, "incarnation": incarnation, "secret_sha256": _sha256(secret)}
        # A proven reattach keeps its secret: a new one could be lost with a reply the agent never
        # delivered (a crash right after the commit), and that would lock the VMM out of its own pages.
        self.index.add_vm(
            VmRecord(vm_id, kind.value, backend.n_pages, backend.page_size, {**meta, "labels": labels})
        )
        s = VmSession(
            vm_id=vm_id,
            backend_kind=kind,
            backend=backend,
            policy=policy,
            index=self.index,
            stores=self.store,
            events=self.events,
            metrics=self.metrics,
            node_id=self.node_id,
            incarnation=incarnation,
            labels=dict(labels),
            tracking=tracking,
            restore=restore,
        )
        s.reattach_secret = secret
        fs = FaultServer(s)
        self.faults[vm_id] = fs
        self.engines[vm_id] = CycleEngine(s, fs)
        self.sessions[vm_id] = s
        s.state = VmState.ARMED
        fs.start(native=self.settings.native_faults)
        if tracking:
            t = threading.Thread(target=self._auto_loop, args=(s,), name=f"auto-{vm_id}", daemon=True)
            self._auto_threads[vm_id] = t
            t.start()
        self.events.publish(
            EventKind.VM_ATTACHED, f"VM {vm_id} attached ({kind.value}, {backend.n_pages} pages)", vm_id
        )
        log.info("vm attached", vm=vm_id, backend=kind.value, pages=backend.n_pages)
        return s

    # --- lookups ---------------------------------------------------------------------------------------
    def session(self, vm_id: str) -> VmSession:
        """The session of ``vm_id`` (NotFound otherwise)."""
        validate_id(vm_id, "vm id")
        s = self.sessions.get(vm_id)
        if s is None:
            raise NotFound(f"VM {vm_id} is not attached to node {self.node_id}")
        return s

    def status(self, vm_id: str) -> VmStatus:
        """One VM's status."""
        return self.session(vm_id).status()

    def list_status(self) -> list[VmStatus]:
        """Every VM's status."""
        return [s.status() for s in list(self.sessions.values())]

    # --- policy and cycles ---------------------------------------------------------------------------
    def set_policy(self, vm_id: str, policy: EvictionPolicy) -> int:
        """Install a policy; it applies from the next cycle. Page ages are kept."""
        s = self.session(vm_id)
        policy.validate(self.known_stores())
        if policy.version and policy.version < s.policy.version:
            return s.policy.version  # a stale push from a slower path; keep the newer one
        changed = policy != s.policy
        s.policy = policy
        rec = self.index.record(vm_id)
        if rec is not None:
            rec.meta["policy"] = policy_to_dict(policy)
            self.index.add_vm(rec)
        if changed:
            self.events.publish(EventKind.POLICY_CHANGED, f"policy v{policy.version} installed", vm_id)
        return policy.version

    def run_cycle(
        self,
        vm_id: str,
        mode: CycleMode,
        interval_ms: int = 0,
        policy: EvictionPolicy | None = None,
        order_id: str = "",
    ) -> CycleReport:
        """Run one cycle now (blocking for the detection interval)."""
        s = self.session(vm_id)
        if order_id and order_id in s.recent_reports:
            return s.recent_reports[order_id]
        if interval_ms < 0 or interval_ms > EvictionPolicy.MAX_INTERVAL_MS:
            raise InvalidArgument("interval_ms out of range")  # before anything is installed
        if policy is not None:
            self.set_policy(vm_id, policy)
        s.require(VmState.ARMED)
        rep = self.engines[vm_id].run(mode, (interval_ms or s.policy.interval_ms) / 1000.0)
        if order_id:
            s.recent_reports[order_id] = rep
            while len(s.recent_reports) > 64:
                s.recent_reports.pop(next(iter(s.recent_reports)))
        return rep

    def _auto_loop(self, s: VmSession) -> None:
        """Autonomous mode: cycles from the local policy while no control plane drives this node."""
        engine = self.engines[s.vm_id]
        while not s.closing.is_set() and not self._stop.is_set():
            if not self.autonomous.is_set() or s.policy.paused or s.state is not VmState.ARMED:
                s.closing.wait(0.2)
                continue
            try:
                rep = engine.run(CycleMode.EVICT, s.policy.interval_ms / 1000.0)
                with self._auto_reports_lock:
                    self._auto_reports.append(rep)
                    del self._auto_reports[:-1000]  # bounded while the control plane is away
            except FailedPrecondition:
                s.closing.wait(0.2)
            except Exception as e:  # keep the loop alive; the cycle reported its own error
                log.error("autonomous cycle failed", vm=s.vm_id, error=str(e))
                s.closing.wait(1.0)

    def take_autonomous_reports(self) -> list[CycleReport]:
        """Reports of autonomous cycles not yet sent to the control plane."""
        with self._auto_reports_lock:
            out, self._auto_reports = self._auto_reports, []
        return out

    # --- drain, verify, detach -------------------------------------------------------------------------
    def drain(self, vm_id: str, progress: Callable[[DrainProgress], None] | None = None) -> DrainProgress:
        """Bring every evicted page back, then empty the store for this VM."""
        s = self.session(vm_id)
        if s.restore is not None:
            raise FailedPrecondition(
                f"VM {vm_id} restores a snapshot: its pages stay in the store for the next "
                "restore (prefault brings them in; detach with purge deletes them)"
            )
        fs = self.faults[vm_id]
        with s.cycle_lock:
            if s.backend.closed:
                raise FailedPrecondition(f"VM {vm_id} has no connected VMM; pages cannot be restored")
            s.state = VmState.DRAINING
            try:
                pages = self.index.evicted_pages(vm_id)
                prog = DrainProgress(vm_id, pages_total=len(pages))
                for i in range(0, len(pages), DRAIN_BATCH):
                    chunk = pages[i : i + DRAIN_BATCH]
                    entries = [e for e in self.index.entries(vm_id, chunk) if e is not None]
                    for store_name in sorted({e.store for e in entries}):
                        group = [e for e in entries if e.store == store_name]
                        data = fs.fetch(group, inline=False)
                        if data is None:
                            raise FailedPrecondition(f"VM {vm_id} is detaching; drain stopped")
                        res = fs.install([e.stored.page for e in group], data)
                        # Present pages are restored too: drain holds the cycle lock, so no eviction
                        # is about to punch them (after a crash the index may lag the memfd).
                        done = set(res.copied) | set(res.present)
                        restored = self.index.remove(
                            vm_id,
                            [(e.stored.page, e.stored.generation) for e in group if e.stored.page in done],
                        )
                        with s.retired_lock:
                            s.retired.extend(restored)
                        fs.wake(res)
                        prog.pages_restored += len(done)
                    self._emit_drain(s, prog, progress)
                prog.done = self.index.count(vm_id) == 0
                self._housekeep(s)
                self._emit_drain(s, prog, progress)
                return prog
            finally:
                s.state = VmState.ARMED

    def _emit_drain(
        self, s: VmSession, prog: DrainProgress, cb: Callable[[DrainProgress], None] | None
    ) -> None:
        self.events.publish(
            EventKind.DRAIN_PROGRESS,
            f"drain {prog.pages_restored}/{prog.pages_total}",
            s.vm_id,
            restored=prog.pages_restored,
            total=prog.pages_total,
        )
        if cb is not None:
            cb(DrainProgress(prog.vm_id, prog.pages_total, prog.pages_restored, prog.done))

    def verify(self, vm_id: str) -> tuple[int, int, bool]:
        """(pages checked, mismatches, supported) for VMs whose guest keeps expected contents."""
        s = self.session(vm_id)
        guest = s.guest
        if guest is None:
            return 0, 0, False
        checked, bad = guest.verify()
        return int(checked), int(bad), True

    def detach(self, vm_id: str, purge: bool = False) -> int:
        """Detach a VM: refused while pages are evicted, unless ``purge`` after the VM shut down."""
        s = self.session(vm_id)
        n = self.index.count(vm_id)
        if n and not purge:
            raise FailedPrecondition(
                f"VM {vm_id} has {n} evicted pages: drain it first, or detach with purge "
                "after the VM has shut down"
            )
        if n and purge and s.backend_kind is not Backend.SIM and not s.backend.closed:
            raise FailedPrecondition(f"VM {vm_id} is still running: shut it down before purging its pages")
        used = {e.store for e in self.index.entries(vm_id, self.index.evicted_pages(vm_id)) if e} | {
            s.policy.store
        }
        with self._lock:
            self._close_session(s, drop_index=True)
        purged = 0
        if purge:
            for name in sorted(used & self.known_stores()):
                purged += self.store(name).purge_vm(s.space)
        self.events.publish(
            EventKind.VM_DETACHED, f"VM {vm_id} detached" + (f", {n} pages purged" if purge else ""), vm_id
        )
        return max(purged, n if purge else 0)

    def end_session(self, s: VmSession) -> None:
        """Close a session and keep its index (a restore's snapshot outlives its Firecracker process)."""
        with self._lock:
            if self.sessions.get(s.vm_id) is s:
                self._close_session(s, drop_index=False)

    def _close_session(self, s: VmSession, drop_index: bool) -> None:
        s.closing.set()
        guest = s.guest
        if guest is not None:
            guest.stop()
        fs = self.faults.pop(s.vm_id, None)
        with contextlib.suppress(Exception):
            s.backend.close()
        if fs is not None:
            fs.stop()
        t = self._auto_threads.pop(s.vm_id, None)
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        self.engines.pop(s.vm_id, None)
        self.sessions.pop(s.vm_id, None)
        s.state = VmState.DETACHED
        try:
            self._housekeep(s)
        except Exception as e:  # the index keeps the queued removals; only payload garbage can leak here
            self.metrics.housekeeper_errors.labels("index_flush", type(e).__name__).inc()
            log.error("housekeeper: flush at close failed", vm=s.vm_id, error=str(e))
        if drop_index:
            self.index.remove_vm(s.vm_id)
        self.metrics.forget_vm(s.vm_id)

    def mark_disconnected(self, vm_id: str) -> None:
        """The VMM went away: release its uffd, memfd and mappings, keep the index and the session.

        The evicted pages stay indexed and stored: a VMM that reattaches (same id, new fds) is
        served again; otherwise an operator purges them with a detach.
        """
        s = self.sessions.get(vm_id)
        if s is None:
            return
        # No cycle lock: a cycle in flight fails on the closed backend and reports its error, instead
        # of holding the VMM's connection thread for a whole detection interval.
        s.state = VmState.DISCONNECTED
        fs = self.faults.pop(vm_id, None)
        if fs is None or fs.first_gone():  # reported now, not after in-flight faults finish into the void
            self.events.publish(EventKind.VMM_DISCONNECTED, f"VMM of {vm_id} disconnected", vm_id)
        with contextlib.suppress(Exception):
            s.backend.close()
        if fs is not None:
            fs.stop()

    # --- housekeeping ------------------------------------------------------------------------------------
    def _housekeep(self, s: VmSession) -> None:
        """Persist index removals, then delete the restored pages' payloads from their stores.

        Raises when the index cannot be written (ENOSPC, EIO): the removals stay queued in the
        index and the retired entries stay on the session, so the next pass retries both.
        """
        with s.retired_lock:
            retired, s.retired = s.retired, []
        if not retired:
            return
        try:
            self.index.flush()  # durable removal first: a crash leaves only orphaned payloads, never lost pages
        except BaseException:
            with s.retired_lock:
                s.retired[:0] = retired
            raise
        by_store: dict[str, list[IndexEntry]] = {}
        for e in retired:
            by_store.setdefault(e.store, []).append(e)
        for name, entries in by_store.items():
            try:
                self.store(name).delete_pages(s.space, [e.stored for e in entries])
            except Exception as e:  # retried at the next pass
                self.metrics.housekeeper_errors.labels("store_delete", type(e).__name__).inc()
                log.warning("store delete failed; will retry", vm=s.vm_id, store=name, error=str(e))
                with s.retired_lock:
                    s.retired.extend(entries)

    def _purge_orphans(self) -> None:
        """Purge namespaces no VM can use any more (a retired incarnation); each is retried until it succeeds."""
        for name, space in self.index.orphans():
            if name not in self.known_stores():
                self.index.drop_orphan(name, space)  # the store is no longer configured: nothing to reach
                continue
            self.store(name).purge_vm(space)
            self.index.drop_orphan(name, space)
            log.info("purged the pages of a retired incarnation", store=name, space=space)

    def housekeep_once(self) -> bool:
        """One housekeeper pass over every VM and the orphan queue; False if anything failed (and will be retried)."""
        ok = True
        for s in list(self.sessions.values()):
            try:
                self._housekeep(s)
            except Exception as e:
                ok = False
                self.metrics.housekeeper_errors.labels("index_flush", type(e).__name__).inc()
                log.error("housekeeper: index flush failed; will retry", vm=s.vm_id, error=str(e))
        try:
            self.index.flush()  # removals of VMs that detached meanwhile
            self._purge_orphans()
        except Exception as e:
            ok = False
            self.metrics.housekeeper_errors.labels("purge", type(e).__name__).inc()
            log.error("housekeeper: pass failed; will retry", error=str(e))
        return ok

    def _housekeep_loop(self) -> None:
        # Any error is logged, counted and retried with backoff (0.5 s doubling to 30 s); the loop never
        # dies, so queued removals and store garbage are handled as soon as the fault (a full disk) clears.
        delay = HOUSEKEEP_INTERVAL
        while not self._stop.wait(delay):
            try:
                ok = self.housekeep_once()
            except Exception as e:  # the housekeeper must outlive anything
                self.metrics.housekeeper_errors.labels("loop", type(e).__name__).inc()
                log.exception("housekeeper: unexpected error; will retry")
                ok = False
            delay = HOUSEKEEP_INTERVAL if ok else min(delay * 2, HOUSEKEEP_MAX_BACKOFF)

    def _drop_orphaned_sim_vms(self) -> None:
        # A sim VM's memory lived in the previous agent process; its evicted pages can never be restored.
        for rec in self.index.vm_records():
            if rec.backend == Backend.SIM.value:
                log.warning("dropping sim VM from a previous run", vm=rec.vm_id)
                self._retire_incarnation(rec.vm_id)  # its pages are purged by the housekeeper

    def _gauge_snapshot(self) -> list[tuple[str, int, int, int]]:
        out = []
        for s in list(self.sessions.values()):
            ev = s.evicted_count()
            out.append((s.vm_id, s.resident_count(), ev, s.working_set))
        return out

    def node_stats(self) -> dict[str, float]:
        """Totals for this node."""
        import resource

        sessions = list(self.sessions.values())
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "vms": len(sessions),
            "tracked_bytes": sum(s.n_pages * s.page_size for s in sessions),
            "evicted_bytes": sum(s.evicted_count() * s.page_size for s in sessions),
            "faults_served": sum(s.counters.faults_served for s in sessions),
            "store_errors": sum(s.counters.store_errors for s in sessions),
            "cpu_seconds": ru.ru_utime + ru.ru_stime,
            "rss_bytes": _rss_bytes(),
        }

    def close(self) -> None:
        """Stop every session (pages stay evicted and indexed) and the housekeeper."""
        self._stop.set()
        with self._lock:
            for s in list(self.sessions.values()):
                self._close_session(s, drop_index=False)
        self._housekeeper.join(timeout=5)
        self.events.close()
        self.index.close()
        for st in self._stores.values():
            with contextlib.suppress(Exception):
                st.close()


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _secret_matches(rec: VmRecord, secret: str) -> bool:
    want = rec.meta.get("secret_sha256")
    return isinstance(want, str) and hmac.compare_digest(want, _sha256(secret))


def _space_of(node_id: str, rec: VmRecord) -> str:
    inc = rec.meta.get("incarnation")
    return store_space(node_id, rec.vm_id, inc) if isinstance(inc, str) and inc else rec.vm_id


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except OSError:
        return 0
