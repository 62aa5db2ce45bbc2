"""One VM's session on the agent: its backend, policy, page ages, state machine and locks.

The cycle engine (``cycle.py``) and the fault server (``faults.py``) both work on
a session. They share two pieces of state, guarded by ``evict_lock``:

* ``frozen``: between the freeze (sync mode) and the end of the eviction decision,
  sync tracking faults are parked in ``deferred`` instead of being resolved —
  resolving one would let the guest write to a page the engine may be about to
  write out and punch (the v10 race);
* ``pending_evict``: pages chosen for eviction and not yet punched. A sync fault
  on one of them stays blocked; the batch's UFFDIO_WAKE after the punch makes the
  vCPU retry, which then takes the MISSING path and fetches the page back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tiermem import evict
from tiermem.agent.index import IndexEntry, PageIndex
from tiermem.agent.metrics import AgentMetrics
from tiermem.agent.restore_state import RestoreState
from tiermem.agent.stats import LatencyWindow, VmCounters
from tiermem.errors import FailedPrecondition, NotFound
from tiermem.events import EventBus
from tiermem.kernel.backend import KernelBackend
from tiermem.kernel.registry import LocalGuest
from tiermem.model import Backend, CycleReport, EvictionPolicy, StoreUsage, VmState, VmStatus, now_ms
from tiermem.store.base import PageStore
from tiermem.store.space import store_space

__all__ = ["VmSession"]


@dataclass
class VmSession:
    """Everything the agent holds for one VM."""

    vm_id: str
    backend_kind: Backend
    backend: KernelBackend
    policy: EvictionPolicy
    index: PageIndex
    stores: Callable[[str], PageStore]
    """Resolves a store name to the store (raises NotFound)."""
    events: EventBus
    metrics: AgentMetrics
    node_id: str = ""
    incarnation: str = ""
    """This VM's incarnation (tiermem.store.space): issued at first attach, proved on reattach."""
    labels: dict[str, str] = field(default_factory=dict)
    state: VmState = VmState.ATTACHED
    tracking: bool = True
    """False for MISSING-only VMs (Firecracker lazy restore): no cycles."""
    restore: RestoreState | None = None
    """Set when this session restores an imported snapshot: its index entries are never consumed."""
    counters: VmCounters = field(default_factory=VmCounters)
    fault_latency: LatencyWindow = field(default_factory=LatencyWindow)
    last_report: CycleReport | None = None
    working_set: int = 0
    guest: LocalGuest | None = None
    """The in-process guest of a locally created VM (the sim's workload runner), if any."""
    on_close: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reattach_secret = ""
        """The secret this VMM proves itself with on reattach (only its hash is persisted)."""
        self.space = (
            store_space(self.node_id, self.vm_id, self.incarnation) if self.incarnation else self.vm_id
        )
        """The store namespace of this incarnation: every store call uses it, never the bare id."""
        self._algorithm: evict.Algorithm | None = None
        self._algorithm_key: tuple[str, str] = ("", "")
        self.promoted: list[int] = []
        """Pages promoted since the last cycle close (the eviction algorithm learns from them)."""
        self.promoted_lock = threading.Lock()
        self.cycle_lock = threading.Lock()
        """One cycle or drain at a time."""
        self.evict_lock = threading.Lock()
        self.frozen = False
        self.deferred: list[tuple[int, bool]] = []
        """Parked sync tracking faults: (page, True for a MINOR fault)."""
        self.pending_evict = np.zeros(self.backend.n_pages, dtype=bool)
        self.closing = threading.Event()
        self.attached_at = time.monotonic()
        self.retired: list[IndexEntry] = []
        """Entries of pages back in guest memory, whose payloads the housekeeper deletes from the store."""
        self.retired_lock = threading.Lock()
        self.recent_reports: dict[str, CycleReport] = {}
        """Reports by scheduler order id, so a repeated order is not run twice."""

    def algorithm(self, policy: EvictionPolicy | None = None) -> evict.Algorithm:
        """The eviction algorithm of ``policy`` (default: the VM's) with its per-page state.

        A new one (fresh state) when the policy names another algorithm or other options.
        """
        p = policy or self.policy
        key = (p.algorithm, p.algorithm_options)
        if self._algorithm is None or key != self._algorithm_key:
            self._algorithm = evict.create(key[0], self.backend.n_pages, p.cold_after, key[1])
            self._algorithm_key = key
        self._algorithm.cold_after = p.cold_after  # the SLO's back-off changes it; the state is kept
        return self._algorithm

    # --- derived views -----------------------------------------------------------------------
    @property
    def n_pages(self) -> int:
        """Guest pages."""
        return self.backend.n_pages

    @property
    def page_size(self) -> int:
        """Bytes per page."""
        return self.backend.page_size

    def evicted_count(self) -> int:
        """Pages currently evicted (index entries; for a restore, the snapshot pages not installed yet)."""
        if self.restore is not None:  # the snapshot's entries stay: count what this restore still lacks
            with self.restore.lock:
                return int(np.count_nonzero(self.index.evicted_bitmap(self.vm_id) & ~self.restore.done))
        return self.index.count(self.vm_id)

    def resident_count(self) -> int:
        """Pages backed by memory now (0 once the VMM is gone)."""
        if self.backend.closed:
            return 0
        try:
            return int(np.count_nonzero(self.backend.populated()))
        except NotImplementedError:
            return self.n_pages - self.evicted_count()

    def store(self) -> PageStore:
        """The store named by the policy in force."""
        return self.stores(self.policy.store)

    def require(self, *states: VmState) -> None:
        """Raise FailedPrecondition unless the session is in one of ``states``."""
        if self.state not in states:
            raise FailedPrecondition(
                f"VM {self.vm_id} is {self.state.value}; needs {'/'.join(s.value for s in states)}"
            )

    def status(self) -> VmStatus:
        """A status snapshot."""
        evicted = self.evicted_count()
        p50, p99 = self.fault_latency.percentiles(50, 99)
        usage = StoreUsage()
        try:
            st = self.store()
            u = st.usage(self.space)
            usage = StoreUsage(
                store_name=st.name,
                store_kind=st.kind,
                store_url=st.url,
                pages=u.pages,
                zero_pages=u.zero_pages,
                stored_bytes=u.stored_bytes,
                logical_bytes=u.logical_bytes,
            )
        except (NotFound, Exception):  # status must not fail because a store is down
            usage = StoreUsage(store_name=self.policy.store)
        return VmStatus(
            vm_id=self.vm_id,
            node_id=self.node_id,
            state=self.state,
            backend=self.backend_kind,
            total_pages=self.n_pages,
            resident_pages=self.resident_count(),
            evicted_pages=evicted,
            working_set_pages=self.working_set,
            faults_served=self.counters.faults_served,
            minor_faults=self.counters.rwp_faults,
            promotion_rate=self.counters.promotion_rate(evicted),
            store_usage=usage,
            cycles=self.counters.cycles,
            page_size=self.page_size,
            labels=dict(self.labels),
            policy=self.policy,
            fault_p50_us=int(p50),
            fault_p99_us=int(p99),
            updated_unix_ms=now_ms(),
            incarnation=self.incarnation,
        )
