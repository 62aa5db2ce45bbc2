"""``tiermem bench`` scenarios on the real kernel (userfaultfd, KVM), in quick mode: fields and sanity only."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.timing import scaled
from tests.integration.test_bench_quick import bench, check_ratio
from tiermem import native
from tiermem.kernel.probe import probe_host

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(180)]


def probed_mode() -> str:
    """The mode a process guest picks by itself on this kernel."""
    return "rwp" if probe_host().backends["rwp"] else "uffd"


def check_fault_row(r: dict[str, Any], store: str, faults: int) -> None:
    assert (r["store"], r["faults"], r["mismatches"]) == (store, faults, 0)
    assert r["faults_served"] == faults  # every read was a real MISSING fault served by the agent
    assert 0 < r["guest"]["p50_us"] <= r["guest"]["p99_us"] <= r["guest"]["max_us"]
    assert 0 < r["agent"]["p50_us"] <= r["agent"]["p99_us"] and r["agent"]["samples"] == faults
    assert set(r["agent"]["stage_mean_us"]) == {"lookup", "fetch", "install"}
    copy, get = r["baseline_copy"], r["baseline_get"]
    assert copy["calls"] == faults and 0 < copy["p50_us"] <= copy["p99_us"]
    assert get["client"] and 0 < get["p50_us"] <= get["p99_us"]
    check_ratio(r["ratio_p50_vs_copy_plus_get"], r["guest"]["p50_us"], copy["p50_us"] + get["p50_us"])
    check_ratio(r["ratio_p50_vs_get"], r["guest"]["p50_us"], get["p50_us"])
    assert r["resident_touch"]["p50_us"] > 0
    c = r["baseline_c_handler"]
    assert [x["faults"] for x in c["runs"]] == [faults, faults]  # before and after the agent's run
    assert all(0 < x["p50_us"] <= x["p99_us"] for x in c["runs"])
    check_ratio(r["ratio_p50_vs_c_handler"], r["guest"]["p50_us"], c["p50_us"])
    assert r["fault_path"] in ("native", "python")


def test_fault_local() -> None:
    out = bench("fault", "--faults", "200")
    paths = ["native", "python"] if native.paths()["fault_serve"] == "native" else ["python"]
    assert [(r["store"], r["placement"], r["fault_path"]) for r in out["rows"]] == [
        ("local", where, p) for where in ("pinned", "unpinned") for p in paths
    ]
    for r in out["rows"]:
        check_fault_row(r, "local", 200)
        assert r["mode"] == probed_mode()  # --mode auto: the guest follows the probe
        assert r["mac"]["pages"] == 200 and r["mac"]["verify_us_per_page"] > 0  # the MAC's cost per fault
        assert r["mac_share_of_agent_p50"] is not None and r["mac_share_of_agent_p50"] > 0
        if r["fault_path"] == "native":
            assert r["native"]["served"] == 200  # every evicted page came back on the native thread
    assert set(out["goals"]) == {"local_p50_le_4x_c_handler", "local_p99_le_1ms", "redis_p50_le_1.3x_raw_get"}
    assert out["goals"]["redis_p50_le_1.3x_raw_get"] is None  # no Redis row


@pytest.mark.redis
def test_fault_redis(redis_srv: Any) -> None:
    out = bench("fault", "--no-local", "--no-pin", "--store", redis_srv.url, "--faults", "100")
    for r in out["rows"]:
        assert r["placement"] == "unpinned"
        check_fault_row(r, "redis", 100)
        if r["fault_path"] == "native":  # every Redis page came back on the native thread (hiredis GET)
            assert r["native"]["served"] == 100
    goals = out["goals"]
    assert (goals["local_p50_le_4x_c_handler"], goals["local_p99_le_1ms"]) == (None, None)
    assert isinstance(goals["redis_p50_le_1.3x_raw_get"], bool)


def test_evict_uffd_local() -> None:
    (r,) = bench("evict", "--pages", "512")["rows"]
    assert (r["backend"], r["pages"], r["bytes_written"]) == ("uffd", 512, 512 * 4096)
    check_ratio(r["ratio_vs_raw"], r["agent"]["pages_per_s"], r["raw"]["pages_per_s"])
    assert r["store_put"]["pages_per_s"] > 0


@pytest.mark.redis
@pytest.mark.parametrize("path", ["native", "python"])
def test_agent_with_redis(redis_srv: Any, path: str) -> None:
    more = ["--python-path"] if path == "python" else []
    out = bench(
        "agent",
        "--store",
        redis_srv.url,
        "--sim-vms",
        "2",
        "--sim-mib",
        "8",
        "--guest-mib",
        "4",
        "--cap-mib",
        "2",
        "--interval-ms",
        "50",
        *more,
    )
    expect = "native" if path == "native" and getattr(native.mod, "HAVE_REDIS", False) else "python"
    assert out["fault_path"] == expect
    assert out["native_served"] == (1024 if expect == "native" else 0)
    assert out["store"]["kind"] == "redis" and out["mismatches"] == 0
    assert [t["backend"] for t in out["tracking"]] == ["sim", "sim", probed_mode()]
    for t in out["tracking"][:2]:  # the 10% hot set, found exactly by a detect-only cycle
        assert t["hot"] == round(0.1 * t["pages"]) and t["hot"] + t["cold"] == t["pages"]
        assert t["phases_ms"]["total"] > 0 and t["cpu_ms"] >= 0
    ev = out["eviction"]
    assert ev["vms"] == 2 and ev["pages"] == 2 * 512  # the 2 MiB cap of each VM
    for key in ("faults_idle", "faults_during_eviction"):
        f = out[key]
        assert f["faults"] == 512 and 0 < f["p50_us"] <= f["p99_us"]
    g = out["baseline_get"]
    assert g["client"] and 0 < g["p50_us"] <= g["p99_us"]
    check_ratio(
        out["ratio_fault_p50_during_vs_raw_get"], out["faults_during_eviction"]["p50_us"], g["p50_us"]
    )
    check_ratio(out["ratio_evict_rate_vs_raw_put"], ev["pages_per_s"], out["baseline_put"]["pages_per_s"])
    assert out["cpu_per_gib"]["sim_ms_per_cycle"] > 0 and out["cpu_per_gib"]["baseline_numpy_pass_ms"] > 0
    assert list(out["goals"]) == [
        "fault_p50_idle_le_1.3x_raw_get",
        "fault_p50_during_eviction_le_1.3x_raw_get",
    ]


@pytest.mark.kvm
def test_kvm() -> None:
    out = bench("kvm", "--memory-mib", "16", "--duration", "0.3", "--fault-samples", "50")
    for g in ("kvm", "process"):
        assert out[g]["mismatches"] == 0 and out[g]["verified_pages"] > 0
        assert out[g]["off"]["accesses_per_s"] > 0 and out[g]["on"]["accesses_per_s"] > 0
        assert out[g]["latency"]["fault_p50_us"] <= out[g]["latency"]["fault_p99_us"]
    assert out["ratios"]["kvm_on_over_off"] > 0
    # MISSING -> COPY through the node agent, on each of its fault paths
    paths = ["native", "python"] if native.paths()["fault_serve"] == "native" else ["python"]
    assert [a["fault_path"] for a in out["agent_latency"]] == paths
    for a in out["agent_latency"]:
        assert a["faults"] == 50 and a["mismatches"] == 0 and a["verified_pages"] == 16 * 256
        assert a["touch_evicted_p50_us"] <= a["touch_evicted_p99_us"]
        assert a["native_served"] == (50 if a["fault_path"] == "native" else 0)  # every sampled fault
        assert f"agent_{a['fault_path']}_fault_p50_over_pager" in out["ratios"]


@pytest.mark.parametrize("mode", ["uffd", pytest.param("rwp", marks=pytest.mark.rwp)])
def test_fault_and_evict_in_each_mode(mode: str) -> None:
    rows = bench("fault", "--faults", "100", "--no-pin", "--mode", mode, timeout=scaled(110))["rows"]
    assert rows
    for r in rows:
        check_fault_row(r, "local", 100)
        assert r["mode"] == mode
    (e,) = bench("evict", "--pages", "256", "--mode", mode, timeout=scaled(110))["rows"]
    assert (e["mode"], e["pages"], e["bytes_written"]) == (mode, 256, 256 * 4096)


def test_tracking_off_and_uffd() -> None:
    out = bench("tracking", "--modes", "off,uffd")
    off, uffd = out["rows"]
    assert (off["mode"], uffd["mode"], uffd["registered"]) == ("off", "uffd", "uffd")
    assert off["cycles"] == 0 and off["agent_cpu_ms_per_gib_per_cycle"] is None
    assert uffd["cycles"] >= 2 and uffd["agent_cpu_ms_per_gib_per_cycle"] > 0
    assert uffd["hot_pages_last_cycle"] > 0  # the workload's hot set is seen by the emulated tracking
    assert off["mismatches"] == uffd["mismatches"] == 0
    check_ratio(out["access_rate_uffd_vs_off"], uffd["accesses_per_s"], off["accesses_per_s"])


@pytest.mark.rwp
def test_tracking_all_three_modes_on_an_rwp_kernel() -> None:
    out = bench("tracking", timeout=scaled(110))
    assert out["rwp_available"] is True
    rows = {r["mode"]: r for r in out["rows"]}
    assert list(rows) == ["off", "rwp", "uffd"]
    assert rows["rwp"]["registered"] == "rwp" and rows["uffd"]["registered"] == "uffd"
    for m in ("rwp", "uffd"):
        assert rows[m]["cycles"] >= 1 and rows[m]["hot_pages_last_cycle"] > 0 and rows[m]["mismatches"] == 0
    check_ratio(out["access_rate_rwp_vs_off"], rows["rwp"]["accesses_per_s"], rows["off"]["accesses_per_s"])
    check_ratio(out["agent_cpu_per_gib_per_cycle_uffd_vs_rwp"], rows["uffd"]["agent_cpu_ms_per_gib_per_cycle"],
                rows["rwp"]["agent_cpu_ms_per_gib_per_cycle"])  # fmt: skip


def test_agent_with_a_local_store_faults_on_the_native_path(tmp_path: Any) -> None:
    out = bench(
        "agent",
        "--store",
        f"file://{tmp_path}/pages",
        "--sim-vms",
        "2",
        "--sim-mib",
        "8",
        "--guest-mib",
        "4",
        "--cap-mib",
        "2",
        "--interval-ms",
        "50",
    )
    assert out["mismatches"] == 0
    if native.paths()["fault_serve"] != "native":
        assert out["fault_path"] == "python" and out["native_served"] == 0
        return
    assert out["fault_path"] == "native"
    assert out["native_served"] == 1024  # both halves of the 4 MiB guest, idle and during the evictions
    assert out["faults_during_eviction"]["faults"] == 512


@pytest.mark.s3
def test_restore_local_and_s3(s3_srv: Any) -> None:
    out = bench("restore", "--store", s3_srv.url("bench-restore"), timeout=170)
    assert out["size_mib"] == 8 and out["pages"] == 2048
    lr, rg = out["baseline_local_read"], out["baseline_ranged_get"]
    assert lr["pages_per_s"] > 0 and 0 < lr["p50_us"] <= lr["p99_us"]
    assert rg is not None and rg["chunk_pages_per_s"] > 0 and 0 < rg["page_p50_us"] <= rg["page_p99_us"]
    assert [r["store"] for r in out["rows"]] == ["local", "s3"]
    for r in out["rows"]:
        assert r["identical"] and r["pages"] == 2048 and r["first_touch_ms"] > 0
        od, pf = r["on_demand"], r["prefaulted"]
        # every non-zero page was read from the store once per restore, and nothing is left behind
        assert od["store_bytes_read"] == pf["store_bytes_read"] == r["stored_bytes"]
        assert od["pages_prefaulted"] == 0 and od["pages_remaining"] == pf["pages_remaining"] == 0
        assert pf["pages_prefaulted"] > 0 and pf["zero_pages"] == od["zero_pages"] == r["zero_pages"]
        check_ratio(r["ratio_on_demand_vs_local_read"], r["on_demand_pages_per_s"], lr["pages_per_s"])
        check_ratio(r["ratio_prefault_vs_ranged_get"], r["prefault_pages_per_s"], rg["chunk_pages_per_s"])
        check_ratio(r["ratio_first_touch_vs_ranged_get"], r["first_touch_ms"] * 1000, rg["page_p50_us"])
