"""Guard rails of the suite itself: a missing required capability is a skip with its reason, a failure in CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.capability import in_ci, require

ROOT = Path(__file__).resolve().parents[2]

_NEEDS_REDIS = """
import pytest

@pytest.mark.redis
def test_needs_redis():
    pass
"""


def _run_pytest(tmp_path: Path, *, path: str, ci: str | None) -> subprocess.CompletedProcess[str]:
    """pytest with the suite's conftest as a plugin, on a one-test file marked ``redis``."""
    (tmp_path / "test_needs_redis.py").write_text(_NEEDS_REDIS)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = path
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
            str(tmp_path / "test_needs_redis.py"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_missing_redis_server_is_a_skip_with_its_reason_outside_ci(tmp_path: Path) -> None:
    r = _run_pytest(tmp_path, path=str(tmp_path / "empty-bin"), ci=None)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 skipped" in r.stdout and "redis-server is not installed" in r.stdout


def test_missing_redis_server_fails_the_run_under_ci(tmp_path: Path) -> None:
    r = _run_pytest(tmp_path, path=str(tmp_path / "empty-bin"), ci="true")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "required capability missing under CI=true: redis-server is not installed" in r.stdout
    assert "skipped" not in r.stdout


def test_present_redis_server_runs_the_test_under_ci(tmp_path: Path) -> None:
    r = _run_pytest(tmp_path, path=os.environ.get("PATH", ""), ci="true")
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("value", "ci"), [("true", True), ("TRUE", True), ("1", True), ("false", False), ("", False)]
)
def test_in_ci_reads_the_ci_variable(monkeypatch: pytest.MonkeyPatch, value: str, ci: bool) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci() is ci


def test_require(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    require(None)  # present: nothing happens
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="no widget"):
        require("no widget")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required capability missing under CI=true: no widget"):
        require("no widget")
