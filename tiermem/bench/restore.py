"""Firecracker snapshot restore through the agent: time to first touch, pages/s on demand and with prefault.

Per store: an in-process node agent imports a random memory file (10% zero pages);
a client that restores exactly like Firecracker (:mod:`tiermem.guests.firecracker`)
connects to the VM's restore socket. Measured, in the client:

- ``first_touch_ms``: its first touch after the handshake (handshake -> fault -> store
  get -> UFFDIO_COPY -> wake);
- ``on_demand``: its vCPUs then touch every other page: pages/s;
- ``prefault``: a second restore with the background prefault at ``prefault_rate``: from
  the first touch until every page is resident, pages/s.

Every restore's memory is compared with the file byte for byte. Baselines measured in
the same run: reading the memory file locally one page at a time (``os.pread``, page
cache warm: what a handler that mmaps the file does at best) and a plain ranged GET of
the file in S3 (one 4 KiB page: latency; 4 MiB ranges: pages/s), when the run has an
S3 store.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from tiermem.agent.restore import RestoreService
from tiermem.bench.common import bench_agent, pct, ratio, require_uffd, store_targets
from tiermem.errors import FailedPrecondition
from tiermem.guests.firecracker import FirecrackerProcess
from tiermem.model import PAGE_SIZE

__all__ = ["run", "run_store"]

MiB = 1 << 20


def memory_file(path: Path, size: int, seed: int = 19) -> bytes:
    """Random pages, one in ten zero (a snapshot's free memory)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size, dtype=np.uint8)
    data.reshape(-1, PAGE_SIZE)[rng.random(size // PAGE_SIZE) < 0.1] = 0
    raw = data.tobytes()
    path.write_bytes(raw)
    return raw


@contextlib.contextmanager
def _restores(url: str, tmp: Path) -> Iterator[RestoreService]:
    with bench_agent({"default": url}, tmp=tmp) as agent:
        rs = RestoreService(agent).start()
        try:
            yield rs
        finally:
            rs.close()


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise FailedPrecondition(f"restore bench: timed out waiting for {what}")
        time.sleep(0.002)


def _restore_once(rs: RestoreService, vm: str, raw: bytes, tmp: Path, *, prefault: bool) -> dict[str, Any]:
    n = len(raw) // PAGE_SIZE
    half = n // 2 * PAGE_SIZE
    # two regions around a hole, like a guest with an MMIO gap
    fc = FirecrackerProcess(rs.socket_path(vm), f"{half // 1024}K,{(len(raw) - half) // 1024}K", hole="2M")
    try:
        first = fc.cmd("touch 0")
        s = rs.agent.sessions[vm]
        r = s.restore
        assert r is not None
        t0 = time.perf_counter()
        if prefault:
            _wait(lambda: r.remaining() == 0, 600, "the prefault")
            rest_s = time.perf_counter() - t0
        else:
            rest_s = float(fc.cmd(f"touch 1-{n - 1}", timeout=600)["seconds"])
        out = tmp / f"{vm}.dump"
        fc.cmd(f"dump {out}", timeout=600)
        same = out.read_bytes() == raw
        out.unlink()
        summary = r.summary()
    finally:
        fc.close()
    _wait(lambda: vm not in rs.agent.sessions, 30, "the restore session to end")
    if not same:
        raise AssertionError(f"restored memory of {vm} differs from the memory file")
    return {
        "first_touch_ms": round(float(first["seconds"]) * 1000, 3),
        "rest_s": rest_s,
        "pages_per_s": round((n - 1) / rest_s, 1),
        "summary": summary,
    }


def run_store(
    label: str, url: str, raw: bytes, mem: Path, prefault_rate: float, tmp: Path, prefetch: int = 8
) -> dict[str, Any]:
    """Import ``mem`` into the store at ``url``; restore it on demand, then with prefault."""
    home = tmp / f"agent-{label}"
    home.mkdir(mode=0o700)  # the restore sockets live below it
    with _restores(url, home) as rs:
        t0 = time.perf_counter()
        info = rs.import_snapshot(f"od-{label}", mem_file=str(mem), prefetch_pages=prefetch)
        import_s = time.perf_counter() - t0
        od = _restore_once(rs, f"od-{label}", raw, tmp, prefault=False)
        rs.import_snapshot(
            f"pf-{label}", mem_file=str(mem), prefault_pages_per_s=prefault_rate, prefetch_pages=prefetch
        )
        pf = _restore_once(rs, f"pf-{label}", raw, tmp, prefault=True)
    return {
        "store": label,
        "url": url,
        "pages": info.pages,
        "zero_pages": info.zero_pages,
        "stored_bytes": info.stored_bytes,
        "import_s": round(import_s, 3),
        "import_pages_per_s": round(info.pages / import_s, 1),
        "first_touch_ms": od["first_touch_ms"],
        "on_demand_pages_per_s": od["pages_per_s"],
        "prefault_first_touch_ms": pf["first_touch_ms"],
        "prefault_pages_per_s": pf["pages_per_s"],
        "prefault_rate": prefault_rate,
        "prefetch": prefetch,
        "on_demand": od["summary"],
        "prefaulted": pf["summary"],
        "identical": True,
    }


def _local_read(mem: Path, n: int) -> dict[str, Any]:
    """Page-by-page pread of the memory file (warm page cache): latency of one page and pages/s."""
    fd = os.open(mem, os.O_RDONLY)
    try:
        for _ in range(2):  # warm the page cache, then measure
            lat = np.empty(n)
            t0 = time.perf_counter()
            for p in range(n):
                t = time.perf_counter()
                os.pread(fd, PAGE_SIZE, p * PAGE_SIZE)
                lat[p] = time.perf_counter() - t
            total = time.perf_counter() - t0
    finally:
        os.close(fd)
    p50, p99 = pct(lat * 1e6, 50, 99)
    return {"p50_us": p50, "p99_us": p99, "pages_per_s": round(n / total, 1)}


def _ranged_get(url: str, raw: bytes, samples: int) -> dict[str, Any]:
    """The memory file put in the S3 store's bucket, read back with plain ranged GETs."""
    import boto3
    from botocore.config import Config

    parts = urlsplit(url)
    q = dict(parse_qsl(parts.query))
    client = boto3.session.Session().client(
        "s3",
        endpoint_url=q.get("endpoint"),
        region_name=q.get("region"),
        config=Config(s3={"addressing_style": "path"}),
    )
    key = f"{parts.path.strip('/')}-restore-bench/mem.bin".lstrip("/")
    client.put_object(Bucket=parts.netloc, Key=key, Body=raw)
    try:
        n = len(raw) // PAGE_SIZE
        rng = np.random.default_rng(3)
        lat = np.empty(samples)
        for i, p in enumerate(rng.integers(0, n, samples).tolist()):
            t = time.perf_counter()
            rng_h = f"bytes={p * PAGE_SIZE}-{(p + 1) * PAGE_SIZE - 1}"
            client.get_object(Bucket=parts.netloc, Key=key, Range=rng_h)["Body"].read()
            lat[i] = time.perf_counter() - t
        t0 = time.perf_counter()
        for off in range(0, len(raw), 4 * MiB):
            rng_h = f"bytes={off}-{min(off + 4 * MiB, len(raw)) - 1}"
            client.get_object(Bucket=parts.netloc, Key=key, Range=rng_h)["Body"].read()
        total = time.perf_counter() - t0
    finally:
        client.delete_object(Bucket=parts.netloc, Key=key)
    p50, p99 = pct(lat * 1e6, 50, 99)
    return {
        "page_p50_us": p50,
        "page_p99_us": p99,
        "samples": samples,
        "chunk_pages_per_s": round(n / total, 1),
    }


def run(
    urls: Sequence[str] = (),
    spawn: Sequence[str] = (),
    quick: bool = False,
    size_mib: int = 64,
    prefault_rate: float = 1e6,
    local: bool = True,
    prefetch: int = 8,
) -> dict[str, Any]:
    """The restore benchmark on each store, with the same-run baselines."""
    require_uffd()
    if quick:
        size_mib = min(size_mib, 8)
    if size_mib < 2 or size_mib % 2:
        raise FailedPrecondition("size must be an even number of MiB >= 2 (two regions)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tiermem-bench-restore-") as d:
        tmp = Path(d)
        mem = tmp / "mem.bin"
        raw = memory_file(mem, size_mib * MiB)
        n = len(raw) // PAGE_SIZE
        local_read = _local_read(mem, n)
        ranged: dict[str, Any] | None = None
        with store_targets(urls, spawn, local=local, tmp=tmp / "local") as targets:
            for t in targets:
                rows.append(run_store(t.label, t.url, raw, mem, prefault_rate, tmp, prefetch))
                if t.label == "s3" and ranged is None:
                    ranged = _ranged_get(t.url, raw, 64 if quick else 512)
    for r in rows:
        r["ratio_on_demand_vs_local_read"] = ratio(r["on_demand_pages_per_s"], local_read["pages_per_s"])
        r["ratio_prefault_vs_local_read"] = ratio(r["prefault_pages_per_s"], local_read["pages_per_s"])
        if ranged is not None:
            r["ratio_first_touch_vs_ranged_get"] = ratio(r["first_touch_ms"] * 1000, ranged["page_p50_us"])
            r["ratio_prefault_vs_ranged_get"] = ratio(r["prefault_pages_per_s"], ranged["chunk_pages_per_s"])
    return {
        "size_mib": size_mib,
        "pages": n,
        "prefault_rate": prefault_rate,
        "prefetch": prefetch,
        "rows": rows,
        "baseline_local_read": local_read,
        "baseline_ranged_get": ranged,
    }
