"""Guest workloads: one definition drives the sim, the process guest and the KVM guest.

A :class:`Workload` yields batches ``(pages: int64[], writes: bool[])`` from a
seeded ``np.random.Generator``; every guest applies a batch in order (a write
increments the page's counter, :mod:`tiermem.sim.content`) and records it in
:class:`ExpectedCounters`, so memory can be verified against what the guest last
wrote. Specs (``parse_workload``)::

    hotset:F[:rate=R][:w=W][:noise=N]   fixed hot set of F*n pages; each batch touches each hot
                                        page with probability R (default 1), plus N*hot random pages
    zipf:S[:w=W][:batch=B]              B accesses, page popularity ~ rank^-S
    phases:F[:period=P][:rate=R][:w=W]  a hot set of F*n pages that moves every P batches (default 50)
    scan[:w=W][:batch=B]                sequential sweep of guest memory, B pages per batch
    mix:W[:batch=B]                     uniform random accesses, a fraction W of them writes
    uniform[:w=W][:batch=B]             same as mix
    idle                                no accesses
    trace:PATH                          replay a trace file (tiermem.sim.trace), one tick per batch

``w`` (write fraction) defaults to 0.25; ``batch`` to n/64. Hot pages are spread
over the guest by a seeded bijection rank -> page, in O(1) memory, so fleet-scale
simulations stay cheap.
"""

from __future__ import annotations

import abc
import math
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from tiermem.errors import InvalidArgument
from tiermem.sim import content
from tiermem.sim.trace import Trace, TraceDir, load_trace

if TYPE_CHECKING:
    from tiermem.sim.kernel import SimKernel

__all__ = [
    "Batch",
    "ExpectedCounters",
    "HotSet",
    "Idle",
    "Phases",
    "Scan",
    "SimGuest",
    "TraceWorkload",
    "Uniform",
    "Workload",
    "Zipf",
    "parse_workload",
]

Batch = tuple[np.ndarray, np.ndarray]
"""(pages as int64, writes as bool), applied in order."""

DEFAULT_WRITES = 0.25


class Workload(abc.ABC):
    """A guest access pattern over ``n_pages`` pages."""

    kind = "abstract"
    finite = False
    """True when ``batches`` ends (a trace)."""

    def __init__(
        self, n_pages: int, *, seed: int = 0, writes: float = DEFAULT_WRITES, batch: int = 0
    ) -> None:
        if n_pages <= 0:
            raise InvalidArgument(f"workload needs a guest of at least one page, got {n_pages}")
        if not 0.0 <= writes <= 1.0:
            raise InvalidArgument(f"write fraction must be between 0 and 1, got {writes}")
        if batch < 0:
            raise InvalidArgument(f"batch must be > 0, got {batch}")
        self.n_pages = n_pages
        self.seed = seed
        self.writes = writes
        self.batch = batch or max(1, n_pages // 64)
        # A seeded bijection rank -> page: page = (rank * mult + shift) mod n, gcd(mult, n) = 1.
        g = np.random.default_rng([seed, 0x5EED])
        mult = int(g.integers(1, 1 << 30)) | 1
        while math.gcd(mult, n_pages) != 1:
            mult += 2
        self._mult, self._shift = mult % n_pages or 1, int(g.integers(0, n_pages))

    @property
    def spec(self) -> str:
        """A spec string that parses back to this workload."""
        return self.kind

    def spread(self, ranks: np.ndarray) -> np.ndarray:
        """Pages of popularity ranks 0.. (a seeded permutation of the guest)."""
        return (np.asarray(ranks, dtype=np.int64) * self._mult + self._shift) % self.n_pages

    def _writes(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.random(n) < self.writes if self.writes else np.zeros(n, dtype=bool)

    @abc.abstractmethod
    def make_batch(self, rng: np.random.Generator, index: int) -> Batch:
        """Batch number ``index`` drawn from ``rng``."""

    def hot_pages(self, index: int = 0) -> np.ndarray | None:
        """The pages batch ``index`` is built around (sorted), where the workload has such a set."""
        return None

    def batches(self, stream: int = 0, n_streams: int = 1) -> Iterator[Batch]:
        """Batches of one vCPU: independent streams for random workloads; a trace is split by page."""
        rng = np.random.default_rng([self.seed, stream])
        index = 0
        while True:
            yield self.make_batch(rng, index)
            index += 1


class HotSet(Workload):
    """A fixed hot set: ``fraction`` of the pages, each touched per batch with probability ``rate``."""

    kind = "hotset"

    def __init__(
        self,
        n_pages: int,
        fraction: float,
        *,
        rate: float = 1.0,
        noise: float = 0.0,
        seed: int = 0,
        writes: float = DEFAULT_WRITES,
    ) -> None:
        if not 0.0 < fraction <= 1.0:
            raise InvalidArgument(f"hot-set fraction must be in (0, 1], got {fraction}")
        if not 0.0 < rate <= 1.0:
            raise InvalidArgument(f"rate must be in (0, 1], got {rate}")
        if noise < 0:
            raise InvalidArgument(f"noise must be >= 0, got {noise}")
        super().__init__(n_pages, seed=seed, writes=writes)
        self.fraction, self.rate, self.noise = fraction, rate, noise
        self.hot = max(1, round(fraction * n_pages))

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.fraction}:rate={self.rate}:w={self.writes}:noise={self.noise}"

    def _hot_ranks(self, index: int) -> np.ndarray:
        return np.arange(self.hot, dtype=np.int64)

    def hot_pages(self, index: int = 0) -> np.ndarray | None:
        return np.sort(self.spread(self._hot_ranks(index)))

    def make_batch(self, rng: np.random.Generator, index: int) -> Batch:
        ranks = self._hot_ranks(index)
        if self.rate < 1.0:
            ranks = ranks[rng.random(len(ranks)) < self.rate]
        pages = self.spread(ranks)
        extra = round(self.noise * self.hot)
        if extra:
            pages = np.concatenate([pages, rng.integers(0, self.n_pages, extra)])
        pages = rng.permutation(pages)
        return pages, self._writes(rng, len(pages))


class Phases(HotSet):
    """A hot set that moves to fresh pages every ``period`` batches."""

    kind = "phases"

    def __init__(
        self,
        n_pages: int,
        fraction: float,
        *,
        period: int = 50,
        rate: float = 1.0,
        noise: float = 0.0,
        seed: int = 0,
        writes: float = DEFAULT_WRITES,
    ) -> None:
        if period < 1:
            raise InvalidArgument(f"period must be >= 1 batch, got {period}")
        super().__init__(n_pages, fraction, rate=rate, noise=noise, seed=seed, writes=writes)
        self.period = period

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.fraction}:period={self.period}:rate={self.rate}:w={self.writes}"

    def _hot_ranks(self, index: int) -> np.ndarray:
        phase = index // self.period
        return (np.arange(self.hot, dtype=np.int64) + phase * self.hot) % self.n_pages


