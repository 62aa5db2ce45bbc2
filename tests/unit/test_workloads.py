"""Workloads: determinism, shapes, spec parsing, expected counters, and the SimGuest driver."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tiermem.errors import InvalidArgument
from tiermem.kernel import uapi
from tiermem.sim.content import page_bytes
from tiermem.sim.kernel import SimKernel
from tiermem.sim.trace import write_trace
from tiermem.sim.workloads import (
    ExpectedCounters,
    HotSet,
    Phases,
    SimGuest,
    TraceWorkload,
    Workload,
    parse_workload,
)

PS = 4096
N = 4096


def take(w: Workload, n: int, stream: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    it = w.batches(stream)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize(
    "spec",
    [
        "hotset:0.1",
        "hotset:0.05:rate=0.5:w=0.3:noise=0.2",
        "zipf:1.1",
        "zipf:0.8:batch=100",
        "phases:0.1:period=3",
        "scan",
        "mix:0.5",
        "uniform:w=0.1:batch=7",
        "idle",
    ],
)
def test_deterministic_per_seed_and_spec_round_trips(spec: str) -> None:
    a = take(parse_workload(spec, N, seed=5), 6)
    b = take(parse_workload(spec, N, seed=5), 6)
    for (pa, wa), (pb, wb) in zip(a, b, strict=True):
        assert pa.dtype == np.int64 and wa.dtype == bool and len(pa) == len(wa)
        assert pa.tolist() == pb.tolist() and wa.tolist() == wb.tolist()
        assert len(pa) == 0 or (pa.min() >= 0 and pa.max() < N)
    again = parse_workload(parse_workload(spec, N, seed=5).spec, N, seed=5)
    assert [p.tolist() for p, _ in take(again, 6)] == [p.tolist() for p, _ in a]
    if spec not in ("idle", "scan"):
        other = take(parse_workload(spec, N, seed=6), 6)
        assert [p.tolist() for p, _ in other] != [p.tolist() for p, _ in a]


def test_hotset_fraction_is_respected_and_covered_every_batch() -> None:
    w = parse_workload("hotset:0.1:w=0", N, seed=1)
    assert isinstance(w, HotSet)
    hot = w.hot_pages()
    assert hot is not None and len(hot) == round(0.1 * N) and len(np.unique(hot)) == len(hot)
    for pages, writes in take(w, 3):
        assert sorted(pages.tolist()) == hot.tolist()  # each hot page exactly once, shuffled
        assert not writes.any()
    assert not np.array_equal(hot, np.arange(len(hot)))  # spread over the guest


def test_hotset_rate_and_noise() -> None:
    w = parse_workload("hotset:0.2:rate=0.5:noise=1.0", N, seed=2)
    hot = set(w.hot_pages().tolist())  # type: ignore[union-attr]
    pages, _ = take(w, 1)[0]
    inside = [p for p in pages.tolist() if p in hot]
    assert 0.4 * len(hot) < len(set(inside)) < 0.6 * len(hot)
    assert len(pages) - len(inside) > 0.5 * len(hot)  # uniform noise lands mostly outside


def test_phases_move_the_hot_set() -> None:
    w = parse_workload("phases:0.1:period=2", N, seed=3)
    assert isinstance(w, Phases)
    h0, h1, h2 = (set(w.hot_pages(i).tolist()) for i in (0, 2, 4))  # type: ignore[union-attr]
    assert w.hot_pages(1).tolist() == sorted(h0)  # type: ignore[union-attr]
    assert not h0 & h1 and not h1 & h2
    batches = take(w, 3)
    assert set(batches[2][0].tolist()) == h1


def test_zipf_is_skewed() -> None:
    w = parse_workload("zipf:1.2:batch=20000", N, seed=4)
    pages, _ = take(w, 1)[0]
    counts = np.sort(np.bincount(pages, minlength=N))[::-1]
    assert counts[:40].sum() > 0.5 * len(pages)  # the top 1% of pages take most accesses
    assert (counts > 0).sum() > 200  # with a long tail


def test_scan_sweeps_in_order_and_wraps() -> None:
    w = parse_workload("scan:batch=1000:w=0", N, seed=0)
    seq = np.concatenate([p for p, _ in take(w, 5)])
    assert seq.tolist() == [i % N for i in range(5000)]


def test_mix_write_fraction_and_idle() -> None:
    _, writes = take(parse_workload("mix:0.3:batch=50000", N, seed=9), 1)[0]
    assert abs(writes.mean() - 0.3) < 0.02
    pages, writes = take(parse_workload("idle", N), 1)[0]
    assert len(pages) == 0 and len(writes) == 0


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "empty workload"),
        ("bogus", "unknown workload 'bogus'"),
        ("hotset", "needs a fraction"),
        ("hotset:x", "fraction must be float"),
        ("hotset:0", r"fraction must be in \(0, 1\]"),
        ("hotset:1.5", r"fraction must be in \(0, 1\]"),
        ("hotset:0.1:w=2", "write fraction"),
        ("hotset:0.1:rate=0", "rate"),
        ("hotset:0.1:period=3", "unexpected 'period=3'"),
        ("hotset:0.1:w", "unexpected 'w'"),
        ("zipf:-1", "exponent"),
        ("zipf:nan", "finite"),
        ("phases:0.1:period=0", "period"),
        ("phases:0.1:period=1.5", "period must be int"),
        ("scan:batch=-3", "batch"),
        ("scan:0.5", "unexpected '0.5'"),
        ("idle:w=0.1", "no options"),
        ("trace:", "needs a path"),
        ("trace:/nonexistent/x.csv", "cannot read"),
    ],
)
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match) as e:
        parse_workload(spec, N)
    assert "\n" not in str(e.value)


def test_bad_guest_size() -> None:
    with pytest.raises(InvalidArgument):
        parse_workload("hotset:0.1", 0)


def test_expected_counters_count_duplicates() -> None:
    e = ExpectedCounters(8)
    e.apply(np.array([1, 1, 1, 2, 3, 3]), np.array([True, True, False, True, True, True]))
    e.apply(np.array([7]), None)
    assert e.counts.tolist() == [0, 2, 1, 2, 0, 0, 0, 0]
    assert e.mismatches(np.array([0, 2, 1, 2, 0, 0, 0, 1])).tolist() == [7]


def test_trace_workload_replays_ticks_and_splits_streams(tmp_path: object) -> None:
    path = f"{tmp_path}/t.csv.gz"
    write_trace(path, np.array([0, 0, 2, 2, 2]), np.array([1, 2, 3, 4, 1]), np.array([1, 0, 1, 1, 0], bool))
    w = parse_workload(f"trace:{path}", 8)
    assert isinstance(w, TraceWorkload) and w.finite and w.n_pages == 8
    ticks = list(w.batches())
    assert [p.tolist() for p, _ in ticks] == [[1, 2], [], [3, 4, 1]]
    assert [x.tolist() for _, x in ticks] == [[True, False], [], [True, True, False]]
    odd = [p.tolist() for p, _ in w.batches(stream=1, n_streams=2)]
    assert odd == [[1], [], [3, 1]]
    with pytest.raises(InvalidArgument, match="out of range"):
        parse_workload(f"trace:{path}", 4)


# --- SimGuest ------------------------------------------------------------------------------------
def armed(n: int, synthetic: bool = False) -> SimKernel:
    k = SimKernel(n, synthetic=synthetic)
    k.api(uapi.UFFD_FEATURE_RWP | uapi.UFFD_FEATURE_RWP_ASYNC)
    k.register(k.base, k.size, uapi.UFFDIO_REGISTER_MODE_RWP | uapi.UFFDIO_REGISTER_MODE_MISSING)
    return k


@pytest.mark.parametrize("synthetic", [False, True])
def test_simguest_step_and_verify(synthetic: bool) -> None:
    k = armed(512, synthetic)
    g = SimGuest(k, parse_workload("zipf:1.0:w=0.5:batch=300", 512, seed=1))
    assert g.step(10) == 3000 and g.batches_done == 10
    assert k.counters().tolist() == g.expected.counts.tolist()
    assert g.verify() == (512, 0)
    k.io_write(7 * PS, page_bytes(7, int(g.expected.counts[7]) + 1))  # a write the guest never made
    assert g.verify() == (512, 1)


def test_simguest_verify_faults_evicted_pages_back() -> None:
    k = armed(64)
    g = SimGuest(k, parse_workload("mix:1.0:batch=200", 64, seed=2))
    g.step(3)
    store = {p: k.io_read(p * PS, PS) for p in range(0, 64, 3)}
    for p in store:
        k.punch_hole(p * PS, PS)
    k.set_fault_handler(lambda m: k.copy(m.address, store[k.page_of(m.address)]))
    assert g.verify() == (64, 0)
    assert k.stats.missing_faults == len(store)


def test_simguest_threads_with_a_fault_server_and_evictions() -> None:
    """vCPU threads run while another thread evicts cold pages in sync mode and serves faults."""
    n = 256
    k = armed(n, synthetic=True)
    g = SimGuest(k, parse_workload("phases:0.1:period=5:w=0.5", n, seed=3), vcpus=3, interval_s=0.001)
    store: dict[int, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    frozen = threading.Event()

    errors: list[BaseException] = []

    def serve() -> None:
        try:
            _serve()
        except BaseException as e:
            errors.append(e)
            k.close()  # fail fast: wakes every vCPU instead of leaving them blocked

    def _serve() -> None:
        while not stop.is_set():
            for m in k.read_messages(0.02):
                if m.flags & uapi.UFFD_PAGEFAULT_FLAG_RWP:
                    if not frozen.is_set():
                        k.rwprotect(m.address, PS, protect=False)
                    continue
                with lock:
                    data = store[k.page_of(m.address)]
                try:
                    k.copy(m.address, data)
                except FileExistsError:
                    pass  # two vCPUs faulted on the same page: two messages, one install

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    g.start()
    evicted = 0
    for _ in range(20):
        k.rwprotect(k.base, k.size, protect=True)
        stop.wait(0.005)
        frozen.set()
        k.set_mode(disable=uapi.UFFD_FEATURE_RWP_ASYNC)
        cold = k.pagemap_scan(
            k.base,
            k.base + k.size,
            category_mask=uapi.PAGE_IS_PRESENT | uapi.PAGE_IS_ACCESSED,
            category_inverted=uapi.PAGE_IS_ACCESSED,
        )
        for p in np.flatnonzero(cold.page_mask(k.base, k.base + k.size, PS)).tolist():
            data = k.io_read(p * PS, PS)
            with lock:
                store[p] = data
            k.punch_hole(p * PS, PS)
            k.wake(k.addr(p), PS)
            evicted += 1
        k.set_mode(enable=uapi.UFFD_FEATURE_RWP_ASYNC)
        frozen.clear()
    checked, bad = g.verify()  # while the vCPUs are running
    g.stop()
    stop.set()
    server.join(5)
    assert not errors and g.error is None and g.accesses > 0 and evicted > 0
    assert (checked, bad) == (n, 0)


def test_simguest_rejects_a_too_large_workload() -> None:
    with pytest.raises(InvalidArgument):
        SimGuest(armed(8), parse_workload("idle", 16))
