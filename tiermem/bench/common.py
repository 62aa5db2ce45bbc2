"""Shared pieces of the benchmark scenarios: percentiles, ratios, stores to run on, an in-process agent,
a process guest driven over stdin/stdout, and the raw baselines the scenarios measure in the same run.

Every scenario returns a JSON-able dict; ``tiermem bench`` prints it as tables
or JSON. Nothing here asserts a timing: goals are reported as met or missed.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tiermem.errors import ConfigurationError, FailedPrecondition
from tiermem.model import PAGE_SIZE

__all__ = [
    "GUEST_MODES",
    "GuestDriver",
    "StoreTarget",
    "bench_agent",
    "cpu_seconds",
    "pages_spec",
    "pct",
    "rate",
    "ratio",
    "raw_copy_latencies",
    "raw_get_latencies",
    "require_uffd",
    "store_targets",
]


def pct(samples_us: Sequence[float] | np.ndarray, *qs: float) -> list[float]:
    """Percentiles (0-100) of ``samples_us``, rounded to 0.1; zeros when empty."""
    data = np.asarray(samples_us, dtype=np.float64)
    if data.size == 0:
        return [0.0 for _ in qs]
    return [round(float(v), 1) for v in np.percentile(data, qs)]


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded to 3 places, or None when either is missing or ``b`` is 0."""
    return round(a / b, 3) if a is not None and b else None


def rate(pages: int, seconds: float, page_size: int = PAGE_SIZE) -> dict[str, float]:
    """Throughput of ``pages`` in ``seconds``: pages/s and MB/s (decimal)."""
    s = max(seconds, 1e-9)
    return {
        "pages": pages,
        "seconds": round(seconds, 4),
        "pages_per_s": round(pages / s, 1),
        "mb_per_s": round(pages * page_size / s / 1e6, 2),
    }


def cpu_seconds() -> float:
    """CPU seconds (user + system) used by this process so far, every thread included."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


GUEST_MODES = ("auto", "uffd", "rwp")
"""How a scenario's process guests register their memory: ``auto`` follows the kernel probe."""


def require_uffd(mode: str = "auto") -> None:
    """FailedPrecondition with the probe's reason unless real userfaultfd (and RWP for ``rwp``) works here."""
    from tiermem.kernel.probe import probe_host

    rep = probe_host()
    need = "rwp" if mode == "rwp" else "uffd"
    if not rep.backends.get(need):
        what = "userfaultfd RWP (Linux 7.3+)" if need == "rwp" else "real userfaultfd"
        raise FailedPrecondition(f"this scenario needs {what}: {rep.reasons.get(need, 'unavailable')}")


# --- stores --------------------------------------------------------------------------------------
class StoreTarget:
    """One store a scenario runs against: a label (local, redis, s3) and its URL."""

    def __init__(self, label: str, url: str) -> None:
        self.label, self.url = label, url

    def __repr__(self) -> str:
        return f"StoreTarget({self.label!r}, {self.url!r})"


def _label(url: str) -> str:
    scheme = url.split(":", 1)[0]
    return {"file": "local", "rediss": "redis"}.get(scheme, scheme)


@contextlib.contextmanager
def store_targets(
    urls: Sequence[str] = (), spawn: Sequence[str] = (), *, local: bool = True, tmp: Path | None = None
) -> Iterator[list[StoreTarget]]:
    """The stores to benchmark: a fresh local store (unless ``local`` is False), the servers started
    for ``spawn`` (``redis``, ``s3``: stopped on exit) and the given URLs, in that order."""
    from tiermem.bench.servers import spawn as spawn_server

    with contextlib.ExitStack() as stack:
        out: list[StoreTarget] = []
        if local:
            root = tmp or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiermem-bench-")))
            out.append(StoreTarget("local", f"file://{root / 'pages'}"))
        for kind in spawn:
            if kind not in ("redis", "s3"):
                raise ConfigurationError(f"--spawn takes redis or s3, not {kind!r}")
            out.append(StoreTarget(kind, stack.enter_context(spawn_server(kind))))
        out.extend(StoreTarget(_label(u), u) for u in urls)
        if not out:
            raise ConfigurationError("no store to benchmark: give --store URL or --spawn redis|s3")
        yield out


# --- the agent and a process guest ------------------------------------------------------------------
@contextlib.contextmanager
def bench_agent(
    stores: dict[str, str], *, tmp: Path | None = None, fsync: bool = True, native_faults: bool = True
) -> Iterator[Any]:
    """An in-process node agent (autonomous cycles off) listening on a handoff socket in a temp dir."""
    from tiermem.agent.attach import start_handoff
    from tiermem.agent.node import Agent
    from tiermem.config import AgentSettings

    with contextlib.ExitStack() as stack:
        root = tmp or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tiermem-bench-agent-")))
        settings = AgentSettings(
            node_id="bench",
            data_dir=str(root / "agent"),
            autonomous=False,
            fsync=fsync,
            stores=stores,
            handoff_socket=str(root / "handoff.sock"),
            native_faults=native_faults,
        )
        agent = Agent(settings)
        stop = start_handoff(agent)
        try:
            yield agent
        finally:
            if stop is not None:
                stop()
            agent.close()