class Zipf(Workload):
    """``batch`` accesses whose page popularity follows rank^-exponent (bounded, inverse-CDF sampled)."""

    kind = "zipf"

    def __init__(
        self, n_pages: int, exponent: float, *, seed: int = 0, writes: float = DEFAULT_WRITES, batch: int = 0
    ) -> None:
        if not 0.0 < exponent <= 10.0:
            raise InvalidArgument(f"zipf exponent must be in (0, 10], got {exponent}")
        super().__init__(n_pages, seed=seed, writes=writes, batch=batch)
        self.exponent = exponent

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.exponent}:w={self.writes}:batch={self.batch}"

    def make_batch(self, rng: np.random.Generator, index: int) -> Batch:
        u = rng.random(self.batch)
        n, s = float(self.n_pages), self.exponent
        # Inverse CDF of the continuous power law on [1, n + 1): rank r has weight ~ r^-s.
        if abs(s - 1.0) < 1e-9:
            x = np.exp(u * math.log(n + 1.0))
        else:
            x = ((math.pow(n + 1.0, 1.0 - s) - 1.0) * u + 1.0) ** (1.0 / (1.0 - s))
        ranks = np.minimum(x.astype(np.int64) - 1, self.n_pages - 1)
        return self.spread(ranks), self._writes(rng, self.batch)


class Scan(Workload):
    """A sequential sweep of guest memory in address order, ``batch`` pages per batch."""

    kind = "scan"

    @property
    def spec(self) -> str:
        return f"{self.kind}:w={self.writes}:batch={self.batch}"

    def make_batch(self, rng: np.random.Generator, index: int) -> Batch:
        pages = (np.arange(self.batch, dtype=np.int64) + index * self.batch) % self.n_pages
        return pages, self._writes(rng, self.batch)


class Uniform(Workload):
    """Uniform random accesses: the read/write mix workload."""

    kind = "mix"

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.writes}:batch={self.batch}"

    def make_batch(self, rng: np.random.Generator, index: int) -> Batch:
        return rng.integers(0, self.n_pages, self.batch, dtype=np.int64), self._writes(rng, self.batch)


class Idle(Workload):
    """A guest that touches nothing."""

    kind = "idle"

    def make_batch(self, rng: np.random.Generator, index: int) -> Batch:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)


