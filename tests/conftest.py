"""Suite-wide fixtures: capability skips, and real Redis / S3 servers on loopback."""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers.servers import RedisServer, S3Server
from tests.helpers.timing import time_scale


@functools.cache
def uffd_reason() -> str | None:
    """None if the real userfaultfd path can run here, else why not."""
    from tiermem.kernel.probe import probe_host

    rep = probe_host()
    return None if rep.backends["uffd"] else f"real userfaultfd unavailable: {rep.reasons['uffd']}"


@functools.cache
def rwp_reason() -> str | None:
    """None if the kernel has userfaultfd RWP (Linux 7.3+), else why not."""
    from tiermem.kernel.probe import probe_host

    rep = probe_host()
    if rep.backends["rwp"]:
        return None
    return f"needs userfaultfd RWP (Linux 7.3+; `make test-rwp` runs these in a 7.3 VM): {rep.reasons['rwp']}"


@functools.cache
def kvm_reason() -> str | None:
    """None if /dev/kvm works, else why not."""
    from tiermem.kernel.probe import kvm_api_version

    return None if kvm_api_version() == 12 else "/dev/kvm is missing or unusable"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long soak tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    scale = time_scale()
    base_timeout = float(config.getini("timeout") or 0)
    for item in items:
        if scale != 1:  # a slow machine (the kernel-VM tier under TCG): stretch every test's time limit
            m = item.get_closest_marker("timeout")
            limit = float(m.args[0]) if m is not None and m.args else base_timeout
            if limit:
                item.add_marker(pytest.mark.timeout(limit * scale), append=False)
        if "uffd" in item.keywords and (why := uffd_reason()):
            item.add_marker(pytest.mark.skip(reason=why))
        if item.get_closest_marker("rwp") and (why := rwp_reason()):
            item.add_marker(pytest.mark.skip(reason=why))
        if "kvm" in item.keywords and (why := kvm_reason()):
            item.add_marker(pytest.mark.skip(reason=why))
        if "soak" in item.keywords and not config.getoption("--soak"):
            item.add_marker(pytest.mark.skip(reason="soak test: run with --soak"))
        if "redis" in item.keywords and shutil.which("redis-server") is None:
            # make test installs redis-server; a missing binary means a broken setup, so fail loudly.
            item.add_marker(pytest.mark.xfail(reason="redis-server not installed", run=False, strict=True))


@pytest.fixture(scope="session")
def redis_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session (tests namespace their keys by VM id)."""
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def s3_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One real S3 API server (SeaweedFS, or moto's server) for the session."""
    srv = S3Server(tmp_path_factory.mktemp("s3")).start(os.environ.get("TIERMEM_TEST_S3", "weed"))
    old = {k: os.environ.get(k) for k in srv.env()}
    os.environ.update(srv.env())
    yield srv
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    srv.stop()
