"""Eviction throughput per store: the agent's eviction path beside the store's raw put, same run.

A guest writes every page once, then one eviction cycle evicts them all. The
agent's path per batch of 1,024 pages (``cycle.EVICT_BATCH_PAGES``): read through
the I/O mapping -> ``store.put_pages`` (acknowledged) -> durable index commit ->
``fallocate(PUNCH_HOLE)`` -> UFFDIO_WAKE. The figure is the cycle's evict phase.

Guest: a process guest on the real ``uffd`` backend (default), or the sim
backend (``backend="sim"``: same agent code, simulated kernel).

Baselines, same run, same number of pages and batch size:

- ``raw``: the store's plain client writing the same amount of bytes (a redis-py
  pipeline of SETs; one ``put_object`` per batch; ``os.pwrite`` + ``fdatasync``
  when the store fsyncs) -- the page-store benchmark's baselines;
- ``store``: ``PageStore.put_pages`` alone, so the agent's own share (I/O-mapping
  reads, index, punch, wake) shows as the gap between the two ratios.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from tiermem.agent.cycle import EVICT_BATCH_PAGES
from tiermem.bench.common import (
    GuestDriver,
    bench_agent,
    rate,
    ratio,
    require_uffd,
    store_targets,
    wait_attached,
)
from tiermem.bench.mac import mac_cost
from tiermem.errors import ConfigurationError, FailedPrecondition
from tiermem.model import PAGE_SIZE, CycleMode, EvictionPolicy
from tiermem.store.base import PageBlob

__all__ = ["run", "run_store"]


def _raw_put(url: str, pages: int, batch: int) -> tuple[str, dict[str, float], dict[str, float]]:
    """(raw client name, raw put rate, PageStore.put_pages rate) for ``pages`` random pages."""
    from tiermem.bench.store import _raw_for  # the store engineer's baselines, reused as they are
    from tiermem.store.url import open_store

    store = open_store(url, name="bench-raw")
    raw = _raw_for(store)
    vm = f"bench-evict-{uuid.uuid4().hex[:8]}"
    try:
        if raw is None:
            raise ConfigurationError(f"no raw baseline for a {store.kind} store")
        raw.reset()
        data = [os.urandom(PAGE_SIZE) for _ in range(min(batch, pages))]
        t_raw = t_store = 0.0
        for b, first in enumerate(range(0, pages, batch)):  # alternate batch by batch: drift hits both
            n = min(batch, pages - first)
            t0 = time.perf_counter()
            raw.put(b, data[:n])
            t1 = time.perf_counter()
            store.put_pages(vm, [PageBlob(first + i, 1, data[i]) for i in range(n)])
            t_store += time.perf_counter() - t1
            t_raw += t1 - t0
        return raw.name, rate(pages, t_raw), rate(pages, t_store)
    finally:
        if raw is not None:
            raw.close()
        store.purge_vm(vm)
        store.close()


def run_store(label: str, url: str, pages: int, backend: str = "uffd", mode: str = "auto") -> dict[str, Any]:
    """Evict ``pages`` written pages of one guest to the store at ``url``; the cycle's phase times."""
    vm = f"evict-{label}"
    with bench_agent({"default": url}) as agent:
        pol = EvictionPolicy(cold_after=1, prefetch_pages=0, store="default")
        guest = None
        try:
            if backend == "uffd":
                guest = GuestDriver(
                    agent.settings.handoff_path(), vm, f"{pages * PAGE_SIZE // 1024}K", mode=mode
                )
                wait_attached(agent, vm)
                agent.set_policy(vm, pol)
                guest.cmd(f"touch 0-{pages - 1} w")
            elif backend == "sim":
                agent.attach_sim(vm, pages * PAGE_SIZE, pol, synthetic=True, vcpus=0)
                b = agent.sessions[vm].backend
                b.access_batch(np.arange(pages, dtype=np.int64), np.ones(pages, dtype=bool))
            else:
                raise ConfigurationError(f"backend must be uffd or sim, not {backend!r}")
            rep = agent.run_cycle(vm, CycleMode.EVICT, interval_ms=20)
            if rep.error or rep.pages_evicted != pages:
                raise FailedPrecondition(
                    f"eviction to {label} evicted {rep.pages_evicted}/{pages}: {rep.error}"
                )
            check = {"mismatches": 0}
            if guest is not None:
                # Every page is read back through the guest: prefetch makes that one store round trip per
                # 513 pages instead of one per page (an S3 ranged GET costs milliseconds).
                agent.set_policy(vm, pol.with_changes(prefetch_pages=EvictionPolicy.MAX_PREFETCH))
                check = guest.cmd("verify", timeout=900)
            if check["mismatches"]:
                raise AssertionError(f"{check['mismatches']} pages differ after eviction to {label}")
        finally:
            if guest is not None:
                guest.close()
    ph = rep.phases
    evict_s = ph.evict_us / 1e6
    agent_rate = rate(rep.pages_evicted, evict_s)
    agent_rate["stored_mb_per_s"] = round(rep.bytes_written / max(evict_s, 1e-9) / 1e6, 2)
    raw_name, raw_rate, store_rate = _raw_put(url, pages, EVICT_BATCH_PAGES)
    mac = mac_cost(min(pages, 4096))  # the page MAC's tag, paid once per evicted page
    evict_us_per_page = evict_s * 1e6 / max(rep.pages_evicted, 1)
    return {
        "store": label,
        "url": url,
        "backend": backend,
        "mode": guest.mode if guest is not None else "sim",
        "pages": pages,
        "batch": EVICT_BATCH_PAGES,
        "bytes_written": rep.bytes_written,
        "zero_pages": rep.zero_pages,
        "agent": agent_rate,
        "raw": {"client": raw_name, **raw_rate},
        "store_put": store_rate,
        "ratio_vs_raw": ratio(agent_rate["pages_per_s"], raw_rate["pages_per_s"]),
        "ratio_vs_store_put": ratio(agent_rate["pages_per_s"], store_rate["pages_per_s"]),
        "mac": mac,
        "mac_share_of_evict_per_page": ratio(mac["tag_us_per_page"], evict_us_per_page),
        "phases_ms": {
            k.removesuffix("_us"): round(getattr(ph, k) / 1000, 2)
            for k in (
                "protect_us",
                "wait_us",
                "freeze_us",
                "scan_us",
                "decide_us",
                "evict_us",
                "resume_us",
                "total_us",
            )
        },
    }


def run(
    urls: Sequence[str] = (),
    spawn: Sequence[str] = (),
    quick: bool = False,
    pages: int = 65536,
    backend: str = "uffd",
    local: bool = True,
    mode: str = "auto",
) -> dict[str, Any]:
    """The eviction benchmark on each store (a local store first, unless ``local`` is False)."""
    if backend == "uffd":
        require_uffd(mode)
    if quick:
        pages = min(pages, 2048)
    if pages < 1:
        raise FailedPrecondition("pages must be >= 1")
    with store_targets(urls, spawn, local=local) as targets:
        rows = [run_store(t.label, t.url, pages, backend, mode) for t in targets]
    return {"pages": pages, "page_size": PAGE_SIZE, "backend": backend, "rows": rows}