class TraceWorkload(Workload):
    """Replay of a trace: one batch per tick (empty ticks included); finite."""

    kind = "trace"
    finite = True

    def __init__(self, trace: Trace) -> None:
        super().__init__(trace.n_pages, writes=0.0)
        self.trace = trace

    @property
    def spec(self) -> str:
        return f"trace:{self.trace.name}"

    def make_batch(self, rng: np.random.Generator, index: int) -> Batch:
        raise NotImplementedError("a trace is replayed with batches()")

    def batches(self, stream: int = 0, n_streams: int = 1) -> Iterator[Batch]:
        """Each tick's accesses; with several streams, stream i takes the pages with page % n == i."""
        for _, pages, writes in self.trace.by_tick():
            if n_streams > 1:
                mine = pages % n_streams == stream
                yield pages[mine], writes[mine]
            else:
                yield pages, writes


# --- spec parsing ----------------------------------------------------------------------------------
_KINDS = "hotset:F, zipf:S, phases:F, scan, mix:W, uniform, idle, trace:PATH"
_KEYS: dict[str, dict[str, type]] = {
    "hotset": {"rate": float, "w": float, "noise": float},
    "phases": {"rate": float, "w": float, "noise": float, "period": int},
    "zipf": {"w": float, "batch": int},
    "scan": {"w": float, "batch": int},
    "mix": {"batch": int},
    "uniform": {"w": float, "batch": int},
    "idle": {},
}
_POSITIONAL = {"hotset": "fraction", "phases": "fraction", "zipf": "exponent", "mix": "w"}


def parse_workload(spec: str, n_pages: int, seed: int = 0, traces: TraceDir | None = None) -> Workload:
    """Build a workload from a spec such as ``hotset:0.1:w=0.3``; InvalidArgument on a bad spec.

    ``traces``: where ``trace:PATH`` may be read from (a service passes its
    :class:`TraceDir`); None reads any path the local user can (the CLI's own files).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgument(f"empty workload spec; use one of {_KINDS}")
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if kind == "trace":
        if not rest:
            raise InvalidArgument("workload 'trace' needs a path: trace:/path/file.csv[.gz]")
        if traces is not None:
            return TraceWorkload(traces.load(rest, n_pages=n_pages or None))
        return TraceWorkload(load_trace(rest, n_pages=n_pages or None))
    if kind not in _KEYS:
        raise InvalidArgument(f"unknown workload {kind!r} in {spec!r}; use one of {_KINDS}")
    parts = rest.split(":") if rest else []
    values: dict[str, float | int] = {}
    if kind in _POSITIONAL:
        if not parts or "=" in parts[0]:
            raise InvalidArgument(f"workload {spec!r}: {kind} needs a {_POSITIONAL[kind]}, e.g. {kind}:0.1")
        values[_POSITIONAL[kind]] = _number(spec, _POSITIONAL[kind], parts.pop(0), float)
    for part in parts:
        key, eq, val = part.partition("=")
        if not eq or key not in _KEYS[kind]:
            allowed = ", ".join(f"{k}=" for k in _KEYS[kind]) or "no options"
            raise InvalidArgument(f"workload {spec!r}: unexpected {part!r} ({kind} takes {allowed})")
        values[key] = _number(spec, key, val, _KEYS[kind][key])
    w = float(values.get("w", DEFAULT_WRITES))
    batch = int(values.get("batch", 0))
    if kind in ("hotset", "phases"):
        hot = {"rate": float(values.get("rate", 1.0)), "noise": float(values.get("noise", 0.0))}
        if kind == "phases":
            return Phases(
                n_pages,
                float(values["fraction"]),
                period=int(values.get("period", 50)),
                seed=seed,
                writes=w,
                **hot,
            )
        return HotSet(n_pages, float(values["fraction"]), seed=seed, writes=w, **hot)
    if kind == "zipf":
        return Zipf(n_pages, float(values["exponent"]), seed=seed, writes=w, batch=batch)
    if kind == "scan":
        return Scan(n_pages, seed=seed, writes=w, batch=batch)
    if kind in ("mix", "uniform"):
        return Uniform(n_pages, seed=seed, writes=w, batch=batch)
    return Idle(n_pages, seed=seed, writes=w)


def _number(spec: str, key: str, text: str, typ: type) -> float | int:
    try:
        value = typ(text)
    except ValueError:
        raise InvalidArgument(f"workload {spec!r}: {key} must be {typ.__name__}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"workload {spec!r}: {key} must be finite, got {text!r}")
    return int(value) if typ is int else float(value)


# --- verification ----------------------------------------------------------------------------------
class ExpectedCounters:
    """What every page's counter must be, given the writes a guest issued (thread-safe)."""

    def __init__(self, n_pages: int) -> None:
        self.counts = np.zeros(n_pages, dtype=np.uint32)
        self._lock = threading.Lock()

    def apply(self, pages: np.ndarray, writes: np.ndarray | None) -> None:
        """Record a batch; duplicate pages count once per write."""
        if writes is None:
            return
        w = np.asarray(pages, dtype=np.int64)[np.asarray(writes, dtype=bool)]
        if len(w):
            with self._lock:
                np.add.at(self.counts, w, np.uint32(1))

    def mismatches(self, actual: np.ndarray) -> np.ndarray:
        """Pages whose ``actual`` counter differs from the expected one."""
        return np.flatnonzero(np.asarray(actual, dtype=np.uint32) != self.counts)


