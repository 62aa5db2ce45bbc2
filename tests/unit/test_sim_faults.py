"""Fault delivery and resolution on the sim: blocking vCPUs, MISSING/RWP messages, WAKE, DONTWAKE,
SET_MODE, close, the inline handler, contents in both modes, and the eviction race."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tiermem.kernel import uapi
from tiermem.sim.content import counter_of, page_bytes
from tiermem.sim.kernel import CORRUPT, SimKernel

RWP, RWP_ASYNC, TID = uapi.UFFD_FEATURE_RWP, uapi.UFFD_FEATURE_RWP_ASYNC, uapi.UFFD_FEATURE_THREAD_ID
MISSING, MODE_RWP = uapi.UFFDIO_REGISTER_MODE_MISSING, uapi.UFFDIO_REGISTER_MODE_RWP
F_RWP, F_WRITE = uapi.UFFD_PAGEFAULT_FLAG_RWP, uapi.UFFD_PAGEFAULT_FLAG_WRITE
PS = 4096
WAIT = 10.0  # generous bound for a join/read that must succeed; never a timing assertion


def armed(n: int = 8, *, sync: bool = True, mode: int = MODE_RWP | MISSING, **kw: bool) -> SimKernel:
    k = SimKernel(n, **kw)
    k.api(RWP | RWP_ASYNC | TID)
    k.register(k.base, k.size, mode)
    if sync:
        k.set_mode(disable=RWP_ASYNC)
    return k


class Vcpu(threading.Thread):
    """One guest access in a thread (it may block in the sim)."""

    def __init__(self, k: SimKernel, page: int, write: bool = False, tid: int = 42) -> None:
        super().__init__(daemon=True)
        self.k, self.page, self.write, self.tid = k, page, write, tid
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.k.access(self.page, self.write, self.tid)
        except BaseException as e:
            self.error = e

    def finish(self) -> None:
        self.join(WAIT)
        assert not self.is_alive(), "vCPU still blocked"
        assert self.error is None


def one_message(k: SimKernel) -> uapi.UffdMsg:
    msgs = k.read_messages(WAIT)
    assert len(msgs) == 1
    return msgs[0]


def test_sync_rwp_write_blocks_until_rwprotect_clear() -> None:
    k = armed()
    k.rwprotect(k.base, k.size, protect=True)
    v = Vcpu(k, 5, write=True)
    m = one_message(k)
    assert m.event == uapi.UFFD_EVENT_PAGEFAULT
    assert m.flags == F_RWP | F_WRITE and m.address == k.addr(5) and m.ptid == 42
    assert k.counters()[5] == 0 and v.is_alive()  # the write has not happened
    k.rwprotect(k.addr(5), PS, protect=False)
    v.finish()
    assert k.counters()[5] == 1
    assert k.read_messages(0) == []


def test_read_fault_flags_and_no_ptid_without_thread_id() -> None:
    k = SimKernel(4)
    k.api(RWP)
    k.register(k.base, k.size, MODE_RWP)
    k.rwprotect(k.base, k.size, protect=True)
    v = Vcpu(k, 1)
    m = one_message(k)
    assert m.flags == F_RWP and m.ptid == 0
    k.rwprotect(k.base, k.size, protect=False)
    v.finish()


def test_dontwake_clear_keeps_the_thread_until_wake() -> None:
    k = armed()
    k.rwprotect(k.base, k.size, protect=True)
    v = Vcpu(k, 2, write=True)
    one_message(k)
    k.rwprotect(k.addr(2), PS, protect=False, dontwake=True)
    assert k.read_messages(0.05) == [] and v.is_alive()
    k.wake(k.addr(2), PS)
    v.finish()
    assert k.counters()[2] == 1


def test_wake_without_resolution_refaults_with_a_new_message() -> None:
    k = armed()
    k.rwprotect(k.base, k.size, protect=True)
    v = Vcpu(k, 3)
    first = one_message(k)
    k.wake(k.base, k.size)
    second = one_message(k)  # the retried access faults again
    assert first == second
    k.rwprotect(k.base, k.size, protect=False)
    v.finish()
    assert k.stats.rwp_faults == 2


def test_an_unread_message_disappears_when_its_waiter_is_woken() -> None:
    k = armed()
    k.rwprotect(k.base, k.size, protect=True)
    k.set_fault_handler(None)
    v = Vcpu(k, 1)
    while not k.stats.rwp_faults:  # the fault is queued, not read
        threading.Event().wait(0.001)
    k.rwprotect(k.base, k.size, protect=False)
    v.finish()
    assert k.read_messages(0) == []


def test_missing_fault_on_punched_page_served_by_copy() -> None:
    k = armed()
    k.access_batch(np.array([4, 4, 4]), np.array([True, True, True]))
    saved = k.io_read(4 * PS, PS)
    assert counter_of(saved) == 3
    k.punch_hole(4 * PS, PS)
    assert k.io_read(4 * PS, PS) == bytes(PS) and not k.populated()[4]
    v = Vcpu(k, 4, write=True)
    m = one_message(k)
    assert m.flags == F_WRITE and m.address == k.addr(4)
    k.wake(k.addr(4), PS)  # WAKE alone: the access retries and faults MISSING again
    assert one_message(k).flags == F_WRITE
    assert k.copy(k.addr(4), saved) == PS
    v.finish()
    assert k.counters()[4] == 4 and k.read_page(4) == page_bytes(4, 4)


def test_copy_dontwake_then_wake_and_zeropage() -> None:
    k = armed()
    k.punch_hole(0, 2 * PS)
    a, b = Vcpu(k, 0, write=True), Vcpu(k, 1, write=True)
    msgs = k.read_messages(WAIT)
    while len(msgs) < 2:
        msgs += k.read_messages(WAIT)
    assert sorted(m.address for m in msgs) == [k.addr(0), k.addr(1)]
    k.copy(k.addr(0), page_bytes(0, 7), dontwake=True)
    k.zeropage(k.addr(1), PS, dontwake=True)
    assert a.is_alive() and b.is_alive()
    k.wake(k.base, 2 * PS)
    a.finish()
    b.finish()
    assert k.counters()[:2].tolist() == [8, 1]


def test_punched_page_without_missing_reads_zeroes() -> None:
    k = armed(mode=MODE_RWP)
    k.access(6, write=True)
    k.punch_hole(6 * PS, PS)
    k.set_fault_handler(lambda m: pytest.fail(f"unexpected fault {m}"))
    assert k.read_page(6) == bytes(PS)
    assert k.populated()[6] and k.stats.zero_fills == 1
    r = k.pagemap_scan(k.addr(6), k.addr(7), category_mask=uapi.PAGE_IS_ACCESSED)
    assert len(r.regions) == 1  # populated after any protect: reads as accessed


def test_switch_to_async_wakes_rwp_waiters_which_auto_resolve() -> None:
    k = armed()
    k.rwprotect(k.base, k.size, protect=True)
    v = Vcpu(k, 7, write=True)
    one_message(k)
    k.set_mode(enable=RWP_ASYNC)
    v.finish()
    assert k.counters()[7] == 1 and k.stats.async_resolved == 1
    assert k.read_messages(0) == []


def test_close_wakes_missing_waiters_which_zero_fill() -> None:
    k = armed()
    k.access(2, write=True)
    k.punch_hole(2 * PS, PS)
    v = Vcpu(k, 2)
    one_message(k)
    k.close()
    v.finish()
    assert k.read_page(2) == bytes(PS)  # no handler any more: the kernel maps a zero page
    assert k.read_messages(None) == []


def test_close_with_unread_messages_wakes_both_kinds_of_waiter() -> None:
    k = armed()
    k.rwprotect(k.base, k.size, protect=True)
    k.punch_hole(PS, PS)
    a, b = Vcpu(k, 0, write=True), Vcpu(k, 1, write=True)
    while k.stats.rwp_faults + k.stats.missing_faults < 2:  # both blocked, nothing read
        threading.Event().wait(0.001)
    k.close()
    a.finish()
    b.finish()
    assert k.counters()[:2].tolist() == [1, 1]


def test_read_messages_times_out_empty() -> None:
    k = armed()
    assert k.read_messages(0.01) == []


def test_unregister_resolves_and_wakes() -> None:
    k = armed()
    k.rwprotect(k.base, k.size, protect=True)
    v = Vcpu(k, 0, write=True)
    one_message(k)
    k.unregister(k.base, PS)
    v.finish()
    assert k.counters()[0] == 1


def test_access_batch_applies_earlier_accesses_before_a_fault() -> None:
    k = armed()
    k.rwprotect(k.addr(1), PS, protect=True)
    seen: list[int] = []

    def handler(m: uapi.UffdMsg) -> None:
        seen.append(int(k.counters()[0]))
        k.rwprotect(m.address, PS, protect=False)

    k.set_fault_handler(handler)
    k.access_batch(np.array([0, 1, 0, 0]), np.array([True, True, True, False]))
    assert seen == [1]  # the first write to page 0 happened before the fault on page 1
    assert k.counters()[:2].tolist() == [2, 1]


def test_access_batch_with_many_faults_and_duplicates() -> None:
    n = 3000
    k = armed(n, synthetic=True)
    rng = np.random.default_rng(3)
    evicted = rng.choice(n, 400, replace=False)
    for p in evicted:
        k.punch_hole(int(p) * PS, PS)
    served: list[int] = []

    def handler(m: uapi.UffdMsg) -> None:
        p = k.page_of(m.address)
        served.append(p)
        k.zeropage(m.address, PS)

    k.set_fault_handler(handler)
    pages = rng.integers(0, n, 20000)
    writes = rng.random(20000) < 0.5
    k.access_batch(pages, writes)
    assert sorted(served) == sorted(set(evicted.tolist()) & set(pages.tolist()))
    assert k.counters().tolist() == np.bincount(pages[writes], minlength=n).tolist()


def test_inline_handler_must_resolve() -> None:
    k = armed()
    k.rwprotect(k.base, k.size, protect=True)
    k.set_fault_handler(lambda m: None)
    with pytest.raises(RuntimeError, match="did not resolve"):
        k.access(0)


def test_inline_handler_may_evict_then_serve_the_missing_fault() -> None:
    k = armed()
    k.access(3, write=True)
    k.rwprotect(k.base, k.size, protect=True)
    saved: dict[int, bytes] = {}
    flags: list[int] = []

    def handler(m: uapi.UffdMsg) -> None:
        flags.append(m.flags)
        p = k.page_of(m.address)
        if m.flags & F_RWP:  # evict instead of resolving: the retry turns into a MISSING fault
            saved[p] = k.io_read(p * PS, PS)
            k.punch_hole(p * PS, PS)
            k.wake(m.address, PS)
        else:
            k.copy(m.address, saved.pop(p))

    k.set_fault_handler(handler)
    k.access(3, write=True)
    assert flags == [F_RWP | F_WRITE, F_WRITE]
    assert k.read_page(3) == page_bytes(3, 2)


def test_fault_delay_still_delivers_and_resolves() -> None:
    k = armed()
    k.fault_delay_s = 0.01
    k.rwprotect(k.base, k.size, protect=True)
    v = Vcpu(k, 1, write=True)
    m = one_message(k)
    k.rwprotect(m.address, PS, protect=False)
    v.finish()
    assert k.counters()[1] == 1


@pytest.mark.parametrize("synthetic", [False, True])
def test_contents_round_trip_and_corruption_is_detected(synthetic: bool) -> None:
    k = armed(4, synthetic=synthetic, sync=False)
    k.access_batch(np.array([0, 1, 1, 2]), np.array([True, True, True, False]))
    assert [k.io_read(p * PS, PS) for p in range(4)] == [page_bytes(p, c) for p, c in enumerate([1, 2, 0, 0])]
    assert k.io_read(PS + 8, 8) == (1).to_bytes(8, "little")  # unaligned I/O reads work
    expected = np.array([1, 2, 0, 0], dtype=np.uint32)
    assert [x.tolist() for x in k.compare(expected)] == [[], []]
    k.punch_hole(PS, PS)
    k.copy(k.addr(1), page_bytes(0, 2))  # the wrong page's bytes
    bad, absent = k.compare(expected)
    assert bad.tolist() == [1] and absent.tolist() == []
    if synthetic:
        assert k.counters()[1] == CORRUPT
    k.io_write(2 * PS, page_bytes(2, 5))
    assert k.compare(expected)[0].tolist() == [1, 2]
    k.punch_hole(3 * PS, PS)
    assert k.compare(expected)[1].tolist() == [3]


def test_io_write_to_a_hole_caches_it_unmapped_and_unprotectable() -> None:
    k = armed(4, sync=False)
    k.rwprotect(k.base, k.size, protect=True)
    k.punch_hole(0, PS)
    k.io_write(0, page_bytes(0, 9))  # like a pwrite: in the page cache, not in the guest mapping
    k.io_write(PS, page_bytes(1, 3))  # a protected page stays protected
    assert k.populated()[:2].tolist() == [True, True]
    hot = k.pagemap_scan(k.base, k.base + k.size, category_mask=uapi.PAGE_IS_ACCESSED)
    assert hot.regions.tolist() == []  # pagemap sees page 0 as a hole, not as hot
    present = k.pagemap_scan(k.base, k.base + k.size, category_mask=uapi.PAGE_IS_PRESENT)
    assert present.regions.tolist() == [(k.base + PS, k.base + 4 * PS, 0)]
    k.rwprotect(k.base, k.size, protect=True)  # still nothing to protect on page 0
    assert k.counters()[:2].tolist() == [9, 3]


def test_page_installed_after_the_freeze_is_writable_without_a_fault() -> None:
    """In sync mode only *protected* pages trap: a page the fault server installs after the hot
    scan (UFFDIO_COPY sets no uffd bit) is writable at once, so "not in the hot set" is not a
    safe eviction criterion by itself; "present and not accessed" in one scan is."""
    k = armed(2)
    k.access(0, write=True)
    k.punch_hole(0, PS)
    k.rwprotect(k.base, k.size, protect=True)
    hot = k.pagemap_scan(k.base, k.base + k.size, category_mask=uapi.PAGE_IS_ACCESSED)
    assert len(hot.regions) == 0
    k.copy(k.base, page_bytes(0, 1))
    k.set_fault_handler(lambda m: pytest.fail(f"unexpected fault {m}"))
    k.access(0, write=True)
    assert k.counters()[0] == 2


# --- the eviction race ------------------------------------------------------------------------------
class MiniAgent:
    """Just enough of the agent's v10 cycle and fault server to evict one page under a writing vCPU."""

    def __init__(self, k: SimKernel, *, buggy: bool = False, put_delay_s: float = 0.0) -> None:
        self.k, self.buggy, self.put_delay_s = k, buggy, put_delay_s
        self.store: dict[int, bytes] = {}
        self.frozen = False
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.raced = 0
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        k = self.k
        while not self.stop.is_set():
            for m in k.read_messages(0.05):
                p = k.page_of(m.address)
                with self.lock:
                    if m.flags & F_RWP:
                        if self.frozen:
                            self.raced += 1
                            if not self.buggy:
                                # Leave it blocked: SET_MODE(enable) wakes it to auto-resolve, or,
                                # if its page is evicted, the WAKE after the punch makes it MISSING.
                                continue
                        k.rwprotect(m.address, PS, protect=False)
                        continue
                    data = self.store.get(p)
                try:
                    k.copy(m.address, data) if data is not None else k.zeropage(m.address, PS)
                except OSError as e:
                    if e.errno != 17:  # EEXIST: someone else installed it
                        raise

    def cycle(
        self,
        gate: threading.Event | None = None,
        until: threading.Event | None = None,
        interval_s: float = 0.0,
    ) -> bool:
        """freeze -> hot scan -> evict page 0 if cold -> resume -> protect (the next detection).

        With ``gate``, the eviction stops after reading the page for the store, sets the
        gate and waits for the vCPU's fault to arrive (and, with ``until``, for that event).
        """
        k = self.k
        with self.lock:
            self.frozen = True
        k.set_mode(disable=RWP_ASYNC)
        # One atomic observation: resident and not accessed. "Not hot" alone is not enough: a page
        # the fault server installs after the scan (UFFDIO_COPY, no uffd bit) is writable at once.
        cold = k.pagemap_scan(
            k.base,
            k.base + k.size,
            category_mask=uapi.PAGE_IS_PRESENT | uapi.PAGE_IS_ACCESSED,
            category_inverted=uapi.PAGE_IS_ACCESSED,
        )
        evicted = False
        if cold.page_mask(k.base, k.base + k.size, PS)[0]:
            data = k.io_read(0, PS)
            if gate is not None:
                gate.set()
                while not self.raced:
                    threading.Event().wait(0.001)
                if until is not None:
                    assert until.wait(WAIT)
            if self.put_delay_s:
                self.stop.wait(self.put_delay_s)  # the store's round trip
            with self.lock:
                self.store[0] = data
            k.punch_hole(0, PS)
            k.wake(k.base, PS)
            evicted = True
        k.set_mode(enable=RWP_ASYNC)
        with self.lock:
            self.frozen = False
        k.rwprotect(k.base, k.size, protect=True)
        if interval_s:
            self.stop.wait(interval_s)  # detection interval
        return evicted

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)


