"""The KVM benchmark runs end to end on a tiny guest (figures are not asserted: timing belongs to the bench)."""

from __future__ import annotations

import pytest

from tiermem.bench import kvm as bench

pytestmark = [pytest.mark.kvm, pytest.mark.uffd]


def test_kvm_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    r = bench.run(memory_mib=16, duration_s=0.9, interval_s=0.05, fault_samples=50)
    for guest in ("kvm", "process"):
        g = r[guest]
        assert g["mismatches"] == 0 and g["verified_pages"] == 16 * 256
        assert g["off"]["accesses"] > 0 and g["on"]["accesses"] > 0
        assert g["off"]["minor_faults"] == 0 and g["on"]["minor_faults"] > 0  # tracking off means no faults
        assert g["latency"]["faults"] == 50
    assert set(r["ratios"]) >= {"kvm_on_over_off", "process_on_over_off", "kvm_fault_p50_over_process"}
    bench._print(r)
    assert "ratios:" in capsys.readouterr().out
