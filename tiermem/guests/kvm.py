"""The reference KVM VMM: real virtual machines whose guest memory tiermem manages.

A :class:`KvmVm` is one KVM guest (:mod:`tiermem.guests.kvm_machine`) running the
batch-runner program (:mod:`tiermem.guests.asm`) on one or more vCPU threads.
The VMM draws batches from the shared workload generators
(:func:`tiermem.sim.workloads.parse_workload`), posts them to each vCPU's
mailbox, and records every write in :class:`~tiermem.sim.workloads.ExpectedCounters`,
so :meth:`KvmVm.verify` can read every page back through the guest mapping and
check it against the content model (:mod:`tiermem.sim.content`).

Guest RAM is handed to the node agent exactly as a production VMM would: with an
agent socket, :meth:`KvmVm.start` creates a :class:`~tiermem.handoff.client.GuestMemory`
(memfd + MAP_SHARED mapping + userfaultfd), makes that mapping KVM memory slot 1
(``userspace_addr = GuestMemory.base``) and hands it off; the handoff thread then
serves the agent's zap requests inside this process. Without a socket the RAM is
a plain memfd mapping and nothing is tracked.

Figures in :class:`Progress` and :class:`KvmRunSummary`:

* accesses: guest loads and stores executed (entries of completed batches);
* faults: times a vCPU thread slept inside KVM_RUN (voluntary context switches,
  ``getrusage(RUSAGE_THREAD)``). A guest access that waits for the userfaultfd
  handler (MISSING or MINOR) sleeps exactly once; a contended GIL when KVM_RUN
  returns can add at most one per batch, so this is a slight upper bound. The
  agent's own counters are the authority on faults it served;
* resident: bytes the memfd holds (``st_blocks``), evicted pages excluded.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tiermem.errors import FailedPrecondition, InvalidArgument, TiermemError
from tiermem.guests import asm as g
from tiermem.guests.kvm_ioctl import kvm_unavailable_reason
from tiermem.guests.kvm_machine import GuestFault, KvmMachine, PlainRam
from tiermem.handoff.client import GuestMemory
from tiermem.model import PAGE_SIZE, validate_id
from tiermem.sim import content
from tiermem.sim.workloads import Batch, ExpectedCounters, Workload, parse_workload

__all__ = ["GuestFault", "KvmRunSummary", "KvmVm", "Progress", "require_kvm"]

_VERIFY_CHUNK_PAGES = 2048
_MAX_BAD_REPORTED = 20


def require_kvm() -> None:
    """Raise FailedPrecondition (one line, with alternatives) unless /dev/kvm is usable."""
    if why := kvm_unavailable_reason():
        raise FailedPrecondition(
            f"KVM is not available ({why}); run the process guest (python -m tiermem.guests.process)"
            " or use --backend sim"
        )


@dataclass(frozen=True)
class Progress:
    """A live sample of one VM's activity (rates over the last interval)."""

    vm_id: str
    elapsed_s: float
    batches: int
    accesses: int
    accesses_per_s: float
    faults: int
    faults_per_s: float
    resident_mib: float


@dataclass
class KvmRunSummary:
    """What a VM did over its lifetime so far, and its last verification."""

    vm_id: str
    memory_bytes: int
    vcpus: int
    workload: str
    seed: int
    agent_socket: str | None
    mode: str
    """``plain`` (no agent) or the handoff mode (``uffd``, ``rwp``)."""
    duration_s: float
    batches: int
    accesses: int
    reads: int
    writes: int
    accesses_per_s: float
    faults: int
    faults_per_s: float
    resident_mib: float
    zaps_served: int
    pages_checked: int
    mismatches: int
    bad_pages: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    def to_json(self) -> str:
        """The summary as one JSON object."""
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class _VcpuStats:
    batches: int = 0
    accesses: int = 0
    reads: int = 0
    writes: int = 0
    faults: int = 0


