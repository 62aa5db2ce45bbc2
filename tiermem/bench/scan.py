"""Benchmark: the sim's full-range UFFDIO_RWPROTECT and hot-set PAGEMAP_SCAN, state per page, fleet RSS.

Every figure is printed next to a baseline measured in the same run: one
``np.count_nonzero`` pass over a uint8 array as long as the guest. Goals (printed,
not asserted): each operation within 10x of that pass, at most 4 bytes of
tracking state per page, and 1,000 VMs of 262,144 synthetic pages in < 2 GiB RSS.

Run: ``python -m tiermem.bench.scan [--pages N] [--fleet-vms N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tiermem.kernel import uapi
from tiermem.sim.kernel import SimKernel

__all__ = ["main", "run"]

_FEATURES = uapi.UFFD_FEATURE_RWP | uapi.UFFD_FEATURE_RWP_ASYNC
_MODE = uapi.UFFDIO_REGISTER_MODE_RWP | uapi.UFFDIO_REGISTER_MODE_MISSING
GOAL_RATIO = 10.0
GOAL_STATE_BYTES = 4
GOAL_FLEET_RSS = 2 << 30


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, min) seconds over ``repeat`` runs, after one warm-up run."""
    fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), min(runs)


def _rss() -> int:
    """Resident set size of this process, bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _armed(n: int) -> SimKernel:
    k = SimKernel(n, synthetic=True)
    k.api(_FEATURES)
    k.register(k.base, k.size, _MODE)
    return k


def _hot_pages(n: int, fraction: float, run: int, rng: np.random.Generator) -> np.ndarray:
    """``fraction`` of the pages: scattered one by one (run=1) or in runs of ``run`` pages."""
    if run <= 1:
        return np.flatnonzero(rng.random(n) < fraction)
    starts = np.flatnonzero(rng.random(n // run) < fraction) * run
    return (starts[:, None] + np.arange(run)).ravel()


def run(
    pages: int = 1 << 20,
    accessed: float = 0.1,
    fleet_vms: int = 0,
    fleet_pages: int = 262144,
    repeat: int = 5,
) -> dict[str, Any]:
    """Measure and return every figure (seconds, bytes, ratios) as a dict."""
    rng = np.random.default_rng(0)
    base_arr = (rng.random(pages) < accessed).astype(np.uint8)
    baseline, baseline_min = _time(lambda: np.count_nonzero(base_arr), repeat)
    k = _armed(pages)
    protect, protect_min = _time(lambda: k.rwprotect(k.base, k.size, protect=True), repeat)
    out: dict[str, Any] = {
        "pages": pages,
        "accessed_fraction": accessed,
        "repeat": repeat,
        "baseline_count_nonzero_s": baseline,
        "baseline_count_nonzero_min_s": baseline_min,
        "rwprotect_s": protect,
        "rwprotect_min_s": protect_min,
        "rwprotect_ratio": protect / baseline,
        "rwprotect_ratio_best": protect_min / baseline_min,
    }
    for layout, run_len in (("scattered", 1), ("clustered", 64)):
        k.rwprotect(k.base, k.size, protect=True)
        hot = _hot_pages(pages, accessed, run_len, rng)
        k.access_batch(rng.permutation(hot))

        def scan() -> object:
            return k.pagemap_scan(
                k.base,
                k.base + k.size,
                category_mask=uapi.PAGE_IS_ACCESSED,
                return_mask=uapi.PAGE_IS_ACCESSED,
            )

        med, best = _time(scan, repeat)
        res = k.pagemap_scan(k.base, k.base + k.size, category_mask=uapi.PAGE_IS_ACCESSED)
        found = int((res.regions["end"] - res.regions["start"]).sum()) // k.page_size
        if found != len(np.unique(hot)):
            raise AssertionError(f"scan found {found} hot pages, {len(np.unique(hot))} were touched")
        out[f"scan_{layout}_s"] = med
        out[f"scan_{layout}_min_s"] = best
        out[f"scan_{layout}_ratio"] = med / baseline
        out[f"scan_{layout}_ratio_best"] = best / baseline_min
        out[f"scan_{layout}_regions"] = len(res.regions)
    state, content = k.state_bytes_per_page()
    out["state_bytes_per_page"] = state
    out["synthetic_content_bytes_per_page"] = content
    if fleet_vms > 0:
        out.update(_fleet(fleet_vms, fleet_pages, accessed))
    return out


def _fleet(vms: int, pages: int, accessed: float) -> dict[str, Any]:
    """N synthetic VMs, each armed, protected and written on a hot set: process RSS."""
    before = _rss()
    t0 = time.perf_counter()
    fleet = []
    rng = np.random.default_rng(1)
    for _ in range(vms):
        k = _armed(pages)
        k.rwprotect(k.base, k.size, protect=True)
        hot = np.flatnonzero(rng.random(pages) < accessed)
        k.access_batch(hot, np.ones(len(hot), dtype=bool))  # writes touch the counter array
        fleet.append(k)
    after = _rss()
    return {
        "fleet_vms": vms,
        "fleet_pages_per_vm": pages,
        "fleet_build_s": time.perf_counter() - t0,
        "fleet_rss_bytes": after,
        "fleet_rss_delta_bytes": after - before,
        "fleet_bytes_per_page": (after - before) / (vms * pages),
    }


def _fmt_s(s: float) -> str:
    return f"{s * 1e6:10.1f} us"


def report(r: dict[str, Any]) -> str:
    """The human table, with goals and verdicts."""

    def verdict(ok: bool) -> str:
        return "meets goal" if ok else "MISSES goal"

    lines = [
        f"sim scan benchmark: {r['pages']:,} pages ({r['pages'] * 4096 >> 20} MiB guest), "
        f"{r['accessed_fraction']:.0%} accessed; median of {r['repeat']} runs, ratios also best-vs-best "
        "(robust to other load on the machine)",
        f"  baseline np.count_nonzero(uint8[{r['pages']:,}])     {_fmt_s(r['baseline_count_nonzero_s'])}",
        f"  full-range UFFDIO_RWPROTECT                   {_fmt_s(r['rwprotect_s'])}"
        f"  {r['rwprotect_ratio']:6.1f}x baseline (best {r['rwprotect_ratio_best']:.1f}x)"
        f"  {verdict(r['rwprotect_ratio_best'] <= GOAL_RATIO)}: <= 10x",
    ]
    for layout, what in (("clustered", "runs of 64 pages"), ("scattered", "single pages")):
        ratio, best = r[f"scan_{layout}_ratio"], r[f"scan_{layout}_ratio_best"]
        lines.append(
            f"  hot-set PAGEMAP_SCAN, {layout} ({what}, {r[f'scan_{layout}_regions']:,} regions)"
            f"\n{'':46s}{_fmt_s(r[f'scan_{layout}_s'])}  {ratio:6.1f}x baseline (best {best:.1f}x)"
            f"  {verdict(best <= GOAL_RATIO)}: <= 10x"
        )
    lines.append(
        f"  tracking state per page                       {r['state_bytes_per_page']:>10d} B"
        f"   ({verdict(r['state_bytes_per_page'] <= GOAL_STATE_BYTES)}: <= 4 B; synthetic content adds "
        f"{r['synthetic_content_bytes_per_page']} B)"
    )
    if "fleet_vms" in r:
        rss = r["fleet_rss_bytes"]
        lines.append(
            f"  fleet: {r['fleet_vms']:,} VMs x {r['fleet_pages_per_vm']:,} synthetic pages: RSS "
            f"{rss / (1 << 30):.2f} GiB (+{r['fleet_rss_delta_bytes'] / (1 << 30):.2f} GiB, "
            f"{r['fleet_bytes_per_page']:.2f} B/page) ({verdict(rss < GOAL_FLEET_RSS)}: < 2 GiB)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m tiermem.bench.scan", description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=1 << 20, help="guest pages (default 1048576 = 4 GiB)")
    ap.add_argument("--accessed", type=float, default=0.1, help="fraction of pages accessed (default 0.1)")
    ap.add_argument("--fleet-vms", type=int, default=0, help="also build N synthetic VMs and report RSS")
    ap.add_argument("--fleet-pages", type=int, default=262144, help="pages per fleet VM (default 262144)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = ap.parse_args(argv)
    if a.pages <= 0 or a.fleet_vms < 0 or a.fleet_pages <= 0 or a.repeat <= 0 or not 0 < a.accessed <= 1:
        ap.error("sizes and repeat must be positive, --accessed in (0, 1]")
    r = run(a.pages, a.accessed, a.fleet_vms, a.fleet_pages, a.repeat)
    print(json.dumps(r, indent=2) if a.json else report(r))


if __name__ == "__main__":
    main()
