"""The operator's kit in deploy/monitoring: alert rules (promtool), the Grafana dashboard, the ServiceMonitor."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MON = ROOT / "deploy" / "monitoring"
DOCUMENTED = set(re.findall(r"`(tiermem_[a-z_]+)`", (ROOT / "docs" / "metrics.md").read_text()))
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (make test installs prometheus)"
)


def _promtool(*args: str, cwd: Path = MON) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _metrics_in(expr: str) -> set[str]:
    names = set(re.findall(r"\b(tiermem_[a-z_]+?)(?:_bucket|_count|_sum)?\b(?=[{\[\s)]|$)", expr))
    return {n for n in names if not n.endswith(("_bucket", "_count", "_sum"))}


@needs_promtool
def test_alert_rules_check() -> None:
    r = _promtool("check", "rules", "tiermem-rules.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 7 rules found" in r.stdout + r.stderr


@needs_promtool
def test_alert_rules_unit_tests() -> None:
    r = _promtool("test", "rules", "tiermem-rules.test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_rule_unit_tests_can_fail(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a wrong expectation fails them."""
    good = (MON / "tiermem-rules.test.yml").read_text()
    text = good.replace("store: s3, op: get}", "store: s3, op: put}")
    assert text != good
    shutil.copy(MON / "tiermem-rules.yml", tmp_path)
    (tmp_path / "t.yml").write_text(text)
    assert _promtool("test", "rules", "t.yml", cwd=tmp_path).returncode != 0


def test_rules_use_documented_metrics() -> None:
    rules = yaml.safe_load((MON / "tiermem-rules.yml").read_text())["groups"][0]["rules"]
    for rule in rules:
        for name in _metrics_in(rule["expr"]):
            assert name in DOCUMENTED, f"{rule['alert']}: {name} is not in docs/metrics.md"
        assert rule["labels"]["severity"] in ("warning", "critical")


def _dashboard() -> dict[str, Any]:
    return dict(json.loads((MON / "grafana-dashboard.json").read_text()))


def test_dashboard_shape() -> None:
    d = _dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"].lower() for p in d["panels"])
    for want in (
        "fault latency by stage",
        "evictions",
        "promotion rate against the slo",
        "store errors",
        "cycle lag",
    ):
        assert want in titles, want
    assert {v["name"] for v in d["templating"]["list"]} >= {"datasource", "instance"}
    for p in d["panels"]:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            for name in _metrics_in(t["expr"]):
                assert name in DOCUMENTED, f"{p['title']}: {name} is not in docs/metrics.md"


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Every panel query is valid PromQL: promtool checks them as recording rules."""
    rules = []
    for p in _dashboard()["panels"]:
        for t in p["targets"]:
            expr = t["expr"].replace("$__rate_interval", "5m").replace("$instance", ".*")
            rules.append({"record": f"dashboard:panel{p['id']}:{t['refId'].lower()}", "expr": expr})
    f = tmp_path / "dashboard-rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = _promtool("check", "rules", str(f))
    assert r.returncode == 0, r.stdout + r.stderr


def test_servicemonitor_matches_both_services() -> None:
    sm = yaml.safe_load((MON / "servicemonitor.yaml").read_text())
    assert sm["kind"] == "ServiceMonitor" and sm["apiVersion"] == "monitoring.coreos.com/v1"
    sel = sm["spec"]["selector"]["matchLabels"]
    port = sm["spec"]["endpoints"][0]["port"]
    assert sm["spec"]["endpoints"][0]["scheme"] == "http"
    services = [
        d
        for f in sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
        if f.name != "kustomization.yaml"
        for d in yaml.safe_load_all(f.read_text())
        if d and d["kind"] == "Service"
    ]
    matched = [
        s["metadata"]["name"]
        for s in services
        if all(s["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())
        and any(p["name"] == port for p in s["spec"]["ports"])
    ]
    assert sorted(matched) == ["tiermem-agent", "tiermem-controlplane"]
