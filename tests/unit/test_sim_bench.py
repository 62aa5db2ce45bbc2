"""The scan benchmark in quick mode: it runs, checks itself, and reports every documented field."""

from __future__ import annotations

import json

import pytest

from tiermem.bench import scan


def test_quick_run_reports_every_field() -> None:
    r = scan.run(pages=4096, accessed=0.1, fleet_vms=2, fleet_pages=1024, repeat=1)
    for key in (
        "baseline_count_nonzero_s",
        "rwprotect_s",
        "rwprotect_ratio",
        "scan_clustered_s",
        "scan_scattered_s",
        "scan_clustered_ratio",
        "scan_scattered_ratio",
        "scan_clustered_regions",
        "scan_scattered_regions",
        "state_bytes_per_page",
        "fleet_rss_bytes",
        "fleet_bytes_per_page",
    ):
        assert key in r
    assert r["state_bytes_per_page"] == 1 and r["synthetic_content_bytes_per_page"] == 4
    assert r["scan_scattered_regions"] > r["scan_clustered_regions"] > 0
    assert r["fleet_vms"] == 2 and r["fleet_rss_bytes"] > 0
    text = scan.report(r)
    assert "UFFDIO_RWPROTECT" in text and "fleet: 2 VMs x 1,024 synthetic pages" in text
    assert text.count("goal") == 5  # rwprotect, two scans, state bytes, fleet RSS


def test_main_json_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    scan.main(["--pages", "2048", "--repeat", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["pages"] == 2048
    with pytest.raises(SystemExit):
        scan.main(["--pages", "0"])
