"""The store benchmark runs end to end and reports figures beside its baselines (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.servers import RedisServer
from tiermem.bench.store import main, run


def _check(res: dict[str, object], baseline: bool) -> None:
    rows = res["throughput"]
    assert isinstance(rows, list) and [r["batch"] for r in rows] == [1, 8]
    for r in rows:
        assert r["put"]["pages_per_s"] > 0 and r["get"]["pages_per_s"] > 0
        assert (r.get("put_ratio") is not None) is baseline
    zero = res["zero_half"]
    assert isinstance(zero, dict) and zero["ratio"] == 0.5  # exactly the non-zero half is stored
    goals = res["goals"]
    assert isinstance(goals, dict) and goals["stored_le_0.55x_input_half_zero"] is True


def test_local(tmp_path: Path) -> None:
    res = run(f"file://{tmp_path}/pages?fsync=0", pages=64, batch_sizes=(1, 8), quick=True)
    _check(res, baseline=True)
    assert res["baseline"] == "os.pwrite / os.pread on one file"
    assert nothing_left(tmp_path / "pages")


def nothing_left(root: Path) -> bool:
    """The benchmark purges its VMs and removes its raw file."""
    return [p.name for p in root.iterdir() if p.name != ".lock"] == []


def test_memory_has_no_baseline() -> None:
    res = run("memory://", pages=64, batch_sizes=(1, 8), quick=True)
    _check(res, baseline=False)
    assert res["goals"]["single_get_p50_le_1.5x_raw"] is None


@pytest.mark.redis
def test_redis_json_cli(redis_srv: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--store", redis_srv.url, "--pages", "64", "--batch-sizes", "1,8", "--quick", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    _check(res, baseline=True)
    assert res["single_get_latency"]["raw_p50_us"] > 0
    assert not list(redis_srv_keys(redis_srv))


def redis_srv_keys(srv: RedisServer) -> list[bytes]:
    import redis

    client = redis.Redis.from_url(srv.url)
    try:
        return list(client.scan_iter(match="tiermem-bench-raw:*")) + list(
            client.scan_iter(match="tiermem:{bench-*")
        )
    finally:
        client.close()