class SimGuest:
    """vCPU threads (or a deterministic ``step``) applying a workload to a :class:`SimKernel`."""

    def __init__(
        self,
        kernel: SimKernel,
        workload: Workload,
        *,
        vcpus: int = 1,
        seed: int = 0,
        interval_s: float = 0.01,
    ) -> None:
        if workload.n_pages > kernel.n_pages:
            raise InvalidArgument(f"workload covers {workload.n_pages} pages, guest has {kernel.n_pages}")
        if not 0 <= vcpus <= 1024:
            raise InvalidArgument(f"vcpus must be between 0 and 1024, got {vcpus}")
        self.kernel, self.workload, self.vcpus = kernel, workload, vcpus
        self.interval_s = interval_s
        """Pause between two batches of one vCPU thread (keeps idle CPUs idle)."""
        self.expected = ExpectedCounters(kernel.n_pages)
        self.accesses = 0
        self.batches_done = 0
        self._seed = seed
        self._steps = workload.batches(stream=seed * 1024, n_streams=1)
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._gate = threading.Condition()
        self._paused = 0
        self._busy = 0
        self.error: BaseException | None = None

    def _run_batch(self, pages: np.ndarray, writes: np.ndarray, tid: int) -> None:
        self.kernel.access_batch(pages, writes, tid)
        self.expected.apply(pages, writes)
        with self._gate:
            self.accesses += len(pages)
            self.batches_done += 1

    def step(self, n: int = 1) -> int:
        """Apply the next ``n`` batches in this thread (deterministic); returns the accesses made."""
        done = 0
        for _ in range(n):
            try:
                pages, writes = next(self._steps)
            except StopIteration:
                break
            self._run_batch(pages, writes, 1)
            done += len(pages)
        return done

    def start(self) -> None:
        """Start the vCPU threads."""
        if self._threads:
            return
        self._stop.clear()
        for i in range(self.vcpus):
            t = threading.Thread(target=self._vcpu, args=(i,), name=f"sim-vcpu-{i}", daemon=True)
            self._threads.append(t)
            t.start()

    def _vcpu(self, i: int) -> None:
        tid = 1000 + i
        try:
            for pages, writes in self.workload.batches(stream=self._seed * 1024 + i, n_streams=self.vcpus):
                with self._gate:
                    while self._paused and not self._stop.is_set():
                        self._gate.wait()
                    if self._stop.is_set():
                        return
                    self._busy += 1
                try:
                    self._run_batch(pages, writes, tid)
                finally:
                    with self._gate:
                        self._busy -= 1
                        self._gate.notify_all()
                if self.interval_s and self._stop.wait(self.interval_s):
                    return
        except BaseException as e:  # surfaced by stop()/verify(); a vCPU must not die silently
            self.error = e

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the vCPU threads (each finishes its current batch)."""
        self._stop.set()
        with self._gate:
            self._gate.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._threads = [t for t in self._threads if t.is_alive()]

    def verify(self) -> tuple[int, int]:
        """(pages checked, mismatches): every page read through the guest view, evicted ones faulted back.

        vCPU threads are paused (after their current batch) while it runs.
        """
        with self._gate:
            self._paused += 1
            while self._busy:
                self._gate.wait()
        try:
            k = self.kernel
            k.access_batch(np.arange(k.n_pages, dtype=np.int64), None, tid=1)
            bad, absent = k.compare(self.expected.counts)
            n_bad = len(bad)
            for p in absent.tolist():  # evicted again since: read each back through the guest view
                if k.read_page(p) != content.page_bytes(p, int(self.expected.counts[p]), k.page_size):
                    n_bad += 1
            return k.n_pages, n_bad
        finally:
            with self._gate:
                self._paused -= 1
                self._gate.notify_all()