class KvmVm:
    """One KVM guest running a workload on ``vcpus`` vCPU threads, its RAM optionally under an agent."""

    def __init__(
        self, vm_id: str, memory_bytes: int, vcpus: int = 1, workload_spec: str = "zipf:1.1", seed: int = 0
    ) -> None:
        self.vm_id = validate_id(vm_id, "vm id")
        if memory_bytes <= 0 or memory_bytes % PAGE_SIZE or memory_bytes > g.MAX_RAM_BYTES:
            raise InvalidArgument(
                f"memory must be a positive multiple of {PAGE_SIZE} bytes up to"
                f" {g.MAX_RAM_BYTES >> 30} GiB, got {memory_bytes}"
            )
        if not 1 <= vcpus <= g.MAX_VCPUS:
            raise InvalidArgument(f"vcpus must be between 1 and {g.MAX_VCPUS}, got {vcpus}")
        self.memory_bytes = memory_bytes
        self.n_pages = memory_bytes // PAGE_SIZE
        self.vcpus = vcpus
        self.seed = seed
        self.workload: Workload = parse_workload(workload_spec, self.n_pages, seed)
        self.workload_spec = workload_spec
        self.expected = ExpectedCounters(self.n_pages)
        self.agent_socket: str | None = None
        self.mode = "plain"
        self.ram: PlainRam | GuestMemory | None = None
        self._machine: KvmMachine | None = None
        self._streams: list[Iterator[Batch]] = []
        self._stats = [_VcpuStats() for _ in range(vcpus)]
        self._gate = threading.Condition()
        self._paused = 0
        self._busy = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._run_time_s = 0.0
        self._run_started = 0.0
        self._verified: tuple[int, int, list[int]] = (0, 0, [])

    # --- lifecycle ---------------------------------------------------------------------------------
    def start(
        self,
        agent_socket: str | None = None,
        *,
        mode: str | None = None,
        timeout: float = 10.0,
        fresh: bool = False,
    ) -> None:
        """Create guest RAM, the VM and its vCPUs; hand the RAM to the agent at ``agent_socket`` if given.

        Raises FailedPrecondition without /dev/kvm, Unavailable if no agent answers.
        """
        if self._machine is not None:
            raise FailedPrecondition(f"VM {self.vm_id} is already started")
        require_kvm()
        ram: PlainRam | GuestMemory
        if agent_socket is None:
            ram = PlainRam(self.vm_id, self.memory_bytes)
        else:
            ram = GuestMemory.create(self.vm_id, self.memory_bytes, mode=mode)
        try:
            self._machine = KvmMachine(
                self.vm_id,
                ram.base,
                ram.size,
                self.vcpus,
                counter_offset=content.COUNTER_OFFSET,
                index_offset=content.PAGE_INDEX_OFFSET,
            )
            if isinstance(ram, GuestMemory):
                assert agent_socket is not None
                ram.handoff(agent_socket, timeout=timeout, fresh=fresh)
                self.mode = ram.mode
                self.agent_socket = agent_socket
        except BaseException:
            if self._machine is not None:
                self._machine.close()
                self._machine = None
            ram.close()
            raise
        self.ram = ram
        self._streams = [self.workload.batches(stream=i, n_streams=self.vcpus) for i in range(self.vcpus)]

    def close(self, timeout: float = 30.0) -> None:
        """Stop the vCPUs, close the VM, then release guest RAM (disconnecting from the agent).

        A vCPU blocked on a fault nobody serves for ``timeout`` seconds is abandoned
        (its fds and the system slot stay open) rather than waited for forever.
        """
        self.stop(timeout)
        if self._machine is not None:
            self._machine.close(timeout)
            self._machine = None
        if self.ram is not None:
            self.ram.close()
            self.ram = None

    def __enter__(self) -> KvmVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def machine(self) -> KvmMachine:
        """The KVM machine; FailedPrecondition before :meth:`start`."""
        if self._machine is None:
            raise FailedPrecondition(f"VM {self.vm_id} is not started")
        return self._machine

    # --- running ------------------------------------------------------------------------------------
    def _exec(self, vcpu: int, pages: np.ndarray, writes: np.ndarray, *, batches: int = 1) -> int:
        """Run (pages, writes) on ``vcpu`` in mailbox-sized chunks, in order; returns the read sum."""
        m = self.machine
        pages = np.asarray(pages, dtype=np.int64)
        writes = np.asarray(writes, dtype=bool)
        if pages.shape != writes.shape:
            raise InvalidArgument("pages and writes must have the same length")
        entries = m.encode(pages, writes)
        with self._gate:
            while self._paused:
                self._gate.wait()
            self._busy += 1
        st = self._stats[vcpu]
        total = 0
        try:
            for lo in range(0, max(len(entries), 1), g.MAX_BATCH):
                hi = min(lo + g.MAX_BATCH, len(entries))
                before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
                total += m.run_batch(vcpu, entries[lo:hi])
                st.faults += resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before
                # Recorded per chunk, so a later failure never leaves done writes unrecorded.
                self.expected.apply(pages[lo:hi], writes[lo:hi])
                n_w = int(writes[lo:hi].sum())
                st.writes += n_w
                st.reads += hi - lo - n_w
                st.accesses += hi - lo
            st.batches += batches
        finally:
            with self._gate:
                self._busy -= 1
                self._gate.notify_all()
        return total & 0xFFFF_FFFF

    def prefill(self) -> None:
        """Write every page once through the memfd, as a VMM restoring a memory image would.

        The guest then finds every page in the page cache (no MISSING fault on first
        touch) and every page holds data. Only before any guest activity.
        """
        if self.ram is None:
            raise FailedPrecondition(f"VM {self.vm_id} is not started")
        if self.accesses or self.expected.counts.any():
            raise FailedPrecondition(f"VM {self.vm_id} already ran: prefill only a fresh guest")
        step = 4096
        for first in range(0, self.n_pages, step):
            n = min(step, self.n_pages - first)
            data = memoryview(content.pages_bytes(np.arange(first, first + n), np.ones(n, dtype=np.uint32)))
            off = 0
            while off < len(data):
                off += os.pwrite(self.ram.memfd, data[off:], first * PAGE_SIZE + off)
        self.expected.counts[:] = 1

    def touch(self, pages: np.ndarray | list[int], *, write: bool = False, vcpu: int = 0) -> int:
        """Have vCPU ``vcpu`` read (or write) ``pages`` in order; returns the u32 sum of the counters read.

        Reading one page returns the counter the guest sees in it.
        """
        if not 0 <= vcpu < self.vcpus:
            raise InvalidArgument(f"vcpu must be between 0 and {self.vcpus - 1}, got {vcpu}")
        p = np.asarray(pages, dtype=np.int64)
        return self._exec(vcpu, p, np.full(len(p), write, dtype=bool))

    def run_batches(self, n: int) -> int:
        """Every vCPU runs its next ``n`` workload batches (in parallel); returns the accesses made."""
        if n < 0:
            raise InvalidArgument(f"batches must be >= 0, got {n}")
        before = self.accesses
        self._start_threads(lambda i: self._vcpu_loop(i, n))
        self._join_threads()
        return self.accesses - before

    def run(
        self,
        duration_s: float,
        on_progress: Callable[[Progress], None] | None = None,
        *,
        progress_interval_s: float = 1.0,
        verify: bool = True,
    ) -> KvmRunSummary:
        """Run the workload on every vCPU for ``duration_s`` seconds (or until a trace ends).

        ``on_progress`` gets a :class:`Progress` every ``progress_interval_s``.
        With ``verify`` (the default) every page is checked at the end.
        """
        if duration_s <= 0 or progress_interval_s <= 0:
            raise InvalidArgument("duration and progress interval must be > 0 seconds")
        self.machine  # noqa: B018 - raises before any thread starts if the VM is not started
        t0 = time.monotonic()
        self._start_threads(lambda i: self._vcpu_loop(i, None))
        last_t, last_acc, last_faults = t0, self.accesses, self.faults
        try:
            while True:
                now = time.monotonic()
                alive = [t for t in self._threads if t.is_alive()]
                if not alive or now >= t0 + duration_s or self._errors:
                    break
                alive[0].join(max(min(t0 + duration_s, last_t + progress_interval_s) - now, 0.001))
                now = time.monotonic()
                if now - last_t < progress_interval_s:
                    continue
                if on_progress is not None:
                    acc, faults, dt = self.accesses, self.faults, now - last_t
                    on_progress(
                        Progress(
                            self.vm_id,
                            now - t0,
                            self.batches,
                            acc,
                            (acc - last_acc) / dt,
                            faults,
                            (faults - last_faults) / dt,
                            self.resident_bytes() / 2**20,
                        )
                    )
                last_t, last_acc, last_faults = now, self.accesses, self.faults
        finally:
            self._stop.set()
            self._join_threads()
        if verify:
            self.verify()
        return self.summary()

    def _start_threads(self, target: Callable[[int], None]) -> None:
        if self._threads:
            raise FailedPrecondition(f"VM {self.vm_id} is already running")
        self.machine  # noqa: B018
        self._stop.clear()
        self._errors.clear()
        self._run_started = time.monotonic()
        for i in range(self.vcpus):
            t = threading.Thread(
                target=self._guarded, args=(target, i), name=f"{self.vm_id}-vcpu{i}", daemon=True
            )
            self._threads.append(t)
            t.start()

    def _guarded(self, target: Callable[[int], None], i: int) -> None:
        try:
            target(i)
        except BaseException as e:  # surfaced by _join_threads; a vCPU must not die silently
            self._errors.append(e)
            self._stop.set()

    def _vcpu_loop(self, i: int, n: int | None) -> None:
        # Workload batches are coalesced into mailbox-sized runs, in order: fewer
        # KVM exits and less Python per access (and less GIL noise in ``faults``).
        done = 0
        while not self._stop.is_set() and (n is None or done < n):
            parts: list[Batch] = []
            size = 0
            ended = False
            while size < g.MAX_BATCH and (n is None or done < n):
                try:
                    pages, writes = next(self._streams[i])
                except StopIteration:  # a finite trace ran out
                    ended = True
                    break
                parts.append((pages, writes))
                size += len(pages)
                done += 1
            if parts:
                pages = np.concatenate([p for p, _ in parts]) if len(parts) > 1 else parts[0][0]
                writes = np.concatenate([w for _, w in parts]) if len(parts) > 1 else parts[0][1]
                self._exec(i, pages, writes, batches=len(parts))
            if ended:
                return
            if not size:  # an idle guest: do not spin through empty batches
                self._stop.wait(0.01)

    def _join_threads(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0.0))
        stuck = [t.name for t in self._threads if t.is_alive()]
        self._run_time_s += time.monotonic() - self._run_started
        with self._gate:
            self._threads = []
            self._gate.notify_all()
        if stuck:
            raise TiermemError(
                f"VM {self.vm_id}: {', '.join(stuck)} still blocked in KVM_RUN (a fault nobody serves?)"
            )
        if self._errors:
            err = self._errors[0]
            self._errors = []
            raise err

    def stop(self, timeout: float = 30.0) -> None:
        """Stop a run in progress from another thread; returns once its vCPU threads are done."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        with self._gate:
            while self._threads and time.monotonic() < deadline:
                self._gate.wait(0.05)

    # --- verification and figures -------------------------------------------------------------------
    def verify(self) -> tuple[int, int]:
        """(pages checked, mismatches): every page read through the guest mapping and checked.

        Evicted pages fault back through the agent; vCPUs pause between batches
        while it runs. Every page becomes resident. The first bad pages are kept
        in ``summary().bad_pages``.
        """
        m = self.machine
        with self._gate:
            self._paused += 1
            while self._busy:
                self._gate.wait()
        try:
            buf = np.empty(_VERIFY_CHUNK_PAGES * PAGE_SIZE, dtype=np.uint8)
            bad: list[int] = []
            n_bad = 0
            for first in range(0, self.n_pages, _VERIFY_CHUNK_PAGES):
                n = min(_VERIFY_CHUNK_PAGES, self.n_pages - first)
                chunk = buf[: n * PAGE_SIZE]
                m.read_ram(first * PAGE_SIZE, chunk)
                ctr, valid = content.decode_pages(chunk, first, PAGE_SIZE)
                wrong = np.flatnonzero(~valid | (ctr != self.expected.counts[first : first + n]))
                n_bad += len(wrong)
                bad += (wrong[: _MAX_BAD_REPORTED - len(bad)] + first).tolist()
            self._verified = (self.n_pages, n_bad, bad)
            return self.n_pages, n_bad
        finally:
            with self._gate:
                self._paused -= 1
                self._gate.notify_all()

    def resident_bytes(self) -> int:
        """Bytes of guest RAM backed by memory now (the memfd's allocated blocks)."""
        if self.ram is None:
            return 0
        return os.fstat(self.ram.memfd).st_blocks * 512

    @property
    def accesses(self) -> int:
        """Guest accesses executed so far."""
        return sum(s.accesses for s in self._stats)

    @property
    def batches(self) -> int:
        """Batches (workload batches and touches) completed so far."""
        return sum(s.batches for s in self._stats)

    @property
    def faults(self) -> int:
        """Times a vCPU thread slept in KVM_RUN (each guest access that waited on a uffd fault; see module doc)."""
        return sum(s.faults for s in self._stats)

    def summary(self) -> KvmRunSummary:
        """Totals so far and the last verification."""
        secs = self._run_time_s
        checked, n_bad, bad = self._verified
        zaps = self.ram.zaps if isinstance(self.ram, GuestMemory) else 0
        return KvmRunSummary(
            vm_id=self.vm_id,
            memory_bytes=self.memory_bytes,
            vcpus=self.vcpus,
            workload=self.workload_spec,
            seed=self.seed,
            agent_socket=self.agent_socket,
            mode=self.mode,
            duration_s=round(secs, 3),
            batches=self.batches,
            accesses=self.accesses,
            reads=sum(s.reads for s in self._stats),
            writes=sum(s.writes for s in self._stats),
            accesses_per_s=self.accesses / secs if secs else 0.0,
            faults=self.faults,
            faults_per_s=self.faults / secs if secs else 0.0,
            resident_mib=self.resident_bytes() / 2**20,
            zaps_served=zaps,
            pages_checked=checked,
            mismatches=n_bad,
            bad_pages=list(bad),
        )
