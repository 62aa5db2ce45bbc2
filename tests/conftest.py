"""Suite-wide fixtures: capability checks (tests/helpers/capability.py), and real Redis / S3 servers on loopback."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.capability import REQUIRED, in_ci, redis_reason, require, rwp_reason, s3_reason
from tests.helpers.servers import RedisServer, S3Server
from tests.helpers.timing import time_scale


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long soak tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    scale = time_scale()
    base_timeout = float(config.getini("timeout") or 0)
    for item in items:
        if "soak" in item.keywords and not config.getoption("--soak"):
            item.add_marker(pytest.mark.skip(reason="soak test: run with --soak"))
        if scale != 1:  # a slow machine (the kernel-VM tier under TCG): stretch every test's time limit
            m = item.get_closest_marker("timeout")
            limit = float(m.args[0]) if m is not None and m.args else base_timeout
            if limit:
                item.add_marker(pytest.mark.timeout(limit * scale), append=False)
        # rwp tests skip on kernels without RWP, CI included: `make test-rwp` runs them in a 7.3 VM, where
        # a missing RWP fails them (rwp_reason) instead of letting the tier go green without them.
        if item.get_closest_marker("rwp") and (why := rwp_reason()):
            item.add_marker(pytest.mark.skip(reason=why))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked redis, s3, uffd or kvm needs that capability: skipped without it, failed in CI."""
    for marker, reason in REQUIRED.items():
        if marker in item.keywords:
            require(reason())


@pytest.fixture(scope="session")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (tests namespace their keys by VM id)."""
    require(redis_reason())
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def s3_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One real S3 API server (SeaweedFS; outside CI, moto's server if SeaweedFS is missing) for the session."""
    require(s3_reason())
    srv = S3Server(tmp_path_factory.mktemp("s3")).start(
        os.environ.get("TIERMEM_TEST_S3", "weed"), fallback=not in_ci()
    )
    old = {k: os.environ.get(k) for k in srv.env()}
    os.environ.update(srv.env())
    yield srv
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    srv.stop()