class GuestDriver:
    """``python -m tiermem.guests.process --control`` as a child: one command line, one JSON answer."""

    def __init__(
        self,
        socket_path: str,
        vm_id: str,
        memory: str,
        *extra: str,
        timeout: float = 30.0,
        mode: str = "auto",
    ) -> None:
        if mode not in GUEST_MODES:
            raise ConfigurationError(f"guest mode must be one of {', '.join(GUEST_MODES)}, got {mode!r}")
        # auto: the guest probes the kernel (rwp where it has RWP, else uffd), as a real VMM would
        forced = [] if mode == "auto" else ["--mode", mode]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tiermem.guests.process",
                "--socket",
                socket_path,
                "--vm-id",
                vm_id,
                "--memory",
                memory,
                *forced,
                "--control",
                "--timeout",
                str(timeout),
                *extra,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.vm_id = vm_id
        self.ready = self._read(timeout + 10)
        if not self.ready.get("ready"):
            self.close()
            raise FailedPrecondition(
                f"process guest {vm_id} did not attach: {self.ready.get('error', self.ready)}"
            )
        self.mode: str = str(self.ready.get("mode", ""))
        """The mode the guest registered its memory in (``uffd`` or ``rwp``)."""

    def _read(self, timeout: float) -> dict[str, Any]:
        out: list[str] = []
        t = threading.Thread(
            target=lambda: out.append(self.proc.stdout.readline() if self.proc.stdout else ""), daemon=True
        )
        t.start()
        t.join(timeout)
        if not out or not out[0]:
            err = ""
            if self.proc.poll() is not None and self.proc.stderr is not None:
                err = self.proc.stderr.read()[-500:]
            raise FailedPrecondition(
                f"process guest {self.vm_id}: no answer in {timeout:.0f} s {err}".strip()
            )
        data: dict[str, Any] = json.loads(out[0])
        return data

    def cmd(self, line: str, timeout: float = 300.0) -> dict[str, Any]:
        """Send one command; its answer (FailedPrecondition on an error answer)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ans = self._read(timeout)
        if "error" in ans:
            raise FailedPrecondition(f"process guest {self.vm_id}: {line.split()[0]} failed: {ans['error']}")
        return ans

    def close(self) -> None:
        """Quit (or kill) the guest."""
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.cmd("quit", timeout=5)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()


def settled_count(read: Callable[[], int], quiet_s: float = 0.05, limit_s: float = 2.0) -> int:
    """``read()`` once it stops changing: the agent counts a fault just after waking the guest, so the
    guest's last load can return before the last fault is counted."""
    value, since, end = read(), time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < end and time.monotonic() - since < quiet_s:
        time.sleep(0.005)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
    return value


def wait_attached(agent: Any, vm_id: str, timeout: float = 10.0) -> Any:
    """The agent's session of ``vm_id`` once the handoff is done."""
    deadline = time.monotonic() + timeout
    while vm_id not in agent.sessions:
        if time.monotonic() > deadline:
            raise FailedPrecondition(f"{vm_id} never attached to the bench agent")
        time.sleep(0.01)
    return agent.sessions[vm_id]


def pages_spec(pages: Sequence[int] | np.ndarray) -> str:
    """The process guest's PAGES argument, in the given order (``1,5,7``; runs of +1 as ``a-b``)."""
    ps = [int(p) for p in pages]
    out: list[str] = []
    i = 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[j] + 1:
            j += 1
        out.append(str(ps[i]) if i == j else f"{ps[i]}-{ps[j]}")
        i = j + 1
    return ",".join(out)


# --- raw baselines -----------------------------------------------------------------------------------
def raw_copy_latencies(n: int, page_size: int = PAGE_SIZE) -> np.ndarray:
    """Microseconds of ``n`` UFFDIO_COPY calls, one page each, from a warm buffer into missing pages of a
    memfd mapping registered MISSING (no fault, no store: the kernel's install cost plus the ioctl call)."""
    from tiermem.kernel import uapi
    from tiermem.kernel.uffd_ioctl import Mapping, Uffd, buffer_address, memfd_create, new_uffd

    memfd = memfd_create("tiermem-bench-copy", n * page_size)
    mapping = Mapping(memfd, n * page_size)
    ufd = -1
    try:
        ufd, _ = new_uffd(uapi.UFFD_FEATURE_MISSING_SHMEM)
        u = Uffd(ufd)
        u.register(mapping.addr, n * page_size, uapi.UFFDIO_REGISTER_MODE_MISSING)
        buf = os.urandom(page_size)
        src, keep = buffer_address(buf)
        lat = np.empty(n)
        for i in range(n):
            t0 = time.perf_counter()
            u.copy(mapping.addr + i * page_size, src, page_size)
            lat[i] = time.perf_counter() - t0
        if bytes(mapping.view()[(n - 1) * page_size : n * page_size]) != buf:
            raise AssertionError("UFFDIO_COPY baseline installed different bytes")  # a benchmark must not lie
        del keep
        return lat * 1e6
    finally:
        if ufd >= 0:
            os.close(ufd)
        mapping.close()
        os.close(memfd)


def raw_get_latencies(url: str, samples: int, seed: int = 7) -> tuple[str, np.ndarray]:
    """(baseline name, microseconds) of single-page reads with the store's plain client: redis-py GET,
    boto3 ranged get_object, or os.pread on a local file (the page-store benchmark's baselines)."""
    from tiermem.bench.store import _raw_for  # the store engineer's baselines, reused as they are
    from tiermem.store.url import open_store

    store = open_store(url, name="bench-raw")
    raw = _raw_for(store)
    try:
        if raw is None:
            raise ConfigurationError(f"no raw baseline for a {store.kind} store")
        n = 256
        raw.reset()
        raw.put(0, [os.urandom(store.page_size) for _ in range(n)])
        rng = np.random.default_rng(seed)
        lat = np.empty(samples)
        for i, p in enumerate(rng.integers(0, n, samples).tolist()):
            t0 = time.perf_counter()
            raw.get_one(0, p)
            lat[i] = time.perf_counter() - t0
        return raw.name, lat * 1e6
    finally:
        if raw is not None:
            raw.close()
        store.close()


def which(name: str) -> str | None:
    """A binary next to this Python or on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)