@pytest.mark.parametrize("buggy", [False, True])
def test_race_write_during_eviction(buggy: bool) -> None:
    """The vCPU writes the page between the evictor's read and its punch.

    Correct agent: the RWP fault is left blocked, the WAKE after the punch turns it into
    a MISSING fault served from the store, then the write lands: nothing lost. Buggy
    agent (resolves RWP faults on pages being evicted): the write lands before the
    punch and is lost, and the check catches it.
    """
    k = armed(2, sync=False)
    agent = MiniAgent(k, buggy=buggy)
    k.access(0, write=True)
    k.rwprotect(k.base, k.size, protect=True)  # detection: page 0 stays cold
    gate, wrote = threading.Event(), threading.Event()
    ev = threading.Thread(target=agent.cycle, args=(gate, wrote if buggy else None), daemon=True)
    ev.start()
    assert gate.wait(WAIT)  # read for the store, not yet punched
    writer = Vcpu(k, 0, write=True)  # blocks: RWP fault in sync mode
    if buggy:
        writer.finish()
        wrote.set()
    ev.join(WAIT)
    writer.finish()
    agent.close()
    assert agent.raced == 1
    k.set_fault_handler(lambda m: k.copy(m.address, agent.store[0]))
    assert counter_of(k.read_page(0)) == (1 if buggy else 2)


def test_race_stress_writes_are_never_lost() -> None:
    """A vCPU writes page 0 in bursts while the agent cycles; whatever the interleaving, the page
    ends up holding exactly the number of writes the vCPU made."""
    k = armed(2, sync=False)
    agent = MiniAgent(k, put_delay_s=0.0005)
    writes = 0
    stop = threading.Event()
    pauses = np.random.default_rng(11).integers(0, 4, 100_000)

    def vcpu() -> None:
        nonlocal writes
        for pause in pauses:
            if stop.is_set():
                return
            k.access(0, write=True)
            writes += 1
            if pause:
                stop.wait(0.0004 * pause)

    t = threading.Thread(target=vcpu, daemon=True)
    t.start()
    evictions = sum(agent.cycle(interval_s=0.0005) for _ in range(400))
    stop.set()
    t.join(WAIT)
    agent.close()
    k.set_fault_handler(lambda m: k.copy(m.address, agent.store[0]))
    assert evictions > 0 and writes > 0
    assert counter_of(k.read_page(0)) == writes
