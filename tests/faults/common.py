"""Shared helpers of the reliability suite: waiting, result records, data-safety checks, a loop thread."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import xxhash
from hypothesis import HealthCheck, settings

from tiermem.agent.index import IndexEntry, PageIndex
from tiermem.agent.node import Agent
from tiermem.errors import TiermemError
from tiermem.model import Event, EventKind
from tiermem.sim.kernel import SimKernel
from tiermem.sim.workloads import SimGuest
from tiermem.store.base import Codec, PageStore, StoredPage
from tiermem.store.pagemac import PageKeyring
from tiermem.store.payload import PayloadStore
from tiermem.store.space import store_space
from tiermem.store.url import open_store

T = TypeVar("T")

SOAK = os.environ.get("TIERMEM_SOAK") == "1"
"""Set by tests/faults/conftest.py when pytest runs with --soak."""


def fuzz_settings(examples: int, soak_examples: int | None = None) -> settings:
    """Hypothesis settings of the suite: modest example counts, no deadline; many more under --soak."""
    n = (soak_examples or examples * 10) if SOAK else examples
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=not SOAK,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


class LoopThread:
    """An asyncio loop on its own thread: run grpc.aio servers under synchronous (hypothesis) tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


# --- events ----------------------------------------------------------------------------------------
class EventLog:
    """Every event an agent publishes, from the moment it is attached."""

    def __init__(self, agent: Agent) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()
        agent.events.add_listener(self._add)

    def _add(self, ev: Event) -> None:
        with self._lock:
            self.events.append(ev)

    def kinds(self, vm_id: str = "") -> list[EventKind]:
        """Kinds seen (for one VM if given), in order."""
        with self._lock:
            return [e.kind for e in self.events if not vm_id or e.vm_id == vm_id]

    def of(self, kind: EventKind, vm_id: str = "") -> list[Event]:
        """Events of one kind."""
        with self._lock:
            return [e for e in self.events if e.kind is kind and (not vm_id or e.vm_id == vm_id)]


# --- results ---------------------------------------------------------------------------------------
def record(scenario: str, *, pages_verified: int, pages_lost: int, **figures: Any) -> None:
    """One scenario run's outcome: appended as JSON to $TIERMEM_RELIABILITY_LOG (docs/reliability.md)."""
    row = {
        "scenario": scenario,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "pages_verified": pages_verified,
        "pages_lost": pages_lost,
        **figures,
    }
    print("RELIABILITY " + json.dumps(row))
    path = os.environ.get("TIERMEM_RELIABILITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


# --- sim guests --------------------------------------------------------------------------------------
def sim_of(agent: Agent, vm_id: str) -> tuple[SimKernel, SimGuest]:
    """The sim kernel and guest of a sim VM attached with a workload."""
    s = agent.sessions[vm_id]
    assert isinstance(s.backend, SimKernel) and isinstance(s.guest, SimGuest)
    return s.backend, s.guest


def fill(guest: SimGuest, times: int = 1) -> None:
    """Write every page ``times`` times through the guest (so no page is a zero page), recorded for verify."""
    k = guest.kernel
    pages = np.tile(np.arange(k.n_pages, dtype=np.int64), times)
    writes = np.ones(len(pages), dtype=bool)
    k.access_batch(pages, writes, tid=7)
    guest.expected.apply(pages, writes)


# --- data-safety checks ------------------------------------------------------------------------------
def holes_of(agent: Agent, vm_id: str) -> set[int]:
    """Pages not backed by guest memory now (punched, or never touched)."""
    return set(np.flatnonzero(~agent.sessions[vm_id].backend.populated()).tolist())


def open_direct(url: str, name: str, data_dir: str | Path) -> PageStore:
    """Open an agent's store from outside the agent, with the agent's page keys (so its MACs verify)."""
    st = open_store(url, name=name)
    assert isinstance(st, PayloadStore)
    st.keyring = PageKeyring.load(Path(data_dir) / "page-keys.json")
    return st


def space_in(index: PageIndex, node_id: str, vm_id: str) -> str:
    """The store namespace of ``vm_id``'s current incarnation, from an agent's index."""
    rec = index.record(vm_id)
    assert rec is not None, f"{vm_id} is not in the index"
    return store_space(node_id, vm_id, str(rec.meta["incarnation"]))


def check_payloads(store: PageStore, vm_id: str, entries: Sequence[StoredPage]) -> int:
    """How many of ``entries`` cannot be read back and verified from ``store`` (one batch per 256)."""
    bad = 0
    nonzero = [e for e in entries if e.codec is not Codec.ZERO]
    for i in range(0, len(nonzero), 256):
        chunk = nonzero[i : i + 256]
        try:
            store.get_pages(vm_id, chunk)
        except TiermemError:
            for e in chunk:  # find which ones
                try:
                    store.get_pages(vm_id, [e])
                except TiermemError:
                    bad += 1
    return bad


def unbacked_punches(index: PageIndex, vm_id: str, holes: set[int]) -> list[int]:
    """Punched pages with no durable index entry: each one would be a lost page (invariant 1)."""
    return sorted(p for p in holes if index.get(vm_id, p) is None)


def entries_for(index: PageIndex, vm_id: str, pages: Sequence[int]) -> list[IndexEntry]:
    """Index entries of ``pages`` (all must exist)."""
    out = [index.get(vm_id, p) for p in pages]
    assert all(e is not None for e in out), "every page asked for must be indexed"
    return [e for e in out if e is not None]


class ServeLog:
    """Wraps a store's ``get_pages``: every (page, generation) served must always have the same bytes."""

    def __init__(self, store: PageStore) -> None:
        self.store = store
        self.digests: dict[tuple[int, int], set[int]] = {}
        self.calls = 0
        self._lock = threading.Lock()
        self._orig = store.get_pages

        def get_pages(vm_id: str, entries: Sequence[StoredPage]) -> list[bytes]:
            data = self._orig(vm_id, entries)
            with self._lock:
                self.calls += 1
                for e, d in zip(entries, data, strict=True):
                    self.digests.setdefault((e.page, e.generation), set()).add(xxhash.xxh3_64_intdigest(d))
            return data

        store.get_pages = get_pages  # type: ignore[method-assign]

    def served_differently(self) -> list[tuple[int, int]]:
        """(page, generation) pairs that were served with two different contents."""
        with self._lock:
            return [k for k, v in self.digests.items() if len(v) > 1]

    def restore(self) -> None:
        """Remove the wrapper."""
        self.store.get_pages = self._orig  # type: ignore[method-assign]


def rss_bytes(pid: int | str = "self", field: str = "VmRSS") -> int:
    """Resident memory of a process from /proc/PID/status: ``VmRSS`` (all), ``RssAnon`` (heap and anonymous
    mappings, without shared memory such as a guest memfd the process maps), ``RssShmem``, ``RssFile``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int | str = "self") -> dict[int, str]:
    """fd -> target of a process's open file descriptors."""
    out: dict[int, str] = {}
    d = Path(f"/proc/{pid}/fd")
    for p in d.iterdir():
        try:
            out[int(p.name)] = os.readlink(p)
        except OSError:
            continue
    return out
