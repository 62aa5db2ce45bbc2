"""``tiermem doctor`` probes the host and reports backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tiermem.kernel import uapi
from tiermem.kernel.probe import probe_host


def test_doctor_json_shape() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tiermem.cli", "doctor", "--json"], capture_output=True, text=True, check=True
    ).stdout
    data = json.loads(out)
    assert set(data["backends"]) == {"sim", "uffd", "rwp"}
    assert data["backends"]["sim"] is True
    assert isinstance(data["uffd_features"], list)
    assert isinstance(data["kvm"], bool)
    assert isinstance(data["kernel"], str) and data["kernel"]
    if not data["backends"]["rwp"]:
        assert "RWP" in data["backend_reasons"]["rwp"]
    assert data["native"]["sim_scan"] in ("native", "numpy")
    assert data["native"]["fault_serve"] in ("native", "python")


def test_doctor_reports_the_native_paths_and_their_switch() -> None:
    """doctor says which path is active: the built extension by default, the Python paths with
    TIERMEM_NATIVE=0 (``make setup`` builds the extension, so it must be there in this venv)."""
    env = {**os.environ, "TIERMEM_NATIVE": "0"}
    off = json.loads(
        subprocess.run(
            [sys.executable, "-m", "tiermem.cli", "doctor", "--json"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
    )["native"]
    assert off["sim_scan"] == "numpy" and off["fault_serve"] == off["fault_serve_redis"] == "python"
    assert "TIERMEM_NATIVE=0" in off["extension"]
    on = json.loads(
        subprocess.run(
            [sys.executable, "-m", "tiermem.cli", "doctor", "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )["native"]
    assert on["extension"] == "built", on
    assert on["sim_scan"] == "native"
    assert on["fault_serve_redis"] == "native"  # make setup-test installs libhiredis-dev


@pytest.mark.uffd
def test_doctor_agrees_with_feature_bits() -> None:
    rep = probe_host()
    assert rep.backends["uffd"] is True
    # rwp is available exactly when the kernel reports both RWP feature bits.
    has_rwp = bool(rep.features & uapi.UFFD_FEATURE_RWP) and bool(rep.features & uapi.UFFD_FEATURE_RWP_ASYNC)
    assert rep.backends["rwp"] == (has_rwp and rep.backends["rwp"])
    if not has_rwp:
        assert rep.backends["rwp"] is False
        assert "RWP" not in rep.uffd_features


def test_cli_bad_flag_is_user_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tiermem.cli", "doctor", "--bogus"], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
