"""``tiermem bench`` scenarios that need no special kernel, in quick mode: documented JSON fields and sanity.

Each command runs in a child process, as a user runs it. The suite checks
fields, positive figures, a baseline and a ratio consistent with them; never
timings (the figures live in docs/benchmarks.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str, timeout: float = 110) -> dict[str, Any]:
    """Run ``tiermem bench ARGS --quick --json``; the parsed JSON (stdout holds only the JSON)."""
    proc = subprocess.run(
        [sys.executable, "-m", "tiermem", "bench", *args, "--quick", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["host"]["cores"] >= 1 and out["host"]["kernel"]
    return out


def check_ratio(ratio: float | None, a: float, b: float) -> None:
    assert b > 0 and a > 0
    assert ratio == pytest.approx(a / b, rel=0.02, abs=0.002)


def check_store_run(s: dict[str, Any], kind: str, batches: list[int]) -> None:
    assert s["kind"] == kind and s["baseline"]
    assert [r["batch"] for r in s["throughput"]] == batches
    for r in s["throughput"]:
        for k in ("put", "get"):
            assert r[k]["pages_per_s"] > 0 and r[k]["mb_per_s"] > 0
            check_ratio(r[f"{k}_ratio"], r[k]["pages_per_s"], r[f"{k}_raw"]["pages_per_s"])
    lat = s["single_get_latency"]
    assert 0 < lat["p50_us"] <= lat["p99_us"] and 0 < lat["raw_p50_us"] <= lat["raw_p99_us"]
    assert s["zero_half"]["ratio"] <= 0.55  # half the pages are zero and never stored
    assert set(s["goals"]) and all(v in (True, False, None) for v in s["goals"].values())


def test_store_local() -> None:
    out = bench("store", "--pages", "256", "--batch-sizes", "1,64")
    assert out["scenario"] == "store"
    (s,) = out["runs"]
    check_store_run(s, "file", [1, 64])


@pytest.mark.redis
def test_store_redis(redis_srv: Any) -> None:
    (s,) = bench("store", "--store", redis_srv.url, "--pages", "256", "--batch-sizes", "1,64")["runs"]
    check_store_run(s, "redis", [1, 64])


@pytest.mark.s3
def test_store_s3(s3_srv: Any) -> None:
    (s,) = bench("store", "--store", s3_srv.url(), "--pages", "128", "--batch-sizes", "1,64")["runs"]
    check_store_run(s, "s3", [1, 64])


def test_policy() -> None:
    out = bench(
        "policy",
        "--pages",
        "512",
        "--ticks",
        "120",
        "--cold-after",
        "1,4",
        "--workload",
        "zipf:1.1",
        "--workload",
        "hotset:0.1",
        "--cost-pages",
        "2048",
    )
    assert [(r["workload"], r["policy"], r["cold_after"]) for r in out["rows"]] == [
        ("zipf:1.1", "age", 1),
        ("zipf:1.1", "age", 4),
        ("zipf:1.1", "rrd", 2),
        ("hotset:0.1", "age", 1),
        ("hotset:0.1", "age", 4),
        ("hotset:0.1", "rrd", 2),
    ]
    for r in out["rows"]:
        # nothing beats the future-knowing bound at the same saving
        assert r["bound_promotions"] <= r["promotions"] and r["oracle_promotions"] >= r["bound_promotions"]
    assert [c["policy"] for c in out["cycle_cost"]] == ["age", "rrd"]
    assert all(c["cpu_ms_per_cycle"] > 0 for c in out["cycle_cost"])
    rows = [r for r in out["rows"] if r["policy"] == "age"]
    for r in rows:
        assert 0 < r["saved"] < 1 and r["accesses"] > 0
        # the oracle knows the future: it never promotes more than the policy at the same evictions
        assert r["oracle_promotions"] <= r["promotions"]
        assert 0 < r["oracle_saved"] < 1 and 0 < r["random_saved"] < 1
    zipf1, zipf4 = rows[0], rows[1]
    assert zipf1["saved"] > zipf4["saved"] and zipf1["promotions"] > zipf4["promotions"] > 0
    check_ratio(zipf1["vs_oracle"], zipf1["promotions"], zipf1["oracle_promotions"])
    check_ratio(zipf1["random_vs_policy"], zipf1["random_promotions"], zipf1["promotions"])
    hot = rows[2]
    assert hot["promotions"] == 0 and hot["random_promotions"] > 0  # a fixed hot set is never evicted


def test_scan() -> None:
    out = bench("scan", "--pages", "16384", "--repeat", "2", "--fleet-vms", "2", "--fleet-pages", "1024")
    assert out["pages"] == 16384 and out["baseline_count_nonzero_s"] > 0
    for op in ("rwprotect", "scan_clustered", "scan_scattered"):
        check_ratio(out[f"{op}_ratio"], out[f"{op}_s"], out["baseline_count_nonzero_s"])
    assert 0 < out["state_bytes_per_page"] <= 64
    assert out["fleet_vms"] == 2 and out["fleet_rss_bytes"] > 0
    assert out["goals"]["state_le_4_bytes_per_page"] in (True, False)


def test_control() -> None:
    out = bench("control", "--vms", "20", "--agents", "2", "--interval", "1", "--duration", "2")
    assert (out["vms"], out["agents"]) == (20, 2)
    assert out["orders"] > 0 and out["failed"] == 0
    assert 0 <= out["lag_p50_ms"] <= out["lag_p99_ms"]
    assert out["baseline"]["wakeups"] > 0 and out["baseline"]["lag_p99_ms"] >= 0
    assert out["rss_mib"] > 0 and set(out["goals"]) == {"lag_p99_under_1s", "rss_under_500mib"}


def test_evict_on_the_sim_backend() -> None:
    out = bench("evict", "--backend", "sim", "--pages", "512")
    (r,) = out["rows"]
    assert (r["store"], r["backend"], r["pages"]) == ("local", "sim", 512)
    assert r["bytes_written"] == 512 * 4096 and r["zero_pages"] == 0  # every page held data
    check_ratio(r["ratio_vs_raw"], r["agent"]["pages_per_s"], r["raw"]["pages_per_s"])
    check_ratio(r["ratio_vs_store_put"], r["agent"]["pages_per_s"], r["store_put"]["pages_per_s"])
    assert r["raw"]["client"].startswith("os.pwrite")
    assert r["phases_ms"]["evict"] > 0 and r["phases_ms"]["total"] >= r["phases_ms"]["evict"]
    mac = r["mac"]  # the page MAC's cost per evicted page, with its same-run baseline (fields, not timings)
    assert mac["pages"] == 512 and mac["tag_us_per_page"] > 0 and mac["xxh3_us_per_page"] > 0
    check_ratio(mac["tag_vs_xxh3"], mac["tag_us_per_page"], mac["xxh3_us_per_page"])
    assert r["mac_share_of_evict_per_page"] is not None and r["mac_share_of_evict_per_page"] > 0


def test_bad_arguments_are_one_line_errors() -> None:
    for args, msg in (
        (["policy", "--cold-after", "0"], "--cold-after"),
        (["store", "--batch-sizes", "a,b"], "--batch-sizes"),
        (["store", "--spawn", "mysql"], "--spawn"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "tiermem", "bench", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1, (args, proc.stderr)
        assert msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
